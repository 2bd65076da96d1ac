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

mod background;
pub mod dcgm;
mod families;
mod metrics;
mod query;
pub mod tiers;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Instant;

use background::{GpmWatcher, XidWatcher, GPM_METRICS};
use families::{Families, THROTTLE_REASONS};
use metrics::{gpu_metrics, CollectOptions, Gpu};
use metricsd_plugin_api::{export_plugin, BatchBuilder, Collector, Context, Error, Result};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};
use query::{is_fatal_for_session, read_constants, Asked, Constants, Stop, CONSTANTS_REFRESH};
use serde::Deserialize;
use tiers::{ReadEvery, Tiers};

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

impl Collector for NvmlCollector {
    type Config = Config;

    fn new(config: Config, ctx: &Context) -> Result<Self> {
        Ok(NvmlCollector {
            tiers: Tiers::new(config.read_every),
            xid: None,
            gpm: None,
            dispatch: ctx.log_dispatch().clone(),
            config,
            nvml: None,
            driver_version: String::new(),
            cuda_version: String::new(),
            identities: BTreeMap::new(),
            constants: HashMap::new(),
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
