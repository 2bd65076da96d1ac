//! node_exporter's `loadavg`, `processes`, `filefd`, `entropy`, `pressure`, `time`, `uname`,
//! `os` and `selinux` collectors.

use std::time::{SystemTime, UNIX_EPOCH};

use metricsd_plugin_api::BatchBuilder;
use procfs::FromRead;

use crate::source::{self, Missing, Outcome};
use crate::SystemCollector;

/// `loadavg`: 1, 5 and 15 minute load averages.
pub fn loadavg(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let text = c.files.read(&c.host.proc("loadavg"))?;
    let load = procfs::LoadAverage::from_read(text.as_bytes()).map_err(Missing::procfs)?;
    for (name, help, v) in [
        ("node_load1", "1m load average.", load.one),
        ("node_load5", "5m load average.", load.five),
        ("node_load15", "15m load average.", load.fifteen),
    ] {
        let f = out.gauge(name, help, "");
        out.sample(f, &[], f64::from(v));
    }
    Ok(())
}

/// `processes` (off by default, as in node_exporter): threads and PIDs in the system.
pub fn processes(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let load = procfs::LoadAverage::from_file(c.host.proc("loadavg")).map_err(Missing::procfs)?;
    let threads = out.gauge("node_processes_threads", "Allocated threads in system.", "");
    out.sample(threads, &[], f64::from(load.max));
    let pids = source::entries(&c.host.proc(""))?
        .iter()
        .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        .count();
    let f = out.gauge("node_processes_pids", "Number of PIDs.", "");
    out.sample(f, &[], pids as f64);
    number_gauge(
        c,
        out,
        "sys/kernel/pid_max",
        "node_processes_max_processes",
        "Number of max PIDs limit.",
    )?;
    number_gauge(
        c,
        out,
        "sys/kernel/threads-max",
        "node_processes_max_threads",
        "Limit of threads in the system.",
    )
}

/// `filefd`: allocated and maximum file handles (`/proc/sys/fs/file-nr`).
pub fn filefd(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let path = c.host.proc("sys/fs/file-nr");
    let text = c.files.read(&path)?;
    let fields: Vec<f64> = text
        .split_ascii_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    let [allocated, _, maximum] = fields[..] else {
        return Err(Missing::parse(&path, format!("`{}`", text.trim())));
    };
    let f = out.gauge(
        "node_filefd_allocated",
        "File descriptor statistics: allocated.",
        "",
    );
    out.sample(f, &[], allocated);
    let f = out.gauge(
        "node_filefd_maximum",
        "File descriptor statistics: maximum.",
        "",
    );
    out.sample(f, &[], maximum);
    Ok(())
}

/// `entropy`: bits in the kernel's entropy pool and its size.
pub fn entropy(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    number_gauge(
        c,
        out,
        "sys/kernel/random/entropy_avail",
        "node_entropy_available_bits",
        "Bits of available entropy.",
    )?;
    number_gauge(
        c,
        out,
        "sys/kernel/random/poolsize",
        "node_entropy_pool_size_bits",
        "Bits of entropy pool.",
    )
}

/// A procfs file holding one number (`rel` under procfs), as the gauge `name`.
pub fn number_gauge(
    c: &mut SystemCollector,
    out: &mut BatchBuilder,
    rel: &str,
    name: &str,
    help: &str,
) -> Outcome {
    let v = c.files.read_number(&c.host.proc(rel))?;
    let f = out.gauge(name, help, "");
    out.sample(f, &[], v);
    Ok(())
}

/// `pressure`: pressure stall information (PSI) totals, in seconds.
pub fn pressure(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    for (resource, some, full) in [
        (
            "cpu",
            Some((
                "node_pressure_cpu_waiting_seconds_total",
                "Total time in seconds that processes have waited for CPU time",
            )),
            None,
        ),
        (
            "io",
            Some((
                "node_pressure_io_waiting_seconds_total",
                "Total time in seconds that processes have waited due to IO congestion",
            )),
            Some((
                "node_pressure_io_stalled_seconds_total",
                "Total time in seconds no process could make progress due to IO congestion",
            )),
        ),
        (
            "memory",
            Some((
                "node_pressure_memory_waiting_seconds_total",
                "Total time in seconds that processes have waited for memory",
            )),
            Some((
                "node_pressure_memory_stalled_seconds_total",
                "Total time in seconds no process could make progress due to memory congestion",
            )),
        ),
    ] {
        let path = c.host.proc(&format!("pressure/{resource}"));
        let text = c.files.read(&path)?;
        for line in text.lines() {
            let mut fields = line.split_ascii_whitespace();
            let family = match fields.next() {
                Some("some") => some,
                Some("full") => full,
                _ => None,
            };
            let Some((name, help)) = family else {
                continue;
            };
            let Some(total) = fields
                .find_map(|f| f.strip_prefix("total="))
                .and_then(|v| v.parse::<f64>().ok())
            else {
                return Err(Missing::parse(&path, format!("no total in `{line}`")));
            };
            let f = out.counter(name, help, "seconds");
            out.sample(f, &[], total / 1e6);
        }
    }
    Ok(())
}

/// `time`: the system clock, the local time zone's offset, and the clock sources.
pub fn time(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let f = out.gauge(
        "node_time_seconds",
        "System time in seconds since epoch (1970).",
        "seconds",
    );
    out.sample(f, &[], now);
    let zoned = jiff::ZonedDateTime::now();
    let info = zoned.time_zone().to_offset_info(zoned.timestamp());
    let f = out.gauge(
        "node_time_zone_offset_seconds",
        "System time zone offset in seconds.",
        "seconds",
    );
    out.sample(
        f,
        &[("time_zone", info.abbreviation())],
        f64::from(info.offset().seconds()),
    );
    let base = c.host.sys("devices/system/clocksource");
    let Ok(devices) = source::entries(&base) else {
        return Ok(());
    };
    for dir in devices {
        let Some(device) = dir.strip_prefix("clocksource") else {
            continue;
        };
        if let Some(available) = source::attribute(&base.join(&dir).join("available_clocksource")) {
            let f = out.info(
                "node_time_clocksource_available_info",
                "Available clocksources read from '/sys/devices/system/clocksource'.",
            );
            for clocksource in available.split_ascii_whitespace() {
                out.sample(f, &[("clocksource", clocksource), ("device", device)], 1.0);
            }
        }
        if let Some(current) = source::attribute(&base.join(&dir).join("current_clocksource")) {
            let f = out.info(
                "node_time_clocksource_current_info",
                "Current clocksource read from '/sys/devices/system/clocksource'.",
            );
            out.sample(
                f,
                &[("clocksource", current.trim()), ("device", device)],
                1.0,
            );
        }
    }
    Ok(())
}

/// `uname`: `uname(2)`'s fields, as the kernel gives them.
pub fn uname(_c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let u = nix::sys::utsname::uname().map_err(|e| Missing::Failed(format!("uname(2): {e}")))?;
    let f = out.info(
        "node_uname_info",
        "Labeled system information as provided by the uname system call.",
    );
    out.sample(
        f,
        &[
            ("sysname", &u.sysname().to_string_lossy()),
            ("nodename", &u.nodename().to_string_lossy()),
            ("release", &u.release().to_string_lossy()),
            ("version", &u.version().to_string_lossy()),
            ("machine", &u.machine().to_string_lossy()),
            ("domainname", &u.domainname().to_string_lossy()),
        ],
        1.0,
    );
    Ok(())
}

/// os-release keys and the `node_os_info` label each becomes.
const OS_KEYS: [(&str, &str); 12] = [
    ("BUILD_ID", "build_id"),
    ("ID", "id"),
    ("ID_LIKE", "id_like"),
    ("IMAGE_ID", "image_id"),
    ("IMAGE_VERSION", "image_version"),
    ("NAME", "name"),
    ("PRETTY_NAME", "pretty_name"),
    ("VARIANT", "variant"),
    ("VARIANT_ID", "variant_id"),
    ("VERSION", "version"),
    ("VERSION_CODENAME", "version_codename"),
    ("VERSION_ID", "version_id"),
];

/// `os`: the distribution, from the host's `/etc/os-release` (or `/usr/lib/os-release`).
pub fn os(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let mut text = None;
    for file in ["/etc/os-release", "/usr/lib/os-release"] {
        match source::read(&c.host.root(file)) {
            Ok(t) => {
                text = Some(t);
                break;
            }
            Err(Missing::Absent) => continue,
            Err(e) => return Err(e),
        }
    }
    let text = text.ok_or(Missing::Absent)?;
    let values = parse_os_release(&text);
    let get = |key: &str| {
        values
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    let labels: Vec<(&str, &str)> = OS_KEYS
        .iter()
        .map(|(key, label)| (*label, get(key)))
        .collect();
    let f = out.info(
        "node_os_info",
        "A metric with a constant '1' value labeled by build_id, id, id_like, image_id, image_version, name, pretty_name, variant, variant_id, version, version_codename, version_id.",
    );
    out.sample(f, &labels, 1.0);
    if let Some(version) = leading_version(get("VERSION_ID")) {
        let f = out.gauge(
            "node_os_version",
            "Metric containing the major.minor part of the OS version.",
            "",
        );
        out.sample(
            f,
            &[
                ("id", get("ID")),
                ("id_like", get("ID_LIKE")),
                ("name", get("NAME")),
            ],
            version,
        );
    }
    Ok(())
}

/// `KEY=value` lines, values unquoted (os-release(5)).
fn parse_os_release(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            (
                k.trim().to_string(),
                v.replace("\\\"", "\"").replace("\\\\", "\\"),
            )
        })
        .collect()
}

/// `major.minor` from a `VERSION_ID` (`"22.04"` → 22.04, `"12"` → 12, `"8.10.1"` → 8.10).
fn leading_version(version_id: &str) -> Option<f64> {
    let mut end = version_id
        .bytes()
        .take_while(|b| b.is_ascii_digit())
        .count();
    if end == 0 {
        return None;
    }
    if version_id[end..].starts_with('.') {
        end += 1 + version_id[end + 1..]
            .bytes()
            .take_while(|b| b.is_ascii_digit())
            .count();
    }
    version_id[..end].trim_end_matches('.').parse().ok()
}

/// `selinux`: whether SELinux is enabled and, when it is, its configured and current modes.
pub fn selinux(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let enforce = source::number_attribute(&c.host.sys("fs/selinux/enforce"));
    let f = out.gauge(
        "node_selinux_enabled",
        "SELinux is enabled, 1 is true, 0 is false",
        "",
    );
    out.sample(f, &[], if enforce.is_some() { 1.0 } else { 0.0 });
    let Some(current) = enforce else {
        return Ok(());
    };
    let f = out.gauge(
        "node_selinux_current_mode",
        "SELinux is enforcing in current mode, 1 is true, 0 is false",
        "",
    );
    out.sample(f, &[], current);
    if let Ok(config) = source::read(&c.host.root("/etc/selinux/config")) {
        let mode = config
            .lines()
            .find_map(|l| l.trim().strip_prefix("SELINUX="))
            .map(|m| match m.trim() {
                "enforcing" => 1.0,
                "permissive" => 0.0,
                _ => -1.0,
            });
        if let Some(mode) = mode {
            let f = out.gauge(
                "node_selinux_config_mode",
                "Configured SELinux enforcement mode",
                "",
            );
            out.sample(f, &[], mode);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_values_and_version() {
        let parsed = parse_os_release(
            "# comment\nNAME=\"Ubuntu\"\nVERSION_ID=\"22.04\"\nID=ubuntu\nPRETTY_NAME='Ubuntu 22.04.4 LTS'\n",
        );
        assert!(parsed.contains(&("NAME".into(), "Ubuntu".into())));
        assert!(parsed.contains(&("ID".into(), "ubuntu".into())));
        assert!(parsed.contains(&("PRETTY_NAME".into(), "Ubuntu 22.04.4 LTS".into())));
        assert_eq!(leading_version("22.04"), Some(22.04));
        assert_eq!(leading_version("12"), Some(12.0));
        assert_eq!(leading_version("8.10.1"), Some(8.10));
        assert_eq!(leading_version("rolling"), None);
    }
}
