//! An NVML simulator: a shared library exporting the NVML C functions that metricsd's NVML
//! plugin calls (same symbol names and versions as `libnvidia-ml.so.1`), answering from a
//! scenario file named by `NVML_SIM_SCENARIO` (a built-in 2-GPU scenario when unset). The plugin
//! loads it through its `library_path`, so nvml-wrapper's real loading and call path runs.
//!
//! `NVML_SIM_CALL_LOG=FILE` appends the name of every device query to FILE, so tests can check
//! which calls were made and how often.
//!
//! A scenario's `call_costs` makes each device query burn the CPU the real driver spends on it:
//! `call_costs = "h200-busy"` (the medians measured on an H200, see [`H200_BUSY`]) or a table
//! of query name (as the call log writes it) → microseconds, `call_costs = { total_energy =
//! 2958, max_clocks = 1528 }`. Collection cost can then be measured and improved without a GPU
//! (`scripts/nvml-wakeups.sh` with `CALL_COSTS=h200-busy`).

#![allow(clippy::missing_safety_doc)]

use std::ffi::{c_char, c_int, c_uint, c_ulonglong, CStr};
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nvml_wrapper_sys::bindings::*;
use serde::Deserialize;

/// A value that may move over time: a constant, or a sine wave.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
pub enum Curve {
    /// Always this value.
    Constant(f64),
    /// `base + amplitude * sin(2π t / period_s)`.
    Wave {
        /// Centre value.
        base: f64,
        /// Half the swing.
        amplitude: f64,
        /// Seconds per cycle.
        period_s: f64,
    },
}

impl Curve {
    fn at(&self, t: f64) -> f64 {
        match *self {
            Curve::Constant(v) => v,
            Curve::Wave {
                base,
                amplitude,
                period_s,
            } => base + amplitude * (std::f64::consts::TAU * t / period_s.max(0.001)).sin(),
        }
    }
}

/// One simulated GPU (or `count` identical ones).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSpec {
    /// Identical GPUs to create from this entry.
    #[serde(default = "one")]
    pub count: u32,
    /// Model name.
    pub name: String,
    /// Board memory.
    pub memory_total_bytes: f64,
    /// Memory used.
    pub memory_used_bytes: Curve,
    /// Memory reserved by the driver.
    #[serde(default)]
    pub memory_reserved_bytes: f64,
    /// GPU utilization, percent.
    pub utilization_gpu: Curve,
    /// Memory controller utilization, percent.
    pub utilization_memory: Curve,
    /// Die temperature, °C.
    pub temperature: Curve,
    /// Power draw, milliwatts.
    pub power_mw: Curve,
    /// Enforced power limit, milliwatts.
    pub power_limit_mw: f64,
    /// Default power limit, milliwatts.
    pub power_limit_default_mw: f64,
    /// SM clock, MHz (graphics uses the same).
    pub sm_clock_mhz: Curve,
    /// Memory clock, MHz.
    pub mem_clock_mhz: f64,
    /// Video clock, MHz.
    pub video_clock_mhz: f64,
    /// Max SM/graphics, memory and video clocks, MHz.
    pub max_clocks_mhz: [f64; 3],
    /// Fan speed, percent.
    #[serde(default)]
    pub fan_percent: Option<f64>,
    /// How many fans the board has; fan indices from here on answer INVALID_ARGUMENT, as an
    /// H200 SXM (no fans) answers for fan 0 with driver 580. Unset: as many as asked for.
    #[serde(default)]
    pub fans: Option<u32>,
    /// Performance state (0 = P0).
    #[serde(default)]
    pub pstate: u32,
    /// Encoder and decoder utilization, percent.
    #[serde(default)]
    pub encoder_decoder: [f64; 2],
    /// Seconds after start when the GPU falls off the bus (GPU_IS_LOST).
    pub lost_at_s: Option<f64>,
    /// Seconds after start when it comes back.
    pub back_at_s: Option<f64>,
    /// Queries that answer NOT_SUPPORTED: `fan_speed`, `power_usage`, `total_energy`,
    /// `encoder`, `decoder`, `temperature`, `pstate`, `power_limit_default`, `max_clocks`.
    #[serde(default)]
    pub not_supported: Vec<String>,
    /// A query that blocks for a while.
    pub hang: Option<Hang>,
    /// A query that fails with NVML_ERROR_UNKNOWN (a passing driver error) for a while.
    pub fail: Option<Fail>,
    /// Slowdown and shutdown temperature thresholds, °C.
    #[serde(default = "default_thresholds")]
    pub temp_thresholds: [f64; 2],
    /// PCIe link: current generation, current width, max generation, max width.
    #[serde(default = "default_pcie")]
    pub pcie: [u32; 4],
    /// PCIe replay counter.
    #[serde(default)]
    pub pcie_replays: u32,
    /// Clock throttle (clocks event) reason bitmask, as NVML reports it.
    #[serde(default)]
    pub throttle_reasons: u64,
    /// ECC mode enabled.
    #[serde(default = "yes")]
    pub ecc: bool,
    /// ECC errors: corrected volatile, uncorrected volatile, corrected aggregate, uncorrected
    /// aggregate.
    #[serde(default)]
    pub ecc_errors: [u64; 4],
    /// Pages waiting to be retired at the next driver reload.
    #[serde(default)]
    pub retired_pages_pending: bool,
    /// BAR1 total and used, bytes.
    #[serde(default)]
    pub bar1_bytes: [f64; 2],
    /// Compute processes that come and go.
    #[serde(default)]
    pub processes: Vec<ProcessSpec>,
    /// Memory (HBM) temperature, °C (field 82); NOT_SUPPORTED when absent.
    pub memory_temperature: Option<f64>,
    /// PCIe bytes per second transmitted and received (fields 197 and 198, counters).
    #[serde(default = "default_pcie_rates")]
    pub pcie_bytes_per_s: [f64; 2],
    /// Remapped rows: correctable, uncorrectable, pending (0/1), failure (0/1) (fields 142-145).
    #[serde(default)]
    pub remapped_rows: [u32; 4],
    /// GPM (Hopper and newer) metrics in percent; `None`: GPM not supported.
    pub gpm: Option<GpmSpec>,
    /// Retired pages: for multiple single-bit ECC errors, for double-bit ECC errors.
    #[serde(default)]
    pub retired_pages: [u32; 2],
    /// MIG: `None` when the GPU has no MIG support (NOT_SUPPORTED); else (enabled, pending,
    /// instances).
    pub mig: Option<(bool, bool, u32)>,
    /// The MIG instances' profiles and memory (index order); instances beyond this list
    /// answer NOT_SUPPORTED to name and memory queries.
    #[serde(default)]
    pub mig_instances: Vec<MigInstanceSpec>,
    /// NVLink links of the GPU (0: no NVLink, queries answer NOT_SUPPORTED).
    #[serde(default)]
    pub nvlinks: u32,
    /// Links that are down.
    #[serde(default)]
    pub nvlinks_down: Vec<u32>,
    /// NVLink error counters per link: replay, recovery, CRC flit, CRC data.
    #[serde(default)]
    pub nvlink_errors: [u64; 4],
    /// NVLink KiB per second transmitted and received, whole GPU (fields 138 and 139).
    #[serde(default)]
    pub nvlink_kib_per_s: [f64; 2],
    /// Critical Xid events delivered through NVML event sets.
    #[serde(default)]
    pub xid_events: Vec<XidSpec>,
    /// Serial number.
    #[serde(default)]
    pub serial: String,
    /// VBIOS version.
    #[serde(default)]
    pub vbios: String,
    /// Board part number (NOT_SUPPORTED when empty, as for a VBIOS that leaves it unset).
    #[serde(default)]
    pub board_part_number: String,
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

fn default_thresholds() -> [f64; 2] {
    [87.0, 92.0]
}

fn default_pcie_rates() -> [f64; 2] {
    [2.0e9, 5.0e9]
}

fn default_pcie() -> [u32; 4] {
    [5, 16, 5, 16]
}

/// GPM metric values in percent (as NVML reports them).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpmSpec {
    /// GRAPHICS_UTIL.
    pub graphics: Curve,
    /// SM_UTIL (SM active).
    pub sm_active: Curve,
    /// SM_OCCUPANCY.
    pub sm_occupancy: Curve,
    /// ANY_TENSOR_UTIL.
    pub tensor: Curve,
    /// DRAM_BW_UTIL.
    pub dram: Curve,
    /// FP64_UTIL, FP32_UTIL, FP16_UTIL.
    pub fp: [f64; 3],
}

/// One MIG instance (a MIG device handle of its parent GPU).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigInstanceSpec {
    /// GPU instance profile, e.g. `3g.40gb`.
    pub profile: String,
    /// Memory of the instance, bytes.
    pub memory_total_bytes: f64,
    /// Memory used, bytes.
    pub memory_used_bytes: Curve,
}

/// MIG device handles are `MIG_HANDLE_BASE + gpu * 10 + instance`.
const MIG_HANDLE_BASE: usize = 1_000_000;

/// A MIG device handle's parent GPU (asked with `query`, so a lost parent is lost), instance
/// index and spec; `None` when `handle` is a whole-GPU handle.
#[allow(clippy::type_complexity)]
fn mig_lookup(
    handle: nvmlDevice_t,
    query: &str,
) -> Option<
    Result<
        (
            usize,
            usize,
            &'static MigInstanceSpec,
            f64,
            &'static GpuSpec,
        ),
        nvmlReturn_t,
    >,
> {
    let raw = (handle as usize).checked_sub(MIG_HANDLE_BASE)?;
    let (gpu, instance) = (raw / 10, raw % 10);
    Some(
        lookup((gpu + 1) as nvmlDevice_t, query).and_then(|(_, g, t)| {
            let spec = g.mig_instances.get(instance).ok_or(NOT_SUPPORTED)?;
            Ok((gpu, instance, spec, t, g))
        }),
    )
}

/// A critical Xid error raised at `at_s`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XidSpec {
    /// Seconds after start.
    pub at_s: f64,
    /// The Xid code.
    pub xid: u64,
}

/// A compute process on a GPU, present between `from_s` and `until_s`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    /// Process id.
    pub pid: u32,
    /// Process name (what `nvmlSystemGetProcessName` answers).
    pub name: String,
    /// GPU memory it uses, bytes.
    pub used_bytes: f64,
    /// SM and memory-controller utilization in percent while it runs; a process with both
    /// at 0 has no utilization sample, as NVML reports only busy processes.
    #[serde(default)]
    pub util_percent: [u32; 2],
    /// Present from this second.
    #[serde(default)]
    pub from_s: f64,
    /// Gone at this second (never when absent).
    pub until_s: Option<f64>,
}

impl ProcessSpec {
    fn running(&self, t: f64) -> bool {
        t >= self.from_s && self.until_s.is_none_or(|until| t < until)
    }
}

/// A query that blocks for `seconds` when asked between `from_s` and `until_s`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hang {
    /// The query (as in `not_supported`).
    pub query: String,
    /// How long each such call blocks.
    pub seconds: f64,
    /// From this second after start.
    #[serde(default)]
    pub from_s: f64,
    /// Until this second (for ever when absent).
    pub until_s: Option<f64>,
}

/// A query that answers NVML_ERROR_UNKNOWN between `from_s` and `until_s`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fail {
    /// The query (as in `not_supported`).
    pub query: String,
    /// From this second after start.
    #[serde(default)]
    pub from_s: f64,
    /// Until this second.
    pub until_s: f64,
}

/// The scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Driver version string.
    pub driver_version: String,
    /// CUDA driver version as NVML reports it (12040 = 12.4).
    pub cuda_version: i32,
    /// `nvmlInit` fails with this NVML error code (e.g. 9 = DRIVER_NOT_LOADED).
    pub init_error: Option<u32>,
    /// The GPUs.
    pub gpus: Vec<GpuSpec>,
    /// CPU each device query burns, as the real driver spends it: a measured preset
    /// (`"h200-busy"`) or a table of query name → microseconds (`{ total_energy = 2958 }`).
    /// Absent: queries cost only the simulator's own few microseconds.
    pub call_costs: Option<CallCosts>,
}

/// A scenario's `call_costs`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CallCosts {
    /// A measured preset, by name.
    Preset(String),
    /// Query name (as `NVML_SIM_CALL_LOG` writes it) → microseconds per call.
    Table(std::collections::BTreeMap<String, f64>),
}

/// `h200-busy`: the CPU each query cost on an H200 with driver 580.159.04 and one compute
/// process (median of 5 rounds, docs/gpu-runs/2026-11-26-h200/calls-busy.md). A query the
/// simulator answers for several NVML calls (`max_clocks` for each clock type, `pcie` for
/// generation and width) costs their mean. The two lists that clients ask for twice, once for
/// the size and once for the entries (`processes`, `process_utilization`: pynvml and
/// nvml-wrapper alike), were measured as the pair: each call costs half.
pub const H200_BUSY: [(&str, f64); 31] = [
    ("utilization", 11.0),
    ("memory", 66.0),
    ("bar1", 347.0),
    ("temperature", 12.0),
    ("temperature_threshold", 135.0),
    ("power_usage", 8.0),
    ("power_limit", 5.0),
    ("power_limit_default", 3.0),
    ("power_management_limit", 282.0),
    ("total_energy", 2958.0),
    ("clocks", 12.0),
    ("max_clocks", 1528.0),
    ("pstate", 10.0),
    ("fan_speed", 27.0),
    ("encoder", 8.0),
    ("decoder", 3.0),
    ("pcie", 57.0),
    ("pcie_max", 5.0),
    ("pcie_replay", 313.0),
    ("throttle", 7.0),
    ("ecc", 265.0),
    ("ecc_errors", 5.0),
    ("retired_pages", 261.0),
    ("field_values", 647.0),
    ("mig", 338.0),
    ("nvlink", 35.0),
    ("processes", 64.0),
    ("process_utilization", 1003.0),
    ("pcie_throughput", 649.0),
    ("uuid", 34.0),
    ("gpm_sample", 168.0),
];

impl CallCosts {
    /// Query name → cost, or what is wrong with the key.
    fn table(&self) -> Result<std::collections::HashMap<String, Duration>, String> {
        let micros: Vec<(String, f64)> = match self {
            CallCosts::Preset(name) if name == "h200-busy" => H200_BUSY
                .iter()
                .map(|(q, us)| (q.to_string(), *us))
                .collect(),
            CallCosts::Preset(name) => {
                return Err(format!(
                    "nvml-sim: call_costs = \"{name}\" is not a preset (known: \"h200-busy\"; or give a table of query = microseconds)"
                ))
            }
            CallCosts::Table(t) => t.iter().map(|(q, us)| (q.clone(), *us)).collect(),
        };
        micros
            .into_iter()
            .map(|(q, us)| {
                if us.is_finite() && us >= 0.0 {
                    Ok((q, Duration::from_secs_f64(us / 1e6)))
                } else {
                    Err(format!(
                        "nvml-sim: call_costs.{q} = {us} is not a number of microseconds"
                    ))
                }
            })
            .collect()
    }
}

/// Burns `cost` of CPU on the calling thread (the driver's work is CPU in its ioctls, not
/// sleep).
fn burn(cost: Duration) {
    let end = Instant::now() + cost;
    while Instant::now() < end {
        std::hint::spin_loop();
    }
}

/// Built-in scenario: two H100 SXM GPUs.
pub const DEFAULT_SCENARIO: &str = include_str!("../scenarios/h100-sxm-2.toml");

struct Sim {
    scenario: Scenario,
    gpus: Vec<GpuSpec>,
    start: Instant,
    /// Query name → the CPU it burns (`call_costs`).
    costs: std::collections::HashMap<String, Duration>,
}

fn sim() -> &'static Result<Sim, String> {
    static SIM: OnceLock<Result<Sim, String>> = OnceLock::new();
    SIM.get_or_init(|| {
        let text = match std::env::var("NVML_SIM_SCENARIO") {
            Ok(path) => std::fs::read_to_string(&path)
                .map_err(|e| format!("nvml-sim: cannot read {path}: {e}"))?,
            Err(_) => DEFAULT_SCENARIO.to_string(),
        };
        let scenario: Scenario =
            toml::from_str(&text).map_err(|e| format!("nvml-sim: bad scenario: {e}"))?;
        let gpus = scenario
            .gpus
            .iter()
            .flat_map(|g| std::iter::repeat_n(g.clone(), g.count as usize))
            .collect();
        let costs = match &scenario.call_costs {
            Some(c) => c.table()?,
            None => Default::default(),
        };
        Ok(Sim {
            scenario,
            gpus,
            start: Instant::now(),
            costs,
        })
    })
}

fn log_call(name: &str) {
    if let Ok(path) = std::env::var("NVML_SIM_CALL_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            // One write per line: the plugin's own threads (GPM, Xid) call in concurrently, and
            // writeln! may split a line in two writes that another thread's line gets between.
            let _ = f.write_all(format!("{name}\n").as_bytes());
        }
    }
}

const SUCCESS: nvmlReturn_t = nvmlReturn_enum_NVML_SUCCESS;
const INVALID_ARGUMENT: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
const NOT_SUPPORTED: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED;
const GPU_IS_LOST: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST;
const UNKNOWN: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_UNKNOWN;
const UNINITIALIZED: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_UNINITIALIZED;
const INSUFFICIENT_SIZE: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE;

/// Resolves a handle to its GPU and the scenario time, applying loss, NOT_SUPPORTED and hangs.
fn lookup(
    handle: nvmlDevice_t,
    query: &str,
) -> Result<(usize, &'static GpuSpec, f64), nvmlReturn_t> {
    log_call(query);
    let sim = sim().as_ref().map_err(|_| UNINITIALIZED)?;
    if let Some(cost) = sim.costs.get(query) {
        burn(*cost);
    }
    let index = (handle as usize).checked_sub(1).ok_or(INVALID_ARGUMENT)?;
    let gpu = sim.gpus.get(index).ok_or(INVALID_ARGUMENT)?;
    let t = sim.start.elapsed().as_secs_f64();
    let lost =
        gpu.lost_at_s.is_some_and(|at| t >= at) && !gpu.back_at_s.is_some_and(|back| t >= back);
    if lost {
        return Err(GPU_IS_LOST);
    }
    if gpu.not_supported.iter().any(|q| q == query) {
        return Err(NOT_SUPPORTED);
    }
    if let Some(f) = &gpu.fail {
        if f.query == query && t >= f.from_s && t < f.until_s {
            return Err(UNKNOWN);
        }
    }
    if let Some(h) = &gpu.hang {
        if h.query == query && t >= h.from_s && h.until_s.is_none_or(|until| t < until) {
            std::thread::sleep(Duration::from_secs_f64(h.seconds));
        }
    }
    Ok((index, gpu, t))
}

macro_rules! answer {
    ($handle:expr, $query:expr, |$i:ident, $gpu:ident, $t:ident| $body:expr) => {
        match lookup($handle, $query) {
            Ok(($i, $gpu, $t)) => {
                let _ = (&$i, &$gpu, &$t);
                $body;
                SUCCESS
            }
            Err(code) => code,
        }
    };
}

/// Copies `text` with its NUL into a caller buffer of `length` bytes.
unsafe fn write_str(text: &str, buf: *mut c_char, length: c_uint) -> nvmlReturn_t {
    if buf.is_null() {
        return INVALID_ARGUMENT;
    }
    let bytes = text.as_bytes();
    if bytes.len() + 1 > length as usize {
        return INSUFFICIENT_SIZE;
    }
    // SAFETY: the caller gave a writable buffer of `length` bytes, checked to be large enough.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), bytes.len());
        *buf.add(bytes.len()) = 0;
    }
    SUCCESS
}

/// Writes a value through an out pointer, refusing null.
unsafe fn put<T>(out: *mut T, value: T) {
    if !out.is_null() {
        // SAFETY: NVML's contract: out pointers point to writable storage of their type.
        unsafe { out.write(value) }
    }
}

fn uuid(index: usize) -> String {
    format!("GPU-5f7c{index:04x}-1d2e-4c3b-9a8f-0e1d2c3b{index:04x}")
}

fn bus_id(index: usize) -> String {
    format!("00000000:{:02X}:00.0", 0x18 + index * 0x10)
}

#[no_mangle]
pub extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    match sim() {
        Ok(s) => s.scenario.init_error.unwrap_or(SUCCESS),
        Err(e) => {
            eprintln!("{e}");
            UNINITIALIZED
        }
    }
}

#[no_mangle]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    nvmlInit_v2()
}

#[no_mangle]
pub extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    SUCCESS
}

#[no_mangle]
pub extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    let text: &'static CStr = match result {
        SUCCESS => c"Success",
        NOT_SUPPORTED => c"Not Supported",
        GPU_IS_LOST => c"GPU is lost",
        UNINITIALIZED => c"Uninitialized",
        _ => c"Unknown Error",
    };
    text.as_ptr()
}

#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    match sim() {
        // SAFETY: forwarded caller buffer.
        Ok(s) => unsafe { write_str(&s.scenario.driver_version, version, length) },
        Err(_) => UNINITIALIZED,
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(version: *mut c_int) -> nvmlReturn_t {
    match sim() {
        Ok(s) => {
            // SAFETY: caller's out pointer.
            unsafe { put(version, s.scenario.cuda_version) };
            SUCCESS
        }
        Err(_) => UNINITIALIZED,
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> nvmlReturn_t {
    match sim() {
        Ok(s) => {
            // SAFETY: caller's out pointer.
            unsafe { put(count, s.gpus.len() as c_uint) };
            SUCCESS
        }
        Err(_) => UNINITIALIZED,
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let Ok(s) = sim() else { return UNINITIALIZED };
    if index as usize >= s.gpus.len() {
        return INVALID_ARGUMENT;
    }
    let handle = (index as usize + 1) as nvmlDevice_t;
    // The handle is valid, but queries on a lost GPU fail, as with the real driver.
    // SAFETY: caller's out pointer.
    unsafe { put(device, handle) };
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetIndex(
    device: nvmlDevice_t,
    index: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: caller's out pointer.
    answer!(device, "index", |i, _g, _t| unsafe {
        put(index, i as c_uint)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    if let Some(found) = mig_lookup(device, "name") {
        return match found {
            // SAFETY: forwarded caller buffer.
            Ok((_, _, m, _, g)) => unsafe {
                write_str(&format!("{} MIG {}", g.name, m.profile), name, length)
            },
            Err(code) => code,
        };
    }
    match lookup(device, "name") {
        // SAFETY: forwarded caller buffer.
        Ok((_, g, _)) => unsafe { write_str(&g.name, name, length) },
        Err(code) => code,
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    buf: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    if let Some(found) = mig_lookup(device, "uuid") {
        return match found {
            // SAFETY: forwarded caller buffer.
            Ok((gpu, instance, ..)) => unsafe {
                write_str(
                    &format!("MIG-{:08x}-0000-4000-8000-{:012x}", gpu, instance),
                    buf,
                    length,
                )
            },
            Err(code) => code,
        };
    }
    match lookup(device, "uuid") {
        // SAFETY: forwarded caller buffer.
        Ok((i, _, _)) => unsafe { write_str(&uuid(i), buf, length) },
        Err(code) => code,
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetSerial(
    device: nvmlDevice_t,
    buf: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    match lookup(device, "serial") {
        // SAFETY: forwarded caller buffer.
        Ok((i, g, _)) => unsafe { write_str(&format!("{}{i}", g.serial), buf, length) },
        Err(code) => code,
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetVbiosVersion(
    device: nvmlDevice_t,
    buf: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    match lookup(device, "vbios") {
        // SAFETY: forwarded caller buffer.
        Ok((_, g, _)) => unsafe { write_str(&g.vbios, buf, length) },
        Err(code) => code,
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    match lookup(device, "pci_info") {
        Ok((i, _, _)) => {
            if pci.is_null() {
                return INVALID_ARGUMENT;
            }
            let id = bus_id(i);
            // SAFETY: `pci` points to a caller-owned nvmlPciInfo_t; all of it is initialised here.
            unsafe {
                let mut info: nvmlPciInfo_t = std::mem::zeroed();
                for (dst, src) in info.busId.iter_mut().zip(id.bytes()) {
                    *dst = src as c_char;
                }
                for (dst, src) in info.busIdLegacy.iter_mut().zip(id[4..].bytes()) {
                    *dst = src as c_char;
                }
                info.bus = (0x18 + i * 0x10) as c_uint;
                info.pciDeviceId = 0x2330_10de;
                pci.write(info);
            }
            SUCCESS
        }
        Err(code) => code,
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: nvmlDevice_t,
    util: *mut nvmlUtilization_t,
) -> nvmlReturn_t {
    answer!(device, "utilization", |_i, g, t| {
        let value = nvmlUtilization_t {
            gpu: g.utilization_gpu.at(t).clamp(0.0, 100.0) as c_uint,
            memory: g.utilization_memory.at(t).clamp(0.0, 100.0) as c_uint,
        };
        // SAFETY: caller's out pointer.
        unsafe { put(util, value) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    if let Some(found) = mig_lookup(device, "mig_memory") {
        return match found {
            Ok((_, _, m, t, _)) => {
                let total = m.memory_total_bytes as c_ulonglong;
                let used =
                    m.memory_used_bytes.at(t).clamp(0.0, m.memory_total_bytes) as c_ulonglong;
                let value = nvmlMemory_v2_t {
                    version: (std::mem::size_of::<nvmlMemory_v2_t>() | (2 << 24)) as c_uint,
                    total,
                    reserved: 0,
                    free: total.saturating_sub(used),
                    used,
                };
                // SAFETY: caller's out pointer.
                unsafe { put(memory, value) };
                SUCCESS
            }
            Err(code) => code,
        };
    }
    answer!(device, "memory", |_i, g, t| {
        let used = g.memory_used_bytes.at(t).clamp(0.0, g.memory_total_bytes) as c_ulonglong;
        let total = g.memory_total_bytes as c_ulonglong;
        let reserved = g.memory_reserved_bytes as c_ulonglong;
        let value = nvmlMemory_v2_t {
            // NVML_STRUCT_VERSION(Memory, 2), as the caller set it.
            version: (std::mem::size_of::<nvmlMemory_v2_t>() | (2 << 24)) as c_uint,
            total,
            reserved,
            free: total.saturating_sub(used).saturating_sub(reserved),
            used,
        };
        // SAFETY: caller's out pointer.
        unsafe { put(memory, value) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: nvmlDevice_t,
    sensor: nvmlTemperatureSensors_t,
    temp: *mut c_uint,
) -> nvmlReturn_t {
    if sensor != 0 {
        return INVALID_ARGUMENT;
    }
    // SAFETY: caller's out pointer.
    answer!(device, "temperature", |_i, g, t| unsafe {
        put(temp, g.temperature.at(t).max(0.0) as c_uint)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(
    device: nvmlDevice_t,
    power: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: caller's out pointer.
    answer!(device, "power_usage", |_i, g, t| unsafe {
        put(power, g.power_mw.at(t).max(0.0) as c_uint)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetEnforcedPowerLimit(
    device: nvmlDevice_t,
    limit: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: caller's out pointer.
    answer!(device, "power_limit", |_i, g, _t| unsafe {
        put(limit, g.power_limit_mw as c_uint)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPowerManagementDefaultLimit(
    device: nvmlDevice_t,
    limit: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: caller's out pointer.
    answer!(device, "power_limit_default", |_i, g, _t| unsafe {
        put(limit, g.power_limit_default_mw as c_uint)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    device: nvmlDevice_t,
    energy: *mut c_ulonglong,
) -> nvmlReturn_t {
    // Energy in mJ: the integral of the power curve, approximated by the mean power so far.
    answer!(device, "total_energy", |_i, g, t| {
        let mean_mw = (g.power_mw.at(0.0) + g.power_mw.at(t)) / 2.0;
        // SAFETY: caller's out pointer.
        unsafe { put(energy, (1.0e9 + mean_mw * t) as c_ulonglong) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: nvmlDevice_t,
    clock: nvmlClockType_t,
    mhz: *mut c_uint,
) -> nvmlReturn_t {
    answer!(device, "clocks", |_i, g, t| {
        let value = match clock {
            0 | 1 => g.sm_clock_mhz.at(t),
            2 => g.mem_clock_mhz,
            _ => g.video_clock_mhz,
        };
        // SAFETY: caller's out pointer.
        unsafe { put(mhz, value as c_uint) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMaxClockInfo(
    device: nvmlDevice_t,
    clock: nvmlClockType_t,
    mhz: *mut c_uint,
) -> nvmlReturn_t {
    answer!(device, "max_clocks", |_i, g, _t| {
        let value = match clock {
            0 | 1 => g.max_clocks_mhz[0],
            2 => g.max_clocks_mhz[1],
            _ => g.max_clocks_mhz[2],
        };
        // SAFETY: caller's out pointer.
        unsafe { put(mhz, value as c_uint) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetFanSpeed_v2(
    device: nvmlDevice_t,
    fan: c_uint,
    speed: *mut c_uint,
) -> nvmlReturn_t {
    match lookup(device, "fan_speed") {
        Ok((_, g, _)) if g.fans.is_some_and(|n| fan >= n) => INVALID_ARGUMENT,
        Ok((_, g, _)) => match g.fan_percent {
            Some(p) if fan == 0 => {
                // SAFETY: caller's out pointer.
                unsafe { put(speed, p as c_uint) };
                SUCCESS
            }
            Some(_) => INVALID_ARGUMENT,
            None => NOT_SUPPORTED,
        },
        Err(code) => code,
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPerformanceState(
    device: nvmlDevice_t,
    state: *mut nvmlPstates_t,
) -> nvmlReturn_t {
    // SAFETY: caller's out pointer.
    answer!(device, "pstate", |_i, g, _t| unsafe {
        put(state, g.pstate as nvmlPstates_t)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetEncoderUtilization(
    device: nvmlDevice_t,
    util: *mut c_uint,
    period_us: *mut c_uint,
) -> nvmlReturn_t {
    answer!(device, "encoder", |_i, g, _t| {
        // SAFETY: caller's out pointers.
        unsafe {
            put(util, g.encoder_decoder[0] as c_uint);
            put(period_us, 167_000);
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetDecoderUtilization(
    device: nvmlDevice_t,
    util: *mut c_uint,
    period_us: *mut c_uint,
) -> nvmlReturn_t {
    answer!(device, "decoder", |_i, g, _t| {
        // SAFETY: caller's out pointers.
        unsafe {
            put(util, g.encoder_decoder[1] as c_uint);
            put(period_us, 167_000);
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPowerManagementLimit(
    device: nvmlDevice_t,
    limit: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: caller's out pointer.
    answer!(device, "power_management_limit", |_i, g, _t| unsafe {
        put(limit, g.power_limit_mw as c_uint)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTemperatureThreshold(
    device: nvmlDevice_t,
    kind: nvmlTemperatureThresholds_t,
    temp: *mut c_uint,
) -> nvmlReturn_t {
    match lookup(device, "temperature_threshold") {
        Ok((_, g, _)) => {
            let value = match kind {
                0 => g.temp_thresholds[1],
                1 => g.temp_thresholds[0],
                _ => return NOT_SUPPORTED,
            };
            // SAFETY: caller's out pointer.
            unsafe { put(temp, value as c_uint) };
            SUCCESS
        }
        Err(code) => code,
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCurrPcieLinkGeneration(
    device: nvmlDevice_t,
    value: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: caller's out pointer.
    answer!(device, "pcie", |_i, g, _t| unsafe { put(value, g.pcie[0]) })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCurrPcieLinkWidth(
    device: nvmlDevice_t,
    value: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: caller's out pointer.
    answer!(device, "pcie", |_i, g, _t| unsafe { put(value, g.pcie[1]) })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMaxPcieLinkGeneration(
    device: nvmlDevice_t,
    value: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: caller's out pointer.
    answer!(device, "pcie_max", |_i, g, _t| unsafe {
        put(value, g.pcie[2])
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMaxPcieLinkWidth(
    device: nvmlDevice_t,
    value: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: caller's out pointer.
    answer!(device, "pcie_max", |_i, g, _t| unsafe {
        put(value, g.pcie[3])
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPcieReplayCounter(
    device: nvmlDevice_t,
    value: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: caller's out pointer.
    answer!(device, "pcie_replay", |_i, g, _t| unsafe {
        put(value, g.pcie_replays)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(
    device: nvmlDevice_t,
    reasons: *mut c_ulonglong,
) -> nvmlReturn_t {
    // SAFETY: caller's out pointer.
    answer!(device, "throttle", |_i, g, _t| unsafe {
        put(reasons, g.throttle_reasons)
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetEccMode(
    device: nvmlDevice_t,
    current: *mut nvmlEnableState_t,
    pending: *mut nvmlEnableState_t,
) -> nvmlReturn_t {
    answer!(device, "ecc", |_i, g, _t| {
        let state = nvmlEnableState_t::from(g.ecc);
        // SAFETY: caller's out pointers.
        unsafe {
            put(current, state);
            put(pending, state);
        }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: nvmlDevice_t,
    error: nvmlMemoryErrorType_t,
    counter: nvmlEccCounterType_t,
    count: *mut c_ulonglong,
) -> nvmlReturn_t {
    answer!(device, "ecc_errors", |_i, g, _t| {
        let slot = (error.min(1) + 2 * counter.min(1)) as usize;
        // SAFETY: caller's out pointer.
        unsafe { put(count, g.ecc_errors[slot]) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPagesPendingStatus(
    device: nvmlDevice_t,
    pending: *mut nvmlEnableState_t,
) -> nvmlReturn_t {
    // SAFETY: caller's out pointer.
    answer!(device, "retired_pages", |_i, g, _t| unsafe {
        put(pending, nvmlEnableState_t::from(g.retired_pages_pending))
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetBAR1MemoryInfo(
    device: nvmlDevice_t,
    bar1: *mut nvmlBAR1Memory_t,
) -> nvmlReturn_t {
    answer!(device, "bar1", |_i, g, _t| {
        let [total, used] = g.bar1_bytes;
        let value = nvmlBAR1Memory_t {
            bar1Total: total as c_ulonglong,
            bar1Free: (total - used).max(0.0) as c_ulonglong,
            bar1Used: used as c_ulonglong,
        };
        // SAFETY: caller's out pointer.
        unsafe { put(bar1, value) }
    })
}

/// NVML's count-then-fill protocol: with too small a buffer (or none), answer
/// INSUFFICIENT_SIZE and the count needed.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    let (_, g, t) = match lookup(device, "processes") {
        Ok(found) => found,
        Err(code) => return code,
    };
    if count.is_null() {
        return INVALID_ARGUMENT;
    }
    let running: Vec<&ProcessSpec> = g.processes.iter().filter(|p| p.running(t)).collect();
    // SAFETY: `count` is non-null and points to the caller's buffer length.
    let capacity = unsafe { *count } as usize;
    // SAFETY: as above.
    unsafe { *count = running.len() as c_uint };
    if running.is_empty() {
        return SUCCESS;
    }
    if infos.is_null() || capacity < running.len() {
        return INSUFFICIENT_SIZE;
    }
    for (i, p) in running.iter().enumerate() {
        let info = nvmlProcessInfo_t {
            pid: p.pid,
            usedGpuMemory: p.used_bytes as c_ulonglong,
            gpuInstanceId: u32::MAX,
            computeInstanceId: u32::MAX,
        };
        // SAFETY: `infos` holds at least `capacity` >= running.len() elements.
        unsafe { infos.add(i).write(info) };
    }
    SUCCESS
}

/// Per-process utilization: one sample per busy process, stamped now (µs since the epoch);
/// NOT_FOUND when no process was busy, count-then-fill as the driver does.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: nvmlDevice_t,
    utilization: *mut nvmlProcessUtilizationSample_t,
    count: *mut c_uint,
    last_seen: c_ulonglong,
) -> nvmlReturn_t {
    let (_, g, t) = match lookup(device, "process_utilization") {
        Ok(found) => found,
        Err(code) => return code,
    };
    if count.is_null() {
        return INVALID_ARGUMENT;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let busy: Vec<&ProcessSpec> = g
        .processes
        .iter()
        .filter(|p| p.running(t) && p.util_percent != [0, 0] && now > last_seen)
        .collect();
    // SAFETY: `count` is non-null and points to the caller's buffer length.
    let capacity = unsafe { *count } as usize;
    // SAFETY: as above.
    unsafe { *count = busy.len() as c_uint };
    if busy.is_empty() {
        return nvmlReturn_enum_NVML_ERROR_NOT_FOUND;
    }
    if utilization.is_null() || capacity < busy.len() {
        return INSUFFICIENT_SIZE;
    }
    for (i, p) in busy.iter().enumerate() {
        let sample = nvmlProcessUtilizationSample_t {
            pid: p.pid,
            timeStamp: now,
            smUtil: p.util_percent[0],
            memUtil: p.util_percent[1],
            encUtil: 0,
            decUtil: 0,
        };
        // SAFETY: `utilization` holds at least `capacity` >= busy.len() elements.
        unsafe { utilization.add(i).write(sample) };
    }
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetBoardPartNumber(
    device: nvmlDevice_t,
    buf: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    match lookup(device, "board_part_number") {
        Ok((_, g, _)) if g.board_part_number.is_empty() => NOT_SUPPORTED,
        // SAFETY: forwarded caller buffer.
        Ok((_, g, _)) => unsafe { write_str(&g.board_part_number, buf, length) },
        Err(code) => code,
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetProcessName(
    pid: c_uint,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    let Ok(s) = sim() else { return UNINITIALIZED };
    let found = s
        .gpus
        .iter()
        .flat_map(|g| g.processes.iter())
        .find(|p| p.pid == pid);
    match found {
        // SAFETY: forwarded caller buffer.
        Some(p) => unsafe { write_str(&p.name, name, length) },
        None => nvmlReturn_enum_NVML_ERROR_NOT_FOUND,
    }
}

/// Field values: each entry answers with its own return code, as the driver does.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetFieldValues(
    device: nvmlDevice_t,
    count: c_int,
    values: *mut nvmlFieldValue_t,
) -> nvmlReturn_t {
    let (_, g, t) = match lookup(device, "field_values") {
        Ok(found) => found,
        Err(code) => return code,
    };
    if values.is_null() || count < 0 {
        return INVALID_ARGUMENT;
    }
    for i in 0..count as usize {
        // SAFETY: the caller passes `count` initialised entries.
        let entry = unsafe { &mut *values.add(i) };
        entry.timestamp = (t * 1e6) as i64;
        entry.latencyUsec = 0;
        entry.nvmlReturn = SUCCESS;
        match entry.fieldId {
            82 => match g.memory_temperature {
                Some(v) => {
                    entry.valueType = nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_INT;
                    entry.value.uiVal = v as c_uint;
                }
                None => entry.nvmlReturn = NOT_SUPPORTED,
            },
            197 | 198 => {
                let rate = g.pcie_bytes_per_s[(entry.fieldId - 197) as usize];
                entry.valueType = nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG;
                entry.value.ullVal = (1.0e12 + rate * t) as c_ulonglong;
            }
            138 | 139 if g.nvlinks > 0 => {
                let rate = g.nvlink_kib_per_s[(entry.fieldId - 138) as usize];
                entry.valueType = nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG;
                entry.value.ullVal = (rate * t) as c_ulonglong;
            }
            142..=145 => {
                entry.valueType = nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_INT;
                entry.value.uiVal = g.remapped_rows[(entry.fieldId - 142) as usize];
            }
            // NVLink error counters summed over the links (each link counts `nvlink_errors`):
            // CRC flit 38, CRC data 45, replay 52, recovery 59.
            38 | 45 | 52 | 59 if g.nvlinks > 0 => {
                let counter = match entry.fieldId {
                    52 => 0,
                    59 => 1,
                    38 => 2,
                    _ => 3,
                };
                entry.valueType = nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG;
                entry.value.ullVal = g.nvlink_errors[counter] * u64::from(g.nvlinks);
            }
            _ => entry.nvmlReturn = NOT_SUPPORTED,
        }
    }
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetNvLinkState(
    device: nvmlDevice_t,
    link: c_uint,
    active: *mut nvmlEnableState_t,
) -> nvmlReturn_t {
    match lookup(device, "nvlink") {
        Ok((_, g, _)) if g.nvlinks == 0 => NOT_SUPPORTED,
        Ok((_, g, _)) if link >= g.nvlinks => INVALID_ARGUMENT,
        Ok((_, g, _)) => {
            // SAFETY: caller's out pointer.
            unsafe {
                put(
                    active,
                    nvmlEnableState_t::from(!g.nvlinks_down.contains(&link)),
                )
            };
            SUCCESS
        }
        Err(code) => code,
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetNvLinkErrorCounter(
    device: nvmlDevice_t,
    link: c_uint,
    counter: nvmlNvLinkErrorCounter_t,
    value: *mut c_ulonglong,
) -> nvmlReturn_t {
    match lookup(device, "nvlink_errors") {
        Ok((_, g, _)) if g.nvlinks == 0 => NOT_SUPPORTED,
        Ok((_, g, _)) if link >= g.nvlinks || counter > 3 => INVALID_ARGUMENT,
        Ok((_, g, _)) => {
            // SAFETY: caller's out pointer.
            unsafe { put(value, g.nvlink_errors[counter as usize]) };
            SUCCESS
        }
        Err(code) => code,
    }
}

/// Shared by both retired-pages entry points: the count-then-fill protocol.
unsafe fn retired_pages(
    device: nvmlDevice_t,
    cause: c_uint,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
    timestamps: *mut c_ulonglong,
) -> nvmlReturn_t {
    let (_, g, _) = match lookup(device, "retired_pages_list") {
        Ok(found) => found,
        Err(code) => return code,
    };
    if count.is_null() || cause > 1 {
        return INVALID_ARGUMENT;
    }
    let n = g.retired_pages[cause as usize];
    // SAFETY: `count` is non-null: the caller's buffer length, in and out.
    let capacity = unsafe { *count };
    // SAFETY: as above.
    unsafe { *count = n };
    if n == 0 {
        return SUCCESS;
    }
    if capacity < n || addresses.is_null() {
        return INSUFFICIENT_SIZE;
    }
    for i in 0..n as usize {
        // SAFETY: both buffers hold at least `capacity` >= n elements; timestamps may be null.
        unsafe {
            addresses
                .add(i)
                .write(0x1_0000_0000 + i as c_ulonglong * 4096);
            if !timestamps.is_null() {
                timestamps.add(i).write(1_700_000_000 + i as c_ulonglong);
            }
        }
    }
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages(
    device: nvmlDevice_t,
    cause: nvmlPageRetirementCause_t,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller buffers.
    unsafe { retired_pages(device, cause, count, addresses, std::ptr::null_mut()) }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages_v2(
    device: nvmlDevice_t,
    cause: nvmlPageRetirementCause_t,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
    timestamps: *mut c_ulonglong,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller buffers.
    unsafe { retired_pages(device, cause, count, addresses, timestamps) }
}

/// The sampled PCIe throughput call: like the driver, it takes 20 ms.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPcieThroughput(
    device: nvmlDevice_t,
    counter: nvmlPcieUtilCounter_t,
    value: *mut c_uint,
) -> nvmlReturn_t {
    answer!(device, "pcie_throughput", |_i, g, _t| {
        std::thread::sleep(Duration::from_millis(20));
        let rate = g.pcie_bytes_per_s[(counter as usize).min(1)];
        // SAFETY: caller's out pointer (KB/s).
        unsafe { put(value, (rate / 1024.0) as c_uint) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nvmlGpmQueryDeviceSupport(
    device: nvmlDevice_t,
    support: *mut nvmlGpmSupport_t,
) -> nvmlReturn_t {
    match lookup(device, "gpm_support") {
        Ok((_, g, _)) => {
            if support.is_null() {
                return INVALID_ARGUMENT;
            }
            // SAFETY: `support` is non-null and points to the caller's struct.
            unsafe { (*support).isSupportedDevice = c_uint::from(g.gpm.is_some()) };
            SUCCESS
        }
        Err(code) => code,
    }
}

/// GPM samples: a slab of (GPU, time) records; the handle is the slot number plus one.
static GPM_SAMPLES: std::sync::Mutex<Vec<Option<(usize, f64)>>> = std::sync::Mutex::new(Vec::new());

#[no_mangle]
pub unsafe extern "C" fn nvmlGpmSampleAlloc(sample: *mut nvmlGpmSample_t) -> nvmlReturn_t {
    if sample.is_null() {
        return INVALID_ARGUMENT;
    }
    let mut slab = GPM_SAMPLES.lock().unwrap_or_else(|p| p.into_inner());
    let slot = match slab.iter().position(Option::is_none) {
        Some(free) => free,
        None => {
            slab.push(None);
            slab.len() - 1
        }
    };
    slab[slot] = Some((usize::MAX, 0.0));
    // SAFETY: caller's out pointer, checked non-null.
    unsafe { sample.write((slot + 1) as nvmlGpmSample_t) };
    SUCCESS
}

#[no_mangle]
pub extern "C" fn nvmlGpmSampleFree(sample: nvmlGpmSample_t) -> nvmlReturn_t {
    let mut slab = GPM_SAMPLES.lock().unwrap_or_else(|p| p.into_inner());
    match (sample as usize)
        .checked_sub(1)
        .and_then(|i| slab.get_mut(i))
    {
        Some(slot) => {
            *slot = None;
            SUCCESS
        }
        None => INVALID_ARGUMENT,
    }
}

#[no_mangle]
pub extern "C" fn nvmlGpmSampleGet(device: nvmlDevice_t, sample: nvmlGpmSample_t) -> nvmlReturn_t {
    let (gpu, g, t) = match lookup(device, "gpm_sample") {
        Ok(found) => found,
        Err(code) => return code,
    };
    if g.gpm.is_none() {
        return NOT_SUPPORTED;
    }
    let mut slab = GPM_SAMPLES.lock().unwrap_or_else(|p| p.into_inner());
    match (sample as usize)
        .checked_sub(1)
        .and_then(|i| slab.get_mut(i))
    {
        Some(slot @ Some(_)) => {
            *slot = Some((gpu, t));
            SUCCESS
        }
        _ => INVALID_ARGUMENT,
    }
}

/// Metrics between two samples of one GPU: the scenario's curves at the second sample's time.
#[no_mangle]
pub unsafe extern "C" fn nvmlGpmMetricsGet(request: *mut nvmlGpmMetricsGet_t) -> nvmlReturn_t {
    if request.is_null() || sim().is_err() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null; the caller owns the request struct for the duration of the call.
    let request = unsafe { &mut *request };
    if request.version != NVML_GPM_METRICS_GET_VERSION {
        return nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    }
    let slab = GPM_SAMPLES.lock().unwrap_or_else(|p| p.into_inner());
    let get = |h: nvmlGpmSample_t| {
        (h as usize)
            .checked_sub(1)
            .and_then(|i| slab.get(i).copied().flatten())
    };
    let (Some((gpu1, t1)), Some((gpu2, t2))) = (get(request.sample1), get(request.sample2)) else {
        return INVALID_ARGUMENT;
    };
    let Ok(s) = sim() else { return UNINITIALIZED };
    let Some(spec) = s.gpus.get(gpu2).and_then(|g| g.gpm.as_ref()) else {
        return NOT_SUPPORTED;
    };
    if gpu1 != gpu2 || t2 <= t1 {
        return INVALID_ARGUMENT;
    }
    let n = (request.numMetrics as usize).min(request.metrics.len());
    for m in request.metrics[..n].iter_mut() {
        let value = match m.metricId {
            1 => Some(spec.graphics.at(t2)),
            2 => Some(spec.sm_active.at(t2)),
            3 => Some(spec.sm_occupancy.at(t2)),
            5 => Some(spec.tensor.at(t2)),
            10 => Some(spec.dram.at(t2)),
            11 => Some(spec.fp[0]),
            12 => Some(spec.fp[1]),
            13 => Some(spec.fp[2]),
            _ => None,
        };
        match value {
            Some(v) => {
                m.value = v.clamp(0.0, 100.0);
                m.nvmlReturn = SUCCESS;
            }
            None => m.nvmlReturn = NOT_SUPPORTED,
        }
    }
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: nvmlDevice_t,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> nvmlReturn_t {
    match lookup(device, "mig") {
        Ok((_, g, _)) => match g.mig {
            Some((enabled, next, _)) => {
                // SAFETY: caller's out pointers.
                unsafe {
                    put(current, c_uint::from(enabled));
                    put(pending, c_uint::from(next));
                }
                SUCCESS
            }
            None => NOT_SUPPORTED,
        },
        Err(code) => code,
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(
    device: nvmlDevice_t,
    count: *mut c_uint,
) -> nvmlReturn_t {
    match lookup(device, "mig") {
        Ok((_, g, _)) if g.mig.is_some() => {
            // SAFETY: caller's out pointer.
            unsafe { put(count, 7) };
            SUCCESS
        }
        Ok(_) => NOT_SUPPORTED,
        Err(code) => code,
    }
}

/// MIG device handles live above 1,000,000 so they never collide with GPU handles; only their
/// existence is simulated.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    device: nvmlDevice_t,
    index: c_uint,
    mig: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    match lookup(device, "mig") {
        Ok((gpu, g, _)) => match g.mig {
            Some((true, _, instances)) if index < instances => {
                // SAFETY: caller's out pointer.
                unsafe {
                    put(
                        mig,
                        (MIG_HANDLE_BASE + gpu * 10 + index as usize) as nvmlDevice_t,
                    )
                };
                SUCCESS
            }
            Some(_) => nvmlReturn_enum_NVML_ERROR_NOT_FOUND,
            None => NOT_SUPPORTED,
        },
        Err(code) => code,
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> nvmlReturn_t {
    if sim().is_err() {
        return UNINITIALIZED;
    }
    // One set per process is all the plugin uses; the handle is never dereferenced.
    // SAFETY: caller's out pointer.
    unsafe { put(set, 1usize as nvmlEventSet_t) };
    SUCCESS
}

#[no_mangle]
pub extern "C" fn nvmlDeviceRegisterEvents(
    device: nvmlDevice_t,
    _types: c_ulonglong,
    _set: nvmlEventSet_t,
) -> nvmlReturn_t {
    match lookup(device, "register_events") {
        Ok(_) => SUCCESS,
        Err(code) => code,
    }
}

#[no_mangle]
pub extern "C" fn nvmlEventSetFree(_set: nvmlEventSet_t) -> nvmlReturn_t {
    SUCCESS
}

/// Delivers each scenario Xid once, when due; otherwise waits up to `timeout_ms` and answers
/// TIMEOUT, like the driver.
#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    _set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    timeout_ms: c_uint,
) -> nvmlReturn_t {
    static DELIVERED: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());
    let Ok(s) = sim() else { return UNINITIALIZED };
    let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
    loop {
        // The earliest event not delivered yet: delivered now if it is due, else slept for.
        let next = {
            let mut delivered = DELIVERED.lock().unwrap_or_else(|p| p.into_inner());
            let earliest = s
                .gpus
                .iter()
                .enumerate()
                .flat_map(|(g, gpu)| {
                    gpu.xid_events
                        .iter()
                        .enumerate()
                        .map(move |(e, x)| (g, e, x))
                })
                .filter(|(g, e, _)| !delivered.contains(&(*g, *e)))
                .min_by(|a, b| a.2.at_s.total_cmp(&b.2.at_s));
            match earliest {
                Some((g, e, x)) if x.at_s <= s.start.elapsed().as_secs_f64() => {
                    delivered.push((g, e));
                    Ok((g, x))
                }
                Some((_, _, x)) => Err(Some(s.start + Duration::from_secs_f64(x.at_s.max(0.0)))),
                None => Err(None),
            }
        };
        match next {
            Ok((g, x)) => {
                let event = nvmlEventData_t {
                    device: (g + 1) as nvmlDevice_t,
                    eventType: c_ulonglong::from(nvmlEventTypeXidCriticalError),
                    eventData: x.xid,
                    gpuInstanceId: u32::MAX,
                    computeInstanceId: u32::MAX,
                };
                // SAFETY: caller's out pointer.
                unsafe { put(data, event) };
                return SUCCESS;
            }
            Err(next_event) => {
                let now = Instant::now();
                if now >= deadline {
                    return nvmlReturn_enum_NVML_ERROR_TIMEOUT;
                }
                // Sleep until the next scheduled event or the deadline, as the real call blocks.
                let until = next_event.map_or(deadline, |at| at.min(deadline));
                std::thread::sleep(
                    until
                        .saturating_duration_since(now)
                        .max(Duration::from_millis(1)),
                );
            }
        }
    }
}

// The unversioned (v1) and older entry points that other NVML clients call (nvidia-ml-py,
// nvtop, …): each answers as its newer version does, converted to the older layout.

#[no_mangle]
pub extern "C" fn nvmlInit() -> nvmlReturn_t {
    nvmlInit_v2()
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount(count: *mut c_uint) -> nvmlReturn_t {
    // SAFETY: forwarded caller pointer.
    unsafe { nvmlDeviceGetCount_v2(count) }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller pointer.
    unsafe { nvmlDeviceGetHandleByIndex_v2(index, device) }
}

/// The handle of the GPU whose UUID is `uuid`.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid_text: *const c_char,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let Ok(s) = sim() else { return UNINITIALIZED };
    if uuid_text.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: the caller passes a NUL-terminated string.
    let wanted = unsafe { CStr::from_ptr(uuid_text) };
    match (0..s.gpus.len()).find(|i| uuid(*i).as_bytes() == wanted.to_bytes()) {
        Some(i) => {
            // SAFETY: caller's out pointer.
            unsafe { put(device, (i + 1) as nvmlDevice_t) };
            SUCCESS
        }
        None => nvmlReturn_enum_NVML_ERROR_NOT_FOUND,
    }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion(version: *mut c_int) -> nvmlReturn_t {
    // SAFETY: forwarded caller pointer.
    unsafe { nvmlSystemGetCudaDriverVersion_v2(version) }
}

/// The NVML library version: the driver version with NVML's major version in front (`12.`
/// for driver 5xx, as the real library answers).
#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    match sim() {
        // SAFETY: forwarded caller buffer.
        Ok(s) => unsafe {
            write_str(
                &format!("12.{}", s.scenario.driver_version),
                version,
                length,
            )
        },
        Err(_) => UNINITIALIZED,
    }
}

/// Compute capability from the model name: 9.0 for Hopper (H100, H200, GH200), 8.0 for the
/// A100, 8.9 for Ada (RTX 40xx, L4, L40), else 8.6.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCudaComputeCapability(
    device: nvmlDevice_t,
    major: *mut c_int,
    minor: *mut c_int,
) -> nvmlReturn_t {
    answer!(device, "compute_capability", |_i, g, _t| {
        let name = g.name.as_str();
        let (ma, mi) = if ["H100", "H200", "GH200"].iter().any(|m| name.contains(m)) {
            (9, 0)
        } else if name.contains("A100") {
            (8, 0)
        } else if ["RTX 40", "L4", "L40"].iter().any(|m| name.contains(m)) {
            (8, 9)
        } else {
            (8, 6)
        };
        // SAFETY: caller's out pointers.
        unsafe {
            put(major, ma);
            put(minor, mi);
        }
    })
}

/// `nvmlMemory_t`: total, free, and used including what the driver reserves (v2 reports the
/// reserved part on its own).
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_t,
) -> nvmlReturn_t {
    // SAFETY: a zeroed nvmlMemory_v2_t (plain integers) is a valid value.
    let mut v2: nvmlMemory_v2_t = unsafe { std::mem::zeroed() };
    // SAFETY: `v2` is a local of the right type.
    let code = unsafe { nvmlDeviceGetMemoryInfo_v2(device, &mut v2) };
    if code == SUCCESS {
        let value = nvmlMemory_t {
            total: v2.total,
            free: v2.free,
            used: v2.total.saturating_sub(v2.free),
        };
        // SAFETY: caller's out pointer.
        unsafe { put(memory, value) };
    }
    code
}

/// Fan 0.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetFanSpeed(
    device: nvmlDevice_t,
    speed: *mut c_uint,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller pointer.
    unsafe { nvmlDeviceGetFanSpeed_v2(device, 0, speed) }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller pointer (v1 to v3 share nvmlPciInfo_t).
    unsafe { nvmlDeviceGetPciInfo_v3(device, pci) }
}

#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v2(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller pointer.
    unsafe { nvmlDeviceGetPciInfo_v3(device, pci) }
}

/// v2 has v3's layout (`nvmlProcessInfo_v2_t` is `nvmlProcessInfo_t`).
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v2(
    device: nvmlDevice_t,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    // SAFETY: forwarded caller pointers.
    unsafe { nvmlDeviceGetComputeRunningProcesses_v3(device, count, infos) }
}

/// v1: pid and memory only.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses(
    device: nvmlDevice_t,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_v1_t,
) -> nvmlReturn_t {
    if count.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: `count` is non-null and points to the caller's buffer length.
    let capacity = unsafe { *count };
    let mut full = vec![
        nvmlProcessInfo_t {
            pid: 0,
            usedGpuMemory: 0,
            gpuInstanceId: 0,
            computeInstanceId: 0,
        };
        capacity as usize
    ];
    let buffer = if infos.is_null() {
        std::ptr::null_mut()
    } else {
        full.as_mut_ptr()
    };
    // SAFETY: `count` as the caller gave it, `buffer` holds `capacity` entries (or is null).
    let code = unsafe { nvmlDeviceGetComputeRunningProcesses_v3(device, count, buffer) };
    if code == SUCCESS && !infos.is_null() {
        // SAFETY: on success `count` holds how many entries v3 wrote, at most `capacity`.
        let written = unsafe { *count }.min(capacity) as usize;
        for (i, p) in full.iter().take(written).enumerate() {
            let info = nvmlProcessInfo_v1_t {
                pid: p.pid,
                usedGpuMemory: p.usedGpuMemory,
            };
            // SAFETY: `infos` holds at least `capacity` >= written elements.
            unsafe { infos.add(i).write(info) };
        }
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_scenario_parses() {
        let s: Scenario = toml::from_str(DEFAULT_SCENARIO).expect("scenario");
        assert_eq!(s.gpus.iter().map(|g| g.count).sum::<u32>(), 2);
    }

    #[test]
    fn call_costs_are_a_preset_or_a_table_of_queries_the_simulator_answers() {
        let preset = CallCosts::Preset("h200-busy".into())
            .table()
            .expect("preset");
        assert_eq!(preset["total_energy"], Duration::from_micros(2958));
        assert_eq!(preset.len(), H200_BUSY.len());
        // Every query of the preset is one the simulator answers (a misspelt one would cost
        // nothing, silently).
        let source = include_str!("lib.rs");
        for (query, _) in H200_BUSY {
            assert!(
                source.contains(&format!("(device, \"{query}\"")),
                "{query} is not a query of the simulator"
            );
        }
        let s: Scenario = toml::from_str(
            "driver_version = \"1\"\ncuda_version = 1\ngpus = []\ncall_costs = { max_clocks = 1500, uuid = 0.5 }\n",
        )
        .expect("table");
        let table = s.call_costs.expect("costs").table().expect("table");
        assert_eq!(table["max_clocks"], Duration::from_micros(1500));
        assert_eq!(table["uuid"], Duration::from_nanos(500));
        let err = CallCosts::Preset("h100".into())
            .table()
            .expect_err("unknown preset");
        assert!(err.contains("h200-busy"), "{err}");
        let err = CallCosts::Table([("uuid".to_string(), -1.0)].into())
            .table()
            .expect_err("negative");
        assert!(err.contains("call_costs.uuid"), "{err}");
    }

    #[test]
    fn shipped_scenarios_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        for entry in std::fs::read_dir(dir).expect("scenarios") {
            let path = entry.expect("entry").path();
            let text = std::fs::read_to_string(&path).expect("read");
            toml::from_str::<Scenario>(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }

    #[test]
    fn layouts_match_nvml_h() {
        // Sizes from nvml.h (x86_64): the structs the plugin's calls fill.
        assert_eq!(std::mem::size_of::<nvmlMemory_v2_t>(), 40);
        assert_eq!(std::mem::size_of::<nvmlUtilization_t>(), 8);
        assert_eq!(std::mem::size_of::<nvmlPciInfo_t>(), 68);
        // unsigned int pid; unsigned long long timeStamp; four unsigned ints.
        assert_eq!(std::mem::size_of::<nvmlProcessUtilizationSample_t>(), 32);
        assert_eq!(
            std::mem::offset_of!(nvmlProcessUtilizationSample_t, timeStamp),
            8
        );
        assert_eq!(std::mem::size_of::<nvmlProcessInfo_t>(), 24);
    }
}
