//! One GPU's collection: the tiered groups, the constants and what is read every collection,
//! one function per metric area.

use std::collections::HashMap;

use metricsd_plugin_api::{BatchBuilder, FamilyId, LabelSetId};
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};

use crate::families::{Families, CLOCKS, THROTTLE_REASONS};
use crate::query::{
    ask, is_fatal_for_session, Asked, Constants, Query, Stop, FAST_FIELDS, FIELD_MEMORY_TEMP,
    FIELD_NVLINK_RX_KIB, FIELD_NVLINK_TX_KIB, FIELD_PCIE_RX_BYTES, FIELD_PCIE_TX_BYTES,
    FIELD_REMAPPED_COR, FIELD_REMAPPED_FAILURE, FIELD_REMAPPED_PENDING, FIELD_REMAPPED_UNC,
    NVLINK_ERROR_TOTALS, REMAP_FIELDS,
};
use crate::tiers::{Group, Tiers};

/// Memory of one MIG instance, labelled with its index, MIG UUID and profile (`3g.40gb`, from
/// the MIG device's name). NVML gives no utilization for MIG devices; what it cannot answer
/// is left out.
fn mig_instance_metrics(
    out: &mut BatchBuilder,
    f: &Families,
    labels: &[(&str, &str)],
    instance: u32,
    mig: &Device,
) {
    let Ok(memory) = mig.memory_info() else {
        return;
    };
    let uuid = mig.uuid().unwrap_or_default();
    let name = mig.name().unwrap_or_default();
    let profile = name.rsplit_once(" MIG ").map_or("", |(_, p)| p);
    let instance = instance.to_string();
    let mut all = labels.to_vec();
    all.extend([
        ("mig_index", instance.as_str()),
        ("mig_uuid", uuid.as_str()),
        ("mig_profile", profile),
    ]);
    let set = out.label_set(&all);
    out.sample_in(f.mig_memory_total, set, memory.total as f64);
    out.sample_in(f.mig_memory_used, set, memory.used as f64);
}

/// Per pid, SM and memory-controller utilization in percent.
type ProcessUtilization = HashMap<u32, (u32, u32)>;

/// SM and memory utilization (percent) per pid since the previous collection, from the newest
/// sample of each process; `None` when the GPU does not report per-process utilization.
fn process_utilization(
    device: &Device,
    index: u32,
    unsupported: &mut Asked,
    options: &mut CollectOptions,
) -> std::result::Result<Option<ProcessUtilization>, Stop> {
    let since = options.process_util_seen.get(&index).copied();
    let samples = ask(unsupported, index, Query::ProcessUtilization, || {
        match device.process_utilization_stats(since) {
            // No process was busy since `since`.
            Err(NvmlError::NotFound) => Ok(Vec::new()),
            other => other,
        }
    })?;
    let Some(samples) = samples else {
        return Ok(None);
    };
    let mut newest: HashMap<u32, (u64, u32, u32)> = HashMap::new();
    for s in samples {
        let entry = newest.entry(s.pid).or_insert((0, 0, 0));
        if s.timestamp >= entry.0 {
            *entry = (s.timestamp, s.sm_util, s.mem_util);
        }
    }
    if let Some(latest) = newest.values().map(|v| v.0).max() {
        options.process_util_seen.insert(index, latest);
    }
    Ok(Some(
        newest
            .into_iter()
            .map(|(pid, (_, sm, mem))| (pid, (sm, mem)))
            .collect(),
    ))
}

/// NVLink link state, and with `link_errors` the error counters of each link; links are probed
/// until the driver says there are no more. A GPU without NVLink answers NOT_SUPPORTED once and is not asked again.
fn nvlink_metrics(
    g: &mut Gpu,
    unsupported: &mut Asked,
    link_errors: bool,
) -> std::result::Result<(), Stop> {
    use nvml_wrapper::enum_wrappers::nv_link::ErrorCounter;
    let (index, device) = (g.index, g.device);
    if unsupported.contains(&(index, Query::NvLink)) {
        return Ok(());
    }
    for link in 0..nvml_wrapper_sys::bindings::NVML_NVLINK_MAX_LINKS {
        let nvlink = device.link_wrapper_for(link);
        let active = match nvlink.is_active() {
            Ok(a) => a,
            Err(NvmlError::NotSupported) if link == 0 => {
                tracing::debug!(gpu = index, "no NVLink on this GPU: not asked again");
                unsupported.insert((index, Query::NvLink));
                return Ok(());
            }
            Err(NvmlError::GpuLost) => return Err(Stop::Lost),
            Err(e) if is_fatal_for_session(&e) => return Err(Stop::Nvml(e)),
            // Past the last link (InvalidArg) or a link that is not there.
            Err(_) => break,
        };
        let link_text = link.to_string();
        let link_set = g.with(&[("link", link_text.as_str())]);
        g.out
            .sample_in(g.f.nvlink_up, link_set, if active { 1.0 } else { 0.0 });
        if !link_errors {
            continue;
        }
        for (counter, kind) in [
            (ErrorCounter::DlReplay, "replay"),
            (ErrorCounter::DlRecovery, "recovery"),
            (ErrorCounter::DlCrcFlit, "crc_flit"),
            (ErrorCounter::DlCrcData, "crc_data"),
        ] {
            if let Ok(n) = nvlink.error_counter(counter) {
                let kind_set = g.with(&[("link", link_text.as_str()), ("type", kind)]);
                g.out.sample_in(g.f.nvlink_errors, kind_set, n as f64);
            }
        }
    }
    Ok(())
}

/// What to collect beyond the always-on queries.
pub(crate) struct CollectOptions<'a> {
    /// Per-process memory.
    pub(crate) enabled: bool,
    /// NVLink state, errors and throughput.
    pub(crate) nvlink: bool,
    /// NVLink error counters per link rather than per GPU.
    pub(crate) nvlink_link_errors: bool,
    /// The sampled PCIe throughput call.
    pub(crate) pcie_throughput_sampled: bool,
    /// The energy counter.
    pub(crate) energy: bool,
    /// Most processes per GPU.
    pub(crate) max: usize,
    /// For process names.
    pub(crate) nvml: &'a Nvml,
    /// Per GPU, the newest process-utilization sample seen.
    pub(crate) process_util_seen: &'a mut HashMap<u32, u64>,
}

/// One GPU as a collection sees it: where its samples go (a collection's batch, or the batch a
/// tiered group is read into), under which labels, and the device to ask.
pub(crate) struct Gpu<'a, 'd> {
    pub(crate) out: &'a mut BatchBuilder,
    pub(crate) f: &'a Families,
    /// The GPU's own label set in `out`.
    pub(crate) set: LabelSetId,
    pub(crate) labels: &'a [(&'a str, &'a str)],
    pub(crate) index: u32,
    pub(crate) device: &'a Device<'d>,
}

impl Gpu<'_, '_> {
    /// The GPU's labels and `extra`, as a label set of `out`.
    pub(crate) fn with(&mut self, extra: &[(&str, &str)]) -> LabelSetId {
        let mut all = self.labels.to_vec();
        all.extend_from_slice(extra);
        self.out.label_set(&all)
    }

    /// A sample under the GPU's own labels.
    pub(crate) fn sample(&mut self, family: FamilyId, value: f64) {
        self.out.sample_in(family, self.set, value);
    }
}

/// The batch a tiered group is read into, kept by [`Tiers`] afterwards.
struct GroupRead {
    out: BatchBuilder,
    f: Families,
    set: LabelSetId,
    /// [`Asked::missed`] when the read began.
    missed: u32,
}

impl GroupRead {
    fn new(labels: &[(&str, &str)], asked: &Asked) -> Self {
        let mut out = BatchBuilder::new();
        let f = Families::declare(&mut out);
        let set = out.label_set(labels);
        Self {
            out,
            f,
            set,
            missed: asked.missed,
        }
    }

    fn gpu<'a, 'd>(
        &'a mut self,
        labels: &'a [(&'a str, &'a str)],
        index: u32,
        device: &'a Device<'d>,
    ) -> Gpu<'a, 'd> {
        Gpu {
            out: &mut self.out,
            f: &self.f,
            set: self.set,
            labels,
            index,
            device,
        }
    }

    /// Hands the read to `tiers`: served from now on, read again when due, or at the next
    /// collection if a value was missed through a passing driver error.
    fn keep(self, tiers: &mut Tiers, index: u32, group: Group, asked: &Asked) {
        let read = self.out.finish();
        if asked.missed == self.missed {
            tiers.keep(index, group, &read);
        } else {
            tiers.keep_incomplete(index, group, &read);
        }
    }
}

/// Reads `group` of the GPU with `read` if it is due, and serves its last reading into the
/// collection. A read that loses the GPU or the session stops the GPU's collection as any
/// query does.
fn tiered(
    g: &mut Gpu,
    group: Group,
    tiers: &mut Tiers,
    asked: &mut Asked,
    read: impl FnOnce(&mut Gpu, &mut Asked) -> std::result::Result<(), Stop>,
) -> std::result::Result<(), Stop> {
    if tiers.due(g.index, group) {
        let mut own = GroupRead::new(g.labels, asked);
        read(&mut own.gpu(g.labels, g.index, g.device), asked)?;
        own.keep(tiers, g.index, group, asked);
    }
    tiers.serve(g.index, group, g.out, g.set);
    Ok(())
}

/// Everything a GPU reports in one collection: the tiered groups (read when due, served as
/// last read), the constants, and what is read every collection.
pub(crate) fn gpu_metrics(
    g: &mut Gpu,
    constants: &Constants,
    asked: &mut Asked,
    tiers: &mut Tiers,
    options: &mut CollectOptions,
) -> std::result::Result<(), Stop> {
    if options.energy {
        tiered(g, Group::Energy, tiers, asked, |g, asked| {
            if let Some(e) = ask(asked, g.index, Query::Energy, || {
                g.device.total_energy_consumption()
            })? {
                g.sample(g.f.energy, e as f64 / 1000.0);
            }
            Ok(())
        })?;
    }
    if options.enabled {
        tiered(g, Group::Processes, tiers, asked, |g, asked| {
            process_metrics(g, asked, options)
        })?;
    }
    // The error fields (remapped rows, NVLink error totals) ride on the field-values call made
    // every collection when the errors group is due, rather than costing a call of their own.
    let mut errors = tiers
        .due(g.index, Group::Errors)
        .then(|| GroupRead::new(g.labels, asked));
    if let Some(own) = &mut errors {
        error_metrics(&mut own.gpu(g.labels, g.index, g.device), constants, asked)?;
    }
    let error_totals = options.nvlink && !options.nvlink_link_errors;
    let mut error_target = errors
        .as_mut()
        .map(|own| own.gpu(g.labels, g.index, g.device));
    field_metrics(
        g,
        error_target.as_mut(),
        asked,
        options.nvlink,
        error_totals,
    )?;
    if let Some(own) = errors {
        own.keep(tiers, g.index, Group::Errors, asked);
    }
    tiers.serve(g.index, Group::Errors, g.out, g.set);
    tiered(g, Group::State, tiers, asked, |g, asked| {
        state_metrics(g, asked, options)
    })?;
    constant_metrics(g, constants);
    fast_metrics(g, constants, asked, options)
}

/// What [`read_constants`] read, reported every collection.
fn constant_metrics(g: &mut Gpu, constants: &Constants) {
    if let Some((slow, shut)) = constants.thresholds {
        g.sample(g.f.temp_slowdown, f64::from(slow));
        g.sample(g.f.temp_shutdown, f64::from(shut));
    }
    if let Some((gm, wm)) = constants.pcie_max {
        g.sample(g.f.pcie_gen_max, f64::from(gm));
        g.sample(g.f.pcie_width_max, f64::from(wm));
    }
    if let Some(enabled) = constants.ecc_enabled {
        g.sample(g.f.ecc_mode, if enabled { 1.0 } else { 0.0 });
    }
    if let Some(p) = constants.power_limit_default {
        g.sample(g.f.power_limit_default, f64::from(p) / 1000.0);
    }
}

/// The errors group: ECC error counters (where ECC is on), retired pages, PCIe replays. (The
/// remapped rows and NVLink error totals come from [`field_metrics`].)
fn error_metrics(
    g: &mut Gpu,
    constants: &Constants,
    asked: &mut Asked,
) -> std::result::Result<(), Stop> {
    use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError};
    let (index, device) = (g.index, g.device);
    if let Some(r) = ask(asked, index, Query::PcieReplay, || {
        device.pcie_replay_counter()
    })? {
        g.sample(g.f.pcie_replays, f64::from(r));
    }
    if constants.ecc_enabled == Some(true) {
        for (kind, kind_name) in [
            (MemoryError::Corrected, "corrected"),
            (MemoryError::Uncorrected, "uncorrected"),
        ] {
            for (scope, scope_name) in [
                (EccCounter::Volatile, "volatile"),
                (EccCounter::Aggregate, "aggregate"),
            ] {
                if let Some(n) = ask(asked, index, Query::EccErrors, || {
                    device.total_ecc_errors(kind, scope)
                })? {
                    let ecc_set = g.with(&[("type", kind_name), ("scope", scope_name)]);
                    g.out.sample_in(g.f.ecc_errors, ecc_set, n as f64);
                }
            }
        }
    }
    if let Some((sbe, dbe)) = ask(asked, index, Query::RetiredPageCount, || {
        use nvml_wrapper::enum_wrappers::device::RetirementCause;
        Ok((
            device
                .retired_pages(RetirementCause::MultipleSingleBitEccErrors)?
                .len(),
            device
                .retired_pages(RetirementCause::DoubleBitEccError)?
                .len(),
        ))
    })? {
        for (cause, n) in [("multiple_single_bit_ecc", sbe), ("double_bit_ecc", dbe)] {
            let cause_set = g.with(&[("cause", cause)]);
            g.out.sample_in(g.f.retired_pages, cause_set, n as f64);
        }
    }
    if let Some(p) = ask(asked, index, Query::RetiredPages, || {
        device.are_pages_pending_retired()
    })? {
        g.sample(g.f.retired_pending, if p { 1.0 } else { 0.0 });
    }
    Ok(())
}

/// The field-values call: memory temperature, PCIe and NVLink byte counters into the
/// collection, and with `errors` (the errors group being read) the remapped rows and, with
/// `error_totals`, the NVLink error totals into that group's read.
fn field_metrics(
    g: &mut Gpu,
    mut errors: Option<&mut Gpu>,
    asked: &mut Asked,
    nvlink: bool,
    error_totals: bool,
) -> std::result::Result<(), Stop> {
    use nvml_wrapper::enums::device::SampleValue;
    let index = g.index;
    let fields: Vec<nvml_wrapper::structs::device::FieldId> = FAST_FIELDS
        .iter()
        .filter(|id| nvlink || ![FIELD_NVLINK_TX_KIB, FIELD_NVLINK_RX_KIB].contains(id))
        .chain(REMAP_FIELDS.iter().filter(|_| errors.is_some()))
        .chain(
            NVLINK_ERROR_TOTALS
                .iter()
                .filter(|_| errors.is_some() && error_totals)
                .map(|(id, _)| id),
        )
        .filter(|id| !asked.contains(&(index, Query::Field(**id))))
        .map(|id| nvml_wrapper::structs::device::FieldId(*id))
        .collect();
    if fields.is_empty() {
        return Ok(());
    }
    let Some(samples) = ask(asked, index, Query::Field(0), || {
        g.device.field_values_for(&fields)
    })?
    else {
        return Ok(());
    };
    for sample in samples.into_iter().flatten() {
        let id = sample.field.0;
        let value = match sample.value {
            Ok(SampleValue::F64(v)) => v,
            Ok(SampleValue::U32(v)) => f64::from(v),
            Ok(SampleValue::U64(v)) => v as f64,
            Ok(SampleValue::I64(v)) => v as f64,
            Err(NvmlError::NotSupported) => {
                tracing::debug!(
                    gpu = index,
                    field = id,
                    "field not supported by this GPU: not asked again"
                );
                asked.insert((index, Query::Field(id)));
                continue;
            }
            Err(NvmlError::GpuLost) => return Err(Stop::Lost),
            Err(_) => {
                asked.missed += 1;
                continue;
            }
        };
        match id {
            FIELD_MEMORY_TEMP => g.sample(g.f.memory_temp, value),
            FIELD_PCIE_TX_BYTES => g.sample(g.f.pcie_tx, value),
            FIELD_PCIE_RX_BYTES => g.sample(g.f.pcie_rx, value),
            FIELD_NVLINK_TX_KIB => g.sample(g.f.nvlink_tx, value * 1024.0),
            FIELD_NVLINK_RX_KIB => g.sample(g.f.nvlink_rx, value * 1024.0),
            _ => {
                let Some(e) = errors.as_deref_mut() else {
                    continue;
                };
                match id {
                    FIELD_REMAPPED_COR | FIELD_REMAPPED_UNC => {
                        let kind = if id == FIELD_REMAPPED_COR {
                            "correctable"
                        } else {
                            "uncorrectable"
                        };
                        let remap_set = e.with(&[("type", kind)]);
                        e.out.sample_in(e.f.remapped, remap_set, value);
                    }
                    FIELD_REMAPPED_PENDING => e.sample(e.f.remap_pending, value),
                    FIELD_REMAPPED_FAILURE => e.sample(e.f.remap_failure, value),
                    _ => {
                        if let Some((_, kind)) = NVLINK_ERROR_TOTALS.iter().find(|(t, _)| *t == id)
                        {
                            let kind_set = e.with(&[("type", kind)]);
                            e.out.sample_in(e.f.nvlink_errors, kind_set, value);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// The state group: power management limit, BAR1 memory, NVLink link state (and per-link
/// error counters with `nvlink_link_errors`), MIG mode and instances.
fn state_metrics(
    g: &mut Gpu,
    asked: &mut Asked,
    options: &CollectOptions,
) -> std::result::Result<(), Stop> {
    let (index, device) = (g.index, g.device);
    if let Some(p) = ask(asked, index, Query::PowerManagementLimit, || {
        device.power_management_limit()
    })? {
        g.sample(g.f.power_mgmt_limit, f64::from(p) / 1000.0);
    }
    if let Some(b) = ask(asked, index, Query::Bar1, || device.bar1_memory_info())? {
        g.sample(g.f.bar1_total, b.total as f64);
        g.sample(g.f.bar1_used, b.used as f64);
    }
    if options.nvlink {
        nvlink_metrics(g, asked, options.nvlink_link_errors)?;
    }
    if let Some(mode) = ask(asked, index, Query::Mig, || device.mig_mode())? {
        g.sample(g.f.mig_enabled, f64::from(mode.current));
        g.sample(g.f.mig_pending, f64::from(mode.pending));
        if mode.current == 1 {
            let max = device.mig_device_count().unwrap_or(0);
            let mut instances = 0;
            for i in 0..max {
                let Ok(mig) = device.mig_device_by_index(i) else {
                    continue;
                };
                instances += 1;
                mig_instance_metrics(g.out, g.f, g.labels, i, &mig);
            }
            g.sample(g.f.mig_instances, f64::from(instances));
        }
    }
    Ok(())
}

/// The processes group: compute processes by memory, with their SM and memory utilization
/// since the group was last read.
fn process_metrics(
    g: &mut Gpu,
    asked: &mut Asked,
    options: &mut CollectOptions,
) -> std::result::Result<(), Stop> {
    use nvml_wrapper::enums::device::UsedGpuMemory;
    let (index, device) = (g.index, g.device);
    let Some(mut list) = ask(asked, index, Query::Processes, || {
        device.running_compute_processes()
    })?
    else {
        return Ok(());
    };
    list.sort_by_key(|p| {
        std::cmp::Reverse(match p.used_gpu_memory {
            UsedGpuMemory::Used(b) => b,
            UsedGpuMemory::Unavailable => 0,
        })
    });
    list.truncate(options.max);
    // Over 2 ms of CPU on an H200 even when it finds nothing: asked only when there is a
    // process to report it for.
    let utilization = if list.is_empty() {
        None
    } else {
        process_utilization(device, index, asked, options)?
    };
    for p in &list {
        let pid = p.pid.to_string();
        let name = options.nvml.sys_process_name(p.pid, 64).unwrap_or_default();
        let process_set = g.with(&[("pid", pid.as_str()), ("process", name.as_str())]);
        if let UsedGpuMemory::Used(bytes) = p.used_gpu_memory {
            g.out
                .sample_in(g.f.process_memory, process_set, bytes as f64);
        }
        if let Some(samples) = &utilization {
            // NVML returns samples only for processes that were busy in the window: a running
            // process without one was idle (0).
            let (sm, mem) = samples.get(&p.pid).copied().unwrap_or((0, 0));
            g.out
                .sample_in(g.f.process_sm_util, process_set, f64::from(sm) / 100.0);
            g.out
                .sample_in(g.f.process_mem_util, process_set, f64::from(mem) / 100.0);
        }
    }
    Ok(())
}

/// What is read every collection: utilization, memory, temperature, power, clocks,
/// performance state, fan, encoder and decoder, the current PCIe link, clocks event reasons,
/// and the sampled PCIe throughput where asked for.
fn fast_metrics(
    g: &mut Gpu,
    constants: &Constants,
    asked: &mut Asked,
    options: &CollectOptions,
) -> std::result::Result<(), Stop> {
    let (index, device) = (g.index, g.device);
    if let Some(u) = ask(asked, index, Query::Utilization, || {
        device.utilization_rates()
    })? {
        g.sample(g.f.util, f64::from(u.gpu) / 100.0);
        g.sample(g.f.mem_util, f64::from(u.memory) / 100.0);
    }
    if let Some(m) = ask(asked, index, Query::Memory, || device.memory_info())? {
        g.sample(g.f.mem_total, m.total as f64);
        g.sample(g.f.mem_used, m.used as f64);
        g.sample(g.f.mem_free, m.free as f64);
        g.sample(g.f.mem_reserved, m.reserved as f64);
    }
    if let Some(t) = ask(asked, index, Query::Temperature, || {
        device.temperature(TemperatureSensor::Gpu)
    })? {
        g.sample(g.f.temp, f64::from(t));
    }
    if let Some(p) = ask(asked, index, Query::PowerUsage, || device.power_usage())? {
        g.sample(g.f.power, f64::from(p) / 1000.0);
    }
    if let Some(p) = ask(asked, index, Query::PowerLimit, || {
        device.enforced_power_limit()
    })? {
        g.sample(g.f.power_limit, f64::from(p) / 1000.0);
    }
    if let Some((gen, width)) = ask(asked, index, Query::Pcie, || {
        Ok((
            device.current_pcie_link_gen()?,
            device.current_pcie_link_width()?,
        ))
    })? {
        g.sample(g.f.pcie_gen, f64::from(gen));
        g.sample(g.f.pcie_width, f64::from(width));
    }
    if let Some(bits) = ask(asked, index, Query::Throttle, || {
        device.current_throttle_reasons().map(|r| r.bits())
    })? {
        for (bit, reason) in THROTTLE_REASONS {
            let reason_set = g.with(&[("reason", reason)]);
            g.out.sample_in(
                g.f.throttle,
                reason_set,
                if bits & bit != 0 { 1.0 } else { 0.0 },
            );
        }
    }
    if options.pcie_throughput_sampled {
        use nvml_wrapper::enum_wrappers::device::PcieUtilCounter;
        if let Some((tx, rx)) = ask(asked, index, Query::PcieThroughput, || {
            Ok((
                device.pcie_throughput(PcieUtilCounter::Send)?,
                device.pcie_throughput(PcieUtilCounter::Receive)?,
            ))
        })? {
            for (direction, kb) in [("tx", tx), ("rx", rx)] {
                let dir_set = g.with(&[("direction", direction)]);
                g.out
                    .sample_in(g.f.pcie_throughput, dir_set, f64::from(kb) * 1024.0);
            }
        }
    }
    for ((clock, name, id), max) in CLOCKS.into_iter().zip(constants.max_clocks) {
        let current = ask(asked, index, Query::Clock(id), || device.clock_info(clock))?;
        if current.is_none() && max.is_none() {
            continue;
        }
        let clock_set = g.with(&[("clock", name)]);
        if let Some(mhz) = current {
            g.out.sample_in(g.f.clock, clock_set, f64::from(mhz) * 1e6);
        }
        if let Some(mhz) = max {
            g.out
                .sample_in(g.f.clock_max, clock_set, f64::from(mhz) * 1e6);
        }
    }
    if let Some(p) = ask(asked, index, Query::PState, || device.performance_state())? {
        g.sample(g.f.pstate, f64::from(p.as_c()));
    }
    if let Some(s) = ask(asked, index, Query::Fan, || {
        match device.fan_speed(0) {
            // A board without fans (H100/H200 SXM) says fan 0 is out of range.
            Err(NvmlError::InvalidArg) => Err(NvmlError::NotSupported),
            other => other,
        }
    })? {
        g.sample(g.f.fan, f64::from(s) / 100.0);
    }
    if let Some(u) = ask(asked, index, Query::Encoder, || {
        device.encoder_utilization()
    })? {
        g.sample(g.f.encoder, f64::from(u.utilization) / 100.0);
    }
    if let Some(u) = ask(asked, index, Query::Decoder, || {
        device.decoder_utilization()
    })? {
        g.sample(g.f.decoder, f64::from(u.utilization) / 100.0);
    }
    Ok(())
}
