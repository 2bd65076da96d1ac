//! metricsd collector for the operating system: node_exporter's default Linux collectors
//! (cpu, stat, meminfo, filesystem, diskstats, netdev, netclass, netstat, …) under its metric
//! names, types and labels, so that its dashboards and the node-mixin alerts work.
//!
//! Each of node_exporter's collectors is a *source* here, switched on or off with the
//! `collectors` table; every source reads the host through [`source::Host`]'s paths, so that
//! an agent in a container with the host's `/` at `/host/root` reports the node.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use globset::{Glob, GlobSet, GlobSetBuilder};
use metricsd_plugin_api::{export_plugin, BatchBuilder, Collector, Context, Error, Result};
use serde::Deserialize;

pub mod cpu;
pub mod devices;
pub mod filesystems;
pub mod fs;
pub mod hardware;
pub mod hwmon;
pub mod kernel;
pub mod memory;
pub mod net;
pub mod nfs;
pub mod source;
pub mod textfile;

use source::{Host, Missing, Outcome};

/// The instance's `[collectors.config]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where procfs is mounted (node_exporter's `--path.procfs`).
    #[serde(default = "default_procfs")]
    pub procfs: String,
    /// Where sysfs is mounted (`--path.sysfs`).
    #[serde(default = "default_sysfs")]
    pub sysfs: String,
    /// Where the host's root filesystem is mounted (`--path.rootfs`).
    #[serde(default = "default_rootfs")]
    pub rootfs: String,
    /// The udev database (`--path.udev.data`).
    #[serde(default = "default_udev_data")]
    pub udev_data: String,
    /// Sources switched on (`true`) or off (`false`) against their defaults
    /// (`--collector.NAME` / `--no-collector.NAME`).
    #[serde(default)]
    pub collectors: BTreeMap<String, bool>,
    /// Filesystem types not reported (globs).
    #[serde(default = "default_fs_types_exclude")]
    pub fs_types_exclude: Vec<String>,
    /// Mount points not reported (globs).
    #[serde(default = "default_mount_points_exclude")]
    pub mount_points_exclude: Vec<String>,
    /// Block devices not reported in disk I/O (globs).
    #[serde(default = "default_disks_exclude")]
    pub disks_exclude: Vec<String>,
    /// Report partitions beside their disks in disk I/O (off: a sum over devices would count
    /// every I/O twice).
    #[serde(default)]
    pub partitions: bool,
    /// Network interfaces not reported (globs).
    #[serde(default)]
    pub interfaces_exclude: Vec<String>,
    /// `netstat` fields reported (a regular expression on `Protocol_Field`).
    #[serde(default = "default_netstat_fields")]
    pub netstat_fields: String,
    /// `vmstat` fields reported (a regular expression).
    #[serde(default = "default_vmstat_fields")]
    pub vmstat_fields: String,
    /// Directory of `*.prom` files for the `textfile` source (`--collector.textfile.directory`;
    /// empty: none).
    #[serde(default)]
    pub textfile_directory: String,
    /// How long a filesystem's `statvfs` may take before the mount is reported stuck and
    /// skipped until it responds (`--collector.filesystem.mount-timeout`).
    #[serde(
        default = "default_mount_timeout",
        with = "metricsd_plugin_api::duration"
    )]
    pub mount_timeout: Duration,
    /// Report hardware sensors and thermal zones (`false` is the same as `hwmon = false` and
    /// `thermal_zone = false` in `collectors`).
    #[serde(default = "yes")]
    pub temperatures: bool,
}

fn yes() -> bool {
    true
}

fn default_mount_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_procfs() -> String {
    "/proc".into()
}

fn default_sysfs() -> String {
    "/sys".into()
}

fn default_rootfs() -> String {
    "/".into()
}

fn default_udev_data() -> String {
    "/run/udev/data".into()
}

/// node_exporter's default `--collector.netstat.fields`.
pub fn default_netstat_fields() -> String {
    "^(.*_(InErrors|InErrs)|Ip_Forwarding|Ip(6|Ext)_(InOctets|OutOctets)|Icmp6?_(InMsgs|OutMsgs)|TcpExt_(Listen.*|Syncookies.*|TCPSynRetrans|TCPTimeouts)|Tcp_(ActiveOpens|InSegs|OutSegs|OutRsts|PassiveOpens|RetransSegs|CurrEstab)|Udp6?_(InDatagrams|OutDatagrams|NoPorts|RcvbufErrors|SndbufErrors))$".into()
}

/// node_exporter's default `--collector.vmstat.fields`.
pub fn default_vmstat_fields() -> String {
    "^(oom_kill|pgpg|pswp|pg.*fault).*".into()
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

fn pattern(key: &str, pattern: &str) -> Result<regex::Regex> {
    regex::Regex::new(pattern).map_err(|e| {
        Error::config(format!(
            "`{key}`: `{pattern}` is not a valid regular expression: {e}"
        ))
    })
}

/// Declares a counter (`counter`) or gauge whose unit its name gives: `_seconds` or `_bytes`,
/// before `_total` for a counter.
pub(crate) fn numeric_family(
    out: &mut BatchBuilder,
    name: &str,
    help: &str,
    counter: bool,
) -> metricsd_plugin_api::FamilyId {
    let base = name.strip_suffix("_total").unwrap_or(name);
    let unit = if base.ends_with("_seconds") {
        "seconds"
    } else if base.ends_with("_bytes") {
        "bytes"
    } else {
        ""
    };
    if counter {
        out.counter(name, help, unit)
    } else {
        out.gauge(name, help, unit)
    }
}

/// One sample of value 1 in the info family `name`, with `labels`.
pub(crate) fn info_sample<K: AsRef<str>, V: AsRef<str>>(
    out: &mut BatchBuilder,
    name: &str,
    help: &str,
    labels: &[(K, V)],
) {
    let labels: Vec<(&str, &str)> = labels
        .iter()
        .map(|(k, v)| (k.as_ref(), v.as_ref()))
        .collect();
    let f = out.info(name, help);
    out.sample(f, &labels, 1.0);
}

/// One of node_exporter's collectors: its name, whether node_exporter runs it by default,
/// and what reads it.
pub struct Source {
    /// node_exporter's name (`--collector.NAME`).
    pub name: &'static str,
    /// Run unless the config switches it off.
    pub default: bool,
    run: fn(&mut SystemCollector, &mut BatchBuilder) -> Outcome,
}

/// Every source, in collection order (by name, `textfile` last).
#[rustfmt::skip]
pub const SOURCES: &[Source] = &[
    Source { name: "arp", default: true, run: net::arp },
    Source { name: "bcache", default: true, run: filesystems::bcache },
    Source { name: "bonding", default: true, run: net::bonding },
    Source { name: "btrfs", default: true, run: filesystems::btrfs },
    Source { name: "conntrack", default: true, run: net::conntrack },
    Source { name: "cpu", default: true, run: cpu::cpu },
    Source { name: "cpufreq", default: true, run: cpu::cpufreq },
    Source { name: "diskstats", default: true, run: fs::diskstats },
    Source { name: "dmi", default: true, run: devices::dmi },
    Source { name: "edac", default: true, run: hardware::edac },
    Source { name: "entropy", default: true, run: kernel::entropy },
    Source { name: "fibrechannel", default: true, run: devices::fibrechannel },
    Source { name: "filefd", default: true, run: kernel::filefd },
    Source { name: "filesystem", default: true, run: fs::filesystem },
    Source { name: "hwmon", default: true, run: hwmon::hwmon },
    Source { name: "infiniband", default: true, run: hardware::infiniband },
    Source { name: "ipvs", default: true, run: net::ipvs },
    Source { name: "loadavg", default: true, run: kernel::loadavg },
    Source { name: "mdadm", default: true, run: hardware::mdadm },
    Source { name: "meminfo", default: true, run: memory::meminfo },
    Source { name: "netclass", default: true, run: net::netclass },
    Source { name: "netdev", default: true, run: net::netdev },
    Source { name: "netstat", default: true, run: net::netstat },
    Source { name: "nfs", default: true, run: nfs::nfs },
    Source { name: "nfsd", default: true, run: nfs::nfsd },
    Source { name: "nvme", default: true, run: hardware::nvme },
    Source { name: "os", default: true, run: kernel::os },
    Source { name: "powersupplyclass", default: true, run: hardware::powersupplyclass },
    Source { name: "pressure", default: true, run: kernel::pressure },
    Source { name: "processes", default: false, run: kernel::processes },
    Source { name: "rapl", default: true, run: hardware::rapl },
    Source { name: "schedstat", default: true, run: hardware::schedstat },
    Source { name: "selinux", default: true, run: kernel::selinux },
    Source { name: "sockstat", default: true, run: net::sockstat },
    Source { name: "softnet", default: true, run: net::softnet },
    Source { name: "stat", default: true, run: cpu::stat },
    Source { name: "tapestats", default: true, run: devices::tapestats },
    Source { name: "thermal_zone", default: true, run: hwmon::thermal_zone },
    Source { name: "time", default: true, run: kernel::time },
    Source { name: "udp_queues", default: true, run: net::udp_queues },
    Source { name: "uname", default: true, run: kernel::uname },
    Source { name: "vmstat", default: true, run: memory::vmstat },
    Source { name: "watchdog", default: true, run: devices::watchdog },
    Source { name: "xfs", default: true, run: filesystems::xfs },
    Source { name: "zfs", default: true, run: filesystems::zfs },
    // Last: it passes on families it does not define, and must not take a name another
    // source declares later.
    Source { name: "textfile", default: true, run: textfile::textfile },
];

/// The sources a config runs, checked against [`SOURCES`].
fn enabled_sources(config: &Config) -> Result<Vec<&'static Source>> {
    for name in config.collectors.keys() {
        if !SOURCES.iter().any(|s| s.name == name) {
            let known: Vec<&str> = SOURCES.iter().map(|s| s.name).collect();
            return Err(Error::config(format!(
                "`collectors.{name}`: no such collector; known: {}",
                known.join(", ")
            )));
        }
    }
    Ok(SOURCES
        .iter()
        .filter(|s| {
            let on = config.collectors.get(s.name).copied().unwrap_or(s.default);
            on && (config.temperatures || !matches!(s.name, "hwmon" | "thermal_zone"))
        })
        .collect())
}

/// The collector instance.
pub struct SystemCollector {
    host: Host,
    sources: Vec<&'static Source>,
    fs_types_exclude: GlobSet,
    mount_points_exclude: GlobSet,
    disks_exclude: GlobSet,
    partitions: bool,
    partition_pattern: regex::Regex,
    interfaces_exclude: GlobSet,
    netstat_fields: source::Selection,
    vmstat_fields: source::Selection,
    ticks_per_second: f64,
    page_size: f64,
    textfile_directory: String,
    /// Files kept open between collections.
    files: source::Files,
    /// `statvfs` with a deadline.
    statfs: fs::Statfs,
    /// Text files that failed to parse (each is logged once until it parses again).
    textfile_errors: std::collections::HashSet<std::path::PathBuf>,
    /// `node_dmi_info`'s labels, read at the first collection.
    dmi: Option<Vec<(String, String)>>,
    /// Sources that failed in this collection, with the error.
    failing_now: BTreeMap<&'static str, String>,
    /// Sources that failed in the last collection.
    failing: BTreeSet<&'static str>,
}

impl SystemCollector {
    /// After a collection: logs each source when it starts failing and when it can be read
    /// again, and keeps the instance `degraded` in `/health` while any source fails (out of
    /// file descriptors, for one, every `/proc` read fails while the rest of the agent runs).
    fn report_sources(&mut self) {
        for (source, err) in &self.failing_now {
            if !self.failing.contains(source) {
                tracing::warn!(
                    "{source}: cannot read {err}; its metrics are left out until it can be read again"
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
                "cannot read {err} (sources failing: {}); their metrics are left out",
                sources.join(", ")
            ));
        } else if !self.failing.is_empty() {
            metricsd_plugin_api::log::report_recovered();
        }
        self.failing = self.failing_now.keys().copied().collect();
        self.failing_now.clear();
    }
}

impl Collector for SystemCollector {
    type Config = Config;

    fn validate(config: &Config) -> Result<()> {
        globs("fs_types_exclude", &config.fs_types_exclude)?;
        globs("mount_points_exclude", &config.mount_points_exclude)?;
        globs("disks_exclude", &config.disks_exclude)?;
        globs("interfaces_exclude", &config.interfaces_exclude)?;
        pattern("netstat_fields", &config.netstat_fields)?;
        pattern("vmstat_fields", &config.vmstat_fields)?;
        enabled_sources(config)?;
        if config.mount_timeout.is_zero() {
            return Err(Error::config(
                "`mount_timeout`: must be longer than 0s (a filesystem needs time to answer)",
            ));
        }
        for (key, path) in [
            ("procfs", &config.procfs),
            ("sysfs", &config.sysfs),
            ("rootfs", &config.rootfs),
        ] {
            if !path.starts_with('/') {
                return Err(Error::config(format!(
                    "`{key}`: `{path}` is not an absolute path"
                )));
            }
        }
        Ok(())
    }

    fn new(config: Config, _ctx: &Context) -> Result<Self> {
        let sources = enabled_sources(&config)?;
        let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as f64;
        Ok(SystemCollector {
            host: Host::new(
                &config.procfs,
                &config.sysfs,
                &config.rootfs,
                &config.udev_data,
            ),
            sources,
            fs_types_exclude: globs("fs_types_exclude", &config.fs_types_exclude)?,
            mount_points_exclude: globs("mount_points_exclude", &config.mount_points_exclude)?,
            disks_exclude: globs("disks_exclude", &config.disks_exclude)?,
            partitions: config.partitions,
            partition_pattern: pattern("partition pattern", fs::PARTITION_PATTERN)?,
            interfaces_exclude: globs("interfaces_exclude", &config.interfaces_exclude)?,
            netstat_fields: source::Selection::new(pattern(
                "netstat_fields",
                &config.netstat_fields,
            )?),
            vmstat_fields: source::Selection::new(pattern("vmstat_fields", &config.vmstat_fields)?),
            ticks_per_second: procfs::ticks_per_second().max(1) as f64,
            page_size,
            textfile_directory: config.textfile_directory,
            files: source::Files::default(),
            statfs: fs::Statfs::new(config.mount_timeout),
            textfile_errors: Default::default(),
            dmi: None,
            failing_now: BTreeMap::new(),
            failing: BTreeSet::new(),
        })
    }

    fn collect(&mut self, out: &mut BatchBuilder) -> Result<()> {
        // Declared first, and `textfile` runs last (SOURCES lists it last): a text file that
        // redefines one of this collector's families is refused, it never makes the
        // collector's own declaration conflict.
        let duration = out.gauge(
            "node_scrape_collector_duration_seconds",
            "node_exporter: Duration of a collector scrape.",
            "seconds",
        );
        let success = out.gauge(
            "node_scrape_collector_success",
            "node_exporter: Whether a collector succeeded.",
            "",
        );
        let mut results = Vec::with_capacity(self.sources.len());
        for source in self.sources.clone() {
            let start = Instant::now();
            let outcome = (source.run)(self, out);
            let elapsed = start.elapsed().as_secs_f64();
            match outcome {
                Ok(()) => results.push((source.name, elapsed, true)),
                Err(Missing::Absent) => {
                    tracing::debug!("{}: nothing to report on this host", source.name);
                    results.push((source.name, elapsed, false));
                }
                Err(Missing::Failed(e)) => {
                    self.failing_now.insert(source.name, e);
                    results.push((source.name, elapsed, false));
                }
            }
        }
        let useful = results.iter().any(|r| r.2);
        for (name, elapsed, ok) in results {
            let set = out.label_set(&[("collector", name)]);
            out.sample_in(duration, set, elapsed);
            out.sample_in(success, set, if ok { 1.0 } else { 0.0 });
        }
        self.files.sweep();
        self.report_sources();
        if !useful {
            return Err(Error::transient("no system source could be read"));
        }
        Ok(())
    }
}

export_plugin! {
    name: "system",
    description: "the node, under node_exporter's names: CPU, memory, filesystems, disks, network, kernel",
    collector: SystemCollector,
}

#[cfg(test)]
mod tests {
    use super::*;
    use metricsd_plugin_api::testing::{logs_of, CollectorHarness};
    use metricsd_plugin_api::{Batch, LogLevel, MetricKind};
    use std::path::Path;

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

    fn kind(batch: &Batch, name: &str) -> Option<MetricKind> {
        batch
            .families
            .iter()
            .find(|f| f.name.as_str() == name)
            .map(|f| f.kind)
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
                "node_network_up",
                "node_netstat_Tcp_InSegs",
                "node_sockstat_sockets_used",
                "node_vmstat_pgfault",
                "node_boot_time_seconds",
                "node_procs_running",
                "node_uname_info",
                "node_os_info",
                "node_scrape_collector_success",
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
        assert_eq!(
            kind(&b, "node_cpu_seconds_total"),
            Some(MetricKind::COUNTER)
        );
        assert_eq!(
            kind(&b, "node_netstat_Tcp_InSegs"),
            Some(MetricKind::UNTYPED)
        );
        // uname(2)'s own fields, not the distribution's.
        assert!(
            value(&b, "node_uname_info", &[("sysname", "Linux")]).is_some(),
            "sysname is the kernel's"
        );
        // node_exporter's defaults: `processes` is off.
        assert!(value(&b, "node_processes_pids", &[]).is_none());
        assert_eq!(
            value(&b, "node_scrape_collector_success", &[("collector", "cpu")]),
            Some(1.0)
        );

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
    fn exclude_lists_and_switches_apply() {
        let mut h = CollectorHarness::new::<SystemCollector>(
            "sys2",
            r#"{"interfaces_exclude":["lo"],"mount_points_exclude":["/"],"temperatures":false,
                "collectors":{"netstat":false,"processes":true}}"#,
        )
        .expect("instance");
        let b = h.collect().expect("collect");
        assert!(value(&b, "node_network_receive_bytes_total", &[("device", "lo")]).is_none());
        assert!(value(&b, "node_network_up", &[("device", "lo")]).is_none());
        assert!(value(&b, "node_filesystem_size_bytes", &[("mountpoint", "/")]).is_none());
        assert!(kind(&b, "node_netstat_Tcp_InSegs").is_none());
        assert!(value(
            &b,
            "node_scrape_collector_success",
            &[("collector", "netstat")]
        )
        .is_none());
        assert!(value(&b, "node_processes_pids", &[]).is_some_and(|v| v > 0.0));
    }

    #[test]
    fn bad_config_names_the_key() {
        for (config, key) in [
            (r#"{"disks_exclude":["[x"]}"#, "`disks_exclude`"),
            (r#"{"netstat_fields":"("}"#, "`netstat_fields`"),
            (r#"{"collectors":{"nosuch":true}}"#, "`collectors.nosuch`"),
            (r#"{"rootfs":"host"}"#, "`rootfs`"),
        ] {
            let err = CollectorHarness::validate::<SystemCollector>(config).expect_err("refused");
            assert!(err.message.contains(key), "{config}: {}", err.message);
        }
    }

    fn write(root: &Path, rel: &str, text: &str) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    }

    /// A host tree as a container sees the node's under `/host`: procfs, sysfs, the root
    /// filesystem and the udev database at configured paths.
    fn fake_host(dir: &Path) {
        let root = dir.join("root");
        write(
            dir,
            "proc/stat",
            "cpu  1 2 3 4 5 6 7 8 9 10\ncpu0 100 0 0 200 0 0 0 0 30 40\nintr 1234 1 2\nctxt 99\nbtime 1700000000\nprocesses 7\nprocs_running 2\nprocs_blocked 1\n",
        );
        write(
            dir,
            "proc/meminfo",
            "MemTotal:       1000 kB\nActive(anon):      5 kB\nHugePages_Total:       3\n",
        );
        // The host's mount table: `/data` is mounted read-only, `/` read-write, whatever
        // this process's own view of them is; a mount shown under the rootfs prefix is named
        // as the host names it.
        write(
            dir,
            "proc/1/mounts",
            &format!(
                "/dev/sda2 / ext4 rw,relatime 0 0\n/dev/sdb1 /data ext4 ro,relatime 0 0\n/dev/sda2 / ext4 rw,relatime 0 0\n/dev/sdc1 {}/boot vfat rw 0 0\nproc /proc proc rw 0 0\n",
                root.display()
            ),
        );
        std::fs::create_dir_all(root.join("data")).expect("mkdir");
        std::fs::create_dir_all(root.join("boot")).expect("mkdir");
        write(
            dir,
            "proc/diskstats",
            "   8       0 sda 10 1 80 5 20 2 160 7 0 12 13 0 0 0 0 4 1\n   8       1 sda1 10 1 80 5 20 2 160 7 0 12 13 0 0 0 0 4 1\n 259       0 nvme0n1p1 1 0 8 1 1 0 8 1 0 1 1\n   7       0 loop0 1 0 8 1 1 0 8 1 0 1 1\n",
        );
        std::fs::create_dir_all(dir.join("sys/class/block/sda")).expect("mkdir");
        write(dir, "sys/class/block/sda1/partition", "1\n");
        write(
            dir,
            "udev/b8:0",
            "S:disk/by-id/x\nE:ID_MODEL=SAMSUNG_MZ7\nE:ID_SERIAL_SHORT=S3Z1\nE:ID_FS_TYPE=ext4\nE:ID_FS_UUID=abcd\n",
        );
        write(
            dir,
            "proc/net/dev",
            "Inter-|   Receive                                                |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n  eth9: 1000 10 1 2 3 4 5 6 2000 20 7 8 9 10 11 12\n",
        );
        for (file, text) in [
            ("operstate", "up\n"),
            ("mtu", "9000\n"),
            ("speed", "100000\n"),
            ("carrier", "1\n"),
            ("flags", "0x1003\n"),
            ("address", "02:00:00:00:00:09\n"),
            ("statistics/rx_nohandler", "42\n"),
        ] {
            write(dir, &format!("sys/class/net/eth9/{file}"), text);
        }
        write(
            dir,
            "root/etc/os-release",
            "NAME=\"Ubuntu\"\nID=ubuntu\nID_LIKE=debian\nVERSION_ID=\"22.04\"\n",
        );
    }

    #[test]
    fn a_host_tree_at_configured_paths_is_read_as_node_exporter_reads_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        fake_host(dir);
        let config = format!(
            r#"{{"procfs":"{0}/proc","sysfs":"{0}/sys","rootfs":"{0}/root","udev_data":"{0}/udev","temperatures":false}}"#,
            dir.display()
        );
        let mut h = CollectorHarness::new::<SystemCollector>("fake", &config).expect("instance");
        let b = h.collect().expect("collect");

        // Read-only from the host's mount table, not from this process's statvfs flags.
        let ro = |mp| value(&b, "node_filesystem_readonly", &[("mountpoint", mp)]);
        assert_eq!(ro("/data"), Some(1.0));
        assert_eq!(ro("/"), Some(0.0));
        assert_eq!(ro("/boot"), Some(0.0), "rootfs prefix stripped");
        assert!(ro("/proc").is_none());
        let root_series = b
            .samples
            .iter()
            .filter(|s| {
                b.family_of(s)
                    .is_some_and(|f| f.name.as_str() == "node_filesystem_readonly")
                    && b.own_labels_of(s)
                        .iter()
                        .any(|l| l.name.as_str() == "mountpoint" && l.value.as_str() == "/")
            })
            .count();
        assert_eq!(root_series, 1, "a mount listed twice is one series");
        assert_eq!(
            value(
                &b,
                "node_filesystem_device_error",
                &[("mountpoint", "/data")]
            ),
            Some(0.0)
        );

        // Whole disks only: sysfs says sda1 is a partition, the name pattern says
        // nvme0n1p1 is one (no sysfs entry for it), loop devices are excluded.
        let reads = |d| value(&b, "node_disk_reads_completed_total", &[("device", d)]);
        assert_eq!(reads("sda"), Some(10.0));
        assert!(reads("sda1").is_none());
        assert!(reads("nvme0n1p1").is_none());
        assert!(reads("loop0").is_none());
        let weighted = value(
            &b,
            "node_disk_io_time_weighted_seconds_total",
            &[("device", "sda")],
        );
        assert!(
            weighted.is_some_and(|v| (v - 0.013).abs() < 1e-12),
            "{weighted:?}"
        );
        assert_eq!(
            value(&b, "node_disk_flush_requests_total", &[("device", "sda")]),
            Some(4.0)
        );
        assert_eq!(
            value(&b, "node_disk_read_bytes_total", &[("device", "sda")]),
            Some(80.0 * 512.0)
        );
        assert_eq!(
            value(
                &b,
                "node_disk_info",
                &[
                    ("device", "sda"),
                    ("model", "SAMSUNG_MZ7"),
                    ("serial", "S3Z1"),
                    ("major", "8")
                ]
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &b,
                "node_disk_filesystem_info",
                &[("device", "sda"), ("type", "ext4")]
            ),
            Some(1.0)
        );

        // /proc/stat and /proc/meminfo of the tree, not of this machine.
        let tps = procfs::ticks_per_second() as f64;
        assert_eq!(
            value(
                &b,
                "node_cpu_guest_seconds_total",
                &[("cpu", "0"), ("mode", "nice")]
            ),
            Some(40.0 / tps)
        );
        assert_eq!(value(&b, "node_intr_total", &[]), Some(1234.0));
        assert_eq!(value(&b, "node_boot_time_seconds", &[]), Some(1.7e9));
        assert_eq!(
            value(&b, "node_memory_MemTotal_bytes", &[]),
            Some(1000.0 * 1024.0)
        );
        assert_eq!(
            value(&b, "node_memory_Active_anon_bytes", &[]),
            Some(5.0 * 1024.0)
        );
        assert_eq!(value(&b, "node_memory_HugePages_Total", &[]), Some(3.0));

        // Interfaces: /proc/net/dev counters and the sysfs class.
        let eth = [("device", "eth9")];
        assert_eq!(
            value(&b, "node_network_transmit_colls_total", &eth),
            Some(10.0)
        );
        assert_eq!(
            value(&b, "node_network_receive_nohandler_total", &eth),
            Some(42.0)
        );
        assert_eq!(value(&b, "node_network_up", &eth), Some(1.0));
        assert_eq!(value(&b, "node_network_mtu_bytes", &eth), Some(9000.0));
        assert_eq!(value(&b, "node_network_speed_bytes", &eth), Some(1.25e10));
        assert_eq!(value(&b, "node_network_flags", &eth), Some(4099.0));
        assert!(
            value(&b, "node_network_dormant", &eth).is_none(),
            "absent attribute"
        );
        assert_eq!(
            value(
                &b,
                "node_network_info",
                &[("device", "eth9"), ("address", "02:00:00:00:00:09")]
            ),
            Some(1.0)
        );

        // The host's os-release under rootfs.
        assert_eq!(
            value(
                &b,
                "node_os_version",
                &[("id", "ubuntu"), ("id_like", "debian")]
            ),
            Some(22.04)
        );
        assert_eq!(
            value(&b, "node_os_info", &[("name", "Ubuntu"), ("variant", "")]),
            Some(1.0)
        );

        // Sources the tree does not have are "no data", not failures: success 0, nothing
        // logged above debug.
        let success = |c| value(&b, "node_scrape_collector_success", &[("collector", c)]);
        assert_eq!(success("conntrack"), Some(0.0));
        assert_eq!(success("pressure"), Some(0.0));
        assert_eq!(success("diskstats"), Some(1.0));
        let loud: Vec<_> = logs_of("fake")
            .into_iter()
            .filter(|r| r.1 <= LogLevel::WARN)
            .collect();
        assert!(loud.is_empty(), "{loud:?}");

        // With `partitions = true` the partition is reported too.
        let config = format!(
            r#"{{"procfs":"{0}/proc","sysfs":"{0}/sys","rootfs":"{0}/root","udev_data":"{0}/udev","temperatures":false,"partitions":true}}"#,
            dir.display()
        );
        let mut h = CollectorHarness::new::<SystemCollector>("fake2", &config).expect("instance");
        let b = h.collect().expect("collect");
        assert_eq!(
            value(&b, "node_disk_reads_completed_total", &[("device", "sda1")]),
            Some(10.0)
        );
    }

    #[test]
    fn a_broken_source_degrades_and_names_its_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        fake_host(dir);
        write(dir, "proc/sys/fs/file-nr", "garbage\n");
        let config = format!(
            r#"{{"procfs":"{0}/proc","sysfs":"{0}/sys","rootfs":"{0}/root","temperatures":false}}"#,
            dir.display()
        );
        let mut h = CollectorHarness::new::<SystemCollector>("broken", &config).expect("instance");
        let b = h.collect().expect("the other sources still report");
        assert_eq!(
            value(
                &b,
                "node_scrape_collector_success",
                &[("collector", "filefd")]
            ),
            Some(0.0)
        );
        assert!(value(&b, "node_intr_total", &[]).is_some());
        let warned = logs_of("broken")
            .into_iter()
            .any(|r| r.1 == LogLevel::WARN && r.3.contains("file-nr"));
        assert!(warned, "{:?}", logs_of("broken"));
    }
    #[test]
    fn textfiles_are_passed_on_and_a_bad_one_is_left_out_whole() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        write(
            dir,
            "good.prom",
            "# HELP backup_age_seconds Age of the last backup.\n# TYPE backup_age_seconds gauge\nbackup_age_seconds{job=\"db\"} 12\nraid_ok 1\n",
        );
        write(dir, "stamped.prom", "stamped_value 1 1700000000000\n");
        // Redefines a family the loadavg source reports: left out, node_load1 stays loadavg's.
        write(
            dir,
            "clash.prom",
            "# HELP node_load1 mine\nnode_load1 99\nclash_other 1\n",
        );
        write(dir, "ignored.txt", "not_read 1\n");
        let config = format!(
            r#"{{"textfile_directory":"{}","temperatures":false}}"#,
            dir.display()
        );
        let mut h = CollectorHarness::new::<SystemCollector>("text", &config).expect("instance");
        let b = h.collect().expect("collect");
        assert_eq!(
            value(&b, "backup_age_seconds", &[("job", "db")]),
            Some(12.0)
        );
        assert_eq!(kind(&b, "backup_age_seconds"), Some(MetricKind::GAUGE));
        assert_eq!(kind(&b, "raid_ok"), Some(MetricKind::UNTYPED));
        assert!(value(&b, "stamped_value", &[]).is_none());
        assert!(
            value(&b, "clash_other", &[]).is_none(),
            "a clashing file is left out whole"
        );
        assert!(value(&b, "not_read", &[]).is_none());
        assert_ne!(value(&b, "node_load1", &[]), Some(99.0));
        assert_eq!(value(&b, "node_textfile_scrape_error", &[]), Some(1.0));
        let good = dir.join("good.prom").display().to_string();
        assert!(
            value(&b, "node_textfile_mtime_seconds", &[("file", &good)]).is_some_and(|t| t > 1.0e9)
        );
        let stamped = dir.join("stamped.prom").display().to_string();
        assert!(value(&b, "node_textfile_mtime_seconds", &[("file", &stamped)]).is_none());
        let warnings: Vec<String> = logs_of("text")
            .into_iter()
            .filter(|r| r.1 == LogLevel::WARN)
            .map(|r| r.3)
            .collect();
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("stamped.prom") && w.contains("timestamp")),
            "{warnings:?}"
        );
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("clash.prom") && w.contains("node_load1")),
            "{warnings:?}"
        );
        // Each bad file is logged once, not at every collection.
        h.collect().expect("collect");
        let again = logs_of("text")
            .iter()
            .filter(|r| r.1 == LogLevel::WARN)
            .count();
        assert_eq!(again, warnings.len(), "{:?}", logs_of("text"));
        // Families of later sources and of the collector itself are refused too: the
        // collection still reports them as the sources define them.
        write(
            dir,
            "late.prom",
            "# HELP node_time_seconds mine\nnode_time_seconds 1\n",
        );
        write(
            dir,
            "own.prom",
            "# HELP node_scrape_collector_success mine\nnode_scrape_collector_success 5\n",
        );
        let b = h
            .collect()
            .expect("a careless text file does not fail the collection");
        assert!(value(&b, "node_time_seconds", &[]).is_some_and(|t| t > 1.0e9));
        let own = b.samples.iter().any(|s| {
            b.family_of(s)
                .is_some_and(|f| f.name.as_str() == "node_scrape_collector_success")
                && s.value == 5.0
        });
        assert!(
            !own,
            "the text file's node_scrape_collector_success is refused"
        );
        std::fs::remove_file(dir.join("late.prom")).expect("rm");
        std::fs::remove_file(dir.join("own.prom")).expect("rm");
        // Fixed files are read again and the error clears.
        std::fs::remove_file(dir.join("stamped.prom")).expect("rm");
        std::fs::remove_file(dir.join("clash.prom")).expect("rm");
        let b = h.collect().expect("collect");
        assert_eq!(value(&b, "node_textfile_scrape_error", &[]), Some(0.0));
    }
}
