//! metricsd collector for NVIDIA GPUs through NVML (nvml-wrapper).
//!
//! Behaviour operators depend on:
//! - a query a GPU answers NOT_SUPPORTED is remembered per GPU and not asked again; its metric
//!   is absent (never 0), logged once at debug level;
//! - a GPU that falls off the bus is reported as `gpu_up 0` with its last identity labels while
//!   the other GPUs keep reporting, and is picked up again when it returns;
//! - NVML failing to initialise (no driver, library missing, driver/library mismatch, no
//!   permission) is an error in words an operator understands; the host retries with back-off
//!   and no other collector is held up.

pub mod dcgm;
pub mod tiers;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metricsd_plugin_api::{
    export_plugin, BatchBuilder, Collector, Context, Error, FamilyId, LabelSetId, Result,
};
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};
use serde::Deserialize;
use tiers::{Group, ReadEvery, Tiers};

/// The instance's `[collectors.config]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The NVML library to load.
    #[serde(default = "default_library_path")]
    pub library_path: String,
    /// Only these GPUs (indices like `"0"` or UUIDs); empty means all.
    #[serde(default)]
    pub include: Vec<String>,
    /// Never these GPUs (indices or UUIDs).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Report per-process GPU memory and utilization (`gpu_process_*`).
    #[serde(default = "yes")]
    pub processes: bool,
    /// Most processes reported per GPU (pid labels churn series; staleness clears them).
    #[serde(default = "default_max_processes")]
    pub max_processes: usize,
    /// `default` (metricsd names) or `dcgm` (dcgm-exporter names, units and labels).
    #[serde(default)]
    pub naming: Naming,
    /// Also ask `nvmlDeviceGetPcieThroughput`, which samples for 20 ms per direction and GPU
    /// (over 300 ms per cycle on 8 GPUs); the PCIe byte counters are collected either way.
    #[serde(default)]
    pub pcie_throughput_sampled: bool,
    /// Report NVLink link state, error counters and throughput where the GPU has links.
    #[serde(default = "yes")]
    pub nvlink: bool,
    /// NVLink error counters per link (`nvmlDeviceGetNvLinkErrorCounter`: four calls and four
    /// series per link, 72 of each on an H100) instead of per GPU (four totals from the
    /// field-values call the collector makes anyway).
    #[serde(default)]
    pub nvlink_link_errors: bool,
    /// Count critical Xid errors from an NVML event set, on a thread of the plugin's own.
    #[serde(default = "yes")]
    pub xid_events: bool,
    /// Report the energy counter (`nvmlDeviceGetTotalEnergyConsumption`): on an H200 with
    /// driver 580 this one call costs 4 to 6 ms of CPU, about a third of a collection.
    #[serde(default = "yes")]
    pub energy: bool,
    /// Collect GPM profiling metrics (Hopper and newer), over each collection interval, on a
    /// thread of the plugin's own.
    #[serde(default = "yes")]
    pub gpm: bool,
    /// Every how many collections the slower groups are read (`energy`, `processes`,
    /// `errors`, `state`); between reads the last reading is served.
    #[serde(default)]
    pub read_every: ReadEvery,
}

/// A thread of the plugin's own, told to stop when dropped, and joined unless it was started
/// [`Background::detached`].
struct Background {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Background {
    fn spawn(
        name: &str,
        dispatch: tracing::Dispatch,
        body: impl FnOnce(&AtomicBool) + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || body(&thread_stop));
            })
            .map_err(|e| tracing::warn!("cannot start the {name} thread: {e}"))
            .ok();
        Self { stop, thread }
    }
}

impl Background {
    /// Not joined when dropped: for a thread blocked in a call that cannot be interrupted (an
    /// NVML event wait), which sees the stop flag when the call returns and ends then. Its code
    /// stays mapped: the host never unloads a plugin library.
    fn detached(mut self) -> Self {
        self.thread = None;
        self
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // The GPM thread is woken by its watcher's drop before this.
            let _ = t.join();
        }
    }
}

/// GPM metrics this plugin asks for, with their metric names.
const GPM_METRICS: [(nvml_wrapper::enums::gpm::GpmMetricId, &str, &str); 8] = {
    use nvml_wrapper::enums::gpm::GpmMetricId as M;
    [
        (
            M::GraphicsUtil,
            "gpu_graphics_engine_active_ratio",
            "Fraction of time any warp was active on an SM (graphics engine active).",
        ),
        (
            M::SmUtil,
            "gpu_sm_active_ratio",
            "Fraction of time each SM had at least one warp assigned, averaged over SMs.",
        ),
        (
            M::SmOccupancy,
            "gpu_sm_occupancy_ratio",
            "Warps active against the theoretical maximum, averaged over SMs.",
        ),
        (
            M::AnyTensorUtil,
            "gpu_tensor_active_ratio",
            "Fraction of time the tensor pipes were active.",
        ),
        (
            M::DramBwUtil,
            "gpu_dram_active_ratio",
            "Fraction of peak DRAM bandwidth used.",
        ),
        (
            M::Fp64Util,
            "gpu_fp64_active_ratio",
            "Fraction of time the FP64 pipes were active.",
        ),
        (
            M::Fp32Util,
            "gpu_fp32_active_ratio",
            "Fraction of time the FP32 pipes were active.",
        ),
        (
            M::Fp16Util,
            "gpu_fp16_active_ratio",
            "Fraction of time the FP16 pipes were active.",
        ),
    ]
};

/// What the GPM thread and the collections share: how many computations were asked for and
/// done, and the latest values (GPU index → one value per `GPM_METRICS` entry, as ratios).
#[derive(Default)]
struct GpmState {
    asked: u64,
    done: u64,
    /// The thread has ended (no GPU supports GPM, or it was stopped): nothing to wait for.
    ended: bool,
    /// The watcher is going away: the thread ends.
    stopping: bool,
    values: BTreeMap<u32, Vec<Option<f64>>>,
}

#[derive(Default)]
struct GpmShared {
    state: Mutex<GpmState>,
    /// Signalled when `asked` or `done` moves.
    changed: Condvar,
}

/// Samples younger than this are not compared: a ratio over a few milliseconds says little
/// (`metricsd once` gets no GPM values rather than noise).
const GPM_MIN_SPAN: Duration = Duration::from_millis(100);

/// How long a collection waits for the GPM thread (a sample and a computation take a few ms per
/// GPU; a GPM call that hangs costs a collection its GPM values, not its other metrics).
const GPM_WAIT: Duration = Duration::from_millis(500);

fn gpm_sample<'nvml>(
    device: &Device<'nvml>,
    index: u32,
) -> Option<(Instant, nvml_wrapper::gpm::GpmSample<'nvml>)> {
    match device.gpm_sample() {
        Ok(s) => Some((Instant::now(), s)),
        Err(e) => {
            tracing::debug!(gpu = index, "GPM sample failed: {e}");
            None
        }
    }
}

/// One GPM sample per GPU each time a collection asks, compared with the previous one: the
/// values are averages over the collection interval. (On an H200 a sample and a computation
/// cost about 2.7 ms of CPU, so they are made once per collection, not on a timer of their own.)
fn gpm_loop(nvml: &Nvml, shared: &GpmShared, stop: &AtomicBool) {
    let count = nvml.device_count().unwrap_or(0);
    let devices: Vec<(u32, Device)> = (0..count)
        .filter_map(|i| nvml.device_by_index(i).ok().map(|d| (i, d)))
        .filter(|(_, d)| d.gpm_support().unwrap_or(false))
        .collect();
    if devices.is_empty() {
        tracing::debug!("no GPU supports GPM: the GPM thread ends");
        return;
    }
    let ids: Vec<_> = GPM_METRICS.iter().map(|(id, _, _)| *id).collect();
    let mut previous: Vec<_> = devices.iter().map(|(i, d)| gpm_sample(d, *i)).collect();
    loop {
        let target = {
            let Ok(mut state) = shared.state.lock() else {
                return;
            };
            // Asleep until a collection asks or the watcher goes away: no wake-ups between
            // collections.
            while state.asked == state.done {
                if state.stopping || stop.load(Ordering::Relaxed) {
                    return;
                }
                state = match shared.changed.wait(state) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            }
            state.asked
        };
        let mut values = BTreeMap::new();
        for (slot, (index, device)) in devices.iter().enumerate() {
            let Some((at, current)) = gpm_sample(device, *index) else {
                previous[slot] = None;
                continue;
            };
            match &previous[slot] {
                Some((before_at, _)) if at.duration_since(*before_at) < GPM_MIN_SPAN => continue,
                Some((_, before)) => {
                    match nvml_wrapper::gpm::gpm_metrics_get(nvml, before, &current, &ids) {
                        Ok(results) => {
                            let got = results
                                .into_iter()
                                .map(|r| r.ok().map(|m| m.value / 100.0))
                                .collect();
                            values.insert(*index, got);
                        }
                        Err(e) => tracing::debug!(gpu = index, "GPM metrics failed: {e}"),
                    }
                }
                None => {}
            }
            previous[slot] = Some((at, current));
        }
        let Ok(mut state) = shared.state.lock() else {
            return;
        };
        state.values = values;
        state.done = target;
        shared.changed.notify_all();
    }
}

/// Xid errors seen by the event thread.
#[derive(Default)]
struct XidBook {
    /// (GPU index, Xid) → count since the watcher started.
    counts: BTreeMap<(u32, u64), u64>,
    /// GPU index → (last Xid, when, seconds since the epoch).
    last: BTreeMap<u32, (u64, f64)>,
}

/// The thread that waits on an NVML event set for critical Xid errors, and what it saw.
struct XidWatcher {
    book: Arc<Mutex<XidBook>>,
    _thread: Background,
}

impl XidWatcher {
    fn start(nvml: Arc<Nvml>, dispatch: tracing::Dispatch) -> Self {
        let book = Arc::new(Mutex::new(XidBook::default()));
        let thread_book = Arc::clone(&book);
        let thread = Background::spawn("nvml-xid", dispatch, move |stop| {
            xid_loop(&nvml, &thread_book, stop)
        })
        .detached();
        Self {
            book,
            _thread: thread,
        }
    }
}

/// The thread that computes GPM metrics when a collection asks, and what it computed.
struct GpmWatcher {
    shared: Arc<GpmShared>,
    _thread: Background,
}

impl GpmWatcher {
    fn start(nvml: Arc<Nvml>, dispatch: tracing::Dispatch) -> Self {
        let shared = Arc::new(GpmShared::default());
        let thread_shared = Arc::clone(&shared);
        let thread = Background::spawn("nvml-gpm", dispatch, move |stop| {
            gpm_loop(&nvml, &thread_shared, stop);
            if let Ok(mut state) = thread_shared.state.lock() {
                state.ended = true;
                thread_shared.changed.notify_all();
            }
        });
        if thread.thread.is_none() {
            if let Ok(mut state) = shared.state.lock() {
                state.ended = true;
            }
        }
        Self {
            shared,
            _thread: thread,
        }
    }

    /// Asks for the GPM values since the previous ask; [`Self::values`] gives them.
    fn ask(&self) -> Option<u64> {
        let mut state = self.shared.state.lock().ok()?;
        if state.ended {
            return None;
        }
        state.asked += 1;
        self.shared.changed.notify_all();
        Some(state.asked)
    }

    /// The values computed for `ask` (waiting up to [`GPM_WAIT`] for them), or none.
    fn values(&self, ask: u64) -> BTreeMap<u32, Vec<Option<f64>>> {
        let Ok(state) = self.shared.state.lock() else {
            return BTreeMap::new();
        };
        match self
            .shared
            .changed
            .wait_timeout_while(state, GPM_WAIT, |s| s.done < ask && !s.ended)
        {
            Ok((state, _)) if state.done >= ask => state.values.clone(),
            _ => BTreeMap::new(),
        }
    }
}

impl Drop for GpmWatcher {
    /// Wakes the thread so that it sees it must end (then `Background` joins it).
    fn drop(&mut self) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.stopping = true;
        }
        self.shared.changed.notify_all();
    }
}

/// How long one wait for an Xid event lasts: the thread wakes this often without events (6
/// times a minute; it was 120 at 500 ms).
const XID_WAIT_MS: u32 = 10_000;

fn xid_loop(nvml: &Nvml, book: &Mutex<XidBook>, stop: &AtomicBool) {
    use nvml_wrapper::bitmasks::event::EventTypes;
    use nvml_wrapper::enums::event::XidError;
    let mut set = match nvml.create_event_set() {
        Ok(set) => set,
        Err(e) => {
            tracing::warn!("Xid errors are not counted: cannot create an NVML event set: {e}");
            return;
        }
    };
    let count = nvml.device_count().unwrap_or(0);
    for index in 0..count {
        let Ok(device) = nvml.device_by_index(index) else {
            continue;
        };
        set = match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(set) => set,
            Err(e) => {
                tracing::warn!(
                    gpu = index,
                    "Xid errors are not counted: cannot register for events: {}",
                    e.error
                );
                return;
            }
        };
    }
    while !stop.load(Ordering::Relaxed) {
        // Blocked in the driver until an event comes; the timeout only bounds how long the
        // thread outlives its collector (it is not joined: see `Background::detached`).
        match set.wait(XID_WAIT_MS) {
            Ok(event) => {
                let xid = match event.event_data {
                    Some(XidError::Value(v)) => v,
                    Some(XidError::Unknown) => 999,
                    None => continue,
                };
                let Ok(index) = event.device.index() else {
                    continue;
                };
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                tracing::warn!(gpu = index, xid, "GPU reported critical Xid error {xid}");
                if let Ok(mut b) = book.lock() {
                    *b.counts.entry((index, xid)).or_insert(0) += 1;
                    b.last.insert(index, (xid, now));
                }
            }
            Err(NvmlError::Timeout) => {}
            Err(e) => {
                tracing::warn!("waiting for NVML events failed: {e}; retrying in 1 s");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
}

/// Metric naming profile.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Naming {
    /// metricsd's names: base units, `gpu_*`.
    #[default]
    Default,
    /// dcgm-exporter's names for the metrics both have.
    Dcgm,
}

fn yes() -> bool {
    true
}

fn default_max_processes() -> usize {
    32
}

fn default_library_path() -> String {
    "libnvidia-ml.so.1".to_string()
}

/// Identity labels of a GPU, kept so a lost GPU can still be reported under them.
#[derive(Debug, Clone)]
struct Identity {
    uuid: String,
    name: String,
    pci_bus_id: String,
    serial: Option<String>,
    vbios: Option<String>,
    board_part_number: Option<String>,
}

/// Queries that can answer NOT_SUPPORTED, remembered per GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Query {
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
struct Asked {
    not_supported: HashSet<(u32, Query)>,
    missed: u32,
}

impl Asked {
    fn contains(&self, query: &(u32, Query)) -> bool {
        self.not_supported.contains(query)
    }

    fn insert(&mut self, query: (u32, Query)) {
        self.not_supported.insert(query);
    }
}

/// Field-value ids (nvml.h): memory temperature, PCIe byte counters, remapped rows.
const FIELD_MEMORY_TEMP: u32 = 82;
const FIELD_REMAPPED_COR: u32 = 142;
const FIELD_REMAPPED_UNC: u32 = 143;
const FIELD_REMAPPED_PENDING: u32 = 144;
const FIELD_REMAPPED_FAILURE: u32 = 145;
const FIELD_PCIE_TX_BYTES: u32 = 197;
const FIELD_PCIE_RX_BYTES: u32 = 198;
const FIELD_NVLINK_TX_KIB: u32 = 138;
const FIELD_NVLINK_RX_KIB: u32 = 139;
/// NVLink error counters summed over links: CRC flit, CRC data, replay, recovery.
const FIELD_NVLINK_CRC_FLIT_TOTAL: u32 = 38;
const FIELD_NVLINK_CRC_DATA_TOTAL: u32 = 45;
const FIELD_NVLINK_REPLAY_TOTAL: u32 = 52;
const FIELD_NVLINK_RECOVERY_TOTAL: u32 = 59;
const NVLINK_ERROR_TOTALS: [(u32, &str); 4] = [
    (FIELD_NVLINK_REPLAY_TOTAL, "replay"),
    (FIELD_NVLINK_RECOVERY_TOTAL, "recovery"),
    (FIELD_NVLINK_CRC_FLIT_TOTAL, "crc_flit"),
    (FIELD_NVLINK_CRC_DATA_TOTAL, "crc_data"),
];
/// Fields read every collection (the NVLink ones only with `nvlink`).
const FAST_FIELDS: [u32; 5] = [
    FIELD_MEMORY_TEMP,
    FIELD_PCIE_TX_BYTES,
    FIELD_PCIE_RX_BYTES,
    FIELD_NVLINK_TX_KIB,
    FIELD_NVLINK_RX_KIB,
];
/// Fields of the errors group.
const REMAP_FIELDS: [u32; 4] = [
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
struct Constants {
    /// Max graphics, SM, memory and video clocks, MHz (in [`CLOCKS`]' order).
    max_clocks: [Option<u32>; 4],
    /// Slowdown and shutdown temperature thresholds, °C.
    thresholds: Option<(u32, u32)>,
    /// Default power limit, mW.
    power_limit_default: Option<u32>,
    /// Max PCIe link generation and width.
    pcie_max: Option<(u32, u32)>,
    /// ECC currently enabled (a change takes effect only at the next reset).
    ecc_enabled: Option<bool>,
}

/// How long [`Constants`] are used before they are read again.
const CONSTANTS_REFRESH: Duration = Duration::from_secs(600);

/// Reads a GPU's [`Constants`]; `true` with them when every query answered or is known
/// NOT_SUPPORTED. A query that failed otherwise (a passing driver error) is asked again at the
/// next collection rather than left out for [`CONSTANTS_REFRESH`].
fn read_constants(
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
enum Stop {
    Lost,
    Nvml(NvmlError),
}

/// The collector instance.
pub struct NvmlCollector {
    config: Config,
    nvml: Option<Arc<Nvml>>,
    driver_version: String,
    cuda_version: String,
    identities: BTreeMap<u32, Identity>,
    /// Per GPU, its [`Constants`] and when they were read.
    constants: HashMap<u32, (Instant, Constants)>,
    /// The tiered groups' last readings.
    tiers: Tiers,
    unsupported: Asked,
    /// GPUs lost from the bus, logged when they go, summarised while they stay lost and
    /// logged when they answer again.
    lost: BTreeMap<u32, metricsd_plugin_api::ratelimit::Repeating>,
    /// Per GPU, the newest process-utilization sample seen (µs), asked for what came after.
    process_util_seen: HashMap<u32, u64>,
    /// `Hostname` label of the dcgm profile: `NODE_NAME` (Kubernetes) or the kernel hostname.
    hostname: String,
    /// Families, label sets and samples of the last plain batch the dcgm profile translated.
    plain_sizes: (usize, usize, usize),
    xid: Option<XidWatcher>,
    gpm: Option<GpmWatcher>,
    dispatch: tracing::Dispatch,
}

/// One line an operator understands, for an NVML error at start-up.
pub fn describe_init_error(library: &str, err: &NvmlError) -> String {
    match err {
        NvmlError::LibloadingError(e) => format!(
            "cannot load the NVML library {library} ({e}): is the NVIDIA driver installed? Inside a container, run it with the NVIDIA container runtime; set library_path if the library lives elsewhere"
        ),
        NvmlError::DriverNotLoaded => "the NVIDIA kernel driver is not loaded (NVML: driver not loaded)".to_string(),
        NvmlError::LibRmVersionMismatch => "the NVML library and the loaded NVIDIA kernel module are different versions (usually after a driver upgrade without reboot): reboot, or reload the nvidia kernel modules".to_string(),
        NvmlError::NoPermission => "no permission to use the GPUs (/dev/nvidia*): run as a user in the video group, or give the container access to the devices".to_string(),
        other => format!("NVML initialisation failed: {other}"),
    }
}

fn is_fatal_for_session(err: &NvmlError) -> bool {
    matches!(
        err,
        NvmlError::Uninitialized
            | NvmlError::LibRmVersionMismatch
            | NvmlError::DriverNotLoaded
            | NvmlError::NoPermission
    )
}

struct Families {
    up: FamilyId,
    util: FamilyId,
    mem_util: FamilyId,
    mem_total: FamilyId,
    mem_used: FamilyId,
    mem_free: FamilyId,
    mem_reserved: FamilyId,
    temp: FamilyId,
    power: FamilyId,
    power_limit: FamilyId,
    power_limit_default: FamilyId,
    energy: FamilyId,
    clock: FamilyId,
    clock_max: FamilyId,
    pstate: FamilyId,
    fan: FamilyId,
    encoder: FamilyId,
    decoder: FamilyId,
    info: FamilyId,
    power_mgmt_limit: FamilyId,
    temp_slowdown: FamilyId,
    temp_shutdown: FamilyId,
    pcie_gen: FamilyId,
    pcie_width: FamilyId,
    pcie_gen_max: FamilyId,
    pcie_width_max: FamilyId,
    pcie_replays: FamilyId,
    throttle: FamilyId,
    ecc_mode: FamilyId,
    ecc_errors: FamilyId,
    retired_pending: FamilyId,
    bar1_total: FamilyId,
    bar1_used: FamilyId,
    process_memory: FamilyId,
    mig_memory_total: FamilyId,
    mig_memory_used: FamilyId,
    process_sm_util: FamilyId,
    process_mem_util: FamilyId,
    memory_temp: FamilyId,
    pcie_tx: FamilyId,
    pcie_rx: FamilyId,
    remapped: FamilyId,
    remap_pending: FamilyId,
    remap_failure: FamilyId,
    nvlink_up: FamilyId,
    nvlink_errors: FamilyId,
    nvlink_tx: FamilyId,
    nvlink_rx: FamilyId,
    mig_enabled: FamilyId,
    mig_pending: FamilyId,
    mig_instances: FamilyId,
    retired_pages: FamilyId,
    pcie_throughput: FamilyId,
}

impl Families {
    fn declare(out: &mut BatchBuilder) -> Self {
        Self {
            up: out.gauge(
                "gpu_up",
                "1 if the GPU answers NVML queries, 0 if it is lost.",
                "",
            ),
            util: out.gauge(
                "gpu_utilization_ratio",
                "Fraction of the last sample period a kernel ran on the GPU.",
                "ratio",
            ),
            mem_util: out.gauge(
                "gpu_memory_utilization_ratio",
                "Fraction of the last sample period device memory was read or written.",
                "ratio",
            ),
            mem_total: out.gauge(
                "gpu_memory_total_bytes",
                "Installed device memory.",
                "bytes",
            ),
            mem_used: out.gauge("gpu_memory_used_bytes", "Device memory in use.", "bytes"),
            mem_free: out.gauge("gpu_memory_free_bytes", "Device memory free.", "bytes"),
            mem_reserved: out.gauge(
                "gpu_memory_reserved_bytes",
                "Device memory reserved by the driver and firmware.",
                "bytes",
            ),
            temp: out.gauge("gpu_temperature_celsius", "GPU die temperature.", "celsius"),
            power: out.gauge("gpu_power_usage_watts", "Power draw of the board.", "watts"),
            power_limit: out.gauge("gpu_power_limit_watts", "Enforced power limit.", "watts"),
            power_limit_default: out.gauge(
                "gpu_power_default_limit_watts",
                "Default power management limit.",
                "watts",
            ),
            energy: out.counter(
                "gpu_energy_consumed_joules_total",
                "Energy consumed since the driver was loaded.",
                "joules",
            ),
            clock: out.gauge("gpu_clock_hertz", "Current clock by domain.", "hertz"),
            clock_max: out.gauge("gpu_clock_max_hertz", "Maximum clock by domain.", "hertz"),
            pstate: out.gauge(
                "gpu_performance_state",
                "Performance state (0 = P0, maximum performance; 15 = minimum).",
                "",
            ),
            fan: out.gauge(
                "gpu_fan_speed_ratio",
                "Intended fan speed as a fraction of its maximum.",
                "ratio",
            ),
            encoder: out.gauge(
                "gpu_encoder_utilization_ratio",
                "Video encoder utilization.",
                "ratio",
            ),
            decoder: out.gauge(
                "gpu_decoder_utilization_ratio",
                "Video decoder utilization.",
                "ratio",
            ),
            info: out.info("gpu_info", "GPU identity and driver versions; always 1."),
            power_mgmt_limit: out.gauge("gpu_power_management_limit_watts", "Power management limit currently set.", "watts"),
            temp_slowdown: out.gauge("gpu_temperature_slowdown_threshold_celsius", "Temperature at which the GPU starts to slow down.", "celsius"),
            temp_shutdown: out.gauge("gpu_temperature_shutdown_threshold_celsius", "Temperature at which the GPU shuts down.", "celsius"),
            pcie_gen: out.gauge("gpu_pcie_link_generation", "Current PCIe link generation.", ""),
            pcie_width: out.gauge("gpu_pcie_link_width", "Current PCIe link width (lanes).", ""),
            pcie_gen_max: out.gauge("gpu_pcie_link_max_generation", "Maximum PCIe link generation of the GPU and system.", ""),
            pcie_width_max: out.gauge("gpu_pcie_link_max_width", "Maximum PCIe link width (lanes).", ""),
            pcie_replays: out.counter("gpu_pcie_replays_total", "PCIe replay counter.", ""),
            throttle: out.gauge("gpu_clocks_event_active", "1 while this reason holds the clocks down (clocks event / throttle reasons).", ""),
            ecc_mode: out.gauge("gpu_ecc_enabled", "1 if ECC is enabled.", ""),
            ecc_errors: out.counter("gpu_ecc_errors_total", "ECC errors by type (corrected, uncorrected) and scope (volatile: since driver load; aggregate: lifetime).", ""),
            retired_pending: out.gauge("gpu_retired_pages_pending", "1 if pages are waiting to be retired at the next driver reload.", ""),
            bar1_total: out.gauge("gpu_bar1_memory_total_bytes", "BAR1 memory size.", "bytes"),
            bar1_used: out.gauge("gpu_bar1_memory_used_bytes", "BAR1 memory in use.", "bytes"),
            mig_memory_total: out.gauge("gpu_mig_memory_total_bytes", "Memory of a MIG instance.", "bytes"),
            mig_memory_used: out.gauge("gpu_mig_memory_used_bytes", "Memory used in a MIG instance.", "bytes"),
            process_memory: out.gauge("gpu_process_memory_used_bytes", "GPU memory used by a compute process.", "bytes"),
            process_sm_util: out.gauge("gpu_process_sm_utilization_ratio", "Fraction of time the process had a kernel running on the SMs, since the previous collection.", "ratio"),
            process_mem_util: out.gauge("gpu_process_memory_utilization_ratio", "Fraction of time the process used the memory controller, since the previous collection.", "ratio"),
            memory_temp: out.gauge("gpu_memory_temperature_celsius", "Memory (HBM) temperature.", "celsius"),
            pcie_tx: out.counter("gpu_pcie_transmit_bytes_total", "Bytes the GPU transmitted over PCIe.", "bytes"),
            pcie_rx: out.counter("gpu_pcie_receive_bytes_total", "Bytes the GPU received over PCIe.", "bytes"),
            remapped: out.counter("gpu_remapped_rows_total", "Memory rows remapped, by the kind of error that caused it.", ""),
            remap_pending: out.gauge("gpu_remapped_rows_pending", "1 if a row remapping waits for the next GPU reset.", ""),
            remap_failure: out.gauge("gpu_row_remap_failure", "1 if a row remapping failed.", ""),
            nvlink_up: out.gauge("gpu_nvlink_up", "1 if the NVLink link is active.", ""),
            nvlink_errors: out.counter("gpu_nvlink_errors_total", "NVLink data-link errors by type, summed over links (per link with nvlink_link_errors).", ""),
            nvlink_tx: out.counter("gpu_nvlink_transmit_bytes_total", "Bytes the GPU transmitted over all its NVLink links.", "bytes"),
            nvlink_rx: out.counter("gpu_nvlink_receive_bytes_total", "Bytes the GPU received over all its NVLink links.", "bytes"),
            mig_enabled: out.gauge("gpu_mig_mode_enabled", "1 if MIG mode is enabled.", ""),
            mig_pending: out.gauge("gpu_mig_mode_pending", "1 if MIG mode will be enabled after the next GPU reset.", ""),
            mig_instances: out.gauge("gpu_mig_instances", "MIG devices configured on the GPU.", ""),
            retired_pages: out.counter("gpu_retired_pages_total", "Memory pages retired, by cause.", ""),
            pcie_throughput: out.gauge("gpu_pcie_throughput_bytes_per_second", "PCIe throughput sampled over 20 ms (opt-in).", "bytes"),
        }
    }
}

/// Clocks event (throttle) reasons, as in nvml.h.
const THROTTLE_REASONS: [(u64, &str); 9] = [
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
];

const CLOCKS: [(Clock, &str, u8); 4] = [
    (Clock::Graphics, "graphics", 0),
    (Clock::SM, "sm", 1),
    (Clock::Memory, "memory", 2),
    (Clock::Video, "video", 3),
];

impl NvmlCollector {
    fn selected(&self, index: u32, uuid: Option<&str>) -> bool {
        let matches = |list: &[String]| {
            list.iter()
                .any(|s| *s == index.to_string() || Some(s.as_str()) == uuid)
        };
        (self.config.include.is_empty() || matches(&self.config.include))
            && !matches(&self.config.exclude)
    }

    fn ensure_nvml(&mut self) -> Result<()> {
        if self.nvml.is_some() {
            return Ok(());
        }
        let nvml = Nvml::builder()
            .lib_path(OsStr::new(&self.config.library_path))
            .init()
            .map_err(|e| Error::transient(describe_init_error(&self.config.library_path, &e)))?;
        self.driver_version = nvml.sys_driver_version().unwrap_or_default();
        self.cuda_version = nvml
            .sys_cuda_driver_version()
            .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10))
            .unwrap_or_default();
        tracing::info!(
            driver = %self.driver_version,
            cuda = %self.cuda_version,
            "NVML initialised from {}",
            self.config.library_path
        );
        let nvml = Arc::new(nvml);
        // A new session gets a new event thread; the old one (if any) stops with its session.
        self.xid = self
            .config
            .xid_events
            .then(|| XidWatcher::start(Arc::clone(&nvml), self.dispatch.clone()));
        self.gpm = self
            .config
            .gpm
            .then(|| GpmWatcher::start(Arc::clone(&nvml), self.dispatch.clone()));
        self.nvml = Some(nvml);
        Ok(())
    }

    fn xid_metrics(&self, out: &mut BatchBuilder) {
        let Some(watcher) = &self.xid else { return };
        let Ok(book) = watcher.book.lock() else {
            return;
        };
        if book.counts.is_empty() {
            return;
        }
        let errors = out.counter(
            "gpu_xid_errors_total",
            "Critical Xid errors reported by the driver, by Xid code.",
            "",
        );
        let last = out.gauge("gpu_last_xid", "The last critical Xid error code.", "");
        let last_at = out.gauge(
            "gpu_last_xid_timestamp_seconds",
            "When the last critical Xid error was reported.",
            "seconds",
        );
        let labels_of = |index: &u32| -> Vec<(String, String)> {
            let mut labels = vec![("gpu".to_string(), index.to_string())];
            if let Some(id) = self.identities.get(index) {
                labels.push(("uuid".into(), id.uuid.clone()));
                labels.push(("name".into(), id.name.clone()));
                labels.push(("pci_bus_id".into(), id.pci_bus_id.clone()));
            }
            labels
        };
        for ((index, xid), n) in &book.counts {
            let mut labels = labels_of(index);
            labels.push(("xid".into(), xid.to_string()));
            let refs: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            out.sample(errors, &refs, *n as f64);
        }
        for (index, (xid, at)) in &book.last {
            let labels = labels_of(index);
            let refs: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let set = out.label_set(&refs);
            out.sample_in(last, set, *xid as f64);
            out.sample_in(last_at, set, *at);
        }
    }

    fn identity(
        &mut self,
        index: u32,
        device: &Device,
    ) -> std::result::Result<Identity, NvmlError> {
        if let Some(id) = self.identities.get(&index) {
            return Ok(id.clone());
        }
        let id = Identity {
            uuid: device.uuid()?,
            name: device.name()?,
            pci_bus_id: device.pci_info()?.bus_id,
            serial: device.serial().ok(),
            vbios: device.vbios_version().ok(),
            board_part_number: device.board_part_number().ok(),
        };
        self.identities.insert(index, id.clone());
        Ok(id)
    }
}

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

/// Asks one query unless the GPU said NOT_SUPPORTED before.
fn ask<T>(
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
struct CollectOptions<'a> {
    /// Per-process memory.
    enabled: bool,
    /// NVLink state, errors and throughput.
    nvlink: bool,
    /// NVLink error counters per link rather than per GPU.
    nvlink_link_errors: bool,
    /// The sampled PCIe throughput call.
    pcie_throughput_sampled: bool,
    /// The energy counter.
    energy: bool,
    /// Most processes per GPU.
    max: usize,
    /// Every how many collections each group is read.
    read_every: ReadEvery,
    /// For process names.
    nvml: &'a Nvml,
    /// Per GPU, the newest process-utilization sample seen.
    process_util_seen: &'a mut HashMap<u32, u64>,
}

/// One GPU as a collection sees it: where its samples go (a collection's batch, or the batch a
/// tiered group is read into), under which labels, and the device to ask.
struct Gpu<'a, 'd> {
    out: &'a mut BatchBuilder,
    f: &'a Families,
    /// The GPU's own label set in `out`.
    set: LabelSetId,
    labels: &'a [(&'a str, &'a str)],
    index: u32,
    device: &'a Device<'d>,
}

impl Gpu<'_, '_> {
    /// The GPU's labels and `extra`, as a label set of `out`.
    fn with(&mut self, extra: &[(&str, &str)]) -> LabelSetId {
        let mut all = self.labels.to_vec();
        all.extend_from_slice(extra);
        self.out.label_set(&all)
    }

    /// A sample under the GPU's own labels.
    fn sample(&mut self, family: FamilyId, value: f64) {
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
    fn new(labels: &[(&str, &str)], asked: &Asked, tiers: &mut Tiers) -> Self {
        let mut out = tiers.builder();
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
    fn keep(self, tiers: &mut Tiers, index: u32, group: Group, every: u32, asked: &Asked) {
        if asked.missed == self.missed {
            tiers.keep(index, group, every, self.out.finish());
        } else {
            tiers.keep_incomplete(index, group, self.out.finish());
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
    every: u32,
    asked: &mut Asked,
    read: impl FnOnce(&mut Gpu, &mut Asked) -> std::result::Result<(), Stop>,
) -> std::result::Result<(), Stop> {
    if tiers.due(g.index, group) {
        let mut own = GroupRead::new(g.labels, asked, tiers);
        read(&mut own.gpu(g.labels, g.index, g.device), asked)?;
        own.keep(tiers, g.index, group, every, asked);
    }
    tiers.serve(g.index, group, g.out, g.set);
    Ok(())
}

/// Everything a GPU reports in one collection: the tiered groups (read when due, served as
/// last read), the constants, and what is read every collection.
fn gpu_metrics(
    g: &mut Gpu,
    constants: &Constants,
    asked: &mut Asked,
    tiers: &mut Tiers,
    options: &mut CollectOptions,
) -> std::result::Result<(), Stop> {
    let every = options.read_every;
    if options.energy {
        tiered(
            g,
            Group::Energy,
            tiers,
            every.energy.get(),
            asked,
            |g, asked| {
                if let Some(e) = ask(asked, g.index, Query::Energy, || {
                    g.device.total_energy_consumption()
                })? {
                    g.sample(g.f.energy, e as f64 / 1000.0);
                }
                Ok(())
            },
        )?;
    }
    if options.enabled {
        tiered(
            g,
            Group::Processes,
            tiers,
            every.processes.get(),
            asked,
            |g, asked| process_metrics(g, asked, options),
        )?;
    }
    // The error fields (remapped rows, NVLink error totals) ride on the field-values call made
    // every collection when the errors group is due, rather than costing a call of their own.
    let mut errors = tiers
        .due(g.index, Group::Errors)
        .then(|| GroupRead::new(g.labels, asked, tiers));
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
        own.keep(tiers, g.index, Group::Errors, every.errors.get(), asked);
    }
    tiers.serve(g.index, Group::Errors, g.out, g.set);
    tiered(
        g,
        Group::State,
        tiers,
        every.state.get(),
        asked,
        |g, asked| state_metrics(g, asked, options),
    )?;
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

impl Collector for NvmlCollector {
    type Config = Config;

    fn new(config: Config, ctx: &Context) -> Result<Self> {
        Ok(NvmlCollector {
            xid: None,
            gpm: None,
            dispatch: ctx.log_dispatch().clone(),
            config,
            nvml: None,
            driver_version: String::new(),
            cuda_version: String::new(),
            identities: BTreeMap::new(),
            constants: HashMap::new(),
            tiers: Tiers::default(),
            unsupported: Asked::default(),
            lost: BTreeMap::new(),
            process_util_seen: HashMap::new(),
            plain_sizes: (0, 0, 0),
            hostname: std::env::var("NODE_NAME")
                .ok()
                .filter(|n| !n.is_empty())
                .or_else(|| {
                    std::fs::read_to_string("/proc/sys/kernel/hostname")
                        .ok()
                        .map(|h| h.trim().to_string())
                })
                .unwrap_or_default(),
        })
    }

    fn collect(&mut self, out: &mut BatchBuilder) -> Result<()> {
        if self.config.naming == Naming::Dcgm {
            // Sized from the last cycle, as the SDK sizes `out`.
            let (families, label_sets, samples) = self.plain_sizes;
            let mut plain = BatchBuilder::with_capacities(families, label_sets, samples);
            self.collect_plain(&mut plain)?;
            let plain = plain.finish();
            self.plain_sizes = (
                plain.families.len(),
                plain.label_sets.len(),
                plain.samples.len(),
            );
            dcgm::translate(
                &plain,
                out,
                &self.hostname,
                &self.driver_version,
                &THROTTLE_REASONS,
            );
            return Ok(());
        }
        self.collect_plain(out)
    }
}

impl NvmlCollector {
    fn collect_plain(&mut self, out: &mut BatchBuilder) -> Result<()> {
        self.ensure_nvml()?;
        let count = match self.nvml.as_ref().map(|n| n.device_count()) {
            Some(Ok(n)) => n,
            Some(Err(e)) => {
                self.nvml = None;
                return Err(Error::transient(format!("NVML cannot count the GPUs: {e}")));
            }
            None => 0,
        };
        let families = Families::declare(out);
        let count_family = out.gauge("gpu_count", "GPUs NVML reports on this node.", "");
        out.sample(count_family, &[], f64::from(count));
        let Some(nvml) = self.nvml.take() else {
            return Ok(());
        };
        // Before the other queries, not beside them: on an H200 both orders cost the same
        // (8.6-9.7 against 9.1-9.4 ms of CPU a cycle), and this one is simpler to reason about.
        let gpm_values = self
            .gpm
            .as_ref()
            .and_then(|g| g.ask().map(|ask| g.values(ask)))
            .unwrap_or_default();
        let mut gpm_sets = Vec::new();
        let mut session_error = None;
        for index in 0..count {
            let device = match nvml.device_by_index(index) {
                Ok(d) => Ok(d),
                Err(NvmlError::GpuLost) => Err(Stop::Lost),
                Err(e) if is_fatal_for_session(&e) => Err(Stop::Nvml(e)),
                Err(e) => {
                    tracing::debug!(gpu = index, "cannot get a handle: {e}");
                    continue;
                }
            };
            let identity = match &device {
                Ok(d) => match self.identity(index, d) {
                    Ok(id) => Some(id),
                    Err(NvmlError::GpuLost) => None,
                    Err(e) => {
                        tracing::debug!(gpu = index, "cannot read identity: {e}");
                        None
                    }
                },
                Err(_) => None,
            }
            .or_else(|| self.identities.get(&index).cloned());
            if !self.selected(index, identity.as_ref().map(|i| i.uuid.as_str())) {
                continue;
            }
            let index_text = index.to_string();
            let labels: Vec<(&str, &str)> = match &identity {
                Some(id) => vec![
                    ("gpu", index_text.as_str()),
                    ("uuid", id.uuid.as_str()),
                    ("name", id.name.as_str()),
                    ("pci_bus_id", id.pci_bus_id.as_str()),
                ],
                None => vec![("gpu", index_text.as_str())],
            };
            let set = out.label_set(&labels);
            let result = match device {
                Ok(d) if identity.is_some() => 'gpu: {
                    let constants = match self.constants.get(&index) {
                        Some((at, c)) if at.elapsed() < CONSTANTS_REFRESH => *c,
                        _ => match read_constants(&d, index, &mut self.unsupported) {
                            Ok((c, complete)) => {
                                if complete {
                                    self.constants.insert(index, (Instant::now(), c));
                                }
                                c
                            }
                            Err(stop) => break 'gpu Err(stop),
                        },
                    };
                    let mut options = CollectOptions {
                        enabled: self.config.processes,
                        nvlink: self.config.nvlink,
                        nvlink_link_errors: self.config.nvlink_link_errors,
                        pcie_throughput_sampled: self.config.pcie_throughput_sampled,
                        energy: self.config.energy,
                        max: self.config.max_processes,
                        read_every: self.config.read_every,
                        nvml: &nvml,
                        process_util_seen: &mut self.process_util_seen,
                    };
                    gpu_metrics(
                        &mut Gpu {
                            out,
                            f: &families,
                            set,
                            labels: &labels,
                            index,
                            device: &d,
                        },
                        &constants,
                        &mut self.unsupported,
                        &mut self.tiers,
                        &mut options,
                    )
                }
                Ok(_) => Err(Stop::Lost),
                Err(stop) => Err(stop),
            };
            match result {
                Ok(()) => {
                    if let Some(n) = self.lost.remove(&index).and_then(|mut r| r.ended()) {
                        tracing::info!(
                            gpu = index,
                            "GPU answers NVML again (it was reported lost by {n} collections)"
                        );
                    }
                    out.sample_in(families.up, set, 1.0);
                    gpm_sets.push((index, set));
                    if let Some(id) = &identity {
                        let mut info = labels.clone();
                        info.push(("driver_version", self.driver_version.as_str()));
                        info.push(("cuda_version", self.cuda_version.as_str()));
                        info.push(("vbios_version", id.vbios.as_deref().unwrap_or("")));
                        info.push(("serial", id.serial.as_deref().unwrap_or("")));
                        info.push((
                            "board_part_number",
                            id.board_part_number.as_deref().unwrap_or(""),
                        ));
                        out.sample(families.info, &info, 1.0);
                    }
                }
                Err(Stop::Lost) => {
                    // Read again when it is back: a reset may have changed them.
                    self.constants.remove(&index);
                    self.tiers.forget(index);
                    self.lost
                        .entry(index)
                        .or_default()
                        .event()
                        .warn(
                            &format!(
                                "GPU {index} has fallen off the bus (NVML: GPU is lost); reported as gpu_up 0"
                            ),
                            "gpu_up",
                        );
                    out.sample_in(families.up, set, 0.0);
                }
                Err(Stop::Nvml(e)) => {
                    session_error = Some(e);
                    break;
                }
            }
        }
        for (index, set) in gpm_sets {
            let Some(values) = gpm_values.get(&index) else {
                continue;
            };
            for ((_, name, help), value) in GPM_METRICS.iter().zip(values) {
                if let Some(v) = value {
                    let family = out.gauge(name, help, "ratio");
                    out.sample_in(family, set, *v);
                }
            }
        }
        self.xid_metrics(out);
        match session_error {
            // Start over with a fresh NVML session at the next attempt; nothing stale is sent.
            Some(e) => {
                self.xid = None;
                self.gpm = None;
                self.constants.clear();
                self.tiers.clear();
                Err(Error::transient(describe_init_error(
                    &self.config.library_path,
                    &e,
                )))
            }
            None => {
                self.nvml = Some(nvml);
                Ok(())
            }
        }
    }
}

export_plugin! {
    name: "nvml",
    description: "NVIDIA GPUs through NVML",
    collector: NvmlCollector,
}
