//! Window aggregation (`[[aggregate]]`): downsampled history. Over each window (aligned to the
//! clock: a 1-minute window runs from one minute to the next) every gauge series becomes
//! `<name>_min`, `_max`, `_mean`, `_last` and `_count`, and every counter its increase,
//! `<name without _total>_increase` (a drop is a counter reset, as in Prometheus' `increase`).
//! The result is a batch from the source named by the aggregate, stamped at the window's
//! start, and routed like any other batch: raw data to one sink, rollups to another.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use globset::GlobSet;
use metricsd_plugin_api::{Batch, BatchBuilder, MetricKind};

use crate::config::{AggregateConfig, Stat};

/// A series: family name, kind, unit, help, and its labels sorted by name.
#[derive(Clone, PartialEq, Eq, Hash)]
struct SeriesKey {
    name: String,
    kind: MetricKind,
    labels: Vec<(String, String)>,
}

#[derive(Clone)]
struct Acc {
    min: f64,
    max: f64,
    sum: f64,
    count: u64,
    last: f64,
    /// Counters: the increase within the window so far.
    increase: f64,
}

#[derive(Default)]
struct SeriesState {
    /// Metadata of the family.
    help: String,
    unit: String,
    /// Counters: the last value seen (in this or an earlier window).
    previous: Option<f64>,
    /// The open window's accumulator (None: no sample yet in it).
    acc: Option<Acc>,
    /// Windows since the series was last seen (state is forgotten after a few).
    idle: u32,
}

struct State {
    /// Start (ms) of the open window.
    window_start: Option<i64>,
    series: HashMap<SeriesKey, SeriesState>,
    /// Samples that arrived for a window already emitted.
    late: u64,
}

/// One `[[aggregate]]`.
pub struct Aggregator {
    /// The source name of its batches.
    pub name: String,
    from: BTreeSet<String>,
    metrics: Option<GlobSet>,
    window_ms: i64,
    stats: Vec<Stat>,
    /// Static labels (the pipeline adds them again to the output).
    static_labels: Vec<String>,
    state: Mutex<State>,
}

impl Aggregator {
    /// Builds an aggregator from its config.
    pub fn new(config: &AggregateConfig, static_labels: Vec<String>) -> Self {
        Self {
            name: config.name.clone(),
            from: config.from.iter().cloned().collect(),
            metrics: crate::pipeline::globset(&config.metrics),
            window_ms: i64::try_from(config.window.as_millis()).unwrap_or(i64::MAX),
            stats: config.stats.clone(),
            static_labels,
            state: Mutex::new(State {
                window_start: None,
                series: HashMap::new(),
                late: 0,
            }),
        }
    }

    /// Whether batches of `source` are aggregated here.
    pub fn takes(&self, source: &str) -> bool {
        self.from.contains(source)
    }

    /// The window length.
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms.max(0) as u64)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Samples that came after their window was emitted (dropped).
    pub fn late_samples(&self) -> u64 {
        self.lock().late
    }

    /// Adds a batch (after the pipeline's relabelling); returns the batch of a window this
    /// batch's timestamp closed, if any.
    pub fn observe(&self, batch: &Batch) -> Option<Batch> {
        let ts = batch.timestamp_ms.into_option()?;
        let start = ts.div_euclid(self.window_ms) * self.window_ms;
        let mut st = self.lock();
        let mut emitted = None;
        match st.window_start {
            None => st.window_start = Some(start),
            Some(open) if start > open => {
                emitted = Some(self.emit(&mut st));
                st.window_start = Some(start);
            }
            _ => {}
        }
        let open = st.window_start.unwrap_or(start);
        for s in batch.samples.iter() {
            let Some(family) = batch.family_of(s) else {
                continue;
            };
            if !matches!(family.kind, MetricKind::GAUGE | MetricKind::COUNTER) {
                continue;
            }
            if self
                .metrics
                .as_ref()
                .is_some_and(|m| !m.is_match(family.name.as_str()))
            {
                continue;
            }
            let sample_ts = s.timestamp_ms.into_option().unwrap_or(ts);
            if sample_ts < open {
                st.late += 1;
                continue;
            }
            if !s.value.is_finite() {
                continue;
            }
            let mut labels: Vec<(String, String)> = batch
                .labels_of(s)
                .filter(|l| !self.static_labels.iter().any(|n| n == l.name.as_str()))
                .map(|l| (l.name.to_string(), l.value.to_string()))
                .collect();
            labels.sort();
            let key = SeriesKey {
                name: family.name.to_string(),
                kind: family.kind,
                labels,
            };
            let series = st.series.entry(key).or_insert_with(|| SeriesState {
                help: family.help.to_string(),
                unit: family.unit.to_string(),
                ..SeriesState::default()
            });
            series.idle = 0;
            let v = s.value;
            let delta = match (family.kind, series.previous) {
                (MetricKind::COUNTER, Some(prev)) if v >= prev => v - prev,
                // A counter that went down was reset: it counted `v` since.
                (MetricKind::COUNTER, Some(_)) => v,
                _ => 0.0,
            };
            if family.kind == MetricKind::COUNTER {
                series.previous = Some(v);
            }
            match &mut series.acc {
                Some(a) => {
                    a.min = a.min.min(v);
                    a.max = a.max.max(v);
                    a.sum += v;
                    a.count += 1;
                    a.last = v;
                    a.increase += delta;
                }
                None => {
                    series.acc = Some(Acc {
                        min: v,
                        max: v,
                        sum: v,
                        count: 1,
                        last: v,
                        increase: delta,
                    })
                }
            }
        }
        emitted.filter(|b| !b.samples.is_empty())
    }

    /// Emits the open window if it ended before `now_ms` minus `grace_ms` (batches of the
    /// window may still be on their way until then).
    pub fn flush_due(&self, now_ms: i64, grace_ms: i64) -> Option<Batch> {
        let mut st = self.lock();
        let open = st.window_start?;
        if open + self.window_ms + grace_ms > now_ms {
            return None;
        }
        let batch = self.emit(&mut st);
        st.window_start = Some(open + self.window_ms);
        (!batch.samples.is_empty()).then_some(batch)
    }

    /// Emits the open window as it is (shutdown).
    pub fn flush_now(&self) -> Option<Batch> {
        let mut st = self.lock();
        st.window_start?;
        let batch = self.emit(&mut st);
        st.window_start = None;
        (!batch.samples.is_empty()).then_some(batch)
    }

    /// The open window's batch; resets the accumulators.
    fn emit(&self, st: &mut State) -> Batch {
        let start = st.window_start.unwrap_or(0);
        let window = humantime::format_duration(self.window()).to_string();
        let mut out = BatchBuilder::new();
        let mut keys: Vec<&SeriesKey> = st.series.keys().collect();
        keys.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.labels.cmp(&b.labels)));
        for key in keys {
            let Some(series) = st.series.get(key) else {
                continue;
            };
            let Some(acc) = &series.acc else {
                continue;
            };
            let labels: Vec<(&str, &str)> = key
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let set = out.label_set(&labels);
            if key.kind == MetricKind::COUNTER {
                let base = key.name.strip_suffix("_total").unwrap_or(&key.name);
                let f = out.gauge(
                    &format!("{base}_increase"),
                    &format!("Increase of {} over {window}.", key.name),
                    &series.unit,
                );
                out.sample_in(f, set, acc.increase);
                continue;
            }
            for stat in &self.stats {
                let (suffix, value, unit) = match stat {
                    Stat::Min => ("min", acc.min, series.unit.as_str()),
                    Stat::Max => ("max", acc.max, series.unit.as_str()),
                    Stat::Mean => ("mean", acc.sum / acc.count as f64, series.unit.as_str()),
                    Stat::Last => ("last", acc.last, series.unit.as_str()),
                    Stat::Count => ("count", acc.count as f64, ""),
                };
                let f = out.gauge(
                    &format!("{}_{suffix}", key.name),
                    &format!(
                        "{} ({suffix} over {window})",
                        series.help.trim_end_matches('.')
                    ),
                    unit,
                );
                out.sample_in(f, set, value);
            }
        }
        for series in st.series.values_mut() {
            if series.acc.take().is_none() {
                series.idle += 1;
            }
        }
        // Forget series gone for three windows (a counter that comes back starts afresh).
        st.series.retain(|_, s| s.idle < 3);
        out.timestamp_ms(start);
        out.finish()
    }
}

/// The labels of a batch's sample as owned pairs (for tests).
#[cfg(test)]
fn labels_of(batch: &Batch, i: usize) -> Vec<(String, String)> {
    let s = &batch.samples[i];
    batch
        .labels_of(s)
        .map(|l| (l.name.to_string(), l.value.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(window: &str, metrics: &[&str]) -> AggregateConfig {
        AggregateConfig {
            name: "rollup".into(),
            from: vec!["c".into()],
            metrics: metrics.iter().map(|m| m.to_string()).collect(),
            window: humantime::parse_duration(window).expect("window"),
            stats: Stat::all(),
        }
    }

    fn batch(ts: i64, temp: f64, energy: f64) -> Batch {
        let mut b = BatchBuilder::new();
        let t = b.gauge("gpu_temperature_celsius", "GPU temperature.", "celsius");
        let e = b.counter("gpu_energy_joules_total", "Energy.", "joules");
        let set = b.label_set(&[("gpu", "0")]);
        b.sample_in(t, set, temp);
        b.sample_in(e, set, energy);
        b.common_label("node", "n1");
        b.timestamp_ms(ts);
        b.finish()
    }

    fn value(b: &Batch, name: &str) -> Option<f64> {
        b.samples
            .iter()
            .find(|s| b.family_of(s).is_some_and(|f| f.name.as_str() == name))
            .map(|s| s.value)
    }

    #[test]
    fn gauges_become_min_max_mean_last_count_and_counters_their_increase() {
        let agg = Aggregator::new(&config("10s", &[]), vec!["node".into()]);
        assert!(agg.observe(&batch(100_000, 60.0, 1000.0)).is_none());
        assert!(agg.observe(&batch(103_000, 70.0, 1500.0)).is_none());
        // A counter reset inside the window: 1500 → 200 counts 200.
        assert!(agg.observe(&batch(106_000, 62.0, 200.0)).is_none());
        let out = agg
            .observe(&batch(110_000, 50.0, 300.0))
            .expect("window closed");
        assert_eq!(out.timestamp_ms.into_option(), Some(100_000));
        assert_eq!(value(&out, "gpu_temperature_celsius_min"), Some(60.0));
        assert_eq!(value(&out, "gpu_temperature_celsius_max"), Some(70.0));
        assert_eq!(value(&out, "gpu_temperature_celsius_mean"), Some(64.0));
        assert_eq!(value(&out, "gpu_temperature_celsius_last"), Some(62.0));
        assert_eq!(value(&out, "gpu_temperature_celsius_count"), Some(3.0));
        assert_eq!(
            value(&out, "gpu_energy_joules_increase"),
            Some(500.0 + 200.0)
        );
        // Own labels kept, static labels left for the pipeline to add again.
        assert_eq!(
            labels_of(&out, 0),
            vec![("gpu".to_string(), "0".to_string())]
        );
        // The next window's increase starts from the last value of this one.
        let next = agg.flush_now().expect("partial window");
        assert_eq!(value(&next, "gpu_energy_joules_increase"), Some(100.0));
        assert_eq!(next.timestamp_ms.into_option(), Some(110_000));
    }

    #[test]
    fn the_clock_closes_a_window_after_the_grace_and_late_samples_are_counted() {
        let agg = Aggregator::new(&config("10s", &["gpu_temp*"]), Vec::new());
        agg.observe(&batch(100_000, 60.0, 1.0));
        assert!(agg.flush_due(110_500, 1_000).is_none(), "within the grace");
        let out = agg.flush_due(111_000, 1_000).expect("due");
        assert_eq!(value(&out, "gpu_temperature_celsius_max"), Some(60.0));
        assert_eq!(
            value(&out, "gpu_energy_joules_increase"),
            None,
            "not matched"
        );
        agg.observe(&batch(105_000, 1.0, 1.0));
        assert_eq!(agg.late_samples(), 1);
        assert!(agg.flush_now().is_none(), "nothing in the open window");
    }
}
