//! node_exporter's `hwmon` and `thermal_zone` collectors: every sensor of
//! `/sys/class/hwmon/hwmon*` (temperatures, voltages, fans, power, energy, current, humidity,
//! alarms) under node_exporter's chip names (`platform_coretemp_0`), and
//! `/sys/class/thermal` zones and cooling devices.

use std::collections::BTreeMap;
use std::path::Path;

use metricsd_plugin_api::BatchBuilder;

use crate::source::{self, Missing, Outcome};
use crate::SystemCollector;

const SENSOR_TYPES: [&str; 13] = [
    "vrm",
    "beep_enable",
    "update_interval",
    "in",
    "cpu",
    "fan",
    "pwm",
    "temp",
    "curr",
    "power",
    "energy",
    "humidity",
    "intrusion",
];

/// Lower case, every character outside `[a-z0-9:_]` made `_`, `_` trimmed at both ends.
fn clean(name: &str) -> String {
    name.to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == ':' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_matches('_')
        .to_string()
}

/// The sensors of one directory: `temp1` → property → raw value.
fn sensor_data(
    dir: &Path,
    data: &mut BTreeMap<String, BTreeMap<String, String>>,
    open: &mut source::Files,
) {
    let Ok(files) = source::entries(dir) else {
        return;
    };
    for file in files {
        // Known types first: `beep_enable` and `update_interval` contain `_`.
        let parsed = SENSOR_TYPES
            .iter()
            .find(|t| {
                file.strip_prefix(**t).is_some_and(|rest| {
                    rest.is_empty()
                        || rest.starts_with(|c: char| c.is_ascii_digit())
                        || rest.starts_with('_')
                })
            })
            .and_then(|t| {
                let rest = &file[t.len()..];
                let num_end = rest
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(rest.len());
                let (num, rest) = rest.split_at(num_end);
                let property = match rest.strip_prefix('_') {
                    Some(p) => p,
                    None if rest.is_empty() => "",
                    None => return None,
                };
                Some((*t, num, property))
            });
        let Some((kind, num, property)) = parsed else {
            continue;
        };
        let Some(value) = open.attribute(&dir.join(&file)) else {
            continue;
        };
        let num: u32 = num.parse().unwrap_or(0);
        data.entry(format!("{kind}{num}"))
            .or_default()
            .insert(property.to_string(), value);
    }
}

/// node_exporter's chip name: the device's bus and name (`platform_coretemp_0`,
/// `pci0000:00_0000:00:18_3`), else the driver's `name`, else the directory's.
fn chip_name(dir: &Path) -> Option<String> {
    if let Ok(device) = std::fs::canonicalize(dir.join("device")) {
        let name = device.file_name().map(|n| clean(&n.to_string_lossy()));
        let bus = device
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| clean(&n.to_string_lossy()));
        match (bus, name) {
            (Some(bus), Some(name)) if !bus.is_empty() && !name.is_empty() => {
                return Some(format!("{bus}_{name}"))
            }
            (_, Some(name)) if !name.is_empty() => return Some(name),
            _ => {}
        }
    }
    if let Some(name) = source::attribute(&dir.join("name")).map(|n| clean(&n)) {
        if !name.is_empty() {
            return Some(name);
        }
    }
    let real = std::fs::canonicalize(dir).ok()?;
    let name = clean(&real.file_name()?.to_string_lossy());
    (!name.is_empty()).then_some(name)
}

/// `hwmon`: every sensor of every hardware monitor.
pub fn hwmon(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let base = c.host.sys("class/hwmon");
    for entry in source::entries(&base)? {
        let dir = base.join(&entry);
        if !dir.is_dir() {
            continue;
        }
        let Some(chip) = chip_name(&dir) else {
            continue;
        };
        let mut data = BTreeMap::new();
        sensor_data(&dir, &mut data, &mut c.files);
        sensor_data(&dir.join("device"), &mut data, &mut c.files);
        if let Some(name) = source::attribute(&dir.join("name")).map(|n| clean(&n)) {
            if !name.is_empty() {
                let f = out.info(
                    "node_hwmon_chip_names",
                    "Annotation metric for human-readable chip names",
                );
                out.sample(f, &[("chip", &chip), ("chip_name", &name)], 1.0);
            }
        }
        for (sensor, properties) in &data {
            emit_sensor(out, &chip, sensor, properties);
        }
    }
    Ok(())
}

fn emit_sensor(
    out: &mut BatchBuilder,
    chip: &str,
    sensor: &str,
    properties: &BTreeMap<String, String>,
) {
    let kind = sensor.trim_end_matches(|c: char| c.is_ascii_digit());
    let labels = [("chip", chip), ("sensor", sensor)];
    if let Some(label) = properties.get("label") {
        let f = out.info("node_hwmon_sensor_label", "Label for given chip and sensor");
        out.sample(
            f,
            &[("chip", chip), ("sensor", sensor), ("label", label.trim())],
            1.0,
        );
    }
    let whole = properties.get("").map(|v| v.trim());
    match kind {
        "beep_enable" => {
            let f = out.gauge("node_hwmon_beep_enabled", "Hardware beep enabled", "");
            out.sample(f, &labels, if whole == Some("1") { 1.0 } else { 0.0 });
            return;
        }
        "vrm" => {
            if let Some(v) = whole.and_then(|v| v.parse::<f64>().ok()) {
                let f = out.gauge(
                    "node_hwmon_voltage_regulator_version",
                    "Hardware voltage regulator",
                    "",
                );
                out.sample(f, &labels, v);
            }
            return;
        }
        "update_interval" => {
            if let Some(v) = whole.and_then(|v| v.parse::<f64>().ok()) {
                let f = out.gauge(
                    "node_hwmon_update_interval_seconds",
                    "Hardware monitor update interval",
                    "seconds",
                );
                out.sample(f, &labels, v * 0.001);
            }
            return;
        }
        _ => {}
    }
    for (element, value) in properties {
        if element == "label" {
            continue;
        }
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let mut name = format!("node_hwmon_{kind}");
        if element == "input" {
            if properties.contains_key("") {
                name.push_str("_input");
            }
        } else if !element.is_empty() {
            name.push('_');
            name.push_str(&clean(element));
        }
        let el = element.as_str();
        let (name, help, unit, value, counter) = match (kind, el) {
            (_, "fault" | "alarm") => (
                name,
                format!("Hardware sensor {el} status ({kind})"),
                "",
                v,
                false,
            ),
            (_, "beep") => (
                format!("{name}_enabled"),
                "Hardware monitor sensor has beeping enabled".to_string(),
                "",
                v,
                false,
            ),
            ("in" | "cpu", _) => (
                format!("{name}_volts"),
                format!("Hardware monitor for voltage ({el})"),
                "volts",
                v * 0.001,
                false,
            ),
            ("temp", e) if e != "type" => {
                let e = if e.is_empty() { "input" } else { e };
                (
                    format!("{name}_celsius"),
                    format!("Hardware monitor for temperature ({e})"),
                    "celsius",
                    v * 0.001,
                    false,
                )
            }
            ("curr", _) => (
                format!("{name}_amps"),
                format!("Hardware monitor for current ({el})"),
                "amps",
                v * 0.001,
                false,
            ),
            ("energy", _) => (
                format!("{name}_joule_total"),
                format!("Hardware monitor for joules used so far ({el})"),
                "joules",
                v / 1e6,
                true,
            ),
            ("power", "accuracy") => (
                name,
                "Hardware monitor power meter accuracy, as a ratio".to_string(),
                "",
                v / 1e6,
                false,
            ),
            ("power", "average_interval" | "average_interval_min" | "average_interval_max") => (
                format!("{name}_seconds"),
                format!("Hardware monitor power usage update interval ({el})"),
                "seconds",
                v * 0.001,
                false,
            ),
            ("power", _) => (
                format!("{name}_watt"),
                format!("Hardware monitor for power usage in watts ({el})"),
                "watts",
                v / 1e6,
                false,
            ),
            ("humidity", _) => (
                name,
                format!("Hardware monitor for humidity, as a ratio (multiply with 100.0 to get the humidity as a percentage) ({el})"),
                "",
                v / 1e6,
                false,
            ),
            ("fan", "input" | "min" | "max" | "target") => (
                format!("{name}_rpm"),
                format!("Hardware monitor for fan revolutions per minute ({el})"),
                "",
                v,
                false,
            ),
            _ => (
                name,
                format!("Hardware monitor {kind} element {el}"),
                "",
                v,
                false,
            ),
        };
        let f = if counter {
            out.counter(&name, &help, unit)
        } else {
            out.gauge(&name, &help, unit)
        };
        out.sample(f, &labels, value);
    }
}

/// `thermal_zone`: the temperature of each thermal zone, and the state of each cooling
/// device.
pub fn thermal_zone(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let base = c.host.sys("class/thermal");
    let mut any = false;
    for entry in source::entries(&base)? {
        let dir = base.join(&entry);
        if let Some(zone) = entry.strip_prefix("thermal_zone") {
            let (Some(kind), Some(temp)) = (
                c.files.attribute(&dir.join("type")),
                c.files.number(&dir.join("temp")),
            ) else {
                continue;
            };
            any = true;
            let f = out.gauge(
                "node_thermal_zone_temp",
                "Zone temperature in Celsius",
                "celsius",
            );
            out.sample(f, &[("zone", zone), ("type", kind.trim())], temp / 1000.0);
        } else if let Some(device) = entry.strip_prefix("cooling_device") {
            let Some(kind) = c.files.attribute(&dir.join("type")) else {
                continue;
            };
            any = true;
            for (file, name, help) in [
                (
                    "cur_state",
                    "node_cooling_device_cur_state",
                    "Current throttle state of the cooling device",
                ),
                (
                    "max_state",
                    "node_cooling_device_max_state",
                    "Maximum throttle state of the cooling device",
                ),
            ] {
                if let Some(v) = c.files.number(&dir.join(file)) {
                    let f = out.gauge(name, help, "");
                    out.sample(f, &[("name", device), ("type", kind.trim())], v);
                }
            }
        }
    }
    if any {
        Ok(())
    } else {
        Err(Missing::Absent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_as_node_exporter_cleans_them() {
        assert_eq!(clean("coretemp.0"), "coretemp_0");
        assert_eq!(clean("  Nct6779 "), "nct6779");
        assert_eq!(clean("0000:00:18.3"), "0000:00:18_3");
    }
}
