//! Building batches of samples.

use abi_stable::std_types::{ROption, RString, RVec};

use crate::abi::{Batch, Label, MetricFamily, MetricKind, Sample};

/// Refers to a family added to a [`BatchBuilder`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct FamilyId(u32);

impl FamilyId {
    /// The index into [`Batch::families`].
    pub fn index(self) -> u32 {
        self.0
    }
}

/// Refers to a label set added to a [`BatchBuilder`].
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct LabelSetId(u32);

impl LabelSetId {
    /// The index into [`Batch::label_sets`].
    pub fn index(self) -> u32 {
        self.0
    }
}

/// Accumulates the families, label sets and samples of one collection.
///
/// ```
/// use metricsd_plugin_api::{BatchBuilder, MetricKind};
///
/// let mut out = BatchBuilder::new();
/// let temp = out.gauge("gpu_temperature_celsius", "GPU die temperature.", "celsius");
/// let power = out.gauge("gpu_power_usage_watts", "Power draw.", "watts");
/// // One label set per GPU, shared by all of its samples.
/// let gpu0 = out.label_set(&[("gpu", "0"), ("uuid", "GPU-8c2d")]);
/// out.sample_in(temp, gpu0, 61.0);
/// out.sample_in(power, gpu0, 312.5);
/// // Or labels per sample; consecutive samples with equal labels share one set.
/// out.sample(temp, &[("gpu", "1")], 58.0);
/// let batch = out.finish();
/// assert_eq!(batch.samples.len(), 3);
/// assert_eq!(batch.label_sets.len(), 2);
/// assert_eq!(batch.families[0].kind, MetricKind::GAUGE);
/// ```
#[derive(Debug, Default)]
pub struct BatchBuilder {
    batch: Batch,
    /// The first family declared again with another kind, help or unit.
    conflict: Option<String>,
}

impl BatchBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty builder with room for `samples` samples.
    pub fn with_capacity(samples: usize) -> Self {
        let mut builder = Self::default();
        builder.batch.samples.reserve(samples);
        builder
    }

    /// An empty builder with room for that many families, label sets and samples.
    pub fn with_capacities(families: usize, label_sets: usize, samples: usize) -> Self {
        let mut builder = Self::default();
        builder.batch.families.reserve_exact(families);
        builder.batch.label_sets.reserve_exact(label_sets);
        builder.batch.samples.reserve_exact(samples);
        builder
    }

    /// Declares a family, or returns the one already declared under that name.
    ///
    /// Declaring a name again with another kind, help or unit is a bug of the plugin: the
    /// first declaration stays, and the collection fails with an error that names both (the
    /// SDK returns it from `collect`; see [`BatchBuilder::conflict`]).
    pub fn family(&mut self, name: &str, help: &str, unit: &str, kind: MetricKind) -> FamilyId {
        if let Some(i) = self
            .batch
            .families
            .iter()
            .position(|f| f.name.as_str() == name)
        {
            let first = &self.batch.families[i];
            if self.conflict.is_none()
                && (first.kind != kind
                    || first.help.as_str() != help
                    || first.unit.as_str() != unit)
            {
                self.conflict = Some(format!(
                    "metric family `{name}` declared twice: first as {} (help {:?}, unit {:?}), \
                     then as {} (help {:?}, unit {:?}); declare each family once",
                    first.kind.as_str(),
                    first.help.as_str(),
                    first.unit.as_str(),
                    kind.as_str(),
                    help,
                    unit
                ));
            }
            return FamilyId(i as u32);
        }
        self.batch.families.push(MetricFamily {
            name: name.into(),
            help: help.into(),
            unit: unit.into(),
            kind,
        });
        FamilyId((self.batch.families.len() - 1) as u32)
    }

    /// Declares a gauge family.
    pub fn gauge(&mut self, name: &str, help: &str, unit: &str) -> FamilyId {
        self.family(name, help, unit, MetricKind::GAUGE)
    }

    /// Declares a counter family (its name should end in `_total`).
    pub fn counter(&mut self, name: &str, help: &str, unit: &str) -> FamilyId {
        self.family(name, help, unit, MetricKind::COUNTER)
    }

    /// Declares an info family (its samples have value 1 and carry identity labels).
    pub fn info(&mut self, name: &str, help: &str) -> FamilyId {
        self.family(name, help, "", MetricKind::INFO)
    }

    /// Adds a label set that samples can share.
    pub fn label_set(&mut self, labels: &[(&str, &str)]) -> LabelSetId {
        self.label_set_owned(labels.iter().map(|(n, v)| Label::new(*n, *v)).collect())
    }

    /// Adds a label set that is already built (no copy).
    pub fn label_set_owned(&mut self, labels: RVec<Label>) -> LabelSetId {
        self.batch.label_sets.push(labels);
        LabelSetId((self.batch.label_sets.len() - 1) as u32)
    }

    /// Adds a sample with a label set added before.
    pub fn sample_in(&mut self, family: FamilyId, labels: LabelSetId, value: f64) {
        self.push(family, labels, value, None);
    }

    /// Adds a sample with its own timestamp (ms since the Unix epoch).
    pub fn sample_at(
        &mut self,
        family: FamilyId,
        labels: LabelSetId,
        value: f64,
        timestamp_ms: i64,
    ) {
        self.push(family, labels, value, Some(timestamp_ms));
    }

    /// Adds a sample with the given labels. When they equal the labels of the previous label
    /// set, that set is reused, so a loop emitting several metrics per object allocates once.
    pub fn sample(&mut self, family: FamilyId, labels: &[(&str, &str)], value: f64) {
        let same_as_last = self.batch.label_sets.last().is_some_and(|last| {
            last.len() == labels.len()
                && last
                    .iter()
                    .zip(labels)
                    .all(|(l, (n, v))| l.name.as_str() == *n && l.value.as_str() == *v)
        });
        let set = if same_as_last {
            LabelSetId((self.batch.label_sets.len() - 1) as u32)
        } else {
            self.label_set(labels)
        };
        self.push(family, set, value, None);
    }

    fn push(&mut self, family: FamilyId, labels: LabelSetId, value: f64, ts: Option<i64>) {
        self.batch.samples.push(Sample {
            family: family.0,
            labels: labels.0,
            value,
            timestamp_ms: ts.into(),
        });
    }

    /// Adds a label that applies to every sample of the batch.
    pub fn common_label(&mut self, name: &str, value: &str) {
        self.batch.common_labels.push(Label::new(name, value));
    }

    /// Sets the collection time of the whole batch (ms since the Unix epoch).
    pub fn timestamp_ms(&mut self, timestamp_ms: i64) {
        self.batch.timestamp_ms = ROption::RSome(timestamp_ms);
    }

    /// Number of samples so far.
    pub fn len(&self) -> usize {
        self.batch.samples.len()
    }

    /// Whether no sample was added.
    pub fn is_empty(&self) -> bool {
        self.batch.samples.is_empty()
    }

    /// The finished batch.
    pub fn finish(self) -> Batch {
        self.batch
    }

    /// The family already declared under `name`, if any: for a plugin that passes on
    /// families it does not define itself (files, another exporter) and must not redeclare
    /// one of its own with another kind, help or unit.
    pub fn declared(&self, name: &str) -> Option<&MetricFamily> {
        self.batch.families.iter().find(|f| f.name.as_str() == name)
    }

    /// The first family declared twice with a different kind, help or unit, described for
    /// the operator; `None` when every declaration agreed.
    pub fn conflict(&self) -> Option<&str> {
        self.conflict.as_deref()
    }
}

static NO_LABELS: [Label; 0] = [];

impl Batch {
    /// The family of a sample, if its index is valid.
    pub fn family_of(&self, sample: &Sample) -> Option<&MetricFamily> {
        self.families.get(sample.family as usize)
    }

    /// A sample's own labels (empty if its label set index is invalid).
    pub fn own_labels_of(&self, sample: &Sample) -> &[Label] {
        self.label_sets
            .get(sample.labels as usize)
            .map(|s| s.as_slice())
            .unwrap_or(&NO_LABELS)
    }

    /// Iterates over a sample's effective labels: its own, then the common labels it does not
    /// override.
    pub fn labels_of<'a>(&'a self, sample: &Sample) -> impl Iterator<Item = &'a Label> + 'a {
        let own = self.own_labels_of(sample);
        own.iter().chain(
            self.common_labels
                .iter()
                .filter(move |c| !own.iter().any(|l| l.name == c.name)),
        )
    }

    /// The timestamp that applies to a sample.
    pub fn timestamp_of(&self, sample: &Sample) -> Option<i64> {
        sample
            .timestamp_ms
            .into_option()
            .or(self.timestamp_ms.into_option())
    }
}

impl From<&str> for Label {
    /// Parses `name=value`; without `=`, the whole text is the name and the value is empty.
    fn from(text: &str) -> Self {
        match text.split_once('=') {
            Some((n, v)) => Label::new(n, v),
            None => Label::new(text, RString::new()),
        }
    }
}

/// The bits of Prometheus's staleness marker: a NaN that means "this series ended". The host
/// sends one for each series a source's newest batch no longer has (see [`is_stale_marker`]).
pub const STALE_NAN_BITS: u64 = 0x7ff0_0000_0000_0002;

/// Whether a sample's value is a staleness marker: the series it names ended with the source's
/// newest batch. A sink that holds series drops the series; a sink that forwards samples to
/// Prometheus remote write forwards it; a sink that cannot express it skips it (it is not a
/// measured value, and not an invalid one).
pub fn is_stale_marker(value: f64) -> bool {
    value.to_bits() == STALE_NAN_BITS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_deduplicated_by_name() {
        let mut b = BatchBuilder::new();
        let a = b.gauge("a", "help", "");
        let c = b.counter("c_total", "help", "");
        assert_eq!(b.gauge("a", "other help", ""), a);
        assert_ne!(a, c);
        assert_eq!(b.finish().families.len(), 2);
    }

    #[test]
    fn sample_labels_override_common_labels() {
        let mut b = BatchBuilder::new();
        let f = b.gauge("x", "", "");
        b.common_label("node", "n1");
        b.common_label("region", "eu");
        b.sample(f, &[("node", "override")], 1.0);
        let batch = b.finish();
        let labels: Vec<_> = batch
            .labels_of(&batch.samples[0])
            .map(|l| format!("{}={}", l.name, l.value))
            .collect();
        assert_eq!(labels, ["node=override", "region=eu"]);
    }

    #[test]
    fn consecutive_equal_labels_share_a_set() {
        let mut b = BatchBuilder::new();
        let f = b.gauge("a", "", "");
        let g = b.gauge("b", "", "");
        b.sample(f, &[("gpu", "0")], 1.0);
        b.sample(g, &[("gpu", "0")], 2.0);
        b.sample(f, &[("gpu", "1")], 3.0);
        b.sample(g, &[("gpu", "1"), ("x", "y")], 4.0);
        let batch = b.finish();
        assert_eq!(batch.label_sets.len(), 3);
        assert_eq!(batch.samples[1].labels, 0);
        let labels: Vec<_> = batch
            .labels_of(&batch.samples[3])
            .map(|l| l.value.as_str())
            .collect();
        assert_eq!(labels, ["1", "y"]);
    }

    #[test]
    fn sample_timestamp_falls_back_to_batch() {
        let mut b = BatchBuilder::new();
        let f = b.gauge("x", "", "");
        b.sample(f, &[], 1.0);
        let none = b.label_set(&[]);
        b.sample_at(f, none, 2.0, 5);
        b.timestamp_ms(9);
        let batch = b.finish();
        assert_eq!(batch.timestamp_of(&batch.samples[0]), Some(9));
        assert_eq!(batch.timestamp_of(&batch.samples[1]), Some(5));
    }
}
