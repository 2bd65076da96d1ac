//! Per-field collection tiers, as DCGM's watch frequencies: the values of a group are read
//! every `N` collections (`read_every`) and, between reads, served again as last read.
//!
//! A group is read into a batch of its own; what it wrote is kept as a [`Reading`] and copied
//! into each collection's batch until the group is read again. So a group's code is the same
//! whether it is read every collection or every hundredth, and what is served between reads is
//! exactly what the last read wrote (values, labels, and absences).

use std::collections::HashMap;
use std::num::NonZeroU32;

use metricsd_plugin_api::abi::{Batch, MetricKind};
use metricsd_plugin_api::{BatchBuilder, LabelSetId};
use serde::Deserialize;

/// The instance's `read_every` table: per group, every how many collections its values are
/// read (1: every collection). The defaults keep the CPU per GPU per 1 s collection under 2 ms
/// with the H200's measured call costs (the plugin README gives each group's cost).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReadEvery {
    /// The energy counter (about 3 ms of CPU per GPU and read on an H200).
    pub energy: NonZeroU32,
    /// Compute processes, their memory and utilization (about 2.1 ms per GPU with a process).
    pub processes: NonZeroU32,
    /// ECC error counters, retired pages, remapped rows, PCIe replays, NVLink error totals.
    pub errors: NonZeroU32,
    /// Power management limit, BAR1 memory, MIG mode and instances, NVLink link state.
    pub state: NonZeroU32,
}

const fn every(n: u32) -> NonZeroU32 {
    match NonZeroU32::new(n) {
        Some(n) => n,
        None => NonZeroU32::MIN,
    }
}

impl Default for ReadEvery {
    fn default() -> Self {
        Self {
            energy: every(20),
            processes: every(10),
            errors: every(30),
            state: every(30),
        }
    }
}

/// A group of values read together on its own schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    /// See [`ReadEvery::energy`].
    Energy,
    /// See [`ReadEvery::processes`].
    Processes,
    /// See [`ReadEvery::errors`].
    Errors,
    /// See [`ReadEvery::state`].
    State,
}

impl ReadEvery {
    /// Every how many collections `group` is read.
    pub fn of(&self, group: Group) -> u32 {
        match group {
            Group::Energy => self.energy,
            Group::Processes => self.processes,
            Group::Errors => self.errors,
            Group::State => self.state,
        }
        .get()
    }
}

/// A piece of [`Reading::text`].
#[derive(Clone, Copy)]
struct Span(u32, u32);

/// What one read of a group wrote, served again until the next read. Its strings live in one
/// buffer: a reading is kept for many collections, and hundreds of small long-lived allocations
/// beside each collection's short-lived batch made freeing those batches measurably slower.
struct Reading {
    text: String,
    /// The families its samples use (only those): name, help, unit, kind.
    families: Vec<(Span, Span, Span, MetricKind)>,
    /// Every label set's labels one after another, and where each set ends.
    labels: Vec<(Span, Span)>,
    set_ends: Vec<u32>,
    /// Family index into `families`, label set index, value.
    samples: Vec<(u32, u32, f64)>,
    /// Collections this reading is still served at before the group is read again.
    left: u32,
}

impl Reading {
    fn keep(batch: &Batch, left: u32) -> Self {
        let mut text = String::new();
        let mut span = |s: &str| {
            let start = text.len() as u32;
            text.push_str(s);
            Span(start, text.len() as u32)
        };
        let mut family_of = vec![None; batch.families.len()];
        let mut families = Vec::new();
        let mut samples = Vec::with_capacity(batch.samples.len());
        for s in batch.samples.iter() {
            let Some(slot) = family_of.get_mut(s.family as usize) else {
                continue;
            };
            let family = *slot.get_or_insert_with(|| {
                let f = &batch.families[s.family as usize];
                families.push((span(&f.name), span(&f.help), span(&f.unit), f.kind));
                families.len() as u32 - 1
            });
            samples.push((family, s.labels, s.value));
        }
        let mut labels = Vec::new();
        let mut set_ends = Vec::with_capacity(batch.label_sets.len());
        for set in batch.label_sets.iter() {
            for l in set.iter() {
                labels.push((span(&l.name), span(&l.value)));
            }
            set_ends.push(labels.len() as u32);
        }
        Reading {
            text,
            families,
            labels,
            set_ends,
            samples,
            left,
        }
    }

    fn str(&self, span: Span) -> &str {
        self.text
            .get(span.0 as usize..span.1 as usize)
            .unwrap_or("")
    }

    fn serve(&self, out: &mut BatchBuilder, own: LabelSetId) {
        let families: Vec<_> = self
            .families
            .iter()
            .map(|&(name, help, unit, kind)| {
                out.family(self.str(name), self.str(help), self.str(unit), kind)
            })
            .collect();
        let mut sets = vec![None; self.set_ends.len()];
        // A read's first label set is the GPU's own: served as the collection's, not a copy.
        if let Some(first) = sets.first_mut() {
            *first = Some(own);
        }
        let mut pairs = Vec::new();
        for &(family, set, value) in &self.samples {
            let (Some(family), Some(slot)) =
                (families.get(family as usize), sets.get_mut(set as usize))
            else {
                continue;
            };
            let set = *slot.get_or_insert_with(|| {
                let start = match set {
                    0 => 0,
                    n => self.set_ends[n as usize - 1],
                };
                let end = self.set_ends[set as usize];
                pairs.clear();
                pairs.extend(
                    self.labels[start as usize..end as usize]
                        .iter()
                        .map(|&(n, v)| (self.str(n), self.str(v))),
                );
                out.label_set(&pairs)
            });
            out.sample_in(*family, set, value);
        }
    }
}

/// Per GPU and group, the last reading and when the next read is due.
pub struct Tiers {
    every: ReadEvery,
    readings: HashMap<(u32, Group), Reading>,
}

impl Tiers {
    /// No reading yet; each group read every `every.of(group)` collections.
    pub fn new(every: ReadEvery) -> Self {
        Self {
            every,
            readings: HashMap::new(),
        }
    }

    /// Whether `group` of GPU `index` is to be read at this collection.
    pub fn due(&self, index: u32, group: Group) -> bool {
        self.readings
            .get(&(index, group))
            .is_none_or(|r| r.left == 0)
    }

    /// Keeps what a read of `group` wrote. With `every` its `read_every`, the first reading of
    /// a GPU's group is served for `every - index % every` collections, so that the GPUs of a
    /// node read their expensive groups at different collections; later ones for `every`.
    /// Either way no value served is older than `every - 1` collections.
    pub fn keep(&mut self, index: u32, group: Group, read: &Batch) {
        let every = self.every.of(group);
        let left = match self.readings.contains_key(&(index, group)) {
            true => every,
            false => every - index % every,
        };
        self.readings
            .insert((index, group), Reading::keep(read, left));
    }

    /// Keeps a reading that missed a value (a passing driver error): read again at the next
    /// collection, served until then.
    pub fn keep_incomplete(&mut self, index: u32, group: Group, read: &Batch) {
        self.readings.insert((index, group), Reading::keep(read, 1));
    }

    /// Copies the last reading of `group` into `out` and counts the collection. The read's
    /// first label set is the GPU's own labels, which are `own` in `out`.
    pub fn serve(&mut self, index: u32, group: Group, out: &mut BatchBuilder, own: LabelSetId) {
        if let Some(r) = self.readings.get_mut(&(index, group)) {
            r.serve(out, own);
            r.left = r.left.saturating_sub(1);
        }
    }

    /// Forgets what GPU `index` answered: after it was lost (a reset can change anything), every
    /// group is read again when it is back.
    pub fn forget(&mut self, index: u32) {
        self.readings.retain(|(i, _), _| *i != index);
    }

    /// Forgets every GPU (a new NVML session).
    pub fn clear(&mut self) {
        self.readings.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(value: f64) -> Batch {
        let mut b = BatchBuilder::new();
        let unused = b.gauge("unused", "Declared, never sampled.", "");
        let _ = unused;
        let energy = b.counter("gpu_energy_consumed_joules_total", "Energy.", "joules");
        let set = b.label_set(&[("gpu", "1")]);
        b.sample_in(energy, set, value);
        b.finish()
    }

    fn serve(tiers: &mut Tiers, index: u32, group: Group) {
        let mut out = BatchBuilder::new();
        let own = out.label_set(&[("gpu", "x")]);
        tiers.serve(index, group, &mut out, own);
    }

    #[test]
    fn a_reading_is_served_until_the_group_is_due_again() {
        let mut tiers = Tiers::new(ReadEvery {
            energy: every(3),
            processes: every(4),
            ..ReadEvery::default()
        });
        assert!(tiers.due(1, Group::Energy), "never read");
        // GPU 1 of every 3: its first reading serves 2 collections, later ones 3.
        tiers.keep(1, Group::Energy, &read(5.0));
        let mut served = Vec::new();
        for cycle in 0..8 {
            if tiers.due(1, Group::Energy) {
                tiers.keep(1, Group::Energy, &read(f64::from(cycle)));
            }
            let mut out = BatchBuilder::new();
            let own = out.label_set(&[("gpu", "1")]);
            tiers.serve(1, Group::Energy, &mut out, own);
            let batch = out.finish();
            assert_eq!(batch.families.len(), 1, "only the families it used");
            assert_eq!(
                batch.families[0].name.as_str(),
                "gpu_energy_consumed_joules_total"
            );
            assert_eq!(
                batch.label_sets.len(),
                1,
                "the GPU's own label set, not a copy"
            );
            served.push(batch.samples[0].value);
        }
        assert_eq!(served, [5.0, 5.0, 2.0, 2.0, 2.0, 5.0, 5.0, 5.0]);
    }

    #[test]
    fn first_reads_are_spread_over_the_gpus_and_a_lost_gpu_is_read_again() {
        let mut tiers = Tiers::new(ReadEvery {
            energy: every(3),
            processes: every(4),
            ..ReadEvery::default()
        });
        for gpu in 0..4 {
            tiers.keep(gpu, Group::Processes, &read(1.0));
        }
        let mut due_at = Vec::new();
        for cycle in 0..4 {
            let due: Vec<u32> = (0..4).filter(|g| tiers.due(*g, Group::Processes)).collect();
            due_at.push(due);
            for gpu in 0..4 {
                if tiers.due(gpu, Group::Processes) {
                    tiers.keep(gpu, Group::Processes, &read(f64::from(cycle)));
                }
                serve(&mut tiers, gpu, Group::Processes);
            }
        }
        // Read at cycle 0 by the caller above; then GPU 3 first, GPU 0 after a full period.
        assert_eq!(due_at, [vec![], vec![3], vec![2], vec![1]]);
        tiers.forget(2);
        assert!(tiers.due(2, Group::Processes));
        assert!(!tiers.due(1, Group::Processes));
        tiers.keep_incomplete(1, Group::State, &read(1.0));
        serve(&mut tiers, 1, Group::State);
        assert!(
            tiers.due(1, Group::State),
            "a reading that missed a value is read again"
        );
        tiers.clear();
        assert!(tiers.due(0, Group::Processes));
    }

    #[test]
    fn read_every_defaults_and_rejects_zero() {
        let every: ReadEvery =
            metricsd_plugin_api::parse_config(r#"{"errors": 5}"#).expect("parse");
        assert_eq!(every.of(Group::Energy), 20);
        assert_eq!(every.of(Group::Processes), 10);
        assert_eq!(every.of(Group::Errors), 5);
        assert_eq!(every.of(Group::State), 30);
        let err =
            metricsd_plugin_api::parse_config::<ReadEvery>(r#"{"energy": 0}"#).expect_err("zero");
        assert!(err.to_string().contains("`energy`"), "{err}");
        let err = metricsd_plugin_api::parse_config::<ReadEvery>(r#"{"power": 2}"#)
            .expect_err("unknown group");
        assert!(err.to_string().contains("state"), "{err}");
    }
}
