//! node_exporter's network collectors: `netdev`, `netclass`, `netstat`, `sockstat`,
//! `softnet`, `udp_queues`, `arp` and `conntrack`.

use std::collections::BTreeMap;

use metricsd_plugin_api::{BatchBuilder, MetricKind};
use procfs::FromRead;

use crate::source::{self, Missing, Outcome};
use crate::{kernel, SystemCollector};

/// `netdev`: the counters of `/proc/net/dev` for each interface, and `rx_nohandler` from
/// sysfs.
pub fn netdev(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let text = c.files.read(&c.host.proc("net/dev"))?;
    let devices =
        procfs::net::InterfaceDeviceStatus::from_read(text.as_bytes()).map_err(Missing::procfs)?;
    let mut devices: Vec<_> = devices.0.into_values().collect();
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    for d in devices {
        if c.interfaces_exclude.is_match(&d.name) {
            continue;
        }
        let set = out.label_set(&[("device", d.name.as_str())]);
        let nohandler = c.files.number(
            &c.host
                .sys(&format!("class/net/{}/statistics/rx_nohandler", d.name)),
        );
        let values = [
            ("receive", "bytes", Some(d.recv_bytes as f64)),
            ("receive", "packets", Some(d.recv_packets as f64)),
            ("receive", "errs", Some(d.recv_errs as f64)),
            ("receive", "drop", Some(d.recv_drop as f64)),
            ("receive", "fifo", Some(d.recv_fifo as f64)),
            ("receive", "frame", Some(d.recv_frame as f64)),
            ("receive", "compressed", Some(d.recv_compressed as f64)),
            ("receive", "multicast", Some(d.recv_multicast as f64)),
            ("receive", "nohandler", nohandler),
            ("transmit", "bytes", Some(d.sent_bytes as f64)),
            ("transmit", "packets", Some(d.sent_packets as f64)),
            ("transmit", "errs", Some(d.sent_errs as f64)),
            ("transmit", "drop", Some(d.sent_drop as f64)),
            ("transmit", "fifo", Some(d.sent_fifo as f64)),
            ("transmit", "colls", Some(d.sent_colls as f64)),
            ("transmit", "carrier", Some(d.sent_carrier as f64)),
            ("transmit", "compressed", Some(d.sent_compressed as f64)),
        ];
        for (direction, stat, v) in values {
            let Some(v) = v else { continue };
            let unit = if stat == "bytes" { "bytes" } else { "" };
            let f = out.counter(
                &format!("node_network_{direction}_{stat}_total"),
                &format!("Network device statistic {direction}_{stat}."),
                unit,
            );
            out.sample_in(f, set, v);
        }
    }
    Ok(())
}

/// `/sys/class/net/<iface>` number attributes: file, family suffix, counter.
const NETCLASS_NUMBERS: [(&str, &str, bool); 16] = [
    ("addr_assign_type", "address_assign_type", false),
    ("carrier", "carrier", false),
    ("carrier_changes", "carrier_changes_total", true),
    ("carrier_up_count", "carrier_up_changes_total", true),
    ("carrier_down_count", "carrier_down_changes_total", true),
    ("dev_id", "device_id", false),
    ("dormant", "dormant", false),
    ("flags", "flags", false),
    ("ifindex", "iface_id", false),
    ("iflink", "iface_link", false),
    ("link_mode", "iface_link_mode", false),
    ("mtu", "mtu_bytes", false),
    ("name_assign_type", "name_assign_type", false),
    ("netdev_group", "net_dev_group", false),
    ("tx_queue_len", "transmit_queue_length", false),
    ("type", "protocol_type", false),
];

/// `netclass`: each interface's state and properties from `/sys/class/net`: up, carrier,
/// speed, MTU, address, duplex and the rest. An attribute the device does not answer (the
/// carrier of a link that is down) is left out.
pub fn netclass(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let base = c.host.sys("class/net");
    for name in source::entries(&base)? {
        if c.interfaces_exclude.is_match(&name) {
            continue;
        }
        let dir = base.join(&name);
        // Entries that are not directories (`bonding_masters`) are not interfaces.
        if !dir.is_dir() {
            continue;
        }
        let mut text = |file: &str| c.files.attribute(&dir.join(file)).unwrap_or_default();
        let operstate = text("operstate");
        let set = out.label_set(&[("device", name.as_str())]);
        let f = out.gauge(
            "node_network_up",
            "Value is 1 if operstate is 'up', 0 otherwise.",
            "",
        );
        out.sample_in(f, set, if operstate == "up" { 1.0 } else { 0.0 });
        let f = out.info(
            "node_network_info",
            "Non-numeric data from /sys/class/net/<iface>, value is always 1.",
        );
        out.sample(
            f,
            &[
                ("device", name.as_str()),
                ("address", &text("address")),
                ("broadcast", &text("broadcast")),
                ("duplex", &text("duplex")),
                ("operstate", &operstate),
                ("ifalias", &text("ifalias")),
            ],
            1.0,
        );
        for (file, suffix, counter) in NETCLASS_NUMBERS {
            let Some(v) = c.files.number(&dir.join(file)) else {
                continue;
            };
            let name = format!("node_network_{suffix}");
            let help = format!("Network device property: {suffix}");
            let unit = if suffix == "mtu_bytes" { "bytes" } else { "" };
            let f = if counter {
                out.counter(&name, &help, unit)
            } else {
                out.gauge(&name, &help, unit)
            };
            out.sample_in(f, set, v);
        }
        // Mbit/s in sysfs; -1 (unknown) is reported as node_exporter reports it.
        if let Some(speed) = c.files.number(&dir.join("speed")) {
            let f = out.gauge(
                "node_network_speed_bytes",
                "Network device property: speed_bytes",
                "bytes",
            );
            out.sample_in(f, set, speed * 125_000.0);
        }
    }
    Ok(())
}

/// `netstat`: the fields of `/proc/net/netstat`, `/proc/net/snmp` and `/proc/net/snmp6`
/// that `netstat_fields` selects, untyped as node_exporter reports them.
pub fn netstat(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let mut key = String::new();
    for file in ["net/netstat", "net/snmp"] {
        let path = c.host.proc(file);
        let text = c.files.read(&path)?;
        let mut lines = text.lines();
        while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
            let mut names = names.split_ascii_whitespace();
            let mut values = values.split_ascii_whitespace();
            let (Some(protocol), Some(_)) = (names.next(), values.next()) else {
                continue;
            };
            let protocol = protocol.trim_end_matches(':');
            for (name, value) in names.zip(values) {
                key.clear();
                key.push_str(protocol);
                key.push('_');
                key.push_str(name);
                if !c.netstat_fields.selects(&key) {
                    continue;
                }
                let Ok(v) = value.parse::<f64>() else {
                    return Err(Missing::parse(
                        &path,
                        format!("{protocol} {name} is `{value}`"),
                    ));
                };
                netstat_sample(out, protocol, name, v);
            }
        }
    }
    // Absent on a kernel without IPv6.
    if let Some(text) = c.files.optional(&c.host.proc("net/snmp6")) {
        for line in text.lines() {
            let mut f = line.split_ascii_whitespace();
            let (Some(field), Some(value)) = (f.next(), f.next()) else {
                continue;
            };
            let Some(six) = field.find('6') else { continue };
            let (protocol, name) = (&field[..=six], &field[six + 1..]);
            key.clear();
            key.push_str(protocol);
            key.push('_');
            key.push_str(name);
            if !c.netstat_fields.selects(&key) {
                continue;
            }
            if let Ok(v) = value.parse::<f64>() {
                netstat_sample(out, protocol, name, v);
            }
        }
    }
    Ok(())
}

fn netstat_sample(out: &mut BatchBuilder, protocol: &str, name: &str, v: f64) {
    let f = out.family(
        &format!("node_netstat_{protocol}_{name}"),
        &format!("Statistic {protocol}{name}."),
        "",
        MetricKind::UNTYPED,
    );
    out.sample(f, &[], v);
}

/// `sockstat`: sockets in use per protocol, and the memory they hold (`/proc/net/sockstat`,
/// `/proc/net/sockstat6`).
pub fn sockstat(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let path = c.host.proc("net/sockstat");
    let mut text = c.files.read(&path)?;
    // Absent on a kernel without IPv6.
    if let Some(six) = c.files.optional(&c.host.proc("net/sockstat6")) {
        text.push('\n');
        text.push_str(&six);
    }
    for line in text.lines() {
        let Some((protocol, rest)) = line.split_once(':') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
        for pair in fields.chunks(2) {
            let [field, value] = pair else { continue };
            let Ok(v) = value.parse::<f64>() else {
                return Err(Missing::parse(
                    &path,
                    format!("{protocol} {field} is `{value}`"),
                ));
            };
            if protocol == "sockets" {
                let f = out.gauge(
                    &format!("node_sockstat_sockets_{field}"),
                    &format!("Number of IPv4 sockets in use ({field})."),
                    "",
                );
                out.sample(f, &[], v);
                continue;
            }
            let f = out.gauge(
                &format!("node_sockstat_{protocol}_{field}"),
                &format!("Number of {protocol} sockets in state {field}."),
                "",
            );
            out.sample(f, &[], v);
            if *field == "mem" {
                let f = out.gauge(
                    &format!("node_sockstat_{protocol}_mem_bytes"),
                    &format!("Number of {protocol} sockets in state mem_bytes."),
                    "bytes",
                );
                out.sample(f, &[], v * c.page_size);
            }
        }
    }
    Ok(())
}

/// `softnet`: per-CPU packets processed, dropped, and times the budget ran out
/// (`/proc/net/softnet_stat`, hexadecimal columns).
pub fn softnet(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let path = c.host.proc("net/softnet_stat");
    let text = c.files.read(&path)?;
    let families = [
        (
            "node_softnet_processed_total",
            "Number of processed packets",
        ),
        ("node_softnet_dropped_total", "Number of dropped packets"),
        (
            "node_softnet_times_squeezed_total",
            "Number of times processing packets ran out of quota",
        ),
    ]
    .map(|(name, help)| out.counter(name, help, ""));
    for (cpu, line) in text.lines().enumerate() {
        let cpu = cpu.to_string();
        let set = out.label_set(&[("cpu", cpu.as_str())]);
        for (family, column) in families.iter().zip(line.split_ascii_whitespace()) {
            let Ok(v) = u64::from_str_radix(column, 16) else {
                return Err(Missing::parse(
                    &path,
                    format!("`{column}` is not hexadecimal"),
                ));
            };
            out.sample_in(*family, set, v as f64);
        }
    }
    Ok(())
}

/// `udp_queues`: bytes queued in UDP sockets, receive and transmit, IPv4 and IPv6.
pub fn udp_queues(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let f = out.gauge(
        "node_udp_queues",
        "Number of allocated memory in the kernel for UDP datagrams in bytes.",
        "",
    );
    for (file, ip) in [("net/udp", "v4"), ("net/udp6", "v6")] {
        let path = c.host.proc(file);
        let text = match c.files.read(&path) {
            Ok(t) => t,
            Err(Missing::Absent) if ip == "v6" => continue,
            Err(e) => return Err(e),
        };
        let (mut tx, mut rx) = (0u64, 0u64);
        for line in text.lines().skip(1) {
            let Some((t, r)) = line
                .split_ascii_whitespace()
                .nth(4)
                .and_then(|q| q.split_once(':'))
            else {
                continue;
            };
            tx += u64::from_str_radix(t, 16).unwrap_or(0);
            rx += u64::from_str_radix(r, 16).unwrap_or(0);
        }
        out.sample(f, &[("ip", ip), ("queue", "tx")], tx as f64);
        out.sample(f, &[("ip", ip), ("queue", "rx")], rx as f64);
    }
    Ok(())
}

/// `arp`: ARP table entries per interface (`/proc/net/arp`).
pub fn arp(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let text = c.files.read(&c.host.proc("net/arp"))?;
    let mut per_device: BTreeMap<&str, u64> = BTreeMap::new();
    for line in text.lines().skip(1) {
        if let Some(device) = line.split_ascii_whitespace().nth(5) {
            *per_device.entry(device).or_default() += 1;
        }
    }
    let f = out.gauge("node_arp_entries", "ARP entries by device", "");
    for (device, n) in per_device {
        out.sample(f, &[("device", device)], n as f64);
    }
    Ok(())
}

/// `conntrack`: connection-tracking table use and limit, and the kernel's conntrack
/// statistics summed over CPUs. Absent when the `nf_conntrack` module is not loaded.
pub fn conntrack(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    kernel::number_gauge(
        c,
        out,
        "sys/net/netfilter/nf_conntrack_count",
        "node_nf_conntrack_entries",
        "Number of currently allocated flow entries for connection tracking.",
    )?;
    kernel::number_gauge(
        c,
        out,
        "sys/net/netfilter/nf_conntrack_max",
        "node_nf_conntrack_entries_limit",
        "Maximum size of connection tracking table.",
    )?;
    let path = c.host.proc("net/stat/nf_conntrack");
    let Some(text) = c.files.optional(&path) else {
        return Ok(());
    };
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return Ok(());
    };
    let columns: Vec<&str> = header.split_ascii_whitespace().collect();
    let mut sums = vec![0u64; columns.len()];
    for line in lines {
        for (sum, value) in sums.iter_mut().zip(line.split_ascii_whitespace()) {
            *sum += u64::from_str_radix(value, 16).unwrap_or(0);
        }
    }
    for (stat, help) in [
        ("found", "Number of searched entries which were successful."),
        ("invalid", "Number of packets seen which can not be tracked."),
        ("ignore", "Number of packets seen which are already connected to a conntrack entry."),
        ("insert", "Number of entries inserted into the list."),
        ("insert_failed", "Number of entries for which list insertion was attempted but failed."),
        ("drop", "Number of packets dropped due to conntrack failure."),
        ("early_drop", "Number of dropped conntrack entries to make room for new ones, if maximum table size was reached."),
        ("search_restart", "Number of conntrack table lookups which had to be restarted due to hashtable resizes."),
    ] {
        let Some(i) = columns.iter().position(|c| *c == stat) else {
            continue;
        };
        let f = out.gauge(&format!("node_nf_conntrack_stat_{stat}"), help, "");
        out.sample(f, &[], sums[i] as f64);
    }
    Ok(())
}

/// `bonding`: per bonding interface, its configured slaves and those whose link (MII status) is
/// up.
pub fn bonding(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let net = c.host.sys("class/net");
    let masters = c.files.read(&net.join("bonding_masters"))?;
    let slaves_f = out.gauge(
        "node_bonding_slaves",
        "Number of configured slaves per bonding interface.",
        "",
    );
    let active_f = out.gauge(
        "node_bonding_active",
        "Number of active slaves per bonding interface.",
        "",
    );
    for master in masters.split_ascii_whitespace() {
        let path = net.join(master).join("bonding/slaves");
        let slaves = c.files.read(&path)?;
        let (mut configured, mut active) = (0, 0);
        for slave in slaves.split_ascii_whitespace() {
            // `lower_NAME` since Linux 4.?, `slave_NAME` before.
            let status = ["lower_", "slave_"].iter().find_map(|prefix| {
                c.files.attribute(
                    &net.join(master)
                        .join(format!("{prefix}{slave}"))
                        .join("bonding_slave/mii_status"),
                )
            });
            let Some(status) = status else {
                return Err(Missing::Failed(format!(
                    "{}: no MII status for slave {slave}",
                    net.join(master).display()
                )));
            };
            configured += 1;
            if status.trim() == "up" {
                active += 1;
            }
        }
        out.sample(slaves_f, &[("master", master)], configured as f64);
        out.sample(active_f, &[("master", master)], active as f64);
    }
    Ok(())
}

/// An `ADDRESS:PORT` of `/proc/net/ip_vs`: IPv4 as 8 hex digits, IPv6 in brackets, the port in
/// 4 hex digits.
fn ipvs_address(s: &str) -> Option<(String, u16)> {
    let (addr, port) = s.rsplit_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let addr = if let Some(v6) = addr.strip_prefix('[').and_then(|a| a.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().ok()?.to_string()
    } else if addr.len() == 8 {
        std::net::Ipv4Addr::from(u32::from_str_radix(addr, 16).ok()?).to_string()
    } else {
        return None;
    };
    Some((addr, port))
}

/// `ipvs`: the IP Virtual Server's totals (`/proc/net/ip_vs_stats`) and, per backend, its
/// active and inactive connections and weight (`/proc/net/ip_vs`); kube-proxy in IPVS mode
/// programs it.
pub fn ipvs(c: &mut SystemCollector, out: &mut BatchBuilder) -> Outcome {
    let path = c.host.proc("net/ip_vs_stats");
    let text = c.files.read(&path)?;
    let totals: Vec<&str> = text
        .lines()
        .nth(2)
        .map(|l| l.split_ascii_whitespace().collect())
        .unwrap_or_default();
    if totals.len() != 5 {
        return Err(Missing::parse(&path, "no line of five totals"));
    }
    for (i, (name, help)) in [
        ("connections", "The total number of connections made."),
        ("incoming_packets", "The total number of incoming packets."),
        ("outgoing_packets", "The total number of outgoing packets."),
        ("incoming_bytes", "The total amount of incoming data."),
        ("outgoing_bytes", "The total amount of outgoing data."),
    ]
    .into_iter()
    .enumerate()
    {
        let v = u64::from_str_radix(totals[i], 16)
            .map_err(|_| Missing::parse(&path, format!("{name} is `{}`", totals[i])))?;
        let f = crate::numeric_family(out, &format!("node_ipvs_{name}_total"), help, true);
        out.sample(f, &[], v as f64);
    }

    let path = c.host.proc("net/ip_vs");
    let text = c.files.read(&path)?;
    // Backends with the same labels (the same service reached twice) are summed.
    let mut backends: BTreeMap<[String; 6], [f64; 3]> = BTreeMap::new();
    let (mut proto, mut local, mut local_port, mut mark) =
        (String::new(), String::new(), 0u16, String::new());
    for line in text.lines() {
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        match f.as_slice() {
            [p @ ("TCP" | "UDP"), addr, ..] => {
                let (a, port) = ipvs_address(addr)
                    .ok_or_else(|| Missing::parse(&path, format!("`{addr}` is not an address")))?;
                (proto, local, local_port, mark) = (p.to_string(), a, port, String::new());
            }
            ["FWM", m, ..] => {
                (proto, local, local_port, mark) = ("FWM".into(), String::new(), 0, m.to_string());
            }
            ["->", addr, _forward, weight, active, inactive, ..] => {
                let Some((remote, remote_port)) = ipvs_address(addr) else {
                    // The column header `-> RemoteAddress:Port`.
                    continue;
                };
                let num = |s: &str| {
                    s.parse::<f64>()
                        .map_err(|_| Missing::parse(&path, format!("`{line}`")))
                };
                let key = [
                    local.clone(),
                    local_port.to_string(),
                    remote,
                    remote_port.to_string(),
                    proto.clone(),
                    mark.clone(),
                ];
                let sums = backends.entry(key).or_default();
                sums[0] += num(active)?;
                sums[1] += num(inactive)?;
                sums[2] += num(weight)?;
            }
            _ => {}
        }
    }
    let families = [
        out.gauge(
            "node_ipvs_backend_connections_active",
            "The current active connections by local and remote address.",
            "",
        ),
        out.gauge(
            "node_ipvs_backend_connections_inactive",
            "The current inactive connections by local and remote address.",
            "",
        ),
        out.gauge(
            "node_ipvs_backend_weight",
            "The current backend weight by local and remote address.",
            "",
        ),
    ];
    for (key, sums) in &backends {
        let labels: Vec<(&str, &str)> = [
            "local_address",
            "local_port",
            "remote_address",
            "remote_port",
            "proto",
            "local_mark",
        ]
        .into_iter()
        .zip(key.iter().map(String::as_str))
        .collect();
        for (f, v) in families.iter().zip(sums) {
            out.sample(*f, &labels, *v);
        }
    }
    Ok(())
}
