//! Collector batch → validation → relabel rules → static labels → routes → sink queues.
//!
//! The work is per family where it can be (names, routes, renames) and per sample only where
//! it must be (validation, label drops). Static labels go into the batch's `common_labels`, so
//! adding them costs nothing per sample. One batch routed unfiltered to several sinks is shared,
//! not copied.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use abi_stable::std_types::{ROption, RString, RVec};
use globset::{Glob, GlobSet, GlobSetBuilder};
use metricsd_plugin_api::{Batch, Label, MetricKind};

use crate::aggregate::Aggregator;
use crate::config::{
    is_label_name, is_valid_metric_name, Config, EnrichConfig, RelabelAction, RelabelConfig,
    RouteConfig,
};
use crate::delivery::SinkQueue;
use crate::events::{Event, Telemetry};
use crate::health::now_ms;

pub(crate) fn globset(patterns: &[String]) -> Option<GlobSet> {
    if patterns.is_empty() {
        return None;
    }
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        // Patterns were validated with the config.
        if let Ok(g) = Glob::new(p) {
            b.add(g);
        }
    }
    b.build().ok()
}

/// A `*`-pattern rename: `prefix*suffix` → `to_prefix*to_suffix`.
struct Rename {
    from: (String, Option<String>),
    to: (String, Option<String>),
}

impl Rename {
    fn new(from: &str, to: &str) -> Self {
        let split = |s: &str| match s.split_once('*') {
            Some((a, b)) => (a.to_string(), Some(b.to_string())),
            None => (s.to_string(), None),
        };
        Self {
            from: split(from),
            to: split(to),
        }
    }

    fn apply(&self, name: &str) -> Option<String> {
        match (&self.from, &self.to) {
            ((exact, None), (to, _)) => (name == exact).then(|| to.clone()),
            ((prefix, Some(suffix)), (to_prefix, to_suffix)) => {
                if name.len() >= prefix.len() + suffix.len()
                    && name.starts_with(prefix.as_str())
                    && name.ends_with(suffix.as_str())
                {
                    let middle = &name[prefix.len()..name.len() - suffix.len()];
                    Some(format!(
                        "{to_prefix}{middle}{}",
                        to_suffix.as_deref().unwrap_or("")
                    ))
                } else {
                    None
                }
            }
        }
    }
}

struct Rule {
    action: RelabelAction,
    metrics: Option<GlobSet>,
    labels: Option<GlobSet>,
    rename: Option<Rename>,
    collectors: Vec<String>,
}

impl Rule {
    fn new(c: &RelabelConfig) -> Self {
        Self {
            action: c.action,
            metrics: globset(&c.metrics),
            labels: globset(&c.labels),
            rename: match (&c.from, &c.to) {
                (Some(f), Some(t)) => Some(Rename::new(f, t)),
                _ => None,
            },
            collectors: c.collectors.clone(),
        }
    }

    fn applies_to(&self, source: &str) -> bool {
        self.collectors.is_empty() || self.collectors.iter().any(|c| c == source)
    }

    fn metric_matches(&self, name: &str) -> bool {
        self.metrics.as_ref().is_none_or(|g| g.is_match(name))
    }
}

struct Route {
    from: Vec<String>,
    to: Vec<String>,
    include: Option<GlobSet>,
    exclude: Option<GlobSet>,
}

impl Route {
    fn new(c: &RouteConfig) -> Self {
        Self {
            from: c.from.clone(),
            to: c.to.clone(),
            include: globset(&c.include),
            exclude: globset(&c.exclude),
        }
    }

    fn passes(&self, name: &str) -> bool {
        self.include.as_ref().is_none_or(|g| g.is_match(name))
            && !self.exclude.as_ref().is_some_and(|g| g.is_match(name))
    }

    fn is_unfiltered(&self) -> bool {
        self.include.is_none() && self.exclude.is_none()
    }
}

/// An `[[enrich]]` join: what the info collector last reported, by key, and how to apply it.
struct Enricher {
    config: EnrichConfig,
    /// When the info collector last reported, and its labels by key value.
    table: RwLock<Option<(Instant, InfoTable)>>,
}

/// An info collector's labels by key value.
type InfoTable = HashMap<String, Vec<Label>>;

impl Enricher {
    fn new(config: &EnrichConfig) -> Self {
        Self {
            config: config.clone(),
            table: RwLock::new(None),
        }
    }

    /// Takes the info series of a batch of the info collector: a batch without them empties
    /// the table (its collector knows nothing now, e.g. its service is away).
    fn learn(&self, batch: &Batch) {
        let mut table = InfoTable::new();
        if let Some(family) = batch
            .families
            .iter()
            .position(|f| f.name.as_str() == self.config.metric)
        {
            for s in batch.samples.iter().filter(|s| s.family as usize == family) {
                let Some(set) = batch.label_sets.get(s.labels as usize) else {
                    continue;
                };
                let Some(key) = set.iter().find(|l| l.name.as_str() == self.config.on) else {
                    continue;
                };
                let labels: Vec<Label> = set
                    .iter()
                    .filter(|l| l.name.as_str() != self.config.on && !l.value.is_empty())
                    .filter(|l| {
                        self.config.labels.is_empty()
                            || self.config.labels.iter().any(|w| w == l.name.as_str())
                    })
                    .filter(|l| !self.config.exclude.iter().any(|x| x == l.name.as_str()))
                    .cloned()
                    .collect();
                // The first info series of a key wins.
                table.entry(key.value.to_string()).or_insert(labels);
            }
        }
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), table));
    }

    /// Adds the info labels to the label sets whose key has info; returns how many sets.
    fn apply(&self, batch: &mut Batch) -> usize {
        let guard = self.table.read().unwrap_or_else(|p| p.into_inner());
        let Some((at, table)) = guard.as_ref() else {
            return 0;
        };
        if at.elapsed() > self.config.max_age || table.is_empty() {
            return 0;
        }
        let mut enriched = 0;
        for set in batch.label_sets.iter_mut() {
            let Some(info) = set
                .iter()
                .find(|l| l.name.as_str() == self.config.on)
                .and_then(|key| table.get(key.value.as_str()))
            else {
                continue;
            };
            for label in info {
                match set.iter_mut().find(|l| l.name == label.name) {
                    Some(own) if self.config.overwrite => own.value = label.value.clone(),
                    Some(_) => {}
                    None => set.push(label.clone()),
                }
            }
            enriched += 1;
        }
        enriched
    }
}

/// The processing and routing of batches.
pub struct Pipeline {
    static_labels: Vec<Label>,
    rules: Vec<Rule>,
    routes: Option<Vec<Route>>,
    sinks: BTreeMap<String, Arc<SinkQueue>>,
    telemetry: Arc<Telemetry>,
    enrichers: Vec<Enricher>,
    aggregators: Vec<Aggregator>,
    /// Every family seen, by its exposition name (see [`exposition_name`]): the first
    /// declaration of a name wins, a later one that clashes with it is refused.
    families: std::sync::Mutex<HashMap<String, (String, MetricKind)>>,
    /// Per source, the series of its last batch, for staleness markers.
    last: std::sync::Mutex<HashMap<String, LastSeries>>,
}

/// The series of a source's last batch: the batch (to build markers from) and each sample's
/// series key.
struct LastSeries {
    batch: Arc<Batch>,
    keys: Vec<u64>,
}

/// Each sample's series key: a hash of its family name and its effective labels (own, and the
/// common ones it does not have itself, in name order), stable within the process. Where a
/// label sits (own or common) does not change the key.
fn series_keys(batch: &Batch) -> Vec<u64> {
    use std::hash::{Hash, Hasher};
    fn hash_of(value: impl Hash) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        value.hash(&mut h);
        h.finish()
    }
    let families: Vec<u64> = batch
        .families
        .iter()
        .map(|f| hash_of(f.name.as_str()))
        .collect();
    let sets: Vec<u64> = batch
        .label_sets
        .iter()
        .map(|own| {
            let mut pairs: Vec<(&str, &str)> = own
                .iter()
                .chain(
                    batch
                        .common_labels
                        .iter()
                        .filter(|c| !own.iter().any(|o| o.name == c.name)),
                )
                .map(|l| (l.name.as_str(), l.value.as_str()))
                .collect();
            pairs.sort_unstable();
            hash_of(pairs)
        })
        .collect();
    batch
        .samples
        .iter()
        .map(|s| {
            let family = families.get(s.family as usize).copied().unwrap_or(0);
            let set = sets.get(s.labels as usize).copied().unwrap_or(0);
            hash_of((family, set))
        })
        .collect()
}

/// The names a family takes in the expositions, which Prometheus's formats must agree on: its
/// OpenMetrics family name (counters without `_total`, info families without `_info`) and its
/// sample name (with them). Two families that share one of these names (a counter `hx_total`
/// and a gauge `hx` or `hx_total`) cannot both be served.
fn exposition_names(name: &str, kind: MetricKind) -> [String; 2] {
    let with = |suffix: &str| match name.strip_suffix(suffix) {
        Some(base) => [base.to_string(), name.to_string()],
        None => [name.to_string(), format!("{name}{suffix}")],
    };
    match kind {
        MetricKind::COUNTER => with("_total"),
        MetricKind::INFO => with("_info"),
        _ => [name.to_string(), name.to_string()],
    }
}

/// Own labels that repeat an agent-wide (common) label name win over it, in every sink: the
/// common label moves into the label sets that do not have their own.
fn resolve_common_clashes(batch: &mut Batch) {
    let clashing: Vec<usize> = (0..batch.common_labels.len())
        .filter(|&i| {
            let name = &batch.common_labels[i].name;
            batch
                .label_sets
                .iter()
                .any(|set| set.iter().any(|l| &l.name == name))
        })
        .collect();
    for &i in clashing.iter().rev() {
        let common = batch.common_labels.remove(i);
        for set in batch.label_sets.iter_mut() {
            if !set.iter().any(|l| l.name == common.name) {
                set.push(common.clone());
            }
        }
    }
}

/// Keeps only the families whose `keep` entry is true, re-indexing the samples.
fn retain_families(batch: &mut Batch, keep: &[bool]) {
    if keep.iter().all(|k| *k) {
        return;
    }
    let mut new_index = vec![u32::MAX; keep.len()];
    let mut next = 0u32;
    for (i, k) in keep.iter().enumerate() {
        if *k {
            new_index[i] = next;
            next += 1;
        }
    }
    let families = std::mem::take(&mut batch.families);
    batch.families = families
        .into_iter()
        .zip(keep)
        .filter_map(|(f, k)| k.then_some(f))
        .collect();
    batch.samples.retain(|s| keep[s.family as usize]);
    for s in batch.samples.iter_mut() {
        s.family = new_index[s.family as usize];
    }
}

/// What makes a label set unusable in every sink: a name that is not a label name, a name
/// beginning with `__` (reserved: Prometheus refuses a whole scrape with `__name__` in it), or a
/// name given twice.
fn label_problem(set: &[Label]) -> Option<String> {
    for (i, l) in set.iter().enumerate() {
        if !is_label_name(&l.name) {
            return Some(format!("invalid label name `{}`", l.name));
        }
        if l.name.starts_with("__") {
            return Some(format!(
                "reserved label name `{}` (names beginning with __ are Prometheus's own)",
                l.name
            ));
        }
        if set[..i].iter().any(|other| other.name == l.name) {
            return Some(format!("label `{}` given twice in one series", l.name));
        }
    }
    None
}

/// The causes of one batch's invalid samples, each named once: the operator reads every cause
/// from one message, not the first of several.
#[derive(Default)]
struct Causes(Vec<String>);

impl Causes {
    /// At most this many are named; the rest are counted.
    const NAMED: usize = 8;

    fn note(&mut self, reason: String) {
        if !self.0.contains(&reason) {
            self.0.push(reason);
        }
    }

    fn text(&self) -> Option<String> {
        if self.0.is_empty() {
            return None;
        }
        let mut text = self.0[..self.0.len().min(Self::NAMED)].join("; ");
        if self.0.len() > Self::NAMED {
            text.push_str(&format!(
                " (and {} more causes)",
                self.0.len() - Self::NAMED
            ));
        }
        Some(text)
    }
}

/// Removes invalid samples; returns how many and their causes. Names are checked once per
/// family and once per label set, not per sample.
fn validate(batch: &mut Batch) -> (usize, Causes) {
    let mut causes = Causes::default();
    let mut note = |reason: String| causes.note(reason);
    let family_ok: Vec<bool> = batch
        .families
        .iter()
        .map(|f| {
            let ok = is_valid_metric_name(&f.name);
            if !ok {
                note(format!("invalid metric name `{}`", f.name));
            }
            ok
        })
        .collect();
    let set_ok: Vec<bool> = batch
        .label_sets
        .iter()
        .map(|set| match label_problem(set) {
            Some(problem) => {
                note(problem);
                false
            }
            None => true,
        })
        .collect();
    let common_len = batch.common_labels.len();
    let mut seen = std::collections::HashSet::new();
    batch.common_labels.retain(|l| {
        is_label_name(&l.name) && !l.name.starts_with("__") && seen.insert(l.name.clone())
    });
    let mut dropped = common_len - batch.common_labels.len();
    if dropped > 0 {
        note("invalid common label name".to_string());
    }
    let before = batch.samples.len();
    let (families, sets) = (family_ok.len(), set_ok.len());
    batch.samples.retain(|s| {
        let (f, l) = (s.family as usize, s.labels as usize);
        if f >= families || l >= sets {
            note(format!(
                "sample refers to family {f} of {families} / label set {l} of {sets}"
            ));
            return false;
        }
        family_ok[f] && set_ok[l]
    });
    dropped += before - batch.samples.len();
    (dropped, causes)
}

/// Copies the families passing `passes` (and their samples) into a new batch.
fn filtered(batch: &Batch, passes: impl Fn(&str) -> bool) -> Option<Batch> {
    let keep: Vec<bool> = batch.families.iter().map(|f| passes(&f.name)).collect();
    if !keep.iter().any(|k| *k) {
        return None;
    }
    if keep.iter().all(|k| *k) {
        return Some(batch.clone());
    }
    let mut out = Batch {
        families: RVec::new(),
        label_sets: batch.label_sets.clone(),
        samples: RVec::new(),
        common_labels: batch.common_labels.clone(),
        timestamp_ms: batch.timestamp_ms,
    };
    let mut new_index = vec![u32::MAX; keep.len()];
    for (i, f) in batch.families.iter().enumerate() {
        if keep[i] {
            new_index[i] = out.families.len() as u32;
            out.families.push(f.clone());
        }
    }
    for s in batch.samples.iter() {
        if keep[s.family as usize] {
            let mut s = *s;
            s.family = new_index[s.family as usize];
            out.samples.push(s);
        }
    }
    Some(out)
}

impl Pipeline {
    /// Builds the pipeline for a config and the sink queues.
    pub fn new(
        config: &Config,
        sinks: BTreeMap<String, Arc<SinkQueue>>,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Self {
            static_labels: config
                .agent
                .labels
                .iter()
                .map(|(k, v)| Label::new(k.as_str(), v.as_str()))
                .collect(),
            rules: config.relabel.iter().map(Rule::new).collect(),
            routes: (!config.routes.is_empty())
                .then(|| config.routes.iter().map(Route::new).collect()),
            sinks,
            telemetry,
            enrichers: config.enrich.iter().map(Enricher::new).collect(),
            aggregators: config
                .aggregate
                .iter()
                .map(|a| Aggregator::new(a, config.agent.labels.keys().cloned().collect()))
                .collect(),
            families: std::sync::Mutex::default(),
            last: std::sync::Mutex::default(),
        }
    }

    /// Remembers `batch` as the last of `source`; returns staleness markers
    /// ([`STALE_NAN_BITS`](metricsd_plugin_api::STALE_NAN_BITS)) for the series of the source's
    /// previous batch that this one no longer has, so that sinks drop them at once (a lost GPU,
    /// an ended process, a series whose labels changed) instead of serving the last value.
    fn staleness_markers(&self, source: &str, batch: &Arc<Batch>) -> Option<Batch> {
        let keys = series_keys(batch);
        let current = LastSeries {
            batch: Arc::clone(batch),
            keys,
        };
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let previous = match last.get_mut(source) {
            Some(slot) => std::mem::replace(slot, current),
            None => {
                last.insert(source.to_string(), current);
                return None;
            }
        };
        let now: std::collections::HashSet<u64> = last
            .get(source)
            .map(|l| l.keys.iter().copied().collect())
            .unwrap_or_default();
        drop(last);
        let prev = &previous.batch;
        let mut samples: RVec<metricsd_plugin_api::Sample> = previous
            .keys
            .iter()
            .zip(prev.samples.iter())
            .filter(|(key, _)| !now.contains(key))
            .map(|(_, s)| metricsd_plugin_api::Sample {
                value: f64::from_bits(metricsd_plugin_api::STALE_NAN_BITS),
                timestamp_ms: ROption::RNone,
                ..*s
            })
            .collect();
        if samples.is_empty() {
            return None;
        }
        // Only the label sets the markers use: a GPU batch has hundreds, and copying them all
        // for each process that ends cost half a millisecond a time.
        let mut set_index = vec![None; prev.label_sets.len()];
        let mut label_sets = RVec::new();
        samples.retain(|s| (s.labels as usize) < prev.label_sets.len());
        for s in samples.iter_mut() {
            let slot = &mut set_index[s.labels as usize];
            let index = *slot.get_or_insert_with(|| {
                label_sets.push(prev.label_sets[s.labels as usize].clone());
                label_sets.len() as u32 - 1
            });
            s.labels = index;
        }
        let mut markers = Batch {
            families: prev.families.clone(),
            label_sets,
            samples,
            common_labels: prev.common_labels.clone(),
            timestamp_ms: batch.timestamp_ms,
        };
        let mut used = vec![false; markers.families.len()];
        for s in markers.samples.iter() {
            if let Some(u) = used.get_mut(s.family as usize) {
                *u = true;
            }
        }
        retain_families(&mut markers, &used);
        Some(markers)
    }

    /// Refuses the families of `batch` whose exposition name another family already has
    /// with another name or kind (in this batch or an earlier one of any source); returns the
    /// samples dropped and why.
    fn refuse_clashes(&self, batch: &mut Batch, causes: &mut Causes) -> usize {
        let mut known = self.families.lock().unwrap_or_else(|p| p.into_inner());
        let keep: Vec<bool> = batch
            .families
            .iter()
            .map(|f| {
                // A family accepted before owns both its names: no allocation in the usual case.
                if known
                    .get(f.name.as_str())
                    .is_some_and(|(name, kind)| name.as_str() == f.name.as_str() && *kind == f.kind)
                {
                    return true;
                }
                let names = exposition_names(&f.name, f.kind);
                let owner = names.iter().find_map(|n| {
                    known
                        .get(n)
                        .filter(|(name, kind)| name.as_str() != f.name.as_str() || *kind != f.kind)
                        .map(|owner| (n, owner))
                });
                if let Some((shared, (name, kind))) = owner {
                    causes.note(format!(
                        "family `{}` ({}) clashes with `{name}` ({}) declared first: both would be named `{shared}` in the exposition",
                        f.name,
                        f.kind.as_str(),
                        kind.as_str()
                    ));
                    return false;
                }
                for n in names {
                    known
                        .entry(n)
                        .or_insert_with(|| (f.name.to_string(), f.kind));
                }
                true
            })
            .collect();
        drop(known);
        if keep.iter().all(|k| *k) {
            return 0;
        }
        let refused: std::collections::HashSet<u32> = keep
            .iter()
            .enumerate()
            .filter(|(_, k)| !**k)
            .map(|(i, _)| i as u32)
            .collect();
        let dropped = batch
            .samples
            .iter()
            .filter(|s| refused.contains(&s.family))
            .count();
        retain_families(batch, &keep);
        dropped
    }

    /// The shortest aggregation window, if any aggregate is configured.
    pub fn shortest_window(&self) -> Option<std::time::Duration> {
        self.aggregators.iter().map(Aggregator::window).min()
    }

    /// Routes the windows that ended before `now_ms - grace_ms`.
    pub fn flush_aggregates(&self, now_ms: i64, grace_ms: i64) {
        for agg in &self.aggregators {
            if let Some(out) = agg.flush_due(now_ms, grace_ms) {
                self.process(&agg.name, out);
            }
        }
    }

    /// Routes every open window as it is (shutdown).
    pub fn flush_aggregates_now(&self) {
        for agg in &self.aggregators {
            if let Some(out) = agg.flush_now() {
                self.process(&agg.name, out);
            }
        }
    }

    /// Validates, relabels and labels a batch in place; returns the number of valid samples.
    pub fn prepare(&self, source: &str, batch: &mut Batch) -> usize {
        let (mut invalid, mut causes) = validate(batch);
        if batch.timestamp_ms.is_none() {
            batch.timestamp_ms = ROption::RSome(now_ms());
        }
        for rule in self.rules.iter().filter(|r| r.applies_to(source)) {
            self.apply(rule, batch);
        }
        // With the final names (after renames).
        invalid += self.refuse_clashes(batch, &mut causes);
        if invalid > 0 {
            Event::InvalidSamples {
                collector: source,
                count: invalid,
                reason: causes.text().as_deref().unwrap_or("invalid sample"),
            }
            .emit(&self.telemetry);
        } else {
            self.telemetry.valid_samples(source);
        }
        for e in &self.enrichers {
            if e.config.info == source {
                e.learn(batch);
            }
            if e.config.from.iter().any(|f| f == source) {
                e.apply(batch);
            }
        }
        for label in &self.static_labels {
            if !batch.common_labels.iter().any(|l| l.name == label.name) {
                batch.common_labels.push(label.clone());
            }
        }
        resolve_common_clashes(batch);
        batch.samples.len()
    }

    fn apply(&self, rule: &Rule, batch: &mut Batch) {
        match rule.action {
            RelabelAction::Drop | RelabelAction::Keep => {
                let keep_matching = rule.action == RelabelAction::Keep;
                let keep: Vec<bool> = batch
                    .families
                    .iter()
                    .map(|f| rule.metric_matches(&f.name) == keep_matching)
                    .collect();
                retain_families(batch, &keep);
            }
            RelabelAction::Rename => {
                if let Some(rename) = &rule.rename {
                    for f in batch.families.iter_mut() {
                        if let Some(new) = rename.apply(&f.name) {
                            if is_valid_metric_name(&new) {
                                f.name = RString::from(new);
                            }
                        }
                    }
                }
            }
            RelabelAction::DropLabels => {
                let Some(labels) = &rule.labels else { return };
                let strip = |set: &RVec<Label>| -> RVec<Label> {
                    set.iter()
                        .filter(|l| !labels.is_match(l.name.as_str()))
                        .cloned()
                        .collect()
                };
                if rule.metrics.is_none() {
                    batch.common_labels = strip(&batch.common_labels);
                    for set in batch.label_sets.iter_mut() {
                        *set = strip(set);
                    }
                    return;
                }
                // Sets may be shared with metrics the rule does not match: give the matching
                // samples stripped copies.
                let matching: Vec<bool> = batch
                    .families
                    .iter()
                    .map(|f| rule.metric_matches(&f.name))
                    .collect();
                let mut stripped: Vec<Option<u32>> = vec![None; batch.label_sets.len()];
                for i in 0..batch.samples.len() {
                    let s = batch.samples[i];
                    if !matching[s.family as usize] {
                        continue;
                    }
                    let set = s.labels as usize;
                    let new = match stripped[set] {
                        Some(new) => new,
                        None => {
                            let copy = strip(&batch.label_sets[set]);
                            batch.label_sets.push(copy);
                            let new = (batch.label_sets.len() - 1) as u32;
                            stripped[set] = Some(new);
                            new
                        }
                    };
                    batch.samples[i].labels = new;
                }
            }
        }
    }

    /// Prepares a batch and hands it to the queues of the sinks its routes lead to.
    pub fn process(&self, source: &str, mut batch: Batch) {
        self.prepare(source, &mut batch);
        self.route_prepared(source, batch);
    }

    /// Hands a batch that went through [`prepare`](Self::prepare) to the aggregations and the
    /// sink queues, with staleness markers for the series the source no longer has.
    pub fn route_prepared(&self, source: &str, batch: Batch) {
        for agg in self.aggregators.iter().filter(|a| a.takes(source)) {
            let (closed, late) = agg.observe(&batch);
            if late > 0 {
                Event::InvalidSamples {
                    collector: &agg.name,
                    count: late,
                    reason: "arrived after their aggregation window was emitted",
                }
                .emit(&self.telemetry);
            }
            if let Some(out) = closed {
                self.process(&agg.name, out);
            }
        }
        let shared = Arc::new(batch);
        let markers = self.staleness_markers(source, &shared);
        self.to_sinks(source, shared);
        if let Some(markers) = markers {
            self.to_sinks(source, Arc::new(markers));
        }
    }

    /// Queues a batch of `source` for the sinks its routes lead to.
    fn to_sinks(&self, source: &str, shared: Arc<Batch>) {
        let Some(routes) = &self.routes else {
            for queue in self.sinks.values() {
                queue.push(Arc::clone(&shared));
            }
            return;
        };
        for (sink, queue) in &self.sinks {
            let matching: Vec<&Route> = routes
                .iter()
                .filter(|r| r.from.iter().any(|f| f == source) && r.to.iter().any(|t| t == sink))
                .collect();
            if matching.is_empty() {
                continue;
            }
            if matching.iter().any(|r| r.is_unfiltered()) {
                queue.push(Arc::clone(&shared));
            } else if let Some(b) =
                filtered(&shared, |name| matching.iter().any(|r| r.passes(name)))
            {
                queue.push(Arc::new(b));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{from_toml_with_env, ConfigSource};
    use metricsd_plugin_api::BatchBuilder;

    fn config(text: &str) -> Config {
        from_toml_with_env(
            text,
            &ConfigSource::File("t.toml".into()),
            &BTreeMap::<String, String>::new(),
        )
        .expect("valid config")
    }

    fn pipeline(text: &str, sinks: &[&str]) -> (Pipeline, BTreeMap<String, Arc<SinkQueue>>) {
        let telemetry = Arc::new(Telemetry::new());
        let queues: BTreeMap<String, Arc<SinkQueue>> = sinks
            .iter()
            .map(|s| {
                (
                    s.to_string(),
                    Arc::new(SinkQueue::new(s, 1000, Arc::clone(&telemetry))),
                )
            })
            .collect();
        (
            Pipeline::new(&config(text), queues.clone(), telemetry),
            queues,
        )
    }

    fn sample_batch() -> Batch {
        let mut b = BatchBuilder::new();
        let temp = b.gauge("gpu_temperature_celsius", "", "celsius");
        let info = b.info("gpu_info", "");
        let power = b.gauge("gpu_power_usage_watts", "", "watts");
        b.sample(temp, &[("gpu", "0"), ("pid", "17")], 61.0);
        b.sample(info, &[("gpu", "0")], 1.0);
        b.sample(power, &[("gpu", "0")], 300.0);
        b.finish()
    }

    fn names(b: &Batch) -> Vec<String> {
        b.samples
            .iter()
            .map(|s| b.family_of(s).expect("family").name.to_string())
            .collect()
    }

    fn labels_of(b: &Batch, i: usize) -> Vec<String> {
        b.labels_of(&b.samples[i])
            .map(|l| format!("{}={}", l.name, l.value))
            .collect()
    }

    fn discovery_batch(gpus: &[(&str, &str, &str)]) -> Batch {
        let mut b = BatchBuilder::new();
        let up = b.gauge("gpu_discovery_up", "", "");
        b.sample(up, &[], 1.0);
        let info = b.info("gpu_discovery_info", "");
        for (uuid, gpu_id, rental) in gpus {
            b.sample(
                info,
                &[
                    ("uuid", uuid),
                    ("gpu_id", gpu_id),
                    ("rental", rental),
                    ("model", "H100"),
                ],
                1.0,
            );
        }
        b.finish()
    }

    fn nvml_batch() -> Batch {
        let mut b = BatchBuilder::new();
        let temp = b.gauge("gpu_temperature_celsius", "", "celsius");
        let power = b.gauge("gpu_power_usage_watts", "", "watts");
        let g0 = b.label_set(&[("gpu", "0"), ("uuid", "GPU-a"), ("model", "nvml's")]);
        let g1 = b.label_set(&[("gpu", "1"), ("uuid", "GPU-b")]);
        b.sample_in(temp, g0, 61.0);
        b.sample_in(power, g0, 300.0);
        b.sample_in(temp, g1, 58.0);
        b.finish()
    }

    /// The NVML batch as prepared after the discovery collector reported `gpus`.
    fn enriched_after(p: &Pipeline, gpus: &[(&str, &str, &str)]) -> Batch {
        let mut d = discovery_batch(gpus);
        p.prepare("disc", &mut d);
        let mut b = nvml_batch();
        p.prepare("gpu", &mut b);
        b
    }

    const ENRICH: &str = "[[collectors]]\nname = \"gpu\"\nplugin = \"nvml\"\n[[collectors]]\nname = \"disc\"\nplugin = \"discovery\"\n[[enrich]]\nfrom = [\"gpu\"]\ninfo = \"disc\"\n";

    #[test]
    fn enrich_joins_info_labels_on_the_key_and_follows_changes() {
        let (p, _) = pipeline(ENRICH, &[]);
        // Before any info: NVML labels only.
        let mut b = nvml_batch();
        p.prepare("gpu", &mut b);
        assert_eq!(labels_of(&b, 0), ["gpu=0", "uuid=GPU-a", "model=nvml's"]);
        // GPU-a is known; GPU-b is not and keeps its own labels.
        let b = enriched_after(&p, &[("GPU-a", "net-1", "idle")]);
        assert_eq!(
            labels_of(&b, 0),
            [
                "gpu=0",
                "uuid=GPU-a",
                "model=nvml's",
                "gpu_id=net-1",
                "rental=idle"
            ],
            "the series keeps its own model"
        );
        assert_eq!(labels_of(&b, 1), labels_of(&b, 0), "the set is shared");
        assert_eq!(labels_of(&b, 2), ["gpu=1", "uuid=GPU-b"]);
        // A change pushed by the service shows at the next batch.
        let b = enriched_after(
            &p,
            &[("GPU-a", "net-1", "rented"), ("GPU-b", "net-2", "idle")],
        );
        assert!(labels_of(&b, 0).contains(&"rental=rented".to_string()));
        assert!(labels_of(&b, 2).contains(&"gpu_id=net-2".to_string()));
        // The service is away: the discovery collector reports no info, NVML labels only.
        let b = enriched_after(&p, &[]);
        assert_eq!(labels_of(&b, 0), ["gpu=0", "uuid=GPU-a", "model=nvml's"]);
    }

    #[test]
    fn enrich_copies_the_chosen_labels_and_can_overwrite() {
        let text = format!("{ENRICH}labels = [\"model\", \"gpu_id\"]\noverwrite = true\n");
        let (p, _) = pipeline(&text, &[]);
        let b = enriched_after(&p, &[("GPU-a", "net-1", "idle")]);
        assert_eq!(
            labels_of(&b, 0),
            ["gpu=0", "uuid=GPU-a", "model=H100", "gpu_id=net-1"]
        );
    }

    #[test]
    fn enrich_leaves_out_excluded_labels() {
        let text = format!("{ENRICH}exclude = [\"model\", \"rental\"]\n");
        let (p, _) = pipeline(&text, &[]);
        let b = enriched_after(&p, &[("GPU-b", "net-2", "idle")]);
        assert_eq!(labels_of(&b, 2), ["gpu=1", "uuid=GPU-b", "gpu_id=net-2"]);
    }

    #[test]
    fn enrich_config_errors_name_the_key() {
        let bad = ENRICH.replace("info = \"disc\"", "info = \"dsic\"");
        let e = from_toml_with_env(
            &bad,
            &ConfigSource::File("t.toml".into()),
            &BTreeMap::<String, String>::new(),
        )
        .expect_err("unknown collector")
        .to_string();
        assert!(e.contains("enrich[0].info") && e.contains("disc"), "{e}");
    }

    #[test]
    fn static_labels_go_to_common_labels_and_sample_labels_win() {
        let (p, _) = pipeline("[agent]\nlabels = { node_id = \"n1\", gpu = \"x\" }\n", &[]);
        let mut b = sample_batch();
        p.prepare("gpu", &mut b);
        let labels: Vec<String> = b
            .labels_of(&b.samples[0])
            .map(|l| format!("{}={}", l.name, l.value))
            .collect();
        assert_eq!(labels, ["gpu=0", "pid=17", "node_id=n1"]);
        assert!(b.timestamp_ms.is_some());
    }

    #[test]
    fn drop_keep_rename_and_drop_labels() {
        let (p, _) = pipeline(
            r#"
[[collectors]]
name = "gpu"
plugin = "nvml"
[[relabel]]
action = "drop"
metrics = ["*_info"]
[[relabel]]
action = "rename"
from = "gpu_*"
to = "nv_*"
[[relabel]]
action = "drop_labels"
labels = ["pid"]
[[relabel]]
action = "keep"
metrics = ["nv_*"]
collectors = ["gpu"]
"#,
            &[],
        );
        let mut b = sample_batch();
        p.prepare("gpu", &mut b);
        assert_eq!(
            names(&b),
            ["nv_temperature_celsius", "nv_power_usage_watts"]
        );
        assert!(b
            .own_labels_of(&b.samples[0])
            .iter()
            .all(|l| l.name.as_str() != "pid"));
        assert_eq!(b.families.len(), 2, "dropped families are removed");
    }

    #[test]
    fn drop_labels_on_some_metrics_leaves_shared_sets_of_others_intact() {
        let (p, _) = pipeline(
            "[[relabel]]\naction = \"drop_labels\"\nmetrics = [\"gpu_temp*\"]\nlabels = [\"pid\"]\n",
            &[],
        );
        let mut b = BatchBuilder::new();
        let temp = b.gauge("gpu_temperature_celsius", "", "");
        let power = b.gauge("gpu_power_usage_watts", "", "");
        let set = b.label_set(&[("gpu", "0"), ("pid", "7")]);
        b.sample_in(temp, set, 1.0);
        b.sample_in(power, set, 2.0);
        let mut b = b.finish();
        p.prepare("gpu", &mut b);
        let own = |i: usize| -> Vec<String> {
            b.own_labels_of(&b.samples[i])
                .iter()
                .map(|l| l.name.to_string())
                .collect()
        };
        assert_eq!(own(0), ["gpu"]);
        assert_eq!(own(1), ["gpu", "pid"]);
    }

    #[test]
    fn invalid_samples_are_dropped_and_counted() {
        let (p, _) = pipeline("", &[]);
        let mut b = sample_batch();
        let bad = b.label_sets.len() as u32;
        b.label_sets
            .push(RVec::from(vec![Label::new("bad-name", "x")]));
        b.samples[0].labels = bad;
        b.samples[1].family = 99;
        // One message names every cause, not the first.
        let (dropped, causes) = validate(&mut b.clone());
        assert_eq!(dropped, 2);
        let text = causes.text().unwrap_or_default();
        assert!(
            text.contains("invalid label name `bad-name`") && text.contains("refers to family 99"),
            "{text}"
        );
        assert_eq!(p.prepare("c", &mut b), 1);
        assert!(p
            .telemetry
            .render_text()
            .contains("metricsd_collector_invalid_samples_total{collector=\"c\"} 2"));
    }

    #[test]
    fn reserved_and_repeated_label_names_are_refused() {
        let (p, _) = pipeline("", &[]);
        let mut b = BatchBuilder::new();
        let value = b.gauge("tk_value", "", "");
        b.sample(value, &[("series", "1")], 1.0);
        b.sample(value, &[("__name__", "x")], 2.0);
        b.sample(value, &[("__meta", "x")], 3.0);
        b.sample(value, &[("a", "1"), ("b", "2"), ("a", "3")], 4.0);
        let mut batch = b.finish();
        batch.common_labels.push(Label::new("__job", "x"));
        batch.common_labels.push(Label::new("zone", "a"));
        batch.common_labels.push(Label::new("zone", "b"));
        assert_eq!(p.prepare("c", &mut batch), 1);
        let names: Vec<&str> = batch
            .common_labels
            .iter()
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(names, ["zone"]);
        assert_eq!(batch.common_labels[0].value, "a");
        // Three samples, and the two common labels dropped (counted with them).
        let text = p.telemetry.render_text();
        assert!(
            text.contains("metricsd_collector_invalid_samples_total{collector=\"c\"} 5"),
            "{text}"
        );
    }

    #[test]
    fn families_whose_exposition_names_clash_are_refused_after_the_first() {
        let (p, _) = pipeline("", &[]);
        let mut b = BatchBuilder::new();
        let total = b.counter("hx_total", "", "");
        let gauge = b.gauge("hx", "", "");
        let info = b.info("gpu_info", "");
        b.sample(total, &[], 1.0);
        b.sample(gauge, &[], 2.0);
        b.sample(info, &[("gpu", "0")], 1.0);
        let mut batch = b.finish();
        assert_eq!(p.prepare("a", &mut batch), 2);
        let names: Vec<&str> = batch.families.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["hx_total", "gpu_info"]);
        // Another source: the same family merges; a gauge `gpu` clashes with the info family.
        let mut b = BatchBuilder::new();
        let same = b.counter("hx_total", "", "");
        let other = b.gauge("gpu", "", "");
        b.sample(same, &[("x", "1")], 1.0);
        b.sample(other, &[], 1.0);
        let mut batch = b.finish();
        assert_eq!(p.prepare("b", &mut batch), 1);
        assert_eq!(batch.families.len(), 1);
        // A gauge under the counter's sample name.
        let mut b = BatchBuilder::new();
        let retyped = b.gauge("hx_total", "", "");
        b.sample(retyped, &[], 1.0);
        let mut batch = b.finish();
        assert_eq!(p.prepare("b", &mut batch), 0);
        let text = p.telemetry.render_text();
        assert!(
            text.contains("metricsd_collector_invalid_samples_total{collector=\"a\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("metricsd_collector_invalid_samples_total{collector=\"b\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn an_own_label_wins_over_a_common_one_of_the_same_name_in_the_batch_itself() {
        let (p, _) = pipeline("[agent]\nlabels = { node_id = \"n1\", gpu = \"x\" }\n", &[]);
        let mut b = BatchBuilder::new();
        let temp = b.gauge("t", "", "");
        b.sample(temp, &[("gpu", "0")], 1.0);
        b.sample(temp, &[("pid", "1")], 1.0);
        let mut batch = b.finish();
        p.prepare("gpu", &mut batch);
        // No sink sees a name twice: `gpu` moved from the common labels into the set without it.
        let names: Vec<&str> = batch
            .common_labels
            .iter()
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(names, ["node_id"]);
        let of = |i: usize| -> Vec<String> {
            batch
                .labels_of(&batch.samples[i])
                .map(|l| format!("{}={}", l.name, l.value))
                .collect()
        };
        assert_eq!(of(0), ["gpu=0", "node_id=n1"]);
        assert_eq!(of(1), ["pid=1", "gpu=x", "node_id=n1"]);
    }

    #[test]
    fn series_a_source_no_longer_has_get_staleness_markers() {
        let (p, queues) = pipeline("", &["out"]);
        let out = &queues["out"];
        let batch = |gpus: &[&str], name: &str| {
            let mut b = BatchBuilder::new();
            let temp = b.gauge("gpu_temperature_celsius", "", "celsius");
            let other = b.gauge("gpu_other", "", "");
            for g in gpus {
                b.sample(temp, &[("gpu", g), ("name", name)], 40.0);
            }
            b.sample(other, &[], 1.0);
            b.finish()
        };
        p.process("gpu", batch(&["0", "1", "2"], "H100"));
        assert_eq!(out.depth(), 4, "the first batch, no markers");
        // GPU 2 is gone, and GPU 1's labels changed: markers for the old series only.
        p.process("gpu", batch(&["0", "1"], "H100"));
        p.process("other", batch(&["9"], "x"));
        p.process("gpu", batch(&["0", "1"], "H200"));
        let (_, group) = out.take_group(1000).expect("queued");
        let markers: Vec<Vec<String>> = group
            .iter()
            .flat_map(|b| {
                b.samples
                    .iter()
                    .filter(|s| metricsd_plugin_api::is_stale_marker(s.value))
                    .map(|s| {
                        b.labels_of(s)
                            .map(|l| format!("{}={}", l.name, l.value))
                            .collect::<Vec<_>>()
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(
            markers,
            [
                vec!["gpu=2", "name=H100"],
                vec!["gpu=0", "name=H100"],
                vec!["gpu=1", "name=H100"]
            ],
            "one per ended series, none for `other`'s first batch"
        );
        for b in group.iter().filter(|b| {
            b.samples
                .iter()
                .all(|s| metricsd_plugin_api::is_stale_marker(s.value))
        }) {
            assert_eq!(
                b.label_sets.len(),
                b.samples.len(),
                "a marker batch carries the label sets of its markers, not the whole previous batch's"
            );
        }
    }

    #[test]
    fn a_label_moving_between_common_and_own_is_the_same_series() {
        let (p, queues) = pipeline("[agent]\nlabels = { node_id = \"static\" }\n", &["out"]);
        let up = |with_info: bool| {
            let mut b = BatchBuilder::new();
            let up = b.gauge("gpu_discovery_up", "", "");
            b.sample(up, &[], 1.0);
            if with_info {
                let info = b.info("gpu_discovery_info", "");
                b.sample(info, &[("node_id", "node-7")], 1.0);
            }
            b.finish()
        };
        p.process("d", up(false));
        // `node_id` now sits in gpu_discovery_up's own labels (an info series has its own):
        // the same series, no marker.
        p.process("d", up(true));
        let (_, group) = queues["out"].take_group(1000).expect("queued");
        assert_eq!(group.len(), 2, "no marker batch");
    }

    #[test]
    fn routes_filter_per_sink() {
        let (p, queues) = pipeline(
            r#"
[[collectors]]
name = "gpu"
plugin = "nvml"
[[collectors]]
name = "sys"
plugin = "system"
[[sinks]]
name = "a"
plugin = "x"
[[sinks]]
name = "b"
plugin = "y"
[[routes]]
from = ["gpu"]
to = ["a"]
[[routes]]
from = ["gpu", "sys"]
to = ["b"]
exclude = ["*_info"]
"#,
            &["a", "b"],
        );
        p.process("gpu", sample_batch());
        p.process("sys", sample_batch());
        let a = queues["a"].drain_now();
        let b = queues["b"].drain_now();
        assert_eq!(a.len(), 1, "sys does not route to a");
        assert_eq!(names(&a[0]).len(), 3);
        assert_eq!(b.len(), 2);
        assert_eq!(
            names(&b[0]),
            ["gpu_temperature_celsius", "gpu_power_usage_watts"]
        );
    }

    #[test]
    fn rename_patterns() {
        let r = Rename::new("DCGM_FI_DEV_*", "dcgm_*");
        assert_eq!(
            r.apply("DCGM_FI_DEV_GPU_UTIL").as_deref(),
            Some("dcgm_GPU_UTIL")
        );
        assert_eq!(r.apply("other"), None);
        let r = Rename::new("a", "b");
        assert_eq!(r.apply("a").as_deref(), Some("b"));
        assert_eq!(r.apply("ab"), None);
        let r = Rename::new("*_celsius", "*_degrees");
        assert_eq!(r.apply("gpu_celsius").as_deref(), Some("gpu_degrees"));
    }
}
