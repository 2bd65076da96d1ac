//! node_exporter's `hwmon` and `thermal_zone` temperatures, through sysinfo's components.

use metricsd_plugin_api::BatchBuilder;

use crate::source::{Missing, Outcome};
use crate::SystemCollector;

/// `hwmon`: temperature sensors of hardware monitors and thermal zones (sysinfo reads
/// `/sys/class/hwmon` and `/sys/class/thermal`).
pub fn temperatures(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let Some(components) = c.components.as_mut() else {
        return Err(Missing::Absent);
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
    Ok(())
}
