//! node_exporter's hardware collectors: `infiniband`, `edac`, `nvme`, `rapl`,
//! `powersupplyclass`, `mdadm` and `schedstat`.

use std::collections::BTreeMap;

use metricsd_plugin_api::BatchBuilder;

use crate::source::{self, Missing, Outcome};
use crate::SystemCollector;

/// InfiniBand port counters: sysfs file (under `counters/`, or `counters_ext/` for the
/// legacy ones), family suffix, help, and whether the value counts 4-octet words.
#[rustfmt::skip]
const IB_COUNTERS: [(&str, &str, &str, bool); 30] = [
    ("counters_ext/port_multicast_rcv_packets", "legacy_multicast_packets_received_total", "Number of multicast packets received", false),
    ("counters_ext/port_multicast_xmit_packets", "legacy_multicast_packets_transmitted_total", "Number of multicast packets transmitted", false),
    ("counters_ext/port_rcv_data_64", "legacy_data_received_bytes_total", "Number of data octets received on all links", true),
    ("counters_ext/port_rcv_packets_64", "legacy_packets_received_total", "Number of data packets received on all links", false),
    ("counters_ext/port_unicast_rcv_packets", "legacy_unicast_packets_received_total", "Number of unicast packets received", false),
    ("counters_ext/port_unicast_xmit_packets", "legacy_unicast_packets_transmitted_total", "Number of unicast packets transmitted", false),
    ("counters_ext/port_xmit_data_64", "legacy_data_transmitted_bytes_total", "Number of data octets transmitted on all links", true),
    ("counters_ext/port_xmit_packets_64", "legacy_packets_transmitted_total", "Number of data packets received on all links", false),
    ("counters/excessive_buffer_overrun_errors", "excessive_buffer_overrun_errors_total", "Number of times that OverrunErrors consecutive flow control update periods occurred, each having at least one overrun error.", false),
    ("counters/link_downed", "link_downed_total", "Number of times the link failed to recover from an error state and went down", false),
    ("counters/link_error_recovery", "link_error_recovery_total", "Number of times the link successfully recovered from an error state", false),
    ("counters/local_link_integrity_errors", "local_link_integrity_errors_total", "Number of times that the count of local physical errors exceeded the threshold specified by LocalPhyErrors.", false),
    ("counters/multicast_rcv_packets", "multicast_packets_received_total", "Number of multicast packets received (including errors)", false),
    ("counters/multicast_xmit_packets", "multicast_packets_transmitted_total", "Number of multicast packets transmitted (including errors)", false),
    ("counters/port_rcv_constraint_errors", "port_constraint_errors_received_total", "Number of packets received on the switch physical port that are discarded", false),
    ("counters/port_xmit_constraint_errors", "port_constraint_errors_transmitted_total", "Number of packets not transmitted from the switch physical port", false),
    ("counters/port_rcv_data", "port_data_received_bytes_total", "Number of data octets received on all links", true),
    ("counters/port_xmit_data", "port_data_transmitted_bytes_total", "Number of data octets transmitted on all links", true),
    ("counters/port_rcv_discards", "port_discards_received_total", "Number of inbound packets discarded by the port because the port is down or congested", false),
    ("counters/port_xmit_discards", "port_discards_transmitted_total", "Number of outbound packets discarded by the port because the port is down or congested", false),
    ("counters/port_rcv_errors", "port_errors_received_total", "Number of packets containing an error that were received on this port", false),
    ("counters/port_rcv_packets", "port_packets_received_total", "Number of packets received on all VLs by this port (including errors)", false),
    ("counters/port_xmit_packets", "port_packets_transmitted_total", "Number of packets transmitted on all VLs from this port (including errors)", false),
    ("counters/port_xmit_wait", "port_transmit_wait_total", "Number of ticks during which the port had data to transmit but no data was sent during the entire tick", false),
    ("counters/unicast_rcv_packets", "unicast_packets_received_total", "Number of unicast packets received (including errors)", false),
    ("counters/unicast_xmit_packets", "unicast_packets_transmitted_total", "Number of unicast packets transmitted (including errors)", false),
    ("counters/port_rcv_remote_physical_errors", "port_receive_remote_physical_errors_total", "Number of packets marked with the EBP (End of Bad Packet) delimiter received on the port.", false),
    ("counters/port_rcv_switch_relay_errors", "port_receive_switch_relay_errors_total", "Number of packets that could not be forwarded by the switch.", false),
    ("counters/symbol_error", "symbol_error_total", "Number of minor link errors detected on one or more physical lanes.", false),
    ("counters/VL15_dropped", "vl15_dropped_total", "Number of incoming VL15 packets dropped due to resource limitations.", false),
];

/// `4: ACTIVE` → 4.
fn state_id(text: &str) -> Option<f64> {
    text.split(':').next()?.trim().parse().ok()
}

/// `100 Gb/sec (4X EDR)` → bytes per second.
fn ib_rate(text: &str) -> Option<f64> {
    let gbit: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some(gbit * 125_000_000.0)
}

/// `infiniband`: each HCA's identity and each port's state, rate and counters
/// (`/sys/class/infiniband`).
pub fn infiniband(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let base = c.host.sys("class/infiniband");
    for device in source::entries(&base)? {
        let dir = base.join(&device);
        let text = |f: &str| source::attribute(&dir.join(f)).unwrap_or_default();
        let f = out.info(
            "node_infiniband_info",
            "Non-numeric data from /sys/class/infiniband/<device>, value is always 1.",
        );
        out.sample(
            f,
            &[
                ("device", device.as_str()),
                ("board_id", text("board_id").trim()),
                ("firmware_version", text("fw_ver").trim()),
                ("hca_type", text("hca_type").trim()),
            ],
            1.0,
        );
        let Ok(ports) = source::entries(&dir.join("ports")) else {
            continue;
        };
        for port in ports {
            let pdir = dir.join("ports").join(&port);
            let set = out.label_set(&[("device", device.as_str()), ("port", port.as_str())]);
            let mut port_attr = |f: &str| c.files.attribute(&pdir.join(f));
            for (name, help, value) in [
                (
                    "node_infiniband_state_id",
                    "State of the InfiniBand port (0: no change, 1: down, 2: init, 3: armed, 4: active, 5: act defer)",
                    port_attr("state").and_then(|s| state_id(&s)),
                ),
                (
                    "node_infiniband_physical_state_id",
                    "Physical state of the InfiniBand port (0: no change, 1: sleep, 2: polling, 3: disable, 4: shift, 5: link up, 6: link error recover, 7: phytest)",
                    port_attr("phys_state").and_then(|s| state_id(&s)),
                ),
                (
                    "node_infiniband_rate_bytes_per_second",
                    "Maximum signal transfer rate",
                    port_attr("rate").and_then(|s| ib_rate(&s)),
                ),
            ] {
                if let Some(v) = value {
                    let f = out.gauge(name, help, "");
                    out.sample_in(f, set, v);
                }
            }
            for (file, suffix, help, words) in IB_COUNTERS {
                // "N/A (no PMA)" and absent counters are left out.
                let Some(v) = c.files.number(&pdir.join(file)) else {
                    continue;
                };
                let unit = if suffix.ends_with("bytes_total") {
                    "bytes"
                } else {
                    ""
                };
                let f = out.counter(&format!("node_infiniband_{suffix}"), help, unit);
                out.sample_in(f, set, if words { v * 4.0 } else { v });
            }
        }
    }
    Ok(())
}

/// `edac`: correctable and uncorrectable memory errors per memory controller and chip-select
/// row (`/sys/devices/system/edac/mc`).
pub fn edac(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let base = c.host.sys("devices/system/edac/mc");
    let mut any = false;
    for mc in source::entries(&base)? {
        let Some(controller) = source::numbered(&mc, "mc") else {
            continue;
        };
        any = true;
        let dir = base.join(&mc);
        let mut num = |f: &str| c.files.read_number(&dir.join(f));
        for (file, name, help) in [
            (
                "ce_count",
                "node_edac_correctable_errors_total",
                "Total correctable memory errors.",
            ),
            (
                "ce_noinfo_count",
                "node_edac_csrow_correctable_errors_total",
                "Total correctable memory errors for this csrow.",
            ),
            (
                "ue_count",
                "node_edac_uncorrectable_errors_total",
                "Total uncorrectable memory errors.",
            ),
            (
                "ue_noinfo_count",
                "node_edac_csrow_uncorrectable_errors_total",
                "Total uncorrectable memory errors for this csrow.",
            ),
        ] {
            let v = num(file)?;
            let f = out.counter(name, help, "");
            if file.contains("noinfo") {
                out.sample(f, &[("controller", controller), ("csrow", "unknown")], v);
            } else {
                out.sample(f, &[("controller", controller)], v);
            }
        }
        for row in source::entries(&dir)? {
            let Some(csrow) = source::numbered(&row, "csrow") else {
                continue;
            };
            for (file, name, help) in [
                (
                    "ce_count",
                    "node_edac_csrow_correctable_errors_total",
                    "Total correctable memory errors for this csrow.",
                ),
                (
                    "ue_count",
                    "node_edac_csrow_uncorrectable_errors_total",
                    "Total uncorrectable memory errors for this csrow.",
                ),
            ] {
                let v = c.files.read_number(&dir.join(&row).join(file))?;
                let f = out.counter(name, help, "");
                out.sample(f, &[("controller", controller), ("csrow", csrow)], v);
            }
        }
    }
    if any {
        Ok(())
    } else {
        Err(Missing::Absent)
    }
}

/// `nvme`: each NVMe controller's model, serial, firmware and state (`/sys/class/nvme`).
pub fn nvme(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let base = c.host.sys("class/nvme");
    for device in source::entries(&base)? {
        let dir = base.join(&device);
        let text = |f: &str| source::attribute(&dir.join(f)).unwrap_or_default();
        let f = out.info(
            "node_nvme_info",
            "Non-numeric data from /sys/class/nvme/<device>, value is always 1.",
        );
        out.sample(
            f,
            &[
                ("device", device.as_str()),
                ("firmware_revision", text("firmware_rev").trim()),
                ("model", text("model").trim()),
                ("serial", text("serial").trim()),
                ("state", text("state").trim()),
            ],
            1.0,
        );
    }
    Ok(())
}

/// `rapl`: energy counters of the RAPL power zones (`/sys/class/powercap`), one family per
/// zone name (`node_rapl_package_joules_total`).
pub fn rapl(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let base = c.host.sys("class/powercap");
    let mut uses: BTreeMap<String, usize> = BTreeMap::new();
    for zone in source::entries(&base)? {
        let dir = base.join(&zone);
        let Some(name) = source::attribute(&dir.join("name")) else {
            continue;
        };
        let name = name.trim();
        // `package-0` carries its index; a repeated `dram` is counted.
        let (index, name) = match name.split_once('-') {
            Some((n, i)) if !i.contains('-') && i.parse::<usize>().is_ok() => {
                (i.parse::<usize>().unwrap_or(0), n.to_string())
            }
            _ => (*uses.get(name).unwrap_or(&0), name.to_string()),
        };
        uses.insert(name.clone(), index + 1);
        let path = dir.join("energy_uj");
        let microjoules = match std::fs::read_to_string(&path) {
            Ok(text) => source::parse_number(text.trim()).ok_or_else(|| {
                Missing::parse(&path, format!("`{}` is not a number", text.trim()))
            })?,
            // Readable by root only since Linux 5.10: no data for an agent that is not root.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(Missing::Absent)
            }
            Err(e) => return Err(Missing::io(&path, e)),
        };
        let clean: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let f = out.counter(
            &format!("node_rapl_{clean}_joules_total"),
            &format!("Current RAPL {name} value in joules"),
            "joules",
        );
        let path = c.host.sys("class/powercap").join(&zone);
        out.sample(
            f,
            &[
                ("index", &index.to_string()),
                ("path", &path.display().to_string()),
            ],
            microjoules / 1e6,
        );
    }
    Ok(())
}

/// `powersupplyclass`: batteries and mains adapters (`/sys/class/power_supply`).
pub fn powersupplyclass(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let base = c.host.sys("class/power_supply");
    for supply in source::entries(&base)? {
        let dir = base.join(&supply);
        let mut num = |f: &str| c.files.number(&dir.join(f));
        // (sysfs file, family suffix, scale): plain numbers, µ-units, tenths of a degree.
        let fields: [(&str, &str, f64); 47] = [
            ("authentic", "authentic", 1.0),
            ("calibrate", "calibrate", 1.0),
            ("capacity", "capacity", 1.0),
            ("capacity_alert_max", "capacity_alert_max", 1.0),
            ("capacity_alert_min", "capacity_alert_min", 1.0),
            ("cycle_count", "cyclecount", 1.0),
            ("online", "online", 1.0),
            ("present", "present", 1.0),
            ("time_to_empty_now", "time_to_empty_seconds", 1.0),
            ("time_to_full_now", "time_to_full_seconds", 1.0),
            ("current_boot", "current_boot", 1e-6),
            ("current_max", "current_max", 1e-6),
            ("current_now", "current_ampere", 1e-6),
            ("energy_empty", "energy_empty", 1e-6),
            ("energy_empty_design", "energy_empty_design", 1e-6),
            ("energy_full", "energy_full", 1e-6),
            ("energy_full_design", "energy_full_design", 1e-6),
            ("energy_now", "energy_watthour", 1e-6),
            ("voltage_boot", "voltage_boot", 1e-6),
            ("voltage_max", "voltage_max", 1e-6),
            ("voltage_max_design", "voltage_max_design", 1e-6),
            ("voltage_min", "voltage_min", 1e-6),
            ("voltage_min_design", "voltage_min_design", 1e-6),
            ("voltage_now", "voltage_volt", 1e-6),
            ("voltage_ocv", "voltage_ocv", 1e-6),
            ("charge_control_limit", "charge_control_limit", 1e-6),
            ("charge_control_limit_max", "charge_control_limit_max", 1e-6),
            ("charge_counter", "charge_counter", 1e-6),
            ("charge_empty", "charge_empty", 1e-6),
            ("charge_empty_design", "charge_empty_design", 1e-6),
            ("charge_full", "charge_full", 1e-6),
            ("charge_full_design", "charge_full_design", 1e-6),
            ("charge_now", "charge_ampere", 1e-6),
            ("charge_term_current", "charge_term_current", 1e-6),
            ("constant_charge_current", "constant_charge_current", 1e-6),
            (
                "constant_charge_current_max",
                "constant_charge_current_max",
                1e-6,
            ),
            ("constant_charge_voltage", "constant_charge_voltage", 1e-6),
            (
                "constant_charge_voltage_max",
                "constant_charge_voltage_max",
                1e-6,
            ),
            ("precharge_current", "precharge_current", 1e-6),
            ("input_current_limit", "input_current_limit", 1e-6),
            ("power_now", "power_watt", 1e-6),
            ("temp", "temp_celsius", 0.1),
            ("temp_alert_max", "temp_alert_max_celsius", 0.1),
            ("temp_alert_min", "temp_alert_min_celsius", 0.1),
            ("temp_ambient", "temp_ambient_celsius", 0.1),
            ("temp_max", "temp_max_celsius", 0.1),
            ("temp_min", "temp_min_celsius", 0.1),
        ];
        for (file, suffix, scale) in fields {
            if let Some(v) = num(file) {
                let f = out.gauge(
                    &format!("node_power_supply_{suffix}"),
                    &format!("{suffix} value of /sys/class/power_supply/<power_supply>."),
                    "",
                );
                out.sample(f, &[("power_supply", supply.as_str())], v * scale);
            }
        }
        let mut labels: Vec<(String, String)> = vec![("power_supply".into(), supply.clone())];
        for key in [
            "capacity_level",
            "charge_type",
            "health",
            "manufacturer",
            "model_name",
            "serial_number",
            "status",
            "technology",
            "type",
            "usb_type",
            "scope",
        ] {
            if let Some(v) = source::attribute(&dir.join(key)).filter(|v| !v.trim().is_empty()) {
                labels.push((key.into(), v.trim().to_string()));
            }
        }
        crate::info_sample(
            out,
            "node_power_supply_info",
            "info of /sys/class/power_supply/<power_supply>.",
            &labels,
        );
    }
    Ok(())
}

/// One md device of `/proc/mdstat`.
#[derive(Debug, PartialEq)]
pub struct MdDevice {
    pub name: String,
    pub state: String,
    pub disks_active: f64,
    pub disks_total: f64,
    pub disks_failed: f64,
    pub disks_spare: f64,
    pub blocks: f64,
    pub blocks_synced: f64,
}

/// `/proc/mdstat`: a device line (`md0 : active raid1 sdb1[1] sda1[0](F)`), a status line
/// (`1046528 blocks super 1.2 [2/1] [U_]`), an optional bitmap line and an optional sync line
/// (`[==>...]  recovery = 12.6% (131328/1046528) finish=…`).
pub fn parse_mdstat(text: &str) -> Result<Vec<MdDevice>, String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut devices = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty()
            || line.starts_with(' ')
            || line.starts_with("Personalities")
            || line.starts_with("unused")
        {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 3 || fields[1] != ":" {
            return Err(format!("unexpected device line `{line}`"));
        }
        let status = lines.get(i + 1).copied().unwrap_or("");
        let blocks: f64 = status
            .split_whitespace()
            .next()
            .and_then(|b| b.parse().ok())
            .ok_or_else(|| format!("{}: no block count in `{status}`", fields[0]))?;
        let inactive = fields[2] == "inactive";
        let members = fields.iter().filter(|f| f.contains('[')).count() as f64;
        let (active, total) = if line.contains("raid0") || line.contains("linear") {
            (members, members)
        } else if inactive {
            (0.0, 0.0)
        } else {
            // `[2/1]`: disks required / disks up.
            status
                .split_whitespace()
                .find_map(|f| {
                    let inner = f.strip_prefix('[')?.strip_suffix(']')?;
                    let (total, up) = inner.split_once('/')?;
                    Some((up.parse().ok()?, total.parse().ok()?))
                })
                .ok_or_else(|| format!("{}: no [n/m] in `{status}`", fields[0]))?
        };
        let mut sync_line = lines.get(i + 2).copied().unwrap_or("");
        if sync_line.contains("bitmap") {
            sync_line = lines.get(i + 3).copied().unwrap_or("");
        }
        let mut state = if inactive { "inactive" } else { "active" }.to_string();
        let mut synced = blocks;
        for (word, name) in [
            ("recovery", "recovering"),
            ("reshape", "recovering"),
            ("resync", "resync"),
            ("check", "check"),
        ] {
            if sync_line.contains(word) {
                state = name.to_string();
                synced = if sync_line.contains("PENDING") || sync_line.contains("DELAYED") {
                    0.0
                } else {
                    sync_line
                        .split(['(', ')'])
                        .nth(1)
                        .and_then(|p| p.split_once('/'))
                        .and_then(|(done, _)| done.parse().ok())
                        .ok_or_else(|| format!("{}: no progress in `{sync_line}`", fields[0]))?
                };
                break;
            }
        }
        devices.push(MdDevice {
            name: fields[0].to_string(),
            state,
            disks_active: active,
            disks_total: total,
            disks_failed: line.matches("(F)").count() as f64,
            disks_spare: line.matches("(S)").count() as f64,
            blocks,
            blocks_synced: synced,
        });
    }
    Ok(devices)
}

/// `mdadm`: software RAID state, disks and sync progress (`/proc/mdstat`).
pub fn mdadm(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let path = c.host.proc("mdstat");
    let text = source::read(&path)?;
    let devices = parse_mdstat(&text).map_err(|e| Missing::parse(&path, e))?;
    for d in devices {
        let device = d.name.as_str();
        let f = out.gauge("node_md_state", "Indicates the state of md-device.", "");
        for state in ["active", "inactive", "recovering", "resync", "check"] {
            let v = if d.state == state { 1.0 } else { 0.0 };
            out.sample(f, &[("device", device), ("state", state)], v);
        }
        let f = out.gauge(
            "node_md_disks",
            "Number of active/failed/spare disks of device.",
            "",
        );
        out.sample(
            f,
            &[("device", device), ("state", "active")],
            d.disks_active,
        );
        out.sample(
            f,
            &[("device", device), ("state", "failed")],
            d.disks_failed,
        );
        out.sample(f, &[("device", device), ("state", "spare")], d.disks_spare);
        for (name, help, v) in [
            (
                "node_md_disks_required",
                "Total number of disks of device.",
                d.disks_total,
            ),
            (
                "node_md_blocks",
                "Total number of blocks on device.",
                d.blocks,
            ),
            (
                "node_md_blocks_synced",
                "Number of blocks synced on device.",
                d.blocks_synced,
            ),
        ] {
            let f = out.gauge(name, help, "");
            out.sample(f, &[("device", device)], v);
        }
    }
    Ok(())
}

/// `schedstat`: per-CPU time running and waiting, and timeslices (`/proc/schedstat`; only
/// on kernels built with scheduler statistics).
pub fn schedstat(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let path = c.host.proc("schedstat");
    let text = source::read(&path)?;
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(cpu) = fields.first().and_then(|f| f.strip_prefix("cpu")) else {
            continue;
        };
        if fields.len() < 10 {
            return Err(Missing::parse(&path, format!("short line `{line}`")));
        }
        let num = |i: usize| fields[i].parse::<f64>().unwrap_or(0.0);
        for (name, help, unit, v) in [
            (
                "node_schedstat_running_seconds_total",
                "Number of seconds CPU spent running a process.",
                "seconds",
                num(7) / 1e9,
            ),
            (
                "node_schedstat_waiting_seconds_total",
                "Number of seconds spent by processing waiting for this CPU.",
                "seconds",
                num(8) / 1e9,
            ),
            (
                "node_schedstat_timeslices_total",
                "Number of timeslices executed by CPU.",
                "",
                num(9),
            ),
        ] {
            let f = out.counter(name, help, unit);
            out.sample(f, &[("cpu", cpu)], v);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mdstat_states_disks_and_progress() {
        let md = parse_mdstat(
            "Personalities : [raid1] [raid0]\nmd0 : active raid1 sdb1[1] sda1[0](F) sdc1[2](S)\n      1046528 blocks super 1.2 [2/1] [U_]\n      [==>..................]  recovery = 12.6% (131328/1046528) finish=1.2min speed=12345K/sec\n\nmd1 : active raid0 nvme0n1[0] nvme1n1[1]\n      2000000 blocks super 1.2 512k chunks\n\nunused devices: <none>\n",
        )
        .expect("parses");
        assert_eq!(
            md[0],
            MdDevice {
                name: "md0".into(),
                state: "recovering".into(),
                disks_active: 1.0,
                disks_total: 2.0,
                disks_failed: 1.0,
                disks_spare: 1.0,
                blocks: 1046528.0,
                blocks_synced: 131328.0,
            }
        );
        assert_eq!(md[1].state, "active");
        assert_eq!((md[1].disks_active, md[1].disks_total), (2.0, 2.0));
        assert_eq!(md[1].blocks_synced, 2000000.0);
        assert!(parse_mdstat("md0 broken\n").is_err());
    }

    #[test]
    fn infiniband_state_and_rate() {
        assert_eq!(state_id("4: ACTIVE"), Some(4.0));
        assert_eq!(ib_rate("100 Gb/sec (4X EDR)"), Some(12_500_000_000.0));
        assert_eq!(ib_rate("400 Gb/sec (4X NDR)"), Some(50_000_000_000.0));
    }
}
