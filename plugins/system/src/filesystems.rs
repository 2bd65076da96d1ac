//! Statistics of particular filesystems and block caches: node_exporter's `xfs`
//! (`/sys/fs/xfs/DEV/stats/stats`), `btrfs` (`/sys/fs/btrfs/UUID`), `zfs` (the ZFS module's
//! kstats, `/proc/spl/kstat/zfs`) and `bcache` (`/sys/fs/bcache/UUID`).

use std::path::Path;

use metricsd_plugin_api::{BatchBuilder, MetricKind};

use crate::source::{self, Missing, Outcome};
use crate::{numeric_family, SystemCollector};

/// The XFS counters node_exporter reports: the stats line, the position on it, the name after
/// `node_xfs_`, and the help.
#[rustfmt::skip]
const XFS: &[(&str, usize, &str, &str)] = &[
    ("extent_alloc", 0, "extent_allocation_extents_allocated_total", "Number of extents allocated for a filesystem."),
    ("extent_alloc", 1, "extent_allocation_blocks_allocated_total", "Number of blocks allocated for a filesystem."),
    ("extent_alloc", 2, "extent_allocation_extents_freed_total", "Number of extents freed for a filesystem."),
    ("extent_alloc", 3, "extent_allocation_blocks_freed_total", "Number of blocks freed for a filesystem."),
    ("abt", 0, "allocation_btree_lookups_total", "Number of allocation B-tree lookups for a filesystem."),
    ("abt", 1, "allocation_btree_compares_total", "Number of allocation B-tree compares for a filesystem."),
    ("abt", 2, "allocation_btree_records_inserted_total", "Number of allocation B-tree records inserted for a filesystem."),
    ("abt", 3, "allocation_btree_records_deleted_total", "Number of allocation B-tree records deleted for a filesystem."),
    ("blk_map", 0, "block_mapping_reads_total", "Number of block map for read operations for a filesystem."),
    ("blk_map", 1, "block_mapping_writes_total", "Number of block map for write operations for a filesystem."),
    ("blk_map", 2, "block_mapping_unmaps_total", "Number of block unmaps (deletes) for a filesystem."),
    ("blk_map", 3, "block_mapping_extent_list_insertions_total", "Number of extent list insertions for a filesystem."),
    ("blk_map", 4, "block_mapping_extent_list_deletions_total", "Number of extent list deletions for a filesystem."),
    ("blk_map", 5, "block_mapping_extent_list_lookups_total", "Number of extent list lookups for a filesystem."),
    ("blk_map", 6, "block_mapping_extent_list_compares_total", "Number of extent list compares for a filesystem."),
    ("bmbt", 0, "block_map_btree_lookups_total", "Number of block map B-tree lookups for a filesystem."),
    ("bmbt", 1, "block_map_btree_compares_total", "Number of block map B-tree compares for a filesystem."),
    ("bmbt", 2, "block_map_btree_records_inserted_total", "Number of block map B-tree records inserted for a filesystem."),
    ("bmbt", 3, "block_map_btree_records_deleted_total", "Number of block map B-tree records deleted for a filesystem."),
    ("dir", 0, "directory_operation_lookup_total", "Number of file name directory lookups which miss the operating systems directory name lookup cache."),
    ("dir", 1, "directory_operation_create_total", "Number of times a new directory entry was created for a filesystem."),
    ("dir", 2, "directory_operation_remove_total", "Number of times an existing directory entry was created for a filesystem."),
    ("dir", 3, "directory_operation_getdents_total", "Number of times the directory getdents operation was performed for a filesystem."),
    ("ig", 0, "inode_operation_attempts_total", "Number of times the OS looked for an XFS inode in the inode cache."),
    ("ig", 1, "inode_operation_found_total", "Number of times the OS looked for and found an XFS inode in the inode cache."),
    ("ig", 2, "inode_operation_recycled_total", "Number of times the OS found an XFS inode in the cache, but could not use it as it was being recycled."),
    ("ig", 3, "inode_operation_missed_total", "Number of times the OS looked for an XFS inode in the cache, but did not find it."),
    ("ig", 4, "inode_operation_duplicates_total", "Number of times the OS tried to add a missing XFS inode to the inode cache, but found it had already been added by another process."),
    ("ig", 5, "inode_operation_reclaims_total", "Number of times the OS reclaimed an XFS inode from the inode cache to free memory for another purpose."),
    ("ig", 6, "inode_operation_attribute_changes_total", "Number of times the OS explicitly changed the attributes of an XFS inode."),
    ("rw", 0, "write_calls_total", "Number of write(2) system calls made to files in a filesystem."),
    ("rw", 1, "read_calls_total", "Number of read(2) system calls made to files in a filesystem."),
    ("vnodes", 0, "vnode_active_total", "Number of vnodes not on free lists for a filesystem."),
    ("vnodes", 1, "vnode_allocate_total", "Number of times vn_alloc called for a filesystem."),
    ("vnodes", 2, "vnode_get_total", "Number of times vn_get called for a filesystem."),
    ("vnodes", 3, "vnode_hold_total", "Number of times vn_hold called for a filesystem."),
    ("vnodes", 4, "vnode_release_total", "Number of times vn_rele called for a filesystem."),
    ("vnodes", 5, "vnode_reclaim_total", "Number of times vn_reclaim called for a filesystem."),
    ("vnodes", 6, "vnode_remove_total", "Number of times vn_remove called for a filesystem."),
];

/// `xfs`: each mounted XFS filesystem's counters, labelled with its block device. A host
/// without XFS reports nothing and succeeds, as node_exporter's collector does.
pub fn xfs(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let base = c.host.sys("fs/xfs");
    let devices = source::entries_if_present(&base)?;
    // `/sys/fs/xfs/stats/stats` is the totals of all filesystems, a file where a device has
    // a directory.
    for device in devices
        .into_iter()
        .filter(|d| base.join(d).join("stats").is_dir())
    {
        let path = base.join(&device).join("stats/stats");
        let text = match c.files.read(&path) {
            Ok(text) => text,
            Err(Missing::Absent) => continue,
            Err(e) => return Err(e),
        };
        let lines = source::keyed_numbers(&path, &text)?;
        for (key, i, name, help) in XFS {
            let f = out.counter(&format!("node_xfs_{name}"), help, "");
            let v = lines.get(*key).and_then(|v| v.get(*i)).copied();
            out.sample(f, &[("device", &device)], v.unwrap_or(0.0));
        }
    }
    Ok(())
}

/// A btrfs sysfs attribute holding a number; 0 where it is absent or not a number (as
/// node_exporter reads them).
fn btrfs_number(dir: &Path, rel: &str) -> f64 {
    source::number_attribute(&dir.join(rel)).unwrap_or(0.0)
}

/// The allocation ratio of a block-group profile on `devices` devices: the raw bytes written
/// per byte stored (node_exporter's values; 0 for profiles it does not know).
fn allocation_ratio(mode: &str, devices: usize) -> f64 {
    let n = devices as f64;
    match mode {
        "single" | "raid0" => 1.0,
        "dup" | "raid1" | "raid10" => 2.0,
        "raid5" => n / (n - 1.0),
        "raid6" => n / (n - 2.0),
        _ => 0.0,
    }
}

/// `btrfs`: each btrfs filesystem's allocation by block-group type and profile, its global
/// reserve and its devices' sizes (`/sys/fs/btrfs/UUID`).
pub fn btrfs(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let base = c.host.sys("fs/btrfs");
    let filesystems = source::entries_if_present(&base)?;
    // Filesystems are named by UUID; `features` (the module's) is not one.
    for fs in filesystems.iter().filter(|n| n.contains('-')) {
        let dir = base.join(fs);
        let uuid = source::attribute(&dir.join("metadata_uuid"))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| fs.clone());
        let label = source::attribute(&dir.join("label")).unwrap_or_default();
        let devices = source::entries(&dir.join("devices")).unwrap_or_default();
        let info = out.gauge("node_btrfs_info", "Filesystem information", "");
        out.sample(info, &[("uuid", &uuid), ("label", label.trim())], 1.0);
        let rsv = out.gauge(
            "node_btrfs_global_rsv_size_bytes",
            "Size of global reserve.",
            "bytes",
        );
        out.sample(
            rsv,
            &[("uuid", &uuid)],
            btrfs_number(&dir, "allocation/global_rsv_size"),
        );
        for group in ["data", "metadata", "system"] {
            let alloc = dir.join("allocation").join(group);
            let reserved = out.gauge(
                "node_btrfs_reserved_bytes",
                "Amount of space reserved for a data type",
                "bytes",
            );
            out.sample(
                reserved,
                &[("uuid", &uuid), ("block_group_type", group)],
                btrfs_number(&alloc, "bytes_reserved"),
            );
            let Ok(entries) = std::fs::read_dir(&alloc) else {
                continue;
            };
            let mut modes: Vec<String> = entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().into_string().ok())
                .collect();
            modes.sort();
            for mode in modes {
                let labels = [
                    ("uuid", uuid.as_str()),
                    ("block_group_type", group),
                    ("mode", mode.as_str()),
                ];
                let layout = alloc.join(&mode);
                for (name, help, v) in [
                    (
                        "node_btrfs_used_bytes",
                        "Amount of used space by a layout/data type",
                        btrfs_number(&layout, "used_bytes"),
                    ),
                    (
                        "node_btrfs_size_bytes",
                        "Amount of space allocated for a layout/data type",
                        btrfs_number(&layout, "total_bytes"),
                    ),
                    (
                        "node_btrfs_allocation_ratio",
                        "Data allocation ratio for a layout/data type",
                        allocation_ratio(&mode, devices.len()),
                    ),
                ] {
                    let f = numeric_family(out, name, help, false);
                    out.sample(f, &labels, v);
                }
            }
        }
        let size = out.gauge(
            "node_btrfs_device_size_bytes",
            "Size of a device that is part of the filesystem.",
            "bytes",
        );
        for device in &devices {
            // In 512-byte sectors, whatever the device's block size.
            let sectors = btrfs_number(&dir.join("devices").join(device), "size");
            out.sample(
                size,
                &[("uuid", &uuid), ("device", device)],
                sectors * 512.0,
            );
        }
    }
    Ok(())
}

/// The ZFS kstat files node_exporter reads, and the subsystem each becomes (`arcstats` →
/// `node_zfs_arc_*`).
const ZFS_KSTATS: [(&str, &str); 11] = [
    ("abdstats", "zfs_abd"),
    ("arcstats", "zfs_arc"),
    ("dbuf_stats", "zfs_dbuf"),
    ("dmu_tx", "zfs_dmu_tx"),
    ("dnodestats", "zfs_dnode"),
    ("fm", "zfs_fm"),
    ("vdev_cache_stats", "zfs_vdev_cache"),
    ("vdev_mirror_stats", "zfs_vdev_mirror"),
    ("xuio_stats", "zfs_xuio"),
    ("zfetchstats", "zfs_zfetch"),
    ("zil", "zfs_zil"),
];

/// The pool states `node_zfs_zpool_state` has a series for.
const ZPOOL_STATES: [&str; 6] = [
    "online", "degraded", "faulted", "offline", "removed", "unavail",
];

/// The unsigned 64-bit values (kstat data type 4) of a named kstat: `(name, value)` after the
/// `name type data` header.
fn kstat_values(path: &Path, text: &str) -> Result<Vec<(String, f64)>, Missing> {
    let mut lines = text.lines();
    if !lines
        .by_ref()
        .any(|l| l.split_ascii_whitespace().eq(["name", "type", "data"]))
    {
        return Err(Missing::parse(path, "no `name type data` header"));
    }
    let mut values = Vec::new();
    for line in lines {
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        if f.len() < 3 || f[1] != "4" {
            continue;
        }
        let v = f[2]
            .parse::<u64>()
            .map_err(|_| Missing::parse(path, format!("{} is `{}`", f[0], f[2])))?;
        values.push((f[0].to_string(), v as f64));
    }
    Ok(values)
}

/// A kstat name as a metric name's last part.
fn kstat_name(name: &str) -> String {
    name.replace('-', "_")
}

fn untyped(out: &mut BatchBuilder, name: &str, help: &str) -> metricsd_plugin_api::FamilyId {
    out.family(name, help, "", MetricKind::UNTYPED)
}

/// `zfs`: the ZFS module's statistics (ARC, dbuf, dnode, ZIL, prefetch, …) as node_exporter
/// names them, untyped, and per pool its I/O kstats, its datasets' object-set kstats and its
/// state.
pub fn zfs(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let base = c.host.proc("spl/kstat/zfs");
    if !base.is_dir() {
        return Err(Missing::Absent);
    }
    for (file, subsystem) in ZFS_KSTATS {
        let path = base.join(file);
        let text = match c.files.read(&path) {
            Ok(text) => text,
            Err(Missing::Absent) => continue,
            Err(e) => return Err(e),
        };
        for (name, v) in kstat_values(&path, &text)? {
            let f = untyped(
                out,
                &format!("node_{subsystem}_{}", kstat_name(&name)),
                &format!("kstat.zfs.misc.{file}.{name}"),
            );
            out.sample(f, &[], v);
        }
    }
    for pool in source::entries(&base)? {
        let dir = base.join(&pool);
        if !dir.is_dir() {
            continue;
        }
        // The pool's I/O kstat (ZFS before 2.1): a header line of names, then their values.
        if let Some(text) = c.files.optional(&dir.join("io")) {
            let mut lines = text.lines().map(|l| l.split_ascii_whitespace());
            let header = lines.find(|l| l.clone().next() == Some("nread"));
            if let (Some(names), Some(values)) = (header, lines.next()) {
                for (name, value) in names.zip(values) {
                    let v = value.parse::<u64>().map_err(|_| {
                        Missing::parse(&dir.join("io"), format!("{name} is `{value}`"))
                    })?;
                    let f = untyped(
                        out,
                        &format!("node_zfs_zpool_{}", kstat_name(name)),
                        &format!("kstat.zfs.misc.io.{name}"),
                    );
                    out.sample(f, &[("zpool", &pool)], v as f64);
                }
            }
        }
        for objset in source::entries(&dir)?
            .iter()
            .filter(|n| n.starts_with("objset-"))
        {
            let path = dir.join(objset);
            let text = c.files.read(&path)?;
            let dataset = text
                .lines()
                .map(|l| l.split_ascii_whitespace().collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == "dataset_name")
                .map(|f| f[2].to_string())
                .unwrap_or_default();
            for (name, v) in kstat_values(&path, &text)? {
                let f = untyped(
                    out,
                    &format!("node_zfs_zpool_dataset_{}", kstat_name(&name)),
                    &format!("kstat.zfs.misc.objset.{name}"),
                );
                out.sample(f, &[("zpool", &pool), ("dataset", &dataset)], v);
            }
        }
        if let Some(state) = c.files.optional(&dir.join("state")) {
            let state = state.lines().next().unwrap_or("").trim().to_lowercase();
            let f = out.gauge("node_zfs_zpool_state", "kstat.zfs.misc.state", "");
            for name in ZPOOL_STATES {
                let v = if state == name { 1.0 } else { 0.0 };
                out.sample(f, &[("zpool", &pool), ("state", name)], v);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kstat_values_are_the_unsigned_ones_after_the_header() {
        let text = "13 1 0x01 3 816 3305213226 39393034542\nname                            type data\nhits                            4    8772612\nc_min                           4    33554432\nmeta_limit_pct                  3    -1\ndemand_data_hits                4    7221032\n";
        let v = kstat_values(Path::new("arcstats"), text).expect("parses");
        assert_eq!(
            v,
            vec![
                ("hits".to_string(), 8772612.0),
                ("c_min".to_string(), 33554432.0),
                ("demand_data_hits".to_string(), 7221032.0)
            ]
        );
        assert!(kstat_values(Path::new("arcstats"), "hits 4 1\n").is_err());
        assert!(kstat_values(Path::new("arcstats"), "name type data\nhits 4 x\n").is_err());
    }

    #[test]
    fn btrfs_ratios_by_profile() {
        assert_eq!(allocation_ratio("single", 1), 1.0);
        assert_eq!(allocation_ratio("raid1", 2), 2.0);
        assert_eq!(allocation_ratio("raid5", 4), 4.0 / 3.0);
        assert_eq!(allocation_ratio("raid6", 4), 2.0);
        assert_eq!(allocation_ratio("raid1c3", 3), 0.0);
    }
}

/// A bcache sysfs value as `bch_hprint` writes it: a number with an optional binary-prefix
/// suffix (`k`, `M`, `G`, … of 1024) and one decimal digit counting 1024ths ×10 (`1.5k` is
/// 1 + 5/10.24 KiB), as node_exporter reads it. A suffix it does not know gives 0.
fn dehumanize(s: &str) -> Option<f64> {
    let (digits, negative) = match s.strip_prefix('-') {
        Some(rest) => (rest, true),
        None => (s, false),
    };
    let last = digits.chars().last()?;
    let value = if last.is_ascii_digit() {
        digits.parse::<f64>().ok()?
    } else {
        let mantissa = &digits[..digits.len() - last.len_utf8()];
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let mut m = int.parse::<f64>().ok()?;
        if !frac.is_empty() {
            m += frac.parse::<f64>().ok()? / 10.24;
        }
        let power = "kMGTPEZY".find(last).map(|i| i as i32 + 1);
        (m * power.map_or(0.0, |p| 1024f64.powi(p))).trunc()
    };
    Some(if negative { -value } else { value })
}

/// A bcache attribute of `dir`: 0 where it is absent, as node_exporter reads them; one that
/// does not parse fails the source.
fn bcache_value(c: &mut SystemCollector, dir: &Path, file: &str) -> Result<f64, Missing> {
    let path = dir.join(file);
    match c.files.attribute(&path) {
        None => Ok(0.0),
        Some(text) => dehumanize(text.trim())
            .ok_or_else(|| Missing::parse(&path, format!("`{}` is not a size", text.trim()))),
    }
}

/// bcache cache-set attributes: the file, the name after `node_bcache_`, whether it is a
/// counter, the factor to the metric's unit, and the help.
#[rustfmt::skip]
const BCACHE_SET: [(&str, &str, bool, f64, &str); 10] = [
    ("average_key_size", "average_key_size_sectors", false, 1.0, "Average data per key in the btree (sectors)."),
    ("btree_cache_size", "btree_cache_size_bytes", false, 1.0, "Amount of memory currently used by the btree cache."),
    ("cache_available_percent", "cache_available_percent", false, 1.0, "Percentage of cache device without dirty data, usable for writeback (may contain clean cached data)."),
    ("congested", "congested", false, 1.0, "Congestion."),
    ("root_usage_percent", "root_usage_percent", false, 1.0, "Percentage of the root btree node in use (tree depth increases if too high)."),
    ("tree_depth", "tree_depth", false, 1.0, "Depth of the btree."),
    ("internal/active_journal_entries", "active_journal_entries", false, 1.0, "Number of journal entries that are newer than the index."),
    ("internal/btree_nodes", "btree_nodes", false, 1.0, "Total nodes in the btree."),
    // Microseconds (node_exporter 1.5 scales them as nanoseconds, 1000 times too small).
    ("internal/btree_read_average_duration_us", "btree_read_average_duration_seconds", false, 1e-6, "Average btree read duration."),
    ("internal/cache_read_races", "cache_read_races_total", true, 1.0, "Counts instances where while data was being read from the cache, the bucket was reused and invalidated - i.e. where the pointer was stale after the read completed."),
];

/// A backing device's hit and miss counters (`stats_total/`): the file, the name after
/// `node_bcache_`, and the help.
#[rustfmt::skip]
const BCACHE_PERIOD: [(&str, &str, &str); 7] = [
    ("bypassed", "bypassed_bytes_total", "Amount of IO (both reads and writes) that has bypassed the cache."),
    ("cache_hits", "cache_hits_total", "Hits counted per individual IO as bcache sees them."),
    ("cache_misses", "cache_misses_total", "Misses counted per individual IO as bcache sees them."),
    ("cache_bypass_hits", "cache_bypass_hits_total", "Hits for IO intended to skip the cache."),
    ("cache_bypass_misses", "cache_bypass_misses_total", "Misses for IO intended to skip the cache."),
    ("cache_miss_collisions", "cache_miss_collisions_total", "Instances where data insertion from cache miss raced with write (data already present)."),
    ("cache_readaheads", "cache_readaheads_total", "Count of times readahead occurred."),
];

/// The writeback controller's state (`writeback_rate_debug`): the line, the name after
/// `node_bcache_`, and the help.
#[rustfmt::skip]
const BCACHE_WRITEBACK: [(&str, &str, &str); 5] = [
    ("target", "dirty_target_bytes", "Current dirty data target threshold for this backing device in bytes."),
    ("rate", "writeback_rate", "Current writeback rate for this backing device in bytes."),
    ("proportional", "writeback_rate_proportional_term", "Current result of proportional controller, part of writeback rate"),
    ("integral", "writeback_rate_integral_term", "Current result of integral controller, part of writeback rate"),
    ("change", "writeback_change", "Last writeback rate change step for this backing device."),
];

/// `bcache`: each cache set's btree and journal state, its backing devices' dirty data,
/// writeback controller and hit/miss counters, and its cache devices' errors and writes
/// (`/sys/fs/bcache/<uuid>`).
pub fn bcache(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let base = c.host.sys("fs/bcache");
    let sets = source::entries_if_present(&base)?;
    for uuid in sets.iter().filter(|n| n.contains('-')) {
        let dir = base.join(uuid);
        for (file, name, counter, factor, help) in BCACHE_SET {
            let v = bcache_value(c, &dir, file)? * factor;
            let f = numeric_family(out, &format!("node_bcache_{name}"), help, counter);
            out.sample(f, &[("uuid", uuid)], v);
        }
        let entries = source::entries(&dir)?;
        for bdev in entries
            .iter()
            .filter(|n| source::numbered(n, "bdev").is_some())
        {
            let bdir = dir.join(bdev);
            let labels = [("uuid", uuid.as_str()), ("backing_device", bdev.as_str())];
            let dirty = bcache_value(c, &bdir, "dirty_data")?;
            let f = out.gauge(
                "node_bcache_dirty_data_bytes",
                "Amount of dirty data for this backing device in the cache.",
                "bytes",
            );
            out.sample(f, &labels, dirty);
            let debug = c
                .files
                .attribute(&bdir.join("writeback_rate_debug"))
                .unwrap_or_default();
            for (key, name, help) in BCACHE_WRITEBACK {
                let value = debug
                    .lines()
                    .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))
                    .and_then(|l| l.split_ascii_whitespace().last())
                    .map(|v| v.trim_end_matches("/sec"));
                let v = match value {
                    None => 0.0,
                    Some(v) => dehumanize(v).ok_or_else(|| {
                        Missing::parse(
                            &bdir.join("writeback_rate_debug"),
                            format!("{key} is `{v}`"),
                        )
                    })?,
                };
                let f = numeric_family(out, &format!("node_bcache_{name}"), help, false);
                out.sample(f, &labels, v);
            }
            let totals = bdir.join("stats_total");
            for (file, name, help) in BCACHE_PERIOD {
                let v = bcache_value(c, &totals, file)?;
                let f = numeric_family(out, &format!("node_bcache_{name}"), help, true);
                out.sample(f, &labels, v);
            }
        }
        for cache in entries
            .iter()
            .filter(|n| source::numbered(n, "cache").is_some())
        {
            let cdir = dir.join(cache);
            let labels = [("uuid", uuid.as_str()), ("cache_device", cache.as_str())];
            let f = out.gauge(
                "node_bcache_io_errors",
                "Number of errors that have occurred, decayed by io_error_halflife.",
                "",
            );
            out.sample(f, &labels, bcache_value(c, &cdir, "io_errors")?);
            for (file, name, help) in [
                (
                    "metadata_written",
                    "node_bcache_metadata_written_bytes_total",
                    "Sum of all non data writes (btree writes and all other metadata).",
                ),
                (
                    "written",
                    "node_bcache_written_bytes_total",
                    "Sum of all data that has been written to the cache.",
                ),
            ] {
                let f = out.counter(name, help, "bytes");
                out.sample(f, &labels, bcache_value(c, &cdir, file)?);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod bcache_tests {
    use super::dehumanize;

    #[test]
    fn bcache_sizes_as_bch_hprint_writes_them() {
        assert_eq!(dehumanize("542"), Some(542.0));
        assert_eq!(
            dehumanize("2.5k"),
            Some((1024.0f64 * (2.0 + 5.0 / 10.24)).trunc())
        );
        assert_eq!(
            dehumanize("1.1M"),
            Some((1048576.0f64 * (1.0 + 1.0 / 10.24)).trunc())
        );
        assert_eq!(dehumanize("-3.0k"), Some(-3072.0));
        assert_eq!(dehumanize("7Q"), Some(0.0));
        assert_eq!(dehumanize("x"), None);
        assert_eq!(dehumanize(""), None);
    }
}
