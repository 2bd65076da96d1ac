//! node_exporter's `nfs` (the NFS client's RPC statistics, `/proc/net/rpc/nfs`) and `nfsd` (the
//! kernel NFS server's, `/proc/net/rpc/nfsd`).

use std::collections::HashMap;

use metricsd_plugin_api::BatchBuilder;

use crate::source::{self, Outcome};
use crate::SystemCollector;

/// NFSv2 procedures in the order of the `proc2` line.
const V2: [&str; 18] = [
    "Null", "GetAttr", "SetAttr", "Root", "Lookup", "ReadLink", "Read", "WrCache", "Write",
    "Create", "Remove", "Rename", "Link", "SymLink", "MkDir", "RmDir", "ReadDir", "FsStat",
];

/// NFSv3 procedures in the order of the `proc3` line.
const V3: [&str; 22] = [
    "Null",
    "GetAttr",
    "SetAttr",
    "Lookup",
    "Access",
    "ReadLink",
    "Read",
    "Write",
    "Create",
    "MkDir",
    "SymLink",
    "MkNod",
    "Remove",
    "RmDir",
    "Rename",
    "Link",
    "ReadDir",
    "ReadDirPlus",
    "FsStat",
    "FsInfo",
    "PathConf",
    "Commit",
];

/// The NFSv4 client's operations in the order of its `proc4` line (the first 59; later kernels
/// append more, which node_exporter does not name).
const V4_CLIENT: [&str; 59] = [
    "Null",
    "Read",
    "Write",
    "Commit",
    "Open",
    "OpenConfirm",
    "OpenNoattr",
    "OpenDowngrade",
    "Close",
    "Setattr",
    "FsInfo",
    "Renew",
    "SetClientID",
    "SetClientIDConfirm",
    "Lock",
    "Lockt",
    "Locku",
    "Access",
    "Getattr",
    "Lookup",
    "LookupRoot",
    "Remove",
    "Rename",
    "Link",
    "Symlink",
    "Create",
    "Pathconf",
    "StatFs",
    "ReadLink",
    "ReadDir",
    "ServerCaps",
    "DelegReturn",
    "GetACL",
    "SetACL",
    "FsLocations",
    "ReleaseLockowner",
    "Secinfo",
    "FsidPresent",
    "ExchangeID",
    "CreateSession",
    "DestroySession",
    "Sequence",
    "GetLeaseTime",
    "ReclaimComplete",
    "LayoutGet",
    "GetDeviceInfo",
    "LayoutCommit",
    "LayoutReturn",
    "SecinfoNoName",
    "TestStateID",
    "FreeStateID",
    "GetDeviceList",
    "BindConnToSession",
    "DestroyClientID",
    "Seek",
    "Allocate",
    "DeAllocate",
    "LayoutStats",
    "Clone",
];

/// The NFSv4 server's operations in the order of its `proc4ops` line; empty names (the unused
/// operation numbers 0-2, PUTPUBFH, PUTROOTFH) are not reported, as node_exporter does not.
const V4_SERVER: [&str; 38] = [
    "",
    "",
    "",
    "Access",
    "Close",
    "Commit",
    "Create",
    "DelegPurge",
    "DelegReturn",
    "GetAttr",
    "GetFH",
    "Link",
    "Lock",
    "Lockt",
    "Locku",
    "Lookup",
    "LookupRoot",
    "Nverify",
    "Open",
    "OpenAttr",
    "OpenConfirm",
    "OpenDgrd",
    "PutFH",
    "",
    "",
    "Read",
    "ReadDir",
    "ReadLink",
    "Remove",
    "Rename",
    "Renew",
    "RestoreFH",
    "SaveFH",
    "SecInfo",
    "SetAttr",
    "Verify",
    "Write",
    "RelLockOwner",
];

/// A series of its own from one value of a statistics line: the family, its help, the line,
/// the value's position on it, and whether it is a counter (else a gauge).
type Scalar = (&'static str, &'static str, &'static str, usize, bool);

#[rustfmt::skip]
const NFS_SCALARS: [Scalar; 4] = [
    ("node_nfs_connections_total", "Total number of NFSd TCP connections.", "net", 3, true),
    ("node_nfs_rpcs_total", "Total number of RPCs performed.", "rpc", 0, true),
    ("node_nfs_rpc_retransmissions_total", "Number of RPC transmissions performed.", "rpc", 1, true),
    ("node_nfs_rpc_authentication_refreshes_total", "Number of RPC authentication refreshes performed.", "rpc", 2, true),
];

#[rustfmt::skip]
const NFSD_SCALARS: [Scalar; 11] = [
    ("node_nfsd_reply_cache_hits_total", "Total number of NFSd Reply Cache hits (client lost server response).", "rc", 0, true),
    ("node_nfsd_reply_cache_misses_total", "Total number of NFSd Reply Cache an operation that requires caching (idempotent).", "rc", 1, true),
    ("node_nfsd_reply_cache_nocache_total", "Total number of NFSd Reply Cache non-idempotent operations (rename/delete/…).", "rc", 2, true),
    ("node_nfsd_file_handles_stale_total", "Total number of NFSd stale file handles", "fh", 0, true),
    ("node_nfsd_disk_bytes_read_total", "Total NFSd bytes read.", "io", 0, true),
    ("node_nfsd_disk_bytes_written_total", "Total NFSd bytes written.", "io", 1, true),
    ("node_nfsd_server_threads", "Total number of NFSd kernel threads that are running.", "th", 0, false),
    ("node_nfsd_read_ahead_cache_size_blocks", "How large the read ahead cache is in blocks.", "ra", 0, false),
    ("node_nfsd_read_ahead_cache_not_found_total", "Total number of NFSd read ahead cache not found.", "ra", 11, true),
    ("node_nfsd_connections_total", "Total number of NFSd TCP connections.", "net", 3, true),
    ("node_nfsd_server_rpcs_total", "Total number of NFSd RPCs.", "rpc", 0, true),
];

/// The series of `table`, each from its line's value.
fn scalars(out: &mut BatchBuilder, lines: &HashMap<String, Vec<f64>>, table: &[Scalar]) {
    for (name, help, key, i, counter) in table {
        let f = if *counter {
            out.counter(name, help, "")
        } else {
            out.gauge(name, help, "")
        };
        out.sample(f, &[], at(lines, key, *i));
    }
}

/// The value at `i` of a line, 0 where the line or the value is absent (node_exporter reports
/// every procedure, 0 for a protocol version the kernel does not count).
fn at(lines: &HashMap<String, Vec<f64>>, key: &str, i: usize) -> f64 {
    lines
        .get(key)
        .and_then(|v| v.get(i))
        .copied()
        .unwrap_or(0.0)
}

/// The per-procedure counters of a `procN` line (its first number is the count of those that
/// follow); names that are empty are skipped.
fn procedures(
    out: &mut BatchBuilder,
    family: metricsd_plugin_api::FamilyId,
    lines: &HashMap<String, Vec<f64>>,
    key: &str,
    proto: &str,
    names: &[&str],
) {
    for (i, name) in names.iter().enumerate() {
        if !name.is_empty() {
            out.sample(
                family,
                &[("proto", proto), ("method", name)],
                at(lines, key, i + 1),
            );
        }
    }
}

/// `nfs`: the NFS client's network, RPC and per-procedure counters.
pub fn nfs(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let path = c.host.proc("net/rpc/nfs");
    let text = c.files.read(&path)?;
    let lines = source::keyed_numbers(&path, &text)?;
    let packets = out.counter(
        "node_nfs_packets_total",
        "Total NFSd network packets (sent+received) by protocol type.",
        "",
    );
    out.sample(packets, &[("protocol", "udp")], at(&lines, "net", 1));
    out.sample(packets, &[("protocol", "tcp")], at(&lines, "net", 2));
    scalars(out, &lines, &NFS_SCALARS);
    let requests = out.counter(
        "node_nfs_requests_total",
        "Number of NFS procedures invoked.",
        "",
    );
    procedures(out, requests, &lines, "proc2", "2", &V2);
    procedures(out, requests, &lines, "proc3", "3", &V3);
    procedures(out, requests, &lines, "proc4", "4", &V4_CLIENT);
    Ok(())
}

/// `nfsd`: the kernel NFS server's reply cache, file handles, I/O, threads, network, RPC and
/// per-operation counters.
pub fn nfsd(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let path = c.host.proc("net/rpc/nfsd");
    let text = c.files.read(&path)?;
    let lines = source::keyed_numbers(&path, &text)?;
    scalars(out, &lines, &NFSD_SCALARS);
    let packets = out.counter(
        "node_nfsd_packets_total",
        "Total NFSd network packets (sent+received) by protocol type.",
        "",
    );
    out.sample(packets, &[("proto", "udp")], at(&lines, "net", 1));
    out.sample(packets, &[("proto", "tcp")], at(&lines, "net", 2));
    let errors = out.counter(
        "node_nfsd_rpc_errors_total",
        "Total number of NFSd RPC errors by error type.",
        "",
    );
    for (error, i) in [("fmt", 2), ("auth", 3), ("cInt", 4)] {
        out.sample(errors, &[("error", error)], at(&lines, "rpc", i));
    }
    let requests = out.counter(
        "node_nfsd_requests_total",
        "Total number NFSd Requests by method and protocol.",
        "",
    );
    // The server's procedure counters leave out NULL, as node_exporter's do.
    let skip_null = |names: &[&'static str]| -> Vec<&'static str> {
        std::iter::once("")
            .chain(names[1..].iter().copied())
            .collect()
    };
    procedures(out, requests, &lines, "proc2", "2", &skip_null(&V2));
    procedures(out, requests, &lines, "proc3", "3", &skip_null(&V3));
    procedures(out, requests, &lines, "proc4ops", "4", &V4_SERVER);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Missing;
    use std::path::Path;

    #[test]
    fn rpc_lines_and_absent_values() {
        let text = "net 18628 0 18628 6\nrpc 4329785 0 4338291\nproc3 22 1 4084749 29200 94754\nwdeleg_getattr 3\n";
        let lines = source::keyed_numbers(Path::new("nfs"), text).expect("parses");
        assert_eq!(at(&lines, "net", 2), 18628.0);
        assert_eq!(at(&lines, "proc3", 2), 4084749.0);
        assert_eq!(at(&lines, "proc3", 20), 0.0, "short line: 0");
        assert_eq!(at(&lines, "proc2", 1), 0.0, "absent line: 0");
        assert!(matches!(
            source::keyed_numbers(Path::new("nfs"), "rpc 1 x 2\n"),
            Err(Missing::Failed(e)) if e.contains("rpc 1 x 2")
        ));
    }
}
