//! node_exporter's `cpu`, `stat` and `cpufreq` collectors: `/proc/stat` and
//! `/sys/devices/system/cpu/cpu*/cpufreq`.

use metricsd_plugin_api::BatchBuilder;

use crate::source::{self, Missing, Outcome};
use crate::SystemCollector;

const MODES: [&str; 8] = [
    "user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
];

/// `cpu`: per-CPU time in each mode, and time spent running guests.
pub fn cpu(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let path = c.host.proc("stat");
    let text = c.files.read(&path)?;
    let seconds = out.counter(
        "node_cpu_seconds_total",
        "Seconds the CPUs spent in each mode.",
        "seconds",
    );
    let guest = out.counter(
        "node_cpu_guest_seconds_total",
        "Seconds the CPUs spent in guests (VMs) for each mode.",
        "seconds",
    );
    let tps = c.ticks_per_second;
    for line in text.lines() {
        let mut fields = line.split_ascii_whitespace();
        let Some(cpu) = fields
            .next()
            .and_then(|f| f.strip_prefix("cpu"))
            .filter(|n| !n.is_empty())
        else {
            continue;
        };
        let ticks: Vec<f64> = fields.map(|f| f.parse::<f64>().unwrap_or(0.0)).collect();
        if ticks.len() < 4 {
            return Err(Missing::parse(&path, format!("short line `{line}`")));
        }
        for (mode, v) in MODES.iter().zip(&ticks) {
            out.sample(seconds, &[("cpu", cpu), ("mode", mode)], v / tps);
        }
        for (mode, v) in ["user", "nice"].iter().zip(ticks.iter().skip(8)) {
            out.sample(guest, &[("cpu", cpu), ("mode", mode)], v / tps);
        }
    }
    Ok(())
}

/// `stat`: boot time, context switches, forks, interrupts, runnable and blocked processes.
pub fn stat(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let path = c.host.proc("stat");
    let text = c.files.read(&path)?;
    for line in text.lines() {
        let mut fields = line.split_ascii_whitespace();
        let (Some(key), Some(value)) = (fields.next(), fields.next()) else {
            continue;
        };
        let (name, help, counter) = match key {
            "btime" => (
                "node_boot_time_seconds",
                "Node boot time, in unixtime.",
                false,
            ),
            "ctxt" => (
                "node_context_switches_total",
                "Total number of context switches.",
                true,
            ),
            "processes" => ("node_forks_total", "Total number of forks.", true),
            "intr" => (
                "node_intr_total",
                "Total number of interrupts serviced.",
                true,
            ),
            "procs_running" => (
                "node_procs_running",
                "Number of processes in runnable state.",
                false,
            ),
            "procs_blocked" => (
                "node_procs_blocked",
                "Number of processes blocked waiting for I/O to complete.",
                false,
            ),
            _ => continue,
        };
        let Ok(v) = value.parse::<f64>() else {
            return Err(Missing::parse(&path, format!("`{key}` is `{value}`")));
        };
        let unit = if key == "btime" { "seconds" } else { "" };
        let f = if counter {
            out.counter(name, help, unit)
        } else {
            out.gauge(name, help, unit)
        };
        out.sample(f, &[], v);
    }
    Ok(())
}

/// `cpufreq`: current, minimum and maximum frequency of each CPU, from the hardware and from
/// the scaling driver, and the scaling governor.
pub fn cpufreq(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let base = c.host.sys("devices/system/cpu");
    let mut any = false;
    for name in source::entries(&base)? {
        let Some(cpu) = source::numbered(&name, "cpu") else {
            continue;
        };
        let dir = base.join(&name).join("cpufreq");
        if !dir.is_dir() {
            continue;
        }
        any = true;
        for (file, family, help) in [
            (
                "cpuinfo_cur_freq",
                "node_cpu_frequency_hertz",
                "Current CPU thread frequency in hertz.",
            ),
            (
                "cpuinfo_max_freq",
                "node_cpu_frequency_max_hertz",
                "Maximum CPU thread frequency in hertz.",
            ),
            (
                "cpuinfo_min_freq",
                "node_cpu_frequency_min_hertz",
                "Minimum CPU thread frequency in hertz.",
            ),
            (
                "scaling_cur_freq",
                "node_cpu_scaling_frequency_hertz",
                "Current scaled CPU thread frequency in hertz.",
            ),
            (
                "scaling_max_freq",
                "node_cpu_scaling_frequency_max_hertz",
                "Maximum scaled CPU thread frequency in hertz.",
            ),
            (
                "scaling_min_freq",
                "node_cpu_scaling_frequency_min_hertz",
                "Minimum scaled CPU thread frequency in hertz.",
            ),
        ] {
            // kHz in sysfs; cpuinfo_cur_freq is readable by root only.
            if let Some(khz) = c.files.number(&dir.join(file)) {
                let f = out.gauge(family, help, "hertz");
                out.sample(f, &[("cpu", cpu)], khz * 1000.0);
            }
        }
        if let Some(current) = c.files.attribute(&dir.join("scaling_governor")) {
            let available = c
                .files
                .attribute(&dir.join("scaling_available_governors"))
                .unwrap_or_else(|| current.clone());
            let f = out.gauge(
                "node_cpu_scaling_governor",
                "Current enabled CPU frequency governor.",
                "",
            );
            for governor in available.split_ascii_whitespace() {
                let v = if governor == current.trim() { 1.0 } else { 0.0 };
                out.sample(f, &[("cpu", cpu), ("governor", governor)], v);
            }
        }
    }
    if any {
        Ok(())
    } else {
        Err(Missing::Absent)
    }
}
