//! metricsd sink that serves the latest value of every series in the Prometheus text format
//! 0.0.4, or OpenMetrics 1.0 when the scraper asks for it, through the host's metrics listener.
//!
//! A scrape never waits on a collection: it answers from the values this sink holds, rendered
//! once per change and cached (gzip variants too). Series that their collector stops reporting
//! are removed after `stale_after`.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use flate2::write::GzEncoder;
use flate2::Compression;
use metricsd_plugin_api::exposition::{
    push_help, push_help_openmetrics, push_label_value, push_value,
};
use metricsd_plugin_api::{
    export_plugin, Batch, Context, Error, Header, HttpRequest, HttpResponse, MetricKind, Result,
    Sink,
};
use serde::Deserialize;

/// Content type of the text format 0.0.4.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of OpenMetrics 1.0.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The instance's `[sinks.config]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Path served on the host's metrics listener.
    #[serde(default = "default_path")]
    pub path: String,
    /// A series not updated for this long is removed.
    #[serde(default = "default_stale_after", with = "humantime_serde")]
    pub stale_after: Duration,
    /// Answer with OpenMetrics when the scraper's `Accept` asks for it.
    #[serde(default = "yes")]
    pub openmetrics: bool,
    /// Compress with gzip when the scraper's `Accept-Encoding` allows it.
    #[serde(default = "yes")]
    pub gzip: bool,
    /// Most series held; new series beyond it are dropped (and logged) to bound memory.
    #[serde(default = "default_max_series")]
    pub max_series: usize,
}

fn default_path() -> String {
    "/metrics".to_string()
}

fn default_stale_after() -> Duration {
    Duration::from_secs(60)
}

fn yes() -> bool {
    true
}

fn default_max_series() -> usize {
    1_000_000
}

/// Sorted label pairs: the identity of a series within its family.
type LabelKey = Arc<[(Box<str>, Box<str>)]>;

struct SeriesState {
    value: f64,
    seen: Instant,
}

struct FamilyState {
    help: String,
    unit: String,
    kind: MetricKind,
    series: HashMap<LabelKey, SeriesState>,
}

/// The four bodies of one state. Each write renders the variants scrapers have asked for, so
/// a scrape only copies bytes; a variant asked for the first time is rendered by that scrape.
#[derive(Default)]
struct Rendered {
    variants: [OnceLock<Vec<u8>>; 4],
    /// When the oldest series held goes stale: a scrape after that rebuilds (no writes may come).
    expires: Option<Instant>,
}

/// Index into [`Rendered::variants`]: OpenMetrics bit 1, gzip bit 0.
fn variant(openmetrics: bool, gzip: bool) -> usize {
    usize::from(openmetrics) * 2 + usize::from(gzip)
}

#[derive(Default)]
struct Store {
    families: BTreeMap<String, FamilyState>,
    series: usize,
    /// Kind conflicts and capacity drops already logged (log once).
    reported: std::collections::HashSet<String>,
    last_sweep: Option<Instant>,
}

impl Store {
    fn body(&self, variant: usize) -> Vec<u8> {
        let raw = if variant >= 2 {
            render_openmetrics(&self.families)
        } else {
            render_text(&self.families)
        };
        if variant % 2 == 1 {
            gzip(&raw)
        } else {
            raw
        }
    }

    fn oldest_seen(&self) -> Option<Instant> {
        self.families
            .values()
            .flat_map(|f| f.series.values().map(|s| s.seen))
            .min()
    }
}

/// The sink instance.
pub struct PrometheusSink {
    config: Config,
    store: Mutex<Store>,
    /// What scrapes read; replaced (never mutated in place) by writes.
    cache: RwLock<Arc<Rendered>>,
    /// Variants scrapers have asked for, pre-rendered by each write.
    wanted: [AtomicBool; 4],
}

impl Store {
    /// Removes series not seen within `stale_after`; at most once a second.
    fn sweep(&mut self, now: Instant, stale_after: Duration) {
        if self
            .last_sweep
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1).min(stale_after))
        {
            return;
        }
        self.last_sweep = Some(now);
        let mut removed = 0;
        self.families.retain(|_, f| {
            let before = f.series.len();
            f.series
                .retain(|_, s| now.duration_since(s.seen) <= stale_after);
            removed += before - f.series.len();
            !f.series.is_empty()
        });
        if removed > 0 {
            self.series -= removed;
        }
    }
}

/// Effective labels of each label set of a batch (own + common), sorted by name.
fn label_keys(batch: &Batch) -> Vec<LabelKey> {
    batch
        .label_sets
        .iter()
        .map(|own| {
            let mut pairs: Vec<(Box<str>, Box<str>)> = own
                .iter()
                .chain(
                    batch
                        .common_labels
                        .iter()
                        .filter(|c| !own.iter().any(|l| l.name == c.name)),
                )
                .map(|l| (Box::from(l.name.as_str()), Box::from(l.value.as_str())))
                .collect();
            pairs.sort_by(|a, b| a.0.cmp(&b.0));
            pairs.dedup_by(|a, b| a.0 == b.0);
            LabelKey::from(pairs)
        })
        .collect()
}

fn kinds_compatible(a: MetricKind, b: MetricKind) -> bool {
    a == b
}

impl PrometheusSink {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Store>> {
        self.store
            .lock()
            .map_err(|_| Error::fatal("prometheus sink state lock poisoned"))
    }

    /// Builds the cache for the current state: the wanted variants, eagerly.
    fn rebuild(&self, store: &mut Store, now: Instant) -> Arc<Rendered> {
        store.sweep(now, self.config.stale_after);
        let rendered = Rendered {
            expires: store.oldest_seen().map(|t| t + self.config.stale_after),
            ..Rendered::default()
        };
        for (i, wanted) in self.wanted.iter().enumerate() {
            if wanted.load(Ordering::Relaxed) {
                let _ = rendered.variants[i].set(store.body(i));
            }
        }
        let rendered = Arc::new(rendered);
        if let Ok(mut cache) = self.cache.write() {
            *cache = Arc::clone(&rendered);
        }
        rendered
    }

    /// The body of one variant, from the cache when it can be.
    fn body(&self, variant: usize) -> Result<Vec<u8>> {
        self.wanted[variant].store(true, Ordering::Relaxed);
        let now = Instant::now();
        let cached = self
            .cache
            .read()
            .map(|c| Arc::clone(&c))
            .map_err(|_| Error::fatal("prometheus sink cache lock poisoned"))?;
        let cached = if cached.expires.is_some_and(|t| now > t) {
            let mut store = self.lock()?;
            self.rebuild(&mut store, now)
        } else {
            cached
        };
        if let Some(body) = cached.variants[variant].get() {
            return Ok(body.clone());
        }
        let body = self.lock()?.body(variant);
        Ok(cached.variants[variant].get_or_init(|| body).clone())
    }
}

/// Renders the text format 0.0.4.
fn render_text(families: &BTreeMap<String, FamilyState>) -> Vec<u8> {
    let mut out = String::with_capacity(families.values().map(|f| f.series.len() * 64).sum());
    for (name, f) in families {
        out.push_str("# HELP ");
        out.push_str(name);
        out.push(' ');
        push_help(&mut out, &f.help);
        out.push_str("\n# TYPE ");
        out.push_str(name);
        out.push_str(match f.kind {
            MetricKind::COUNTER => " counter\n",
            MetricKind::GAUGE | MetricKind::INFO => " gauge\n",
            _ => " untyped\n",
        });
        write_series(&mut out, name, f);
    }
    out.into_bytes()
}

fn write_series(out: &mut String, sample_name: &str, f: &FamilyState) {
    let mut series: Vec<(&LabelKey, &SeriesState)> = f.series.iter().collect();
    series.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (labels, s) in series {
        out.push_str(sample_name);
        if !labels.is_empty() {
            out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(k);
                out.push_str("=\"");
                push_label_value(out, v);
                out.push('"');
            }
            out.push('}');
        }
        out.push(' ');
        push_value(out, s.value);
        out.push('\n');
    }
}

/// Renders OpenMetrics 1.0: counters are described without `_total` and sampled with it, info
/// families without `_info` and sampled with it, `# UNIT` where the name ends in the unit.
fn render_openmetrics(families: &BTreeMap<String, FamilyState>) -> Vec<u8> {
    let mut out = String::with_capacity(families.values().map(|f| f.series.len() * 64).sum());
    for (name, f) in families {
        let (descriptor, sample_name, kind) = match f.kind {
            MetricKind::COUNTER => match name.strip_suffix("_total") {
                Some(base) => (base.to_string(), name.clone(), "counter"),
                None => (name.clone(), format!("{name}_total"), "counter"),
            },
            MetricKind::INFO => match name.strip_suffix("_info") {
                Some(base) => (base.to_string(), name.clone(), "info"),
                None => (name.clone(), format!("{name}_info"), "info"),
            },
            MetricKind::GAUGE => (name.clone(), name.clone(), "gauge"),
            _ => (name.clone(), name.clone(), "unknown"),
        };
        out.push_str("# TYPE ");
        out.push_str(&descriptor);
        out.push(' ');
        out.push_str(kind);
        out.push('\n');
        if !f.unit.is_empty() && descriptor.ends_with(&format!("_{}", f.unit)) {
            out.push_str("# UNIT ");
            out.push_str(&descriptor);
            out.push(' ');
            out.push_str(&f.unit);
            out.push('\n');
        }
        out.push_str("# HELP ");
        out.push_str(&descriptor);
        out.push(' ');
        push_help_openmetrics(&mut out, &f.help);
        out.push('\n');
        write_series(&mut out, &sample_name, f);
    }
    out.push_str("# EOF\n");
    out.into_bytes()
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::with_capacity(body.len() / 4 + 64), Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(body);
    enc.finish().unwrap_or_default()
}

fn accepts(request: &HttpRequest, header: &str, token: &str) -> bool {
    request.header(header).is_some_and(|v| {
        v.split(',').any(|part| {
            let mut fields = part.split(';');
            let value = fields.next().unwrap_or("").trim();
            let refused = fields.any(|q| {
                q.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            value.eq_ignore_ascii_case(token) && !refused
        })
    })
}

impl Sink for PrometheusSink {
    type Config = Config;

    fn validate(config: &Config) -> Result<()> {
        if !config.path.starts_with('/') {
            return Err(Error::config(format!(
                "`path` must start with /, got `{}`",
                config.path
            )));
        }
        if config.stale_after.is_zero() {
            return Err(Error::config("`stale_after` must be greater than 0"));
        }
        Ok(())
    }

    fn new(config: Config, _ctx: &Context) -> Result<Self> {
        Ok(PrometheusSink {
            config,
            store: Mutex::new(Store::default()),
            cache: RwLock::new(Arc::new(Rendered::default())),
            // The text format is what most scrapers get; have it ready from the first write.
            wanted: [true, false, false, false].map(AtomicBool::new),
        })
    }

    fn http_paths(&self) -> Vec<String> {
        vec![self.config.path.clone()]
    }

    fn write(&self, batch: &Batch) -> Result<()> {
        let now = Instant::now();
        let keys = label_keys(batch);
        let mut guard = self.lock()?;
        let store = &mut *guard;
        store.sweep(now, self.config.stale_after);
        // Resolve each family once: None when its kind conflicts with what is held.
        let mut accept = Vec::with_capacity(batch.families.len());
        for family in batch.families.iter() {
            let name = family.name.as_str();
            let ok = match store.families.get_mut(name) {
                Some(existing) if !kinds_compatible(existing.kind, family.kind) => {
                    if store.reported.insert(format!("kind:{name}")) {
                        tracing::error!(
                            "metric `{name}` arrives as {} but is held as {}; the {} samples are dropped so the exposition stays valid",
                            family.kind.as_str(),
                            existing.kind.as_str(),
                            family.kind.as_str()
                        );
                    }
                    false
                }
                Some(existing) => {
                    if existing.help.is_empty() && !family.help.is_empty() {
                        existing.help = family.help.to_string();
                    }
                    true
                }
                None => {
                    store.families.insert(
                        name.to_string(),
                        FamilyState {
                            help: family.help.to_string(),
                            unit: family.unit.to_string(),
                            kind: family.kind,
                            series: HashMap::new(),
                        },
                    );
                    true
                }
            };
            accept.push(ok);
        }
        let mut dropped_new = 0usize;
        for s in batch.samples.iter() {
            let (Some(family), Some(key)) = (
                batch.families.get(s.family as usize),
                keys.get(s.labels as usize),
            ) else {
                continue;
            };
            if !accept[s.family as usize] {
                continue;
            }
            let Some(state) = store.families.get_mut(family.name.as_str()) else {
                continue;
            };
            match state.series.get_mut(&key[..]) {
                Some(existing) => {
                    existing.value = s.value;
                    existing.seen = now;
                }
                None if store.series >= self.config.max_series => dropped_new += 1,
                None => {
                    state.series.insert(
                        Arc::clone(key),
                        SeriesState {
                            value: s.value,
                            seen: now,
                        },
                    );
                    store.series += 1;
                }
            }
        }
        // A family declared but left without series (all dropped) must not linger.
        store.families.retain(|_, f| !f.series.is_empty());
        if dropped_new > 0 && store.reported.insert("max_series".to_string()) {
            tracing::error!(
                "max_series ({}) reached: {dropped_new} new series dropped; raise max_series or drop labels",
                self.config.max_series
            );
        }
        self.rebuild(store, now);
        Ok(())
    }

    fn render(&self, request: &HttpRequest) -> Result<HttpResponse> {
        let openmetrics =
            self.config.openmetrics && accepts(request, "accept", "application/openmetrics-text");
        let gzip_ok = self.config.gzip && accepts(request, "accept-encoding", "gzip");
        let body = self.body(variant(openmetrics, gzip_ok))?;
        let content_type = if openmetrics {
            OPENMETRICS_CONTENT_TYPE
        } else {
            TEXT_CONTENT_TYPE
        };
        let mut headers: Vec<Header> = vec![Header {
            name: "vary".into(),
            value: "accept, accept-encoding".into(),
        }];
        if gzip_ok {
            headers.push(Header {
                name: "content-encoding".into(),
                value: "gzip".into(),
            });
        }
        Ok(HttpResponse {
            status: 200,
            content_type: content_type.into(),
            headers: headers.into_iter().collect(),
            body: body.into(),
        })
    }
}

export_plugin! {
    name: "prometheus",
    description: "Serves the latest samples in the Prometheus text and OpenMetrics formats",
    sink: PrometheusSink,
}

#[cfg(test)]
mod tests {
    use super::*;
    use metricsd_plugin_api::testing::SinkHarness;
    use metricsd_plugin_api::BatchBuilder;

    fn get(h: &SinkHarness, accept: &str) -> String {
        let request = HttpRequest {
            method: "GET".into(),
            path: "/metrics".into(),
            headers: vec![Header {
                name: "accept".into(),
                value: accept.into(),
            }]
            .into_iter()
            .collect(),
            ..HttpRequest::default()
        };
        let sink_response = h.render(&request).expect("render");
        String::from_utf8(sink_response.body.into_vec()).expect("utf-8")
    }

    fn batch() -> Batch {
        let mut b = BatchBuilder::new();
        let temp = b.gauge("gpu_temperature_celsius", "Die \"temp\"\\\nline", "celsius");
        let energy = b.counter("gpu_energy_consumed_joules_total", "Energy.", "joules");
        let info = b.info("gpu_info", "Identity.");
        let set = b.label_set(&[("gpu", "0"), ("name", "H100 \"SXM\"\\ \n é")]);
        b.sample_in(temp, set, 61.5);
        b.sample_in(energy, set, 1e6);
        b.sample_in(info, set, 1.0);
        b.sample(temp, &[("gpu", "1")], f64::NAN);
        b.common_label("node_id", "n1");
        b.finish()
    }

    #[test]
    fn text_format() {
        let h = SinkHarness::new::<PrometheusSink>("p", "{}").expect("sink");
        h.write(&batch()).expect("write");
        let text = get(&h, "text/plain");
        let expected = "\
# HELP gpu_energy_consumed_joules_total Energy.
# TYPE gpu_energy_consumed_joules_total counter
gpu_energy_consumed_joules_total{gpu=\"0\",name=\"H100 \\\"SXM\\\"\\\\ \\n é\",node_id=\"n1\"} 1000000
# HELP gpu_info Identity.
# TYPE gpu_info gauge
gpu_info{gpu=\"0\",name=\"H100 \\\"SXM\\\"\\\\ \\n é\",node_id=\"n1\"} 1
# HELP gpu_temperature_celsius Die \"temp\"\\\\\\nline
# TYPE gpu_temperature_celsius gauge
gpu_temperature_celsius{gpu=\"0\",name=\"H100 \\\"SXM\\\"\\\\ \\n é\",node_id=\"n1\"} 61.5
gpu_temperature_celsius{gpu=\"1\",node_id=\"n1\"} NaN
";
        assert_eq!(text, expected);
    }

    #[test]
    fn openmetrics_format() {
        let h = SinkHarness::new::<PrometheusSink>("p", "{}").expect("sink");
        h.write(&batch()).expect("write");
        let om = get(
            &h,
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        );
        assert!(om.contains("# TYPE gpu_energy_consumed_joules counter\n# UNIT gpu_energy_consumed_joules joules\n"), "{om}");
        assert!(
            om.contains("\ngpu_energy_consumed_joules_total{gpu=\"0\""),
            "{om}"
        );
        assert!(
            om.contains("# TYPE gpu info\n# HELP gpu Identity.\ngpu_info{"),
            "{om}"
        );
        assert!(
            om.contains("# UNIT gpu_temperature_celsius celsius"),
            "{om}"
        );
        assert!(
            om.contains("# HELP gpu_temperature_celsius Die \\\"temp\\\"\\\\\\nline"),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"));
        let text = get(&h, "application/openmetrics-text;q=0, text/plain");
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn same_family_from_two_batches_merges_and_kind_conflicts_are_dropped() {
        let h = SinkHarness::new::<PrometheusSink>("p", "{}").expect("sink");
        h.write(&batch()).expect("write");
        let mut b = BatchBuilder::new();
        let temp = b.gauge("gpu_temperature_celsius", "", "celsius");
        b.sample(temp, &[("gpu", "1"), ("node_id", "n1")], 40.0);
        let conflicting = b.counter("gpu_info", "", "");
        b.sample(conflicting, &[("gpu", "9")], 5.0);
        h.write(&b.finish()).expect("write");
        let text = get(&h, "");
        assert_eq!(
            text.matches("gpu_temperature_celsius{gpu=\"1\"").count(),
            1,
            "{text}"
        );
        assert!(
            text.contains("gpu_temperature_celsius{gpu=\"1\",node_id=\"n1\"} 40"),
            "{text}"
        );
        assert!(!text.contains("gpu=\"9\""), "{text}");
        assert_eq!(text.matches("# TYPE gpu_info").count(), 1);
    }

    #[test]
    fn stale_series_are_removed() {
        let h = SinkHarness::new::<PrometheusSink>("p", r#"{"stale_after":"50ms"}"#).expect("sink");
        h.write(&batch()).expect("write");
        assert!(get(&h, "").contains("gpu_info"));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(get(&h, ""), "");
    }

    #[test]
    fn max_series_bounds_memory() {
        let h = SinkHarness::new::<PrometheusSink>("p", r#"{"max_series":2}"#).expect("sink");
        h.write(&batch()).expect("write");
        let text = get(&h, "");
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(samples, 2, "{text}");
    }

    #[test]
    fn gzip_when_asked() {
        let h = SinkHarness::new::<PrometheusSink>("p", "{}").expect("sink");
        h.write(&batch()).expect("write");
        let request = HttpRequest {
            method: "GET".into(),
            path: "/metrics".into(),
            headers: vec![Header {
                name: "accept-encoding".into(),
                value: "gzip, deflate".into(),
            }]
            .into_iter()
            .collect(),
            ..HttpRequest::default()
        };
        let r = h.render(&request).expect("render");
        assert!(r
            .headers
            .iter()
            .any(|h| h.name.as_str() == "content-encoding" && h.value.as_str() == "gzip"));
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&r.body[..]), &mut text)
            .expect("gunzip");
        assert!(text.contains("gpu_info{"));
    }

    #[test]
    fn bad_path_is_a_config_error() {
        let err = SinkHarness::new::<PrometheusSink>("p", r#"{"path":"metrics"}"#)
            .err()
            .expect("refused");
        assert!(err.message.contains("`path`"));
    }
}
