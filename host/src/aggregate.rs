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

/// A series' labels (static labels left out), sorted by name.
type SeriesLabels = Vec<(String, String)>;

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
    /// Counters: the last value seen (in this or an earlier window).
    previous: Option<f64>,
    /// The open window's accumulator (None: no sample yet in it).
    acc: Option<Acc>,
    /// Windows since the series was last seen (state is forgotten after a few).
    idle: u32,
}

/// The series of one metric family.
struct FamilyState {
    kind: MetricKind,
    help: String,
    unit: String,
    series: HashMap<SeriesLabels, SeriesState>,
}

struct State {
    /// Start (ms) of the open window.
    window_start: Option<i64>,
    /// By family name.
    families: HashMap<String, FamilyState>,
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
                families: HashMap::new(),
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

    /// Adds a batch (after the pipeline's relabelling); returns the batch of a window this
    /// batch's timestamp closed, if any, and the number of samples left out because their
    /// window was already emitted.
    pub fn observe(&self, batch: &Batch) -> (Option<Batch>, usize) {
        let Some(ts) = batch.timestamp_ms.into_option() else {
            return (None, 0);
        };
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
        // Decided once per family and built once per label set, not per sample.
        let take: Vec<bool> = batch
            .families
            .iter()
            .map(|f| {
                matches!(f.kind, MetricKind::GAUGE | MetricKind::COUNTER)
                    && self
                        .metrics
                        .as_ref()
                        .is_none_or(|m| m.is_match(f.name.as_str()))
            })
            .collect();
        let mut set_labels: Vec<Option<SeriesLabels>> = vec![None; batch.label_sets.len()];
        let mut late = 0;
        for s in batch.samples.iter() {
            let Some(family) = batch.family_of(s) else {
                continue;
            };
            if !take[s.family as usize] || !s.value.is_finite() {
                continue;
            }
            if s.timestamp_ms.into_option().unwrap_or(ts) < open {
                late += 1;
                continue;
            }
            let Some(slot) = set_labels.get_mut(s.labels as usize) else {
                continue;
            };
            let labels = slot.get_or_insert_with(|| {
                let mut labels: SeriesLabels = batch
                    .labels_of(s)
                    .filter(|l| !self.static_labels.iter().any(|n| n == l.name.as_str()))
                    .map(|l| (l.name.to_string(), l.value.to_string()))
                    .collect();
                labels.sort();
                labels
            });
            let fam = match st.families.get_mut(family.name.as_str()) {
                Some(f) => f,
                None => st
                    .families
                    .entry(family.name.to_string())
                    .or_insert_with(|| FamilyState {
                        kind: family.kind,
                        help: family.help.to_string(),
                        unit: family.unit.to_string(),
                        series: HashMap::new(),
                    }),
            };
            if fam.kind != family.kind {
                // The same name arrives with another kind: its rollup would mix the two.
                continue;
            }
            let kind = fam.kind;
            let series = match fam.series.get_mut(labels.as_slice()) {
                Some(series) => series,
                None => fam.series.entry(labels.clone()).or_default(),
            };
            series.idle = 0;
            let v = s.value;
            let delta = match (kind, series.previous) {
                (MetricKind::COUNTER, Some(prev)) if v >= prev => v - prev,
                // A counter that went down was reset: it counted `v` since.
                (MetricKind::COUNTER, Some(_)) => v,
                _ => 0.0,
            };
            if kind == MetricKind::COUNTER {
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
        (emitted.filter(|b| !b.samples.is_empty()), late)
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
        let mut names: Vec<&String> = st.families.keys().collect();
        names.sort();
        for name in names {
            let Some(fam) = st.families.get(name) else {
                continue;
            };
            let mut series: Vec<(&SeriesLabels, &Acc)> = fam
                .series
                .iter()
                .filter_map(|(labels, s)| s.acc.as_ref().map(|acc| (labels, acc)))
                .collect();
            if series.is_empty() {
                continue;
            }
            series.sort_by(|a, b| a.0.cmp(b.0));
            // The output families of this family, declared once.
            let outputs: Vec<(Option<Stat>, metricsd_plugin_api::FamilyId)> =
                if fam.kind == MetricKind::COUNTER {
                    let base = name.strip_suffix("_total").unwrap_or(name);
                    vec![(
                        None,
                        out.gauge(
                            &format!("{base}_increase"),
                            &format!("Increase of {name} over {window}."),
                            &fam.unit,
                        ),
                    )]
                } else {
                    self.stats
                        .iter()
                        .map(|stat| {
                            let (suffix, unit) = match stat {
                                Stat::Min => ("min", fam.unit.as_str()),
                                Stat::Max => ("max", fam.unit.as_str()),
                                Stat::Mean => ("mean", fam.unit.as_str()),
                                Stat::Last => ("last", fam.unit.as_str()),
                                Stat::Count => ("count", ""),
                            };
                            let id = out.gauge(
                                &format!("{name}_{suffix}"),
                                &format!(
                                    "{} ({suffix} over {window})",
                                    fam.help.trim_end_matches('.')
                                ),
                                unit,
                            );
                            (Some(*stat), id)
                        })
                        .collect()
                };
            for (labels, acc) in series {
                let pairs: Vec<(&str, &str)> = labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let set = out.label_set(&pairs);
                for (stat, id) in &outputs {
                    let value = match stat {
                        None => acc.increase,
                        Some(Stat::Min) => acc.min,
                        Some(Stat::Max) => acc.max,
                        Some(Stat::Mean) => acc.sum / acc.count as f64,
                        Some(Stat::Last) => acc.last,
                        Some(Stat::Count) => acc.count as f64,
                    };
                    out.sample_in(*id, set, value);
                }
            }
        }
        for fam in st.families.values_mut() {
            for series in fam.series.values_mut() {
                if series.acc.take().is_none() {
                    series.idle += 1;
                }
            }
            // Forget series gone for three windows (a counter that comes back starts afresh).
            fam.series.retain(|_, s| s.idle < 3);
        }
        st.families.retain(|_, f| !f.series.is_empty());
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
        assert!(agg.observe(&batch(100_000, 60.0, 1000.0)).0.is_none());
        assert!(agg.observe(&batch(103_000, 70.0, 1500.0)).0.is_none());
        // A counter reset inside the window: 1500 → 200 counts 200.
        assert!(agg.observe(&batch(106_000, 62.0, 200.0)).0.is_none());
        let out = agg
            .observe(&batch(110_000, 50.0, 300.0))
            .0
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
        assert_eq!(
            agg.observe(&batch(105_000, 1.0, 1.0)).1,
            1,
            "one late sample"
        );
        assert!(agg.flush_now().is_none(), "nothing in the open window");
    }
}
