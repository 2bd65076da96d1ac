//! Asking NVML: which queries a GPU does not support, what a failure means for the collection,
//! and the constants read once per GPU.

use std::collections::HashSet;
use std::time::Duration;

use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Device;

use crate::families::CLOCKS;

/// Queries that can answer NOT_SUPPORTED, remembered per GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Query {
    Utilization,
    Memory,
    Temperature,
    PowerUsage,
    PowerLimit,
    PowerLimitDefault,
    Energy,
    Clock(u8),
    MaxClock(u8),
    PState,
    Fan,
    Encoder,
    Decoder,
    PowerManagementLimit,
    Thresholds,
    Pcie,
    PcieMax,
    PcieReplay,
    Throttle,
    Ecc,
    EccErrors,
    RetiredPages,
    Bar1,
    Processes,
    ProcessUtilization,
    Field(u32),
    NvLink,
    Mig,
    RetiredPageCount,
    PcieThroughput,
}

/// What the GPUs answered that decides what is asked next: the queries a GPU does not support
/// (not asked again), and how many queries failed with a passing driver error (a tiered group
/// whose read missed one is read again at the next collection).
#[derive(Default)]
pub(crate) struct Asked {
    pub(crate) not_supported: HashSet<(u32, Query)>,
    pub(crate) missed: u32,
}

impl Asked {
    pub(crate) fn contains(&self, query: &(u32, Query)) -> bool {
        self.not_supported.contains(query)
    }

    pub(crate) fn insert(&mut self, query: (u32, Query)) {
        self.not_supported.insert(query);
    }
}

/// Field-value ids (nvml.h): memory temperature, PCIe byte counters, remapped rows.
pub(crate) const FIELD_MEMORY_TEMP: u32 = 82;
pub(crate) const FIELD_REMAPPED_COR: u32 = 142;
pub(crate) const FIELD_REMAPPED_UNC: u32 = 143;
pub(crate) const FIELD_REMAPPED_PENDING: u32 = 144;
pub(crate) const FIELD_REMAPPED_FAILURE: u32 = 145;
pub(crate) const FIELD_PCIE_TX_BYTES: u32 = 197;
pub(crate) const FIELD_PCIE_RX_BYTES: u32 = 198;
pub(crate) const FIELD_NVLINK_TX_KIB: u32 = 138;
pub(crate) const FIELD_NVLINK_RX_KIB: u32 = 139;
/// NVLink error counters summed over links: CRC flit, CRC data, replay, recovery.
pub(crate) const FIELD_NVLINK_CRC_FLIT_TOTAL: u32 = 38;
pub(crate) const FIELD_NVLINK_CRC_DATA_TOTAL: u32 = 45;
pub(crate) const FIELD_NVLINK_REPLAY_TOTAL: u32 = 52;
pub(crate) const FIELD_NVLINK_RECOVERY_TOTAL: u32 = 59;
pub(crate) const NVLINK_ERROR_TOTALS: [(u32, &str); 4] = [
    (FIELD_NVLINK_REPLAY_TOTAL, "replay"),
    (FIELD_NVLINK_RECOVERY_TOTAL, "recovery"),
    (FIELD_NVLINK_CRC_FLIT_TOTAL, "crc_flit"),
    (FIELD_NVLINK_CRC_DATA_TOTAL, "crc_data"),
];
/// Fields read every collection (the NVLink ones only with `nvlink`).
pub(crate) const FAST_FIELDS: [u32; 5] = [
    FIELD_MEMORY_TEMP,
    FIELD_PCIE_TX_BYTES,
    FIELD_PCIE_RX_BYTES,
    FIELD_NVLINK_TX_KIB,
    FIELD_NVLINK_RX_KIB,
];
/// Fields of the errors group.
pub(crate) const REMAP_FIELDS: [u32; 4] = [
    FIELD_REMAPPED_COR,
    FIELD_REMAPPED_UNC,
    FIELD_REMAPPED_PENDING,
    FIELD_REMAPPED_FAILURE,
];

/// What a GPU answers the same every time while it runs (a GPU reset, which NVML sees as the
/// GPU lost and back, or a driver restart can change it): read once, refreshed every
/// [`CONSTANTS_REFRESH`]. On an H200 (driver 580) the four max-clock calls alone cost 5 to 6 ms
/// of CPU, over a third of a collection (docs/benchmarks-history.md).
#[derive(Clone, Copy, Default)]
pub(crate) struct Constants {
    /// Max graphics, SM, memory and video clocks, MHz (in [`CLOCKS`]' order).
    pub(crate) max_clocks: [Option<u32>; 4],
    /// Slowdown and shutdown temperature thresholds, °C.
    pub(crate) thresholds: Option<(u32, u32)>,
    /// Default power limit, mW.
    pub(crate) power_limit_default: Option<u32>,
    /// Max PCIe link generation and width.
    pub(crate) pcie_max: Option<(u32, u32)>,
    /// ECC currently enabled (a change takes effect only at the next reset).
    pub(crate) ecc_enabled: Option<bool>,
}

/// How long [`Constants`] are used before they are read again.
pub(crate) const CONSTANTS_REFRESH: Duration = Duration::from_secs(600);

/// Reads a GPU's [`Constants`]; `true` with them when every query answered or is known
/// NOT_SUPPORTED. A query that failed otherwise (a passing driver error) is asked again at the
/// next collection rather than left out for [`CONSTANTS_REFRESH`].
pub(crate) fn read_constants(
    device: &Device,
    index: u32,
    unsupported: &mut Asked,
) -> std::result::Result<(Constants, bool), Stop> {
    use nvml_wrapper::enum_wrappers::device::TemperatureThreshold;
    let mut missed = Vec::new();
    let mut max_clocks = [None; 4];
    for (slot, (clock, _, id)) in max_clocks.iter_mut().zip(CLOCKS) {
        *slot = ask(unsupported, index, Query::MaxClock(id), || {
            device.max_clock_info(clock)
        })?;
        if slot.is_none() {
            missed.push(Query::MaxClock(id));
        }
    }
    let thresholds = ask(unsupported, index, Query::Thresholds, || {
        Ok((
            device.temperature_threshold(TemperatureThreshold::Slowdown)?,
            device.temperature_threshold(TemperatureThreshold::Shutdown)?,
        ))
    })?;
    let power_limit_default = ask(unsupported, index, Query::PowerLimitDefault, || {
        device.power_management_limit_default()
    })?;
    let pcie_max = ask(unsupported, index, Query::PcieMax, || {
        Ok((device.max_pcie_link_gen()?, device.max_pcie_link_width()?))
    })?;
    let ecc_enabled = ask(unsupported, index, Query::Ecc, || {
        device.is_ecc_enabled().map(|m| m.currently_enabled)
    })?;
    for (query, absent) in [
        (Query::Thresholds, thresholds.is_none()),
        (Query::PowerLimitDefault, power_limit_default.is_none()),
        (Query::PcieMax, pcie_max.is_none()),
        (Query::Ecc, ecc_enabled.is_none()),
    ] {
        if absent {
            missed.push(query);
        }
    }
    let complete = missed.iter().all(|q| unsupported.contains(&(index, *q)));
    let constants = Constants {
        max_clocks,
        thresholds,
        power_limit_default,
        pcie_max,
        ecc_enabled,
    };
    Ok((constants, complete))
}

/// Why a GPU's queries stopped this cycle.
pub(crate) enum Stop {
    Lost,
    Nvml(NvmlError),
}

/// Asks one query unless the GPU said NOT_SUPPORTED before.
pub(crate) fn ask<T>(
    unsupported: &mut Asked,
    index: u32,
    query: Query,
    call: impl FnOnce() -> std::result::Result<T, NvmlError>,
) -> std::result::Result<Option<T>, Stop> {
    if unsupported.contains(&(index, query)) {
        return Ok(None);
    }
    match call() {
        Ok(v) => Ok(Some(v)),
        Err(NvmlError::NotSupported) => {
            tracing::debug!(
                gpu = index,
                ?query,
                "not supported by this GPU: not asked again"
            );
            unsupported.insert((index, query));
            Ok(None)
        }
        Err(NvmlError::GpuLost) => Err(Stop::Lost),
        Err(e) if is_fatal_for_session(&e) => Err(Stop::Nvml(e)),
        Err(e) => {
            tracing::debug!(gpu = index, ?query, "query failed: {e}");
            unsupported.missed += 1;
            Ok(None)
        }
    }
}

pub(crate) fn is_fatal_for_session(err: &NvmlError) -> bool {
    matches!(
        err,
        NvmlError::Uninitialized
            | NvmlError::LibRmVersionMismatch
            | NvmlError::DriverNotLoaded
            | NvmlError::NoPermission
    )
}
