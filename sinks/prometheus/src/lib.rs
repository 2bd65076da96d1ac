//! metricsd sink that serves the latest value of every series in the Prometheus text format
//! 0.0.4, or OpenMetrics 1.0 when the scraper asks for it, through the host's metrics listener.
//!
//! A scrape never waits on a collection: it answers from the values this sink holds, rendered
//! once per change and cached (gzip variants too). Series that their collector stops reporting
//! are removed after `stale_after`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use flate2::write::GzEncoder;
use flate2::Compression;
use hashbrown::HashMap;
use metricsd_plugin_api::exposition::{
    push_help, push_help_openmetrics, push_label_value, push_value,
};
use metricsd_plugin_api::{
    export_plugin, is_stale_marker, Batch, Context, Error, Header, HttpRequest, HttpResponse,
    MetricKind, Result, Sink,
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
    #[serde(
        default = "default_stale_after",
        with = "metricsd_plugin_api::duration"
    )]
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

/// A series' labels as they are written between the braces (`a="x",b="y"`: sorted by name,
/// values escaped): the identity of a series within its family, and what rendering copies.
type LabelKey = Arc<str>;

struct Series {
    labels: LabelKey,
    value: f64,
    seen: Instant,
}

/// Index of the text format and of OpenMetrics in [`FamilyState::parts`].
const TEXT: usize = 0;
const OPENMETRICS: usize = 1;

struct FamilyState {
    help: String,
    unit: String,
    kind: MetricKind,
    /// The series; in label order while `sorted`.
    series: Vec<Series>,
    /// Position of each series in `series`.
    index: HashMap<LabelKey, usize>,
    sorted: bool,
    /// This family's lines in the text format and in OpenMetrics, kept until the family
    /// changes: a write re-renders only the families it changed, into the same buffer.
    parts: [String; 2],
    /// Which of `parts` still match the family.
    fresh: [bool; 2],
}

impl FamilyState {
    fn new(help: &str, unit: &str, kind: MetricKind) -> Self {
        FamilyState {
            help: help.to_string(),
            unit: unit.to_string(),
            kind,
            series: Vec::new(),
            index: HashMap::new(),
            sorted: true,
            parts: [String::new(), String::new()],
            fresh: [false, false],
        }
    }

    fn changed(&mut self) {
        self.fresh = [false, false];
    }

    /// Puts the series in label order (after new ones were added) and indexes them again.
    fn sort(&mut self) {
        if self.sorted {
            return;
        }
        self.series.sort_unstable_by(|a, b| a.labels.cmp(&b.labels));
        self.reindex();
        self.sorted = true;
    }

    fn reindex(&mut self) {
        self.index.clear();
        for (i, s) in self.series.iter().enumerate() {
            self.index.insert(Arc::clone(&s.labels), i);
        }
    }

    /// Removes series not seen within `stale_after`; how many went.
    fn sweep(&mut self, now: Instant, stale_after: Duration) -> usize {
        let before = self.series.len();
        self.series
            .retain(|s| now.duration_since(s.seen) <= stale_after);
        let removed = before - self.series.len();
        if removed > 0 {
            self.reindex();
            self.changed();
        }
        removed
    }

    /// This family's lines in one format, rendered if the family changed since.
    fn part(&mut self, name: &str, format: usize) -> &[u8] {
        self.sort();
        if !self.fresh[format] {
            let mut part = std::mem::take(&mut self.parts[format]);
            part.clear();
            if format == OPENMETRICS {
                render_openmetrics(&mut part, name, self);
            } else {
                render_text(&mut part, name, self);
            }
            self.parts[format] = part;
            self.fresh[format] = true;
        }
        self.parts[format].as_bytes()
    }
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
    /// Buffers kept from one write to the next (large, so that the allocator does not hand
    /// their pages back and fault them in again each time): the bodies of the cache it
    /// replaced, the uncompressed body of a gzip variant, the batch's label keys.
    spare_bodies: [Vec<u8>; 4],
    spare_raw: Vec<u8>,
    spare_keys: (String, Vec<Range<usize>>),
}

impl Store {
    /// One variant of the exposition: the families' parts (re-rendered where they changed)
    /// in name order, written into `out`.
    fn body_into(&mut self, variant: usize, out: &mut Vec<u8>) {
        let format = if variant >= 2 { OPENMETRICS } else { TEXT };
        let gzipped = variant % 2 == 1;
        let mut raw = if gzipped {
            std::mem::take(&mut self.spare_raw)
        } else {
            std::mem::take(out)
        };
        raw.clear();
        let len: usize = self
            .families
            .iter_mut()
            .map(|(name, f)| f.part(name, format).len())
            .sum();
        raw.reserve(len + 6);
        for (name, f) in &mut self.families {
            raw.extend_from_slice(f.part(name, format));
        }
        if format == OPENMETRICS {
            raw.extend_from_slice(b"# EOF\n");
        }
        if gzipped {
            out.clear();
            gzip(&raw, out);
            self.spare_raw = raw;
        } else {
            *out = raw;
        }
    }

    fn body(&mut self, variant: usize) -> Vec<u8> {
        let mut out = Vec::new();
        self.body_into(variant, &mut out);
        out
    }

    fn oldest_seen(&self) -> Option<Instant> {
        self.families
            .values()
            .flat_map(|f| f.series.iter().map(|s| s.seen))
            .min()
    }

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
            removed += f.sweep(now, stale_after);
            !f.series.is_empty()
        });
        self.series -= removed;
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

/// The key of each label set of a batch (own + common labels, each name once, sorted by name,
/// written as between the braces), into one string (emptied first) and the range of each set
/// in it.
fn label_sets(batch: &Batch, text: &mut String, ranges: &mut Vec<Range<usize>>) {
    text.clear();
    ranges.clear();
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for own in batch.label_sets.iter() {
        pairs.clear();
        pairs.extend(own.iter().map(|l| (l.name.as_str(), l.value.as_str())));
        pairs.extend(
            batch
                .common_labels
                .iter()
                .filter(|c| !own.iter().any(|l| l.name == c.name))
                .map(|l| (l.name.as_str(), l.value.as_str())),
        );
        pairs.sort_by(|a, b| a.0.cmp(b.0));
        // A name given twice keeps its first value (own labels before common ones).
        pairs.dedup_by(|a, b| a.0 == b.0);
        let start = text.len();
        for (i, (name, value)) in pairs.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            text.push_str(name);
            text.push_str("=\"");
            push_label_value(text, value);
            text.push('"');
        }
        ranges.push(start..text.len());
    }
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
                let mut body = std::mem::take(&mut store.spare_bodies[i]);
                store.body_into(i, &mut body);
                let _ = rendered.variants[i].set(body);
            }
        }
        let rendered = Arc::new(rendered);
        let replaced = match self.cache.write() {
            Ok(mut cache) => Some(std::mem::replace(&mut *cache, Arc::clone(&rendered))),
            Err(_) => None,
        };
        // No scrape holds the replaced bodies any more: keep their buffers for the next write.
        if let Some(Ok(old)) = replaced.map(Arc::try_unwrap) {
            for (spare, body) in store.spare_bodies.iter_mut().zip(old.variants) {
                if let Some(body) = body.into_inner() {
                    *spare = body;
                }
            }
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

/// One family in the text format 0.0.4.
fn render_text(out: &mut String, name: &str, f: &FamilyState) {
    out.reserve(64 + f.series.len() * 64);
    out.push_str("# HELP ");
    out.push_str(name);
    out.push(' ');
    push_help(out, &f.help);
    out.push_str("\n# TYPE ");
    out.push_str(name);
    out.push_str(match f.kind {
        MetricKind::COUNTER => " counter\n",
        MetricKind::GAUGE | MetricKind::INFO => " gauge\n",
        _ => " untyped\n",
    });
    write_series(out, name, f);
}

fn write_series(out: &mut String, sample_name: &str, f: &FamilyState) {
    for s in &f.series {
        out.push_str(sample_name);
        if !s.labels.is_empty() {
            out.push('{');
            out.push_str(&s.labels);
            out.push('}');
        }
        out.push(' ');
        push_value(out, s.value);
        out.push('\n');
    }
}

/// One family in OpenMetrics 1.0: counters are described without `_total` and sampled with
/// it, info families without `_info` and sampled with it, `# UNIT` where the name ends in the
/// unit.
fn render_openmetrics(out: &mut String, name: &str, f: &FamilyState) {
    out.reserve(96 + f.series.len() * 64);
    let (descriptor, sample_name, kind) = match f.kind {
        MetricKind::COUNTER => match name.strip_suffix("_total") {
            Some(base) => (base.to_string(), name.to_string(), "counter"),
            None => (name.to_string(), format!("{name}_total"), "counter"),
        },
        MetricKind::INFO => match name.strip_suffix("_info") {
            Some(base) => (base.to_string(), name.to_string(), "info"),
            None => (name.to_string(), format!("{name}_info"), "info"),
        },
        MetricKind::GAUGE => (name.to_string(), name.to_string(), "gauge"),
        _ => (name.to_string(), name.to_string(), "unknown"),
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
    push_help_openmetrics(out, &f.help);
    out.push('\n');
    write_series(out, &sample_name, f);
}

/// Compresses `body` into `out` (emptied first; its capacity is reused).
fn gzip(body: &[u8], out: &mut Vec<u8>) {
    let mut buffer = std::mem::take(out);
    buffer.clear();
    buffer.reserve(body.len() / 4 + 64);
    let mut enc = GzEncoder::new(buffer, Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(body);
    *out = enc.finish().unwrap_or_default();
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
        let mut guard = self.lock()?;
        let store = &mut *guard;
        let (mut keys, mut sets) = std::mem::take(&mut store.spare_keys);
        label_sets(batch, &mut keys, &mut sets);
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
                        existing.changed();
                    }
                    true
                }
                None => {
                    store.families.insert(
                        name.to_string(),
                        FamilyState::new(&family.help, &family.unit, family.kind),
                    );
                    true
                }
            };
            accept.push(ok);
        }
        let mut dropped_new = 0usize;
        let mut ended = false;
        let (families, held) = (&mut store.families, &mut store.series);
        // Samples of a family mostly come together: look the family up when it changes.
        let mut current: Option<(u32, &mut FamilyState)> = None;
        for s in batch.samples.iter() {
            let (Some(family), Some(range)) = (
                batch.families.get(s.family as usize),
                sets.get(s.labels as usize),
            ) else {
                continue;
            };
            if !accept[s.family as usize] {
                continue;
            }
            if current.as_ref().is_none_or(|(id, _)| *id != s.family) {
                current = families
                    .get_mut(family.name.as_str())
                    .map(|state| (s.family, state));
            }
            let Some((_, state)) = current.as_mut() else {
                continue;
            };
            let labels = &keys[range.clone()];
            if is_stale_marker(s.value) {
                // The series ended: it goes from the next scrape (removed after the loop).
                if let Some(&i) = state.index.get(labels) {
                    state.series[i].value = s.value;
                    ended = true;
                }
                continue;
            }
            match state.index.get(labels) {
                Some(&i) => {
                    let existing = &mut state.series[i];
                    if existing.value.to_bits() != s.value.to_bits() {
                        existing.value = s.value;
                        state.fresh = [false, false];
                    }
                    existing.seen = now;
                }
                None if *held >= self.config.max_series => dropped_new += 1,
                None => {
                    let key = LabelKey::from(labels);
                    state.index.insert(Arc::clone(&key), state.series.len());
                    state.series.push(Series {
                        labels: key,
                        value: s.value,
                        seen: now,
                    });
                    state.sorted = false;
                    state.changed();
                    *held += 1;
                }
            }
        }
        if ended {
            for f in store.families.values_mut() {
                let before = f.series.len();
                f.series.retain(|s| !is_stale_marker(s.value));
                let removed = before - f.series.len();
                if removed > 0 {
                    f.reindex();
                    f.changed();
                    store.series = store.series.saturating_sub(removed);
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
        store.spare_keys = (keys, sets);
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

    /// A GET of /metrics with these headers.
    fn request(headers: &[(&str, &str)]) -> HttpRequest {
        HttpRequest {
            method: "GET".into(),
            path: "/metrics".into(),
            headers: headers
                .iter()
                .map(|(name, value)| Header {
                    name: (*name).into(),
                    value: (*value).into(),
                })
                .collect(),
            ..HttpRequest::default()
        }
    }

    fn get(h: &SinkHarness, accept: &str) -> String {
        let sink_response = h.render(&request(&[("accept", accept)])).expect("render");
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
    fn a_staleness_marker_removes_its_series_at_once() {
        let h = SinkHarness::new::<PrometheusSink>("p", "{}").expect("sink");
        let mut b = BatchBuilder::new();
        let temp = b.gauge("gpu_temperature_celsius", "", "celsius");
        b.sample(temp, &[("gpu", "0")], 40.0);
        b.sample(temp, &[("gpu", "1")], 41.0);
        h.write(&b.finish()).expect("write");
        let mut b = BatchBuilder::new();
        let temp = b.gauge("gpu_temperature_celsius", "", "celsius");
        b.sample(
            temp,
            &[("gpu", "1")],
            f64::from_bits(metricsd_plugin_api::STALE_NAN_BITS),
        );
        b.sample(
            temp,
            &[("gpu", "7")],
            f64::from_bits(metricsd_plugin_api::STALE_NAN_BITS),
        );
        h.write(&b.finish()).expect("write");
        let text = get(&h, "");
        assert!(
            text.contains("gpu_temperature_celsius{gpu=\"0\"} 40"),
            "{text}"
        );
        assert!(!text.contains("gpu=\"1\""), "{text}");
        assert!(
            !text.contains("gpu=\"7\""),
            "a marker never creates a series: {text}"
        );
        assert!(!text.contains("NaN"), "{text}");
    }

    #[test]
    fn stale_series_are_removed() {
        let h = SinkHarness::new::<PrometheusSink>("p", r#"{"stale_after":"50ms"}"#).expect("sink");
        h.write(&batch()).expect("write");
        assert!(get(&h, "").contains("gpu_info"));
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(get(&h, ""), "");
    }

    fn gauge_batch(family: &str, series: &[(&str, f64)]) -> Batch {
        let mut b = BatchBuilder::new();
        let f = b.gauge(family, "", "");
        for (dev, v) in series {
            b.sample(f, &[("dev", dev)], *v);
        }
        b.finish()
    }

    #[test]
    fn writes_merge_per_family_in_label_order() {
        let h = SinkHarness::new::<PrometheusSink>("p", "{}").expect("sink");
        h.write(&gauge_batch("x", &[("b", 2.0), ("a", 1.0)]))
            .expect("write");
        h.write(&gauge_batch("y", &[("q", 7.0)])).expect("write");
        assert_eq!(
            get(&h, ""),
            "# HELP x \n# TYPE x gauge\nx{dev=\"a\"} 1\nx{dev=\"b\"} 2\n\
             # HELP y \n# TYPE y gauge\ny{dev=\"q\"} 7\n"
        );
        // New series of a held family land in order; the other family is left as it was.
        h.write(&gauge_batch("x", &[("c", 3.0), ("0", 0.5), ("a", 1.5)]))
            .expect("write");
        assert_eq!(
            get(&h, ""),
            "# HELP x \n# TYPE x gauge\nx{dev=\"0\"} 0.5\nx{dev=\"a\"} 1.5\nx{dev=\"b\"} 2\nx{dev=\"c\"} 3\n\
             # HELP y \n# TYPE y gauge\ny{dev=\"q\"} 7\n"
        );
        // The OpenMetrics rendering of the same state, asked for later, agrees.
        let om = get(&h, "application/openmetrics-text");
        assert!(
            om.contains("x{dev=\"0\"} 0.5\nx{dev=\"a\"} 1.5\nx{dev=\"b\"} 2\nx{dev=\"c\"} 3\n"),
            "{om}"
        );
    }

    #[test]
    fn a_series_left_out_goes_stale_while_its_family_stays() {
        let h =
            SinkHarness::new::<PrometheusSink>("p", r#"{"stale_after":"300ms"}"#).expect("sink");
        h.write(&gauge_batch("x", &[("a", 1.0), ("b", 2.0)]))
            .expect("write");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            std::thread::sleep(Duration::from_millis(100));
            h.write(&gauge_batch("x", &[("a", 1.0)])).expect("write");
            let text = get(&h, "");
            if !text.contains("dev=\"b\"") {
                assert!(text.contains("x{dev=\"a\"} 1\n"), "{text}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "series b never went stale: {text}"
            );
        }
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
        let request = request(&[("accept-encoding", "gzip, deflate")]);
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
    fn every_write_gives_fresh_bodies_in_every_variant() {
        let h = SinkHarness::new::<PrometheusSink>("p", "{}").expect("sink");
        let gunzip = |accept: &str| {
            let request = request(&[("accept-encoding", "gzip"), ("accept", accept)]);
            let r = h.render(&request).expect("render");
            let mut text = String::new();
            std::io::Read::read_to_string(
                &mut flate2::read::GzDecoder::new(&r.body[..]),
                &mut text,
            )
            .expect("gunzip");
            text
        };
        // Later writes render into the buffers of earlier ones: nothing of those may remain.
        for round in 0..5 {
            let series: Vec<(String, f64)> = (0..(5 - round))
                .map(|i| (format!("d{i}"), f64::from(round * 10 + i)))
                .collect();
            let refs: Vec<(&str, f64)> = series.iter().map(|(d, v)| (d.as_str(), *v)).collect();
            h.write(&gauge_batch(&format!("x{round}"), &refs))
                .expect("write");
            let text = get(&h, "");
            let expected: String = refs
                .iter()
                .map(|(d, v)| format!("x{round}{{dev=\"{d}\"}} {v}\n"))
                .collect();
            assert!(text.contains(&expected), "{text}");
            assert_eq!(gunzip("text/plain"), text);
            let om = get(&h, "application/openmetrics-text");
            assert_eq!(gunzip("application/openmetrics-text"), om);
            assert_eq!(om.matches("# EOF").count(), 1, "{om}");
        }
    }

    #[test]
    fn bad_path_is_a_config_error() {
        let err = SinkHarness::new::<PrometheusSink>("p", r#"{"path":"metrics"}"#)
            .err()
            .expect("refused");
        assert!(err.message.contains("`path`"));
    }
}
