//! node_exporter's `meminfo` and `vmstat` collectors: every field of `/proc/meminfo`, the
//! selected fields of `/proc/vmstat`.

use metricsd_plugin_api::{BatchBuilder, MetricKind};

use crate::source::{Missing, Outcome};
use crate::SystemCollector;

/// `meminfo`: `node_memory_<Field>_bytes` for each field in kB (× 1024), `node_memory_<Field>`
/// for the counts (`HugePages_Total`); `Active(anon)` is named `Active_anon`.
pub fn meminfo(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let path = c.host.proc("meminfo");
    let text = c.files.read(&path)?;
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let mut parts = rest.split_ascii_whitespace();
        let Some(Ok(value)) = parts.next().map(str::parse::<f64>) else {
            return Err(Missing::parse(&path, format!("`{line}`")));
        };
        let key = key.replace('(', "_").replace(')', "");
        let (name, value, unit) = if parts.next() == Some("kB") {
            (format!("node_memory_{key}_bytes"), value * 1024.0, "bytes")
        } else {
            (format!("node_memory_{key}"), value, "")
        };
        let help = format!(
            "Memory information field {}.",
            &name["node_memory_".len()..]
        );
        let f = out.gauge(&name, &help, unit);
        out.sample(f, &[], value);
    }
    Ok(())
}

/// `vmstat`: the fields of `/proc/vmstat` that `vmstat_fields` selects, untyped as
/// node_exporter reports them (some are counters, some gauges).
pub fn vmstat(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let path = c.host.proc("vmstat");
    let text = c.files.read(&path)?;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(' ') else {
            continue;
        };
        if !c.vmstat_fields.selects(key) {
            continue;
        }
        let Ok(v) = value.trim().parse::<f64>() else {
            return Err(Missing::parse(&path, format!("`{line}`")));
        };
        let f = out.family(
            &format!("node_vmstat_{key}"),
            &format!("/proc/vmstat information field {key}."),
            "",
            MetricKind::UNTYPED,
        );
        out.sample(f, &[], v);
    }
    Ok(())
}
