//! metricsd collector for the operating system: CPU, memory, filesystems, disk I/O, network,
//! load, processes and temperatures, under node_exporter's metric names and labels so that
//! existing dashboards work.
//!
//! Sources: `/proc` through the `procfs` crate (what sysinfo does not give: per-mode CPU time,
//! buffers/cached, per-device I/O, drops), `statvfs(3)` for filesystems, sysinfo for
//! temperatures and the kernel/OS identity.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use globset::{Glob, GlobSet, GlobSetBuilder};
use metricsd_plugin_api::{export_plugin, BatchBuilder, Collector, Context, Error, Result};
use procfs::{Current, CurrentSI};
use serde::Deserialize;

/// The instance's `[collectors.config]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Filesystem types not reported (globs).
    #[serde(default = "default_fs_types_exclude")]
    pub fs_types_exclude: Vec<String>,
    /// Mount points not reported (globs).
    #[serde(default = "default_mount_points_exclude")]
    pub mount_points_exclude: Vec<String>,
    /// Block devices not reported in disk I/O (globs).
    #[serde(default = "default_disks_exclude")]
    pub disks_exclude: Vec<String>,
    /// Network interfaces not reported (globs).
    #[serde(default)]
    pub interfaces_exclude: Vec<String>,
    /// Report temperatures from hwmon and thermal zones.
    #[serde(default = "yes")]
    pub temperatures: bool,
}

fn yes() -> bool {
    true
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Pseudo filesystems, as node_exporter excludes them.
pub fn default_fs_types_exclude() -> Vec<String> {
    strings(&[
        "autofs",
        "binfmt_misc",
        "bpf",
        "cgroup",
        "cgroup2",
        "configfs",
        "debugfs",
        "devpts",
        "devtmpfs",
        "efivarfs",
        "fusectl",
        "hugetlbfs",
        "iso9660",
        "mqueue",
        "nsfs",
        "overlay",
        "proc",
        "procfs",
        "pstore",
        "rpc_pipefs",
        "securityfs",
        "selinuxfs",
        "squashfs",
        "sysfs",
        "tracefs",
        "ramfs",
        "fuse.lxcfs",
        "nfsd",
    ])
}

/// Kernel and container-runtime mount points, as node_exporter excludes them.
pub fn default_mount_points_exclude() -> Vec<String> {
    strings(&[
        "/dev",
        "/dev/*",
        "/proc",
        "/proc/*",
        "/sys",
        "/sys/*",
        "/run/credentials/*",
        "/var/lib/docker/*",
        "/var/lib/containers/storage/*",
        "/var/lib/kubelet/pods/*",
    ])
}

/// RAM disks, loop devices, floppies and optical drives.
pub fn default_disks_exclude() -> Vec<String> {
    strings(&["loop*", "ram*", "zram*", "fd*", "sr*"])
}

fn globs(key: &str, patterns: &[String]) -> Result<GlobSet> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(
            Glob::new(p)
                .map_err(|e| Error::config(format!("`{key}`: `{p}` is not a valid glob: {e}")))?,
        );
    }
    b.build()
        .map_err(|e| Error::config(format!("`{key}`: {e}")))
}

/// The collector instance.
pub struct SystemCollector {
    fs_types_exclude: GlobSet,
    mount_points_exclude: GlobSet,
    disks_exclude: GlobSet,
    interfaces_exclude: GlobSet,
    ticks_per_second: f64,
    components: Option<sysinfo::Components>,
    uname: [String; 5],
    /// Sources that failed in this collection, with the error.
    failing_now: std::collections::BTreeMap<&'static str, String>,
    /// Sources that failed in the last collection.
    failing: std::collections::BTreeSet<&'static str>,
}

const CPU_MODES: [&str; 8] = [
    "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
];

impl SystemCollector {
    /// Notes a source that cannot be read in this collection; the others go on.
    fn source_failed(&mut self, source: &'static str, err: impl std::fmt::Display) {
        self.failing_now.insert(source, err.to_string());
    }

    /// After a collection: logs each source when it starts failing and when it can be read
    /// again, and keeps the instance `degraded` in `/health` while any source fails (out of
    /// file descriptors, for one, every `/proc` read fails while the rest of the agent runs).
    fn report_sources(&mut self) {
        for (source, err) in &self.failing_now {
            if !self.failing.contains(source) {
                tracing::warn!(
                    "cannot read {source}: {err}; its metrics are left out until it can be read again"
                );
            }
        }
        for source in &self.failing {
            if !self.failing_now.contains_key(source) {
                tracing::info!("{source} can be read again");
            }
        }
        if let Some(err) = self.failing_now.values().next() {
            let sources: Vec<&str> = self.failing_now.keys().copied().collect();
            metricsd_plugin_api::log::report_degraded(&format!(
                "cannot read {} ({err}); their metrics are left out",
                sources.join(", ")
            ));
        } else if !self.failing.is_empty() {
            metricsd_plugin_api::log::report_recovered();
        }
        self.failing = self.failing_now.keys().copied().collect();
        self.failing_now.clear();
    }

    fn cpu_and_stat(&mut self, out: &mut BatchBuilder) {
        let stats = match procfs::KernelStats::current() {
            Ok(s) => s,
            Err(e) => return self.source_failed("/proc/stat", e),
        };
        let cpu = out.counter(
            "node_cpu_seconds_total",
            "Seconds the CPUs spent in each mode.",
            "seconds",
        );
        let tps = self.ticks_per_second;
        for (i, t) in stats.cpu_time.iter().enumerate() {
            let index = i.to_string();
            let values = [
                Some(t.user),
                Some(t.nice),
                Some(t.system),
                Some(t.idle),
                t.iowait,
                t.irq,
                t.softirq,
                t.steal,
            ];
            for (mode, v) in CPU_MODES.iter().zip(values) {
                if let Some(v) = v {
                    out.sample(
                        cpu,
                        &[("cpu", index.as_str()), ("mode", mode)],
                        v as f64 / tps,
                    );
                }
            }
        }
        let boot = out.gauge(
            "node_boot_time_seconds",
            "Node boot time, in unixtime.",
            "seconds",
        );
        out.sample(boot, &[], stats.btime as f64);
        let ctxt = out.counter(
            "node_context_switches_total",
            "Total number of context switches.",
            "",
        );
        out.sample(ctxt, &[], stats.ctxt as f64);
        let forks = out.counter("node_forks_total", "Total number of forks.", "");
        out.sample(forks, &[], stats.processes as f64);
        if let Some(r) = stats.procs_running {
            let f = out.gauge(
                "node_procs_running",
                "Number of processes in runnable state.",
                "",
            );
            out.sample(f, &[], f64::from(r));
        }
        if let Some(b) = stats.procs_blocked {
            let f = out.gauge(
                "node_procs_blocked",
                "Number of processes blocked waiting for I/O to complete.",
                "",
            );
            out.sample(f, &[], f64::from(b));
        }
    }

    fn load_and_threads(&mut self, out: &mut BatchBuilder) {
        let load = match procfs::LoadAverage::current() {
            Ok(l) => l,
            Err(e) => return self.source_failed("/proc/loadavg", e),
        };
        for (name, help, v) in [
            ("node_load1", "1m load average.", load.one),
            ("node_load5", "5m load average.", load.five),
            ("node_load15", "15m load average.", load.fifteen),
        ] {
            let f = out.gauge(name, help, "");
            out.sample(f, &[], f64::from(v));
        }
        let threads = out.gauge("node_processes_threads", "Allocated threads in system.", "");
        out.sample(threads, &[], f64::from(load.max));
        match std::fs::read_dir("/proc") {
            Ok(entries) => {
                let pids = entries
                    .filter_map(|e| e.ok())
                    .filter(|e| {
                        e.file_name()
                            .to_str()
                            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                    })
                    .count();
                let f = out.gauge("node_processes_pids", "Number of PIDs.", "");
                out.sample(f, &[], pids as f64);
            }
            Err(e) => self.source_failed("/proc (process count)", e),
        }
    }

    fn memory(&mut self, out: &mut BatchBuilder) {
        let m = match procfs::Meminfo::current() {
            Ok(m) => m,
            Err(e) => return self.source_failed("/proc/meminfo", e),
        };
        let fields: [(&str, Option<u64>); 16] = [
            ("MemTotal", Some(m.mem_total)),
            ("MemFree", Some(m.mem_free)),
            ("MemAvailable", m.mem_available),
            ("Buffers", Some(m.buffers)),
            ("Cached", Some(m.cached)),
            ("SwapCached", Some(m.swap_cached)),
            ("SwapTotal", Some(m.swap_total)),
            ("SwapFree", Some(m.swap_free)),
            ("Active", Some(m.active)),
            ("Inactive", Some(m.inactive)),
            ("Dirty", Some(m.dirty)),
            ("Writeback", Some(m.writeback)),
            ("Shmem", m.shmem),
            ("Slab", Some(m.slab)),
            ("SReclaimable", m.s_reclaimable),
            ("SUnreclaim", m.s_unreclaim),
        ];
        for (field, value) in fields {
            if let Some(v) = value {
                let name = format!("node_memory_{field}_bytes");
                let help = format!("Memory information field {field}_bytes.");
                let f = out.gauge(&name, &help, "bytes");
                out.sample(f, &[], v as f64);
            }
        }
    }

    fn filesystems(&mut self, out: &mut BatchBuilder) {
        let mounts = match procfs::mounts() {
            Ok(m) => m,
            Err(e) => return self.source_failed("/proc/mounts", e),
        };
        let size = out.gauge(
            "node_filesystem_size_bytes",
            "Filesystem size in bytes.",
            "bytes",
        );
        let free = out.gauge(
            "node_filesystem_free_bytes",
            "Filesystem free space in bytes.",
            "bytes",
        );
        let avail = out.gauge(
            "node_filesystem_avail_bytes",
            "Filesystem space available to non-root users in bytes.",
            "bytes",
        );
        let files = out.gauge("node_filesystem_files", "Filesystem total file nodes.", "");
        let files_free = out.gauge(
            "node_filesystem_files_free",
            "Filesystem total free file nodes.",
            "",
        );
        let readonly = out.gauge(
            "node_filesystem_readonly",
            "Filesystem read-only status.",
            "",
        );
        let mut seen = std::collections::HashSet::new();
        for m in mounts {
            if self.fs_types_exclude.is_match(&m.fs_vfstype)
                || self.mount_points_exclude.is_match(&m.fs_file)
                || !seen.insert((m.fs_spec.clone(), m.fs_file.clone()))
            {
                continue;
            }
            // statvfs may block on a dead network filesystem; the host's timeout covers it.
            let st = match nix::sys::statvfs::statvfs(Path::new(&m.fs_file)) {
                Ok(st) => st,
                Err(e) => {
                    tracing::debug!(mountpoint = %m.fs_file, "statvfs failed: {e}");
                    continue;
                }
            };
            let set = out.label_set(&[
                ("device", m.fs_spec.as_str()),
                ("fstype", m.fs_vfstype.as_str()),
                ("mountpoint", m.fs_file.as_str()),
            ]);
            let frag = st.fragment_size() as f64;
            out.sample_in(size, set, st.blocks() as f64 * frag);
            out.sample_in(free, set, st.blocks_free() as f64 * frag);
            out.sample_in(avail, set, st.blocks_available() as f64 * frag);
            out.sample_in(files, set, st.files() as f64);
            out.sample_in(files_free, set, st.files_free() as f64);
            let ro = st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY);
            out.sample_in(readonly, set, if ro { 1.0 } else { 0.0 });
        }
    }

    fn disks(&mut self, out: &mut BatchBuilder) {
        let disks = match procfs::diskstats() {
            Ok(d) => d,
            Err(e) => return self.source_failed("/proc/diskstats", e),
        };
        let read_bytes = out.counter(
            "node_disk_read_bytes_total",
            "The total number of bytes read successfully.",
            "bytes",
        );
        let written_bytes = out.counter(
            "node_disk_written_bytes_total",
            "The total number of bytes written successfully.",
            "bytes",
        );
        let reads = out.counter(
            "node_disk_reads_completed_total",
            "The total number of reads completed successfully.",
            "",
        );
        let writes = out.counter(
            "node_disk_writes_completed_total",
            "The total number of writes completed successfully.",
            "",
        );
        let read_time = out.counter(
            "node_disk_read_time_seconds_total",
            "The total number of seconds spent by all reads.",
            "seconds",
        );
        let write_time = out.counter(
            "node_disk_write_time_seconds_total",
            "This is the total number of seconds spent by all writes.",
            "seconds",
        );
        for d in disks {
            if self.disks_exclude.is_match(&d.name) {
                continue;
            }
            let set = out.label_set(&[("device", d.name.as_str())]);
            // /proc/diskstats counts 512-byte sectors whatever the device's sector size.
            out.sample_in(read_bytes, set, d.sectors_read as f64 * 512.0);
            out.sample_in(written_bytes, set, d.sectors_written as f64 * 512.0);
            out.sample_in(reads, set, d.reads as f64);
            out.sample_in(writes, set, d.writes as f64);
            out.sample_in(read_time, set, d.time_reading as f64 / 1000.0);
            out.sample_in(write_time, set, d.time_writing as f64 / 1000.0);
        }
    }

    fn network(&mut self, out: &mut BatchBuilder) {
        let devices = match procfs::net::dev_status() {
            Ok(d) => d,
            Err(e) => return self.source_failed("/proc/net/dev", e),
        };
        let mut devices: Vec<_> = devices.into_values().collect();
        devices.sort_by(|a, b| a.name.cmp(&b.name));
        let families = [
            (
                "node_network_receive_bytes_total",
                "Network device statistic receive_bytes.",
                "bytes",
            ),
            (
                "node_network_transmit_bytes_total",
                "Network device statistic transmit_bytes.",
                "bytes",
            ),
            (
                "node_network_receive_packets_total",
                "Network device statistic receive_packets.",
                "",
            ),
            (
                "node_network_transmit_packets_total",
                "Network device statistic transmit_packets.",
                "",
            ),
            (
                "node_network_receive_errs_total",
                "Network device statistic receive_errs.",
                "",
            ),
            (
                "node_network_transmit_errs_total",
                "Network device statistic transmit_errs.",
                "",
            ),
            (
                "node_network_receive_drop_total",
                "Network device statistic receive_drop.",
                "",
            ),
            (
                "node_network_transmit_drop_total",
                "Network device statistic transmit_drop.",
                "",
            ),
        ]
        .map(|(name, help, unit)| out.counter(name, help, unit));
        for d in devices {
            if self.interfaces_exclude.is_match(&d.name) {
                continue;
            }
            let set = out.label_set(&[("device", d.name.as_str())]);
            let values = [
                d.recv_bytes,
                d.sent_bytes,
                d.recv_packets,
                d.sent_packets,
                d.recv_errs,
                d.sent_errs,
                d.recv_drop,
                d.sent_drop,
            ];
            for (family, v) in families.iter().zip(values) {
                out.sample_in(*family, set, v as f64);
            }
        }
    }

    fn temperatures(&mut self, out: &mut BatchBuilder) {
        let Some(components) = self.components.as_mut() else {
            return;
        };
        components.refresh(false);
        let mut hwmon_temp = None;
        let mut hwmon_crit = None;
        let mut hwmon_label = None;
        let mut zone_temp = None;
        for c in components.iter() {
            let Some(temp) = c.temperature() else {
                continue;
            };
            let id = c.id().unwrap_or("");
            // sysinfo ids: "hwmon0_1" for hwmon0/temp1_input, "thermal_zone0" for a zone.
            if let Some((chip, n)) = id
                .split_once('_')
                .filter(|(chip, _)| chip.starts_with("hwmon"))
            {
                let sensor = format!("temp{n}");
                let set = out.label_set(&[("chip", chip), ("sensor", sensor.as_str())]);
                let f = *hwmon_temp.get_or_insert_with(|| {
                    out.gauge(
                        "node_hwmon_temp_celsius",
                        "Hardware monitor for temperature (input).",
                        "celsius",
                    )
                });
                out.sample_in(f, set, f64::from(temp));
                if let Some(crit) = c.critical() {
                    let f = *hwmon_crit.get_or_insert_with(|| {
                        out.gauge(
                            "node_hwmon_temp_crit_celsius",
                            "Hardware monitor for temperature (crit).",
                            "celsius",
                        )
                    });
                    out.sample_in(f, set, f64::from(crit));
                }
                let f = *hwmon_label.get_or_insert_with(|| {
                    out.info(
                        "node_hwmon_sensor_label",
                        "Label for given chip and sensor.",
                    )
                });
                out.sample(
                    f,
                    &[
                        ("chip", chip),
                        ("sensor", sensor.as_str()),
                        ("label", c.label()),
                    ],
                    1.0,
                );
            } else if !id.is_empty() {
                let f = *zone_temp.get_or_insert_with(|| {
                    out.gauge(
                        "node_thermal_zone_temp",
                        "Zone temperature in Celsius.",
                        "celsius",
                    )
                });
                out.sample(f, &[("zone", id), ("type", c.label())], f64::from(temp));
            }
        }
    }
}

impl Collector for SystemCollector {
    type Config = Config;

    fn validate(config: &Config) -> Result<()> {
        globs("fs_types_exclude", &config.fs_types_exclude)?;
        globs("mount_points_exclude", &config.mount_points_exclude)?;
        globs("disks_exclude", &config.disks_exclude)?;
        globs("interfaces_exclude", &config.interfaces_exclude)?;
        Ok(())
    }

    fn new(config: Config, _ctx: &Context) -> Result<Self> {
        let uname = [
            sysinfo::System::name().unwrap_or_default(),
            sysinfo::System::host_name().unwrap_or_default(),
            sysinfo::System::kernel_version().unwrap_or_default(),
            sysinfo::System::os_version().unwrap_or_default(),
            sysinfo::System::cpu_arch(),
        ];
        Ok(SystemCollector {
            fs_types_exclude: globs("fs_types_exclude", &config.fs_types_exclude)?,
            mount_points_exclude: globs("mount_points_exclude", &config.mount_points_exclude)?,
            disks_exclude: globs("disks_exclude", &config.disks_exclude)?,
            interfaces_exclude: globs("interfaces_exclude", &config.interfaces_exclude)?,
            ticks_per_second: procfs::ticks_per_second().max(1) as f64,
            components: config
                .temperatures
                .then(sysinfo::Components::new_with_refreshed_list),
            uname,
            failing_now: std::collections::BTreeMap::new(),
            failing: std::collections::BTreeSet::new(),
        })
    }

    fn collect(&mut self, out: &mut BatchBuilder) -> Result<()> {
        self.cpu_and_stat(out);
        self.load_and_threads(out);
        self.memory(out);
        self.filesystems(out);
        self.disks(out);
        self.network(out);
        if self.components.is_some() {
            self.temperatures(out);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let time = out.gauge(
            "node_time_seconds",
            "System time in seconds since epoch (1970).",
            "seconds",
        );
        out.sample(time, &[], now);
        let uname = out.info(
            "node_uname_info",
            "Labeled system information as provided by the uname system call.",
        );
        let [sysname, nodename, release, version, machine] = &self.uname;
        out.sample(
            uname,
            &[
                ("sysname", sysname.as_str()),
                ("nodename", nodename.as_str()),
                ("release", release.as_str()),
                ("version", version.as_str()),
                ("machine", machine.as_str()),
            ],
            1.0,
        );
        self.report_sources();
        if out.is_empty() {
            return Err(Error::transient("no system source could be read"));
        }
        Ok(())
    }
}

export_plugin! {
    name: "system",
    description: "CPU, memory, filesystems, disks, network, load, processes, temperatures",
    collector: SystemCollector,
}

#[cfg(test)]
mod tests {
    use super::*;
    use metricsd_plugin_api::testing::CollectorHarness;
    use metricsd_plugin_api::{Batch, MetricKind};

    fn value(batch: &Batch, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        batch.samples.iter().find_map(|s| {
            let f = batch.family_of(s)?;
            let own = batch.own_labels_of(s);
            (f.name.as_str() == name
                && labels.iter().all(|(k, v)| {
                    own.iter()
                        .any(|l| l.name.as_str() == *k && l.value.as_str() == *v)
                }))
            .then_some(s.value)
        })
    }

    #[test]
    fn reports_this_machine_with_sane_values() {
        let mut h = CollectorHarness::new::<SystemCollector>("sys", "{}").expect("instance");
        let b = h.collect().expect("collect");
        h.expect_families(
            &b,
            &[
                "node_cpu_seconds_total",
                "node_load1",
                "node_memory_MemTotal_bytes",
                "node_memory_MemAvailable_bytes",
                "node_filesystem_size_bytes",
                "node_disk_read_bytes_total",
                "node_network_receive_bytes_total",
                "node_boot_time_seconds",
                "node_procs_running",
                "node_processes_pids",
                "node_uname_info",
            ],
        );
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let idle_series = b
            .samples
            .iter()
            .filter(|s| {
                b.family_of(s)
                    .is_some_and(|f| f.name.as_str() == "node_cpu_seconds_total")
                    && b.own_labels_of(s)
                        .iter()
                        .any(|l| l.value.as_str() == "idle")
            })
            .count();
        assert!(
            idle_series >= cpus,
            "{idle_series} idle series for {cpus} CPUs"
        );
        let idle0 = value(
            &b,
            "node_cpu_seconds_total",
            &[("cpu", "0"), ("mode", "idle")],
        )
        .expect("cpu0 idle");
        assert!(idle0 > 0.0);
        let total = value(&b, "node_memory_MemTotal_bytes", &[]).expect("MemTotal");
        let avail = value(&b, "node_memory_MemAvailable_bytes", &[]).expect("MemAvailable");
        assert!(
            total > 64.0 * 1024.0 * 1024.0 && avail <= total,
            "{avail} / {total}"
        );
        let root = value(&b, "node_filesystem_size_bytes", &[("mountpoint", "/")]);
        assert!(
            root.is_some_and(|v| v > 0.0),
            "the root filesystem is reported"
        );
        assert!(value(&b, "node_filesystem_size_bytes", &[("mountpoint", "/proc")]).is_none());
        let lo = value(&b, "node_network_receive_bytes_total", &[("device", "lo")]);
        assert!(lo.is_some(), "loopback is reported by default");
        let boot = value(&b, "node_boot_time_seconds", &[]).expect("boot");
        assert!(boot > 1.0e9);
        let cpu_family = b
            .families
            .iter()
            .find(|f| f.name.as_str() == "node_cpu_seconds_total")
            .expect("family");
        assert_eq!(cpu_family.kind, MetricKind::COUNTER);
        assert_eq!(cpu_family.unit.as_str(), "seconds");

        // Counters do not go backwards between two collections.
        let b2 = h.collect().expect("collect");
        let idle0_again = value(
            &b2,
            "node_cpu_seconds_total",
            &[("cpu", "0"), ("mode", "idle")],
        )
        .expect("idle");
        assert!(idle0_again >= idle0);
    }

    #[test]
    fn exclude_lists_apply() {
        let mut h = CollectorHarness::new::<SystemCollector>(
            "sys2",
            r#"{"interfaces_exclude":["lo"],"mount_points_exclude":["/"],"temperatures":false}"#,
        )
        .expect("instance");
        let b = h.collect().expect("collect");
        assert!(value(&b, "node_network_receive_bytes_total", &[("device", "lo")]).is_none());
        assert!(value(&b, "node_filesystem_size_bytes", &[("mountpoint", "/")]).is_none());
    }

    #[test]
    fn bad_glob_names_the_key() {
        let err = CollectorHarness::new::<SystemCollector>("s", r#"{"disks_exclude":["[x"]}"#)
            .err()
            .expect("refused");
        assert!(err.message.contains("`disks_exclude`"), "{}", err.message);
    }
}
