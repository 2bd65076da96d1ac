//! node_exporter's collectors of platform and device classes in sysfs: `dmi` (the firmware's
//! system identity), `fibrechannel` (`/sys/class/fc_host`), `tapestats` (`/sys/class/scsi_tape`)
//! and `watchdog` (`/sys/class/watchdog`, node_exporter 1.10's names).

use metricsd_plugin_api::BatchBuilder;

use crate::source::{self, Missing, Outcome};
use crate::{info_sample, numeric_family, SystemCollector};

/// DMI attributes (`/sys/class/dmi/id/FILE`) and the `node_dmi_info` label each becomes.
const DMI: [(&str, &str); 20] = [
    ("bios_date", "bios_date"),
    ("bios_release", "bios_release"),
    ("bios_vendor", "bios_vendor"),
    ("bios_version", "bios_version"),
    ("board_asset_tag", "board_asset_tag"),
    ("board_name", "board_name"),
    ("board_serial", "board_serial"),
    ("board_vendor", "board_vendor"),
    ("board_version", "board_version"),
    ("chassis_asset_tag", "chassis_asset_tag"),
    ("chassis_serial", "chassis_serial"),
    ("chassis_vendor", "chassis_vendor"),
    ("chassis_version", "chassis_version"),
    ("product_family", "product_family"),
    ("product_name", "product_name"),
    ("product_serial", "product_serial"),
    ("product_sku", "product_sku"),
    ("product_uuid", "product_uuid"),
    ("product_version", "product_version"),
    ("sys_vendor", "system_vendor"),
];

/// The DMI labels, read once: the firmware's tables do not change while the host runs. The
/// serial numbers and UUID are readable by root only; an agent that is not root leaves them
/// out, as node_exporter does.
pub fn read_dmi(host: &source::Host) -> Vec<(String, String)> {
    let dir = host.sys("class/dmi/id");
    DMI.iter()
        .filter_map(|(file, label)| {
            let value = std::fs::read(dir.join(file)).ok()?;
            let value = String::from_utf8_lossy(&value).trim().to_string();
            Some((label.to_string(), value))
        })
        .collect()
}

/// `dmi`: `node_dmi_info`, the vendor, product, board, chassis and BIOS the firmware reports.
pub fn dmi(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let labels = c.dmi.get_or_insert_with(|| read_dmi(&c.host));
    if labels.is_empty() {
        return Err(Missing::Absent);
    }
    info_sample(
        out,
        "node_dmi_info",
        "A metric with a constant '1' value labeled by bios_date, bios_release, bios_vendor, bios_version, board_asset_tag, board_name, board_serial, board_vendor, board_version, chassis_asset_tag, chassis_serial, chassis_vendor, chassis_version, product_family, product_name, product_serial, product_sku, product_uuid, product_version, system_vendor if provided by DMI.",
        labels,
    );
    Ok(())
}

/// A string attribute of `dir`, trimmed; empty where the driver does not have it.
fn text_attribute(c: &mut SystemCollector, dir: &std::path::Path, file: &str) -> String {
    c.files
        .attribute(&dir.join(file))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Fibre Channel host counters: the `statistics/` file and the name after
/// `node_fibrechannel_`.
#[rustfmt::skip]
const FC_COUNTERS: [(&str, &str, &str); 14] = [
    ("dumped_frames", "dumped_frames_total", "Number of dumped frames"),
    ("error_frames", "error_frames_total", "Number of errors in frames"),
    ("invalid_crc_count", "invalid_crc_total", "Invalid Cyclic Redundancy Check count"),
    ("rx_frames", "rx_frames_total", "Number of frames received"),
    ("rx_words", "rx_words_total", "Number of words received by host port"),
    ("tx_frames", "tx_frames_total", "Number of frames transmitted by host port"),
    ("tx_words", "tx_words_total", "Number of words transmitted by host port"),
    ("seconds_since_last_reset", "seconds_since_last_reset_total", "Number of seconds since last host port reset"),
    ("invalid_tx_word_count", "invalid_tx_words_total", "Number of invalid words transmitted by host port"),
    ("link_failure_count", "link_failure_total", "Number of times the host port link has failed"),
    ("loss_of_sync_count", "loss_of_sync_total", "Number of failures on either bit or transmission word boundaries"),
    ("loss_of_signal_count", "loss_of_signal_total", "Number of times signal has been lost"),
    ("nos_count", "nos_total", "Number Not_Operational Primitive Sequence received by host port"),
    ("fcp_packet_aborts", "fcp_packet_aborts_total", "Number of aborted packets"),
];

/// `fibrechannel`: per Fibre Channel host port, its identity and state (`node_fibrechannel_info`)
/// and its link and frame counters.
pub fn fibrechannel(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let base = c.host.sys("class/fc_host");
    for host in source::entries(&base)? {
        let dir = base.join(&host);
        let text = |c: &mut SystemCollector, f: &str| text_attribute(c, &dir, f);
        // World Wide Names and the port ID without their `0x`.
        let hex = |s: String| s.get(2..).map(str::to_string).unwrap_or(s);
        let info = [
            ("fc_host", host.clone()),
            ("speed", text(c, "speed")),
            ("port_state", text(c, "port_state")),
            ("port_type", text(c, "port_type")),
            ("port_id", hex(text(c, "port_id"))),
            ("port_name", hex(text(c, "port_name"))),
            ("fabric_name", hex(text(c, "fabric_name"))),
            ("symbolic_name", text(c, "symbolic_name")),
            ("supported_classes", text(c, "supported_classes")),
            ("supported_speeds", text(c, "supported_speeds")),
            ("dev_loss_tmo", text(c, "dev_loss_tmo")),
        ];
        info_sample(
            out,
            "node_fibrechannel_info",
            "Non-numeric data from /sys/class/fc_host/<host>, value is always 1.",
            &info,
        );
        for (file, name, help) in FC_COUNTERS {
            // Counters the driver does not keep read as all ones, or fail (`EOPNOTSUPP`).
            let v = c
                .files
                .number(&dir.join("statistics").join(file))
                .unwrap_or(0.0);
            if v == u64::MAX as f64 {
                continue;
            }
            let f = out.counter(&format!("node_fibrechannel_{name}"), help, "");
            out.sample(f, &[("fc_host", &host)], v);
        }
    }
    Ok(())
}

/// SCSI tape statistics: the `stats/` file, the name after `node_tape_`, whether it is a
/// counter, the factor to the metric's unit, and the help.
#[rustfmt::skip]
const TAPE: [(&str, &str, bool, f64, &str); 10] = [
    ("in_flight", "io_now", false, 1.0, "The number of I/Os currently outstanding to this device."),
    ("io_ns", "io_time_seconds_total", true, 1e-9, "The amount of time spent waiting for all I/O to complete (including read and write). This includes tape movement commands such as seeking between file or set marks and implicit tape movement such as when rewind on close tape devices are used."),
    ("other_cnt", "io_others_total", true, 1.0, "The number of I/Os issued to the tape drive other than read or write commands. The time taken to complete these commands uses the following calculation io_time_seconds_total-read_time_seconds_total-write_time_seconds_total"),
    ("read_byte_cnt", "read_bytes_total", true, 1.0, "The number of bytes read from the tape drive."),
    ("read_cnt", "reads_completed_total", true, 1.0, "The number of read requests issued to the tape drive."),
    ("read_ns", "read_time_seconds_total", true, 1e-9, "The amount of time spent waiting for read requests to complete."),
    ("resid_cnt", "residual_total", true, 1.0, "The number of times during a read or write we found the residual amount to be non-zero. This should mean that a program is issuing a read larger thean the block size on tape. For write not all data made it to tape."),
    ("write_byte_cnt", "written_bytes_total", true, 1.0, "The number of bytes written to the tape drive."),
    ("write_cnt", "writes_completed_total", true, 1.0, "The number of write requests issued to the tape drive."),
    ("write_ns", "write_time_seconds_total", true, 1e-9, "The amount of time spent waiting for write requests to complete."),
];

/// `tapestats`: per SCSI tape drive (`stN`), its I/O counts, bytes and times.
pub fn tapestats(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let base = c.host.sys("class/scsi_tape");
    for tape in source::entries(&base)? {
        if source::numbered(&tape, "st").is_none() {
            continue;
        }
        let stats = base.join(&tape).join("stats");
        for (file, name, counter, factor, help) in TAPE {
            let f = numeric_family(out, &format!("node_tape_{name}"), help, counter);
            let v = c.files.number(&stats.join(file)).unwrap_or(0.0);
            out.sample(f, &[("device", &tape)], v * factor);
        }
    }
    Ok(())
}

/// Numeric watchdog attributes and the name after `node_watchdog_`.
const WATCHDOG_NUMBERS: [(&str, &str); 7] = [
    ("bootstatus", "bootstatus"),
    ("fw_version", "fw_version"),
    ("nowayout", "nowayout"),
    ("timeleft", "timeleft_seconds"),
    ("timeout", "timeout_seconds"),
    ("pretimeout", "pretimeout_seconds"),
    ("access_cs0", "access_cs0"),
];

/// `watchdog`: per hardware watchdog, its timeout, time left, boot status and identity (as
/// node_exporter 1.10 names them; node_exporter 1.5 has no watchdog collector). Attributes a
/// driver does not provide are left out.
pub fn watchdog(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let base = c.host.sys("class/watchdog");
    for wd in source::entries(&base)? {
        let dir = base.join(&wd);
        for (file, name) in WATCHDOG_NUMBERS {
            if let Some(v) = c.files.number(&dir.join(file)) {
                let f = numeric_family(
                    out,
                    &format!("node_watchdog_{name}"),
                    &format!("Value of /sys/class/watchdog/<watchdog>/{file}"),
                    false,
                );
                out.sample(f, &[("name", &wd)], v);
            }
        }
        let text = |c: &mut SystemCollector, f: &str| text_attribute(c, &dir, f);
        let info = [
            ("name", wd.clone()),
            ("options", text(c, "options")),
            ("identity", text(c, "identity")),
            ("state", text(c, "state")),
            ("status", text(c, "status")),
            ("pretimeout_governor", text(c, "pretimeout_governor")),
        ];
        info_sample(
            out,
            "node_watchdog_info",
            "Info of /sys/class/watchdog/<watchdog>",
            &info,
        );
    }
    Ok(())
}
