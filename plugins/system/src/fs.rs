//! node_exporter's `filesystem` and `diskstats` collectors.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use metricsd_plugin_api::BatchBuilder;
use nix::sys::statvfs::Statvfs;
use procfs::FromRead;

use crate::source::{self, Missing, Outcome};
use crate::SystemCollector;

/// One line of a mount table.
#[derive(Debug, PartialEq)]
pub struct Mount {
    pub device: String,
    pub mount_point: String,
    pub fs_type: String,
    pub options: String,
}

/// A mount table (`/proc/1/mounts` format, fstab(5) escapes in the mount point).
pub fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_ascii_whitespace();
            Some(Mount {
                device: f.next()?.to_string(),
                mount_point: unescape(f.next()?),
                fs_type: f.next()?.to_string(),
                options: f.next()?.to_string(),
            })
        })
        .collect()
}

/// Undoes the kernel's octal escapes (`\040` for a space) in a mount table field.
fn unescape(field: &str) -> String {
    if !field.contains('\\') {
        return field.to_string();
    }
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What `statvfs` on a mount point came to.
pub enum Stat {
    /// Its numbers.
    Done(Statvfs),
    /// The call failed.
    Failed(nix::Error),
    /// The call has not returned within the timeout, now or in an earlier collection (a
    /// network filesystem whose server is gone): the mount is skipped until it returns.
    Stuck,
}

type StatResult = nix::Result<Statvfs>;

/// Filesystem types whose `statvfs` reads counters in memory and cannot wait on a device or
/// a server. Every other type (NFS, CIFS, Ceph, Lustre, GPFS, FUSE, ZFS, …) is asked with the
/// deadline.
const LOCAL_FS_TYPES: [&str; 12] = [
    "btrfs", "erofs", "exfat", "ext2", "ext3", "ext4", "f2fs", "ramfs", "squashfs", "tmpfs",
    "vfat", "xfs",
];

/// `statvfs` with a deadline. A dead NFS server makes `statvfs` on its mount block for as long
/// as the mount's retries last, possibly for ever; made in the collection, that call would take
/// every other source of the collector down with it. The calls run on a helper thread; one that
/// does not return within the timeout leaves its mount marked *stuck*, the helper is left to
/// it, and a new helper takes the next calls. A stuck mount is reported with
/// `node_filesystem_device_error` 1 and not asked again until the blocked call returns (as
/// node_exporter's `--collector.filesystem.mount-timeout` does).
pub struct Statfs {
    timeout: Duration,
    /// The helper: where calls go, and where their results come back.
    helper: Option<(Sender<PathBuf>, Receiver<StatResult>)>,
    /// Mounts whose call has not returned, with the channel its result will come back on.
    stuck: HashMap<PathBuf, Receiver<StatResult>>,
}

impl Statfs {
    /// Calls that wait at most `timeout`.
    pub fn new(timeout: Duration) -> Statfs {
        Statfs {
            timeout,
            helper: None,
            stuck: HashMap::new(),
        }
    }

    fn spawn_helper() -> std::io::Result<(Sender<PathBuf>, Receiver<StatResult>)> {
        let (calls, calls_rx) = mpsc::channel::<PathBuf>();
        let (results_tx, results) = mpsc::channel();
        std::thread::Builder::new()
            .name("system-statfs".into())
            .spawn(move || {
                // Ends when the collector drops its sender: after a stuck call has returned,
                // or when the collector goes away.
                for path in calls_rx {
                    if results_tx.send(nix::sys::statvfs::statvfs(&path)).is_err() {
                        break;
                    }
                }
            })?;
        Ok((calls, results))
    }

    /// `statvfs(path)` on a filesystem of type `fs_type`, waited for at most the timeout.
    pub fn stat(&mut self, path: &Path, fs_type: &str) -> Stat {
        // Local filesystems answer from counters in memory, without I/O: asked here. The
        // round trip to the helper costs about 30 µs per mount (measured with the criterion
        // bench: 1.05 ms a collection with 5 local mounts through it, 0.89 ms without).
        if LOCAL_FS_TYPES.contains(&fs_type) {
            return match nix::sys::statvfs::statvfs(path) {
                Ok(st) => Stat::Done(st),
                Err(e) => Stat::Failed(e),
            };
        }
        if let Some(pending) = self.stuck.get(path) {
            match pending.try_recv() {
                Err(mpsc::TryRecvError::Empty) => return Stat::Stuck,
                // The blocked call returned: the mount is asked again.
                _ => {
                    self.stuck.remove(path);
                    tracing::info!("{}: the filesystem responds again", path.display());
                }
            }
        }
        if self.helper.is_none() {
            match Statfs::spawn_helper() {
                Ok(helper) => self.helper = Some(helper),
                // No thread to be had (the process's limit): called here, without a deadline.
                Err(e) => {
                    tracing::debug!("no statfs helper thread ({e}); calling statvfs directly");
                    return match nix::sys::statvfs::statvfs(path) {
                        Ok(st) => Stat::Done(st),
                        Err(e) => Stat::Failed(e),
                    };
                }
            }
        }
        let Some((calls, results)) = &self.helper else {
            return Stat::Failed(nix::Error::EAGAIN);
        };
        if calls.send(path.to_path_buf()).is_err() {
            self.helper = None;
            return Stat::Failed(nix::Error::EAGAIN);
        }
        match results.recv_timeout(self.timeout) {
            Ok(Ok(st)) => Stat::Done(st),
            Ok(Err(e)) => Stat::Failed(e),
            Err(RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    "{}: statvfs did not return within {:?}; the filesystem is reported with node_filesystem_device_error 1 and skipped until it responds",
                    path.display(),
                    self.timeout
                );
                if let Some((_, results)) = self.helper.take() {
                    self.stuck.insert(path.to_path_buf(), results);
                }
                Stat::Stuck
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.helper = None;
                Stat::Failed(nix::Error::EAGAIN)
            }
        }
    }
}

/// `filesystem`: size, free and available space, inodes, read-only flag and device error of
/// each mounted filesystem, from the host's mount table (`/proc/1/mounts`, the mounts of
/// PID 1's namespace: a sandboxed or containerised agent sees its own read-only view in
/// `/proc/self/mounts`); `statvfs(3)` on the mount point under `rootfs`.
pub fn filesystem(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let mut path = c.host.proc("1/mounts");
    let text = match c.files.read(&path) {
        Ok(t) => t,
        // Without PID 1's table (hidepid, another PID namespace): this process's own.
        Err(Missing::Absent) | Err(Missing::Failed(_)) => {
            path = c.host.proc("self/mounts");
            c.files.read(&path)?
        }
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
    let device_error = out.gauge(
        "node_filesystem_device_error",
        "Whether an error occurred while getting statistics for the given device.",
        "",
    );
    let mut seen = HashSet::new();
    for m in parse_mounts(&text) {
        let mount_point = c.host.strip_root(&m.mount_point);
        if c.fs_types_exclude.is_match(&m.fs_type)
            || c.mount_points_exclude.is_match(&mount_point)
            // The same filesystem mounted over itself at one place is one series.
            || !seen.insert((m.device.clone(), mount_point.clone()))
        {
            continue;
        }
        let set = out.label_set(&[
            ("device", m.device.as_str()),
            ("fstype", m.fs_type.as_str()),
            ("mountpoint", mount_point.as_str()),
        ]);
        let st = match c.statfs.stat(&c.host.root(&mount_point), &m.fs_type) {
            Stat::Done(st) => st,
            Stat::Failed(e) => {
                tracing::debug!(mountpoint = %mount_point, "statvfs failed: {e}");
                out.sample_in(device_error, set, 1.0);
                continue;
            }
            Stat::Stuck => {
                out.sample_in(device_error, set, 1.0);
                continue;
            }
        };
        let frag = st.fragment_size() as f64;
        out.sample_in(size, set, st.blocks() as f64 * frag);
        out.sample_in(free, set, st.blocks_free() as f64 * frag);
        out.sample_in(avail, set, st.blocks_available() as f64 * frag);
        out.sample_in(files, set, st.files() as f64);
        out.sample_in(files_free, set, st.files_free() as f64);
        // The mount's own flags in the host's table, not statvfs's: under a sandbox
        // (`ProtectSystem=strict`) every filesystem is read-only to this process only.
        let ro = m.options.split(',').any(|o| o == "ro");
        out.sample_in(readonly, set, if ro { 1.0 } else { 0.0 });
        out.sample_in(device_error, set, 0.0);
    }
    Ok(())
}

/// node_exporter's default `--collector.diskstats.device-exclude`, used to tell partitions
/// where sysfs does not say.
pub(crate) const PARTITION_PATTERN: &str =
    r"^((h|s|v|xv)d[a-z]+|nvme[0-9]+n[0-9]+p|mmcblk[0-9]+p)[0-9]+$";

/// The per-device counters of `/proc/diskstats`: family, help, unit, whether it is a counter,
/// and the scale from the kernel's unit.
const DISK_FIELDS: [(&str, &str, &str, bool, f64); 17] = [
    (
        "node_disk_reads_completed_total",
        "The total number of reads completed successfully.",
        "",
        true,
        1.0,
    ),
    (
        "node_disk_reads_merged_total",
        "The total number of reads merged.",
        "",
        true,
        1.0,
    ),
    (
        "node_disk_read_bytes_total",
        "The total number of bytes read successfully.",
        "bytes",
        true,
        512.0,
    ),
    (
        "node_disk_read_time_seconds_total",
        "The total number of seconds spent by all reads.",
        "seconds",
        true,
        0.001,
    ),
    (
        "node_disk_writes_completed_total",
        "The total number of writes completed successfully.",
        "",
        true,
        1.0,
    ),
    (
        "node_disk_writes_merged_total",
        "The number of writes merged.",
        "",
        true,
        1.0,
    ),
    (
        "node_disk_written_bytes_total",
        "The total number of bytes written successfully.",
        "bytes",
        true,
        512.0,
    ),
    (
        "node_disk_write_time_seconds_total",
        "This is the total number of seconds spent by all writes.",
        "seconds",
        true,
        0.001,
    ),
    (
        "node_disk_io_now",
        "The number of I/Os currently in progress.",
        "",
        false,
        1.0,
    ),
    (
        "node_disk_io_time_seconds_total",
        "Total seconds spent doing I/Os.",
        "seconds",
        true,
        0.001,
    ),
    (
        "node_disk_io_time_weighted_seconds_total",
        "The weighted # of seconds spent doing I/Os.",
        "seconds",
        true,
        0.001,
    ),
    (
        "node_disk_discards_completed_total",
        "The total number of discards completed successfully.",
        "",
        true,
        1.0,
    ),
    (
        "node_disk_discards_merged_total",
        "The total number of discards merged.",
        "",
        true,
        1.0,
    ),
    (
        "node_disk_discarded_sectors_total",
        "The total number of sectors discarded successfully.",
        "",
        true,
        1.0,
    ),
    (
        "node_disk_discard_time_seconds_total",
        "This is the total number of seconds spent by all discards.",
        "seconds",
        true,
        0.001,
    ),
    (
        "node_disk_flush_requests_total",
        "The total number of flush requests completed successfully",
        "",
        true,
        1.0,
    ),
    (
        "node_disk_flush_requests_time_seconds_total",
        "This is the total number of seconds spent by all flush requests.",
        "seconds",
        true,
        0.001,
    ),
];

/// `diskstats`: the I/O counters of each whole disk (partitions are left out unless
/// `partitions = true`: they would count every I/O twice in a sum), with `node_disk_info`
/// and, where udev knows them, filesystem, device-mapper and ATA details.
pub fn diskstats(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let text = c.files.read(&c.host.proc("diskstats"))?;
    let disks = procfs::DiskStats::from_read(text.as_bytes()).map_err(Missing::procfs)?;
    let fields = DISK_FIELDS.map(|(name, help, unit, counter, _)| {
        if counter {
            out.counter(name, help, unit)
        } else {
            out.gauge(name, help, unit)
        }
    });
    for d in disks.0 {
        if c.disks_exclude.is_match(&d.name) || (!c.partitions && c.is_partition(&d.name)) {
            continue;
        }
        let udev = udev_properties(c, d.major, d.minor);
        let get = |key: &str| udev.get(key).map(String::as_str).unwrap_or("");
        let major = d.major.to_string();
        let minor = d.minor.to_string();
        let f = out.info("node_disk_info", "Info of /sys/block/<block_device>.");
        out.sample(
            f,
            &[
                ("device", d.name.as_str()),
                ("major", major.as_str()),
                ("minor", minor.as_str()),
                ("path", get("ID_PATH")),
                ("wwn", get("ID_WWN")),
                ("model", get("ID_MODEL")),
                ("serial", get("ID_SERIAL_SHORT")),
                ("revision", get("ID_REVISION")),
            ],
            1.0,
        );
        let set = out.label_set(&[("device", d.name.as_str())]);
        let values = [
            Some(d.reads),
            Some(d.merged),
            Some(d.sectors_read),
            Some(d.time_reading),
            Some(d.writes),
            Some(d.writes_merged),
            Some(d.sectors_written),
            Some(d.time_writing),
            Some(d.in_progress),
            Some(d.time_in_progress),
            Some(d.weighted_time_in_progress),
            d.discards,
            d.discards_merged,
            d.sectors_discarded,
            d.time_discarding,
            d.flushes,
            d.time_flushing,
        ];
        for ((family, field), v) in fields.iter().zip(DISK_FIELDS).zip(values) {
            if let Some(v) = v {
                out.sample_in(*family, set, v as f64 * field.4);
            }
        }
        if !get("ID_FS_TYPE").is_empty() {
            let f = out.info("node_disk_filesystem_info", "Info about disk filesystem.");
            out.sample(
                f,
                &[
                    ("device", d.name.as_str()),
                    ("type", get("ID_FS_TYPE")),
                    ("usage", get("ID_FS_USAGE")),
                    ("uuid", get("ID_FS_UUID")),
                    ("version", get("ID_FS_VERSION")),
                ],
                1.0,
            );
        }
        if !get("DM_NAME").is_empty() {
            let f = out.info(
                "node_disk_device_mapper_info",
                "Info about disk device mapper.",
            );
            out.sample(
                f,
                &[
                    ("device", d.name.as_str()),
                    ("name", get("DM_NAME")),
                    ("uuid", get("DM_UUID")),
                    ("vg_name", get("DM_VG_NAME")),
                    ("lv_name", get("DM_LV_NAME")),
                    ("lv_layer", get("DM_LV_LAYER")),
                ],
                1.0,
            );
        }
        if !get("ID_ATA").is_empty() {
            for (key, name, help) in [
                (
                    "ID_ATA_WRITE_CACHE",
                    "node_disk_ata_write_cache",
                    "ATA disk has a write cache.",
                ),
                (
                    "ID_ATA_WRITE_CACHE_ENABLED",
                    "node_disk_ata_write_cache_enabled",
                    "ATA disk has its write cache enabled.",
                ),
                (
                    "ID_ATA_ROTATION_RATE_RPM",
                    "node_disk_ata_rotation_rate_rpm",
                    "ATA disk rotation rate in RPMs (0 for SSDs).",
                ),
            ] {
                if let Ok(v) = get(key).parse::<f64>() {
                    let f = out.gauge(name, help, "");
                    out.sample_in(f, set, v);
                }
            }
        }
    }
    Ok(())
}

/// The `E:KEY=value` properties of a block device in the udev database; empty when udev has
/// none (containers without `/run/udev`, virtual devices).
fn udev_properties(c: &SystemCollector, major: i32, minor: i32) -> BTreeMap<String, String> {
    let Some(text) = source::optional(&c.host.udev(&format!("b{major}:{minor}"))) else {
        return BTreeMap::new();
    };
    text.lines()
        .filter_map(|l| l.strip_prefix("E:")?.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl SystemCollector {
    /// Whether a block device is a partition: sysfs says so with a `partition` attribute;
    /// where sysfs has no entry for it, node_exporter's name pattern decides.
    fn is_partition(&self, name: &str) -> bool {
        let dir = self.host.sys(&format!("class/block/{name}"));
        if dir.exists() {
            return dir.join("partition").exists();
        }
        self.partition_pattern.is_match(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_table_lines_and_escapes() {
        let m = parse_mounts("/dev/sda1 /mnt/my\\040disk ext4 ro,relatime 0 0\nshort line\n");
        assert_eq!(
            m,
            vec![Mount {
                device: "/dev/sda1".into(),
                mount_point: "/mnt/my disk".into(),
                fs_type: "ext4".into(),
                options: "ro,relatime".into(),
            }]
        );
    }

    #[test]
    fn partition_names_without_sysfs() {
        let p = regex::Regex::new(PARTITION_PATTERN).expect("valid");
        for yes in ["sda1", "vdb12", "nvme0n1p2", "xvda1", "mmcblk0p1"] {
            assert!(p.is_match(yes), "{yes}");
        }
        for no in ["sda", "nvme0n1", "dm-0", "md0", "vda"] {
            assert!(!p.is_match(no), "{no}");
        }
    }
}
