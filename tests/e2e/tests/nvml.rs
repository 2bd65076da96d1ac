//! The NVML collector through nvml-wrapper's real loading and call path, against the NVML
//! simulator library (tests/nvml-sim) and its scenario files.

use std::path::PathBuf;
use std::time::Duration;

use metricsd_e2e::{build, json_lines, root, wait_for, Agent, Workdir};
use serde_json::Value;

fn sim_library() -> String {
    build().join("libnvml_sim.so").display().to_string()
}

fn scenario(name: &str) -> String {
    let path: PathBuf = root().join("tests/nvml-sim/scenarios").join(name);
    assert!(path.is_file(), "{}", path.display());
    path.display().to_string()
}

fn nvml_collector(library: &str, extra: &str) -> String {
    format!(
        "[[collectors]]\nname = \"gpu\"\nplugin = \"nvml\"\n{extra}\n[collectors.config]\nlibrary_path = \"{library}\"\n"
    )
}

/// `metricsd once --format json` with the NVML collector against the simulator; `settings`
/// are extra `[collectors.config]` lines. The command must succeed.
fn once_json(
    work: &Workdir,
    settings: &str,
    scenario_file: &str,
    env: &[(&str, &str)],
) -> Vec<Value> {
    let config = work.write(
        "once.toml",
        format!("{}{settings}\n", nvml_collector(&sim_library(), "")),
    );
    let scenario_path = scenario(scenario_file);
    let mut all_env = vec![("NVML_SIM_SCENARIO", scenario_path.as_str())];
    all_env.extend_from_slice(env);
    let out = work.metricsd(
        &[
            "-c",
            config.to_str().expect("path"),
            "once",
            "--format",
            "json",
        ],
        &all_env,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_lines(&String::from_utf8_lossy(&out.stdout))
}

/// A running agent's config: the NVML collector (simulator) into the stdout sink as JSON.
fn stdout_agent_config(interval: &str) -> String {
    stdout_agent_config_with(interval, "")
}

/// [`stdout_agent_config`] with extra `[collectors.config]` lines.
fn stdout_agent_config_with(interval: &str, settings: &str) -> String {
    format!(
        "[agent]\ninterval = \"{interval}\"\ninternal_metrics = false\n[http]\nhealth_listen = \"127.0.0.1:{{health}}\"\nmetrics_listen = \"\"\n{}{settings}\n[[sinks]]\nname = \"out\"\nplugin = \"stdout\"\n",
        nvml_collector(&sim_library(), "")
    )
}

/// A running, ready agent with `stdout_agent_config_with(interval, settings)` on a scenario,
/// and the path of the simulator's call log (`NVML_SIM_CALL_LOG`: one line per device query).
fn agent_logging_calls(
    work: &Workdir,
    scenario_file: &str,
    interval: &str,
    settings: &str,
) -> (Agent, PathBuf) {
    let call_log = work.path("nvml-calls.log");
    let mut agent = Agent::start(
        work,
        &stdout_agent_config_with(interval, settings),
        &[
            ("NVML_SIM_SCENARIO", &scenario(scenario_file)),
            ("NVML_SIM_CALL_LOG", call_log.to_str().expect("path")),
        ],
    )
    .expect("start");
    agent.wait_ready().expect("ready");
    (agent, call_log)
}

/// How many times a call log names `query`.
fn calls_to(calls: &str, query: &str) -> usize {
    calls.lines().filter(|l| *l == query).count()
}

/// Rows of one metric, optionally for one GPU.
fn rows<'a>(rows: &'a [Value], name: &str, gpu: Option<&str>) -> Vec<&'a Value> {
    rows.iter()
        .filter(|r| r["name"] == name)
        .filter(|r| gpu.is_none_or(|g| r["labels"]["gpu"] == g))
        .collect()
}

fn value(all: &[Value], name: &str, gpu: &str) -> f64 {
    let found = rows(all, name, Some(gpu));
    assert_eq!(found.len(), 1, "{name} for gpu {gpu}: {found:?}");
    found[0]["value"].as_f64().expect("number")
}

#[test]
fn eight_gpus_report_every_metric_with_the_scenario_values() {
    let work = Workdir::new();
    let all = once_json(&work, "", "h100-sxm-8.toml", &[]);
    assert_eq!(rows(&all, "gpu_count", None)[0]["value"], 8.0);
    let mut uuids = std::collections::BTreeSet::new();
    for gpu in 0..8 {
        let g = gpu.to_string();
        let g = g.as_str();
        assert_eq!(value(&all, "gpu_up", g), 1.0);
        assert_eq!(value(&all, "gpu_utilization_ratio", g), 0.87);
        assert_eq!(value(&all, "gpu_memory_utilization_ratio", g), 0.41);
        assert_eq!(value(&all, "gpu_memory_total_bytes", g), 85_520_809_984.0);
        assert_eq!(value(&all, "gpu_memory_used_bytes", g), 42_949_672_960.0);
        assert_eq!(value(&all, "gpu_memory_reserved_bytes", g), 566_231_040.0);
        assert_eq!(
            value(&all, "gpu_memory_free_bytes", g),
            85_520_809_984.0 - 42_949_672_960.0 - 566_231_040.0
        );
        assert_eq!(value(&all, "gpu_temperature_celsius", g), 61.0);
        assert_eq!(value(&all, "gpu_power_usage_watts", g), 512.345);
        assert_eq!(value(&all, "gpu_power_limit_watts", g), 700.0);
        assert_eq!(value(&all, "gpu_power_default_limit_watts", g), 700.0);
        assert!(value(&all, "gpu_energy_consumed_joules_total", g) >= 1.0e6);
        assert_eq!(value(&all, "gpu_performance_state", g), 0.0);
        assert_eq!(value(&all, "gpu_encoder_utilization_ratio", g), 0.03);
        assert_eq!(value(&all, "gpu_decoder_utilization_ratio", g), 0.05);
        for (clock, current, max) in [
            ("graphics", 1.98e9, 1.98e9),
            ("sm", 1.98e9, 1.98e9),
            ("memory", 2.619e9, 2.619e9),
            ("video", 1.635e9, 1.755e9),
        ] {
            let pick = |name: &str| -> f64 {
                rows(&all, name, Some(g))
                    .into_iter()
                    .find(|r| r["labels"]["clock"] == clock)
                    .and_then(|r| r["value"].as_f64())
                    .unwrap_or_else(|| panic!("{name} clock={clock} gpu={g}"))
            };
            assert_eq!(pick("gpu_clock_hertz"), current);
            assert_eq!(pick("gpu_clock_max_hertz"), max);
        }
        assert_eq!(value(&all, "gpu_power_management_limit_watts", g), 700.0);
        assert_eq!(
            value(&all, "gpu_temperature_slowdown_threshold_celsius", g),
            87.0
        );
        assert_eq!(
            value(&all, "gpu_temperature_shutdown_threshold_celsius", g),
            92.0
        );
        // The scenario: 18 links, each with 5 replay and 2 CRC flit errors.
        for (kind, total) in [("replay", 90.0), ("recovery", 0.0), ("crc_flit", 36.0)] {
            let found: Vec<_> = rows(&all, "gpu_nvlink_errors_total", Some(g))
                .into_iter()
                .filter(|r| r["labels"]["type"] == kind)
                .collect();
            assert_eq!(found.len(), 1, "{kind}: {found:?}");
            assert_eq!(found[0]["value"], total, "{kind}");
        }
        assert_eq!(
            rows(&all, "gpu_nvlink_up", Some(g)).len(),
            18,
            "link state per link"
        );
        assert_eq!(value(&all, "gpu_pcie_link_generation", g), 5.0);
        assert_eq!(value(&all, "gpu_pcie_link_width", g), 16.0);
        assert_eq!(value(&all, "gpu_pcie_link_max_generation", g), 5.0);
        assert_eq!(value(&all, "gpu_pcie_link_max_width", g), 16.0);
        assert_eq!(value(&all, "gpu_pcie_replays_total", g), 2.0);
        assert_eq!(value(&all, "gpu_ecc_enabled", g), 1.0);
        assert_eq!(value(&all, "gpu_retired_pages_pending", g), 0.0);
        assert_eq!(
            value(&all, "gpu_bar1_memory_total_bytes", g),
            274_877_906_944.0
        );
        assert_eq!(value(&all, "gpu_bar1_memory_used_bytes", g), 8_388_608.0);
        let labelled = |name: &str, key: &str, want: &str| -> f64 {
            rows(&all, name, Some(g))
                .into_iter()
                .find(|r| r["labels"][key] == want)
                .and_then(|r| r["value"].as_f64())
                .unwrap_or_else(|| panic!("{name} {key}={want} gpu={g}"))
        };
        assert_eq!(
            labelled("gpu_clocks_event_active", "reason", "sw_power_cap"),
            1.0
        );
        assert_eq!(
            labelled("gpu_clocks_event_active", "reason", "hw_thermal_slowdown"),
            0.0
        );
        assert_eq!(rows(&all, "gpu_clocks_event_active", Some(g)).len(), 9);
        let ecc: Vec<(String, String, f64)> = rows(&all, "gpu_ecc_errors_total", Some(g))
            .into_iter()
            .map(|r| {
                (
                    r["labels"]["type"].as_str().unwrap_or("").to_string(),
                    r["labels"]["scope"].as_str().unwrap_or("").to_string(),
                    r["value"].as_f64().unwrap_or(-1.0),
                )
            })
            .collect();
        for (kind, scope, n) in [
            ("corrected", "volatile", 12.0),
            ("uncorrected", "volatile", 0.0),
            ("corrected", "aggregate", 340.0),
            ("uncorrected", "aggregate", 1.0),
        ] {
            assert!(ecc.contains(&(kind.into(), scope.into(), n)), "{ecc:?}");
        }
        assert_eq!(
            labelled("gpu_process_memory_used_bytes", "pid", "4242"),
            21_474_836_480.0
        );
        let python = rows(&all, "gpu_process_memory_used_bytes", Some(g))
            .into_iter()
            .find(|r| r["labels"]["pid"] == "4242")
            .expect("process");
        assert_eq!(python["labels"]["process"], "python3");
        // Per-process utilization from nvmlDeviceGetProcessUtilization: the busy process has
        // its sample, the idle one (no sample from NVML) reads 0.
        assert_eq!(
            labelled("gpu_process_sm_utilization_ratio", "pid", "4242"),
            0.87
        );
        assert_eq!(
            labelled("gpu_process_memory_utilization_ratio", "pid", "4242"),
            0.41
        );
        assert_eq!(
            labelled("gpu_process_sm_utilization_ratio", "pid", "4343"),
            0.0
        );
        // The fan query answers NOT_SUPPORTED on this card: absent, never 0.
        assert!(rows(&all, "gpu_fan_speed_ratio", Some(g)).is_empty());
        let info = rows(&all, "gpu_info", Some(g));
        assert_eq!(info.len(), 1);
        let labels = &info[0]["labels"];
        assert_eq!(labels["driver_version"], "550.54.15");
        assert_eq!(labels["cuda_version"], "12.4");
        assert_eq!(labels["name"], "NVIDIA H100 80GB HBM3");
        assert_eq!(labels["vbios_version"], "96.00.74.00.01");
        assert_eq!(labels["board_part_number"], "692-2G520-0200-000");
        assert_eq!(labels["serial"], format!("165232100{gpu}"));
        assert_eq!(
            labels["pci_bus_id"],
            format!("00000000:{:02X}:00.0", 0x18 + gpu * 0x10)
        );
        uuids.insert(labels["uuid"].as_str().expect("uuid").to_string());
    }
    assert_eq!(uuids.len(), 8, "every GPU has its own UUID");
}

/// Another NVML client, unchanged: nvidia-ml-py (pynvml, from PyPI; `scripts/test.sh` installs
/// it) loads the simulator as `libnvidia-ml.so.1` and reads the same GPUs through its own
/// entry points (the unversioned v1 ones among them), agreeing with what metricsd reports.
#[test]
fn nvidia_ml_py_reads_the_simulator_and_agrees_with_metricsd() {
    let work = Workdir::new();
    let lib_dir = work.path("nvml-lib");
    std::fs::create_dir_all(&lib_dir).expect("dir");
    std::os::unix::fs::symlink(sim_library(), lib_dir.join("libnvidia-ml.so.1")).expect("link");
    let out = std::process::Command::new("python3")
        .arg(root().join("tests/e2e/scripts/pynvml-read.py"))
        .env("LD_LIBRARY_PATH", &lib_dir)
        .env("NVML_SIM_SCENARIO", scenario("h100-sxm-8.toml"))
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "nvidia-ml-py against the simulator (pip install nvidia-ml-py, or run scripts/test.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let py: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(py["driver"], "550.54.15");
    assert_eq!(py["cuda"], 12040);
    let gpus = py["gpus"].as_array().expect("gpus");
    assert_eq!(gpus.len(), 8);
    let all = once_json(&work, "", "h100-sxm-8.toml", &[]);
    for g in gpus {
        let index = g["index"].as_u64().expect("index").to_string();
        let index = index.as_str();
        let up = &rows(&all, "gpu_up", Some(index))[0]["labels"];
        assert_eq!(g["uuid"], up["uuid"], "{g}");
        assert_eq!(g["name"], up["name"]);
        assert_eq!(g["pci_bus_id"], up["pci_bus_id"]);
        assert_eq!(g["same_handle_by_uuid"], true);
        let bytes = |key: &str| g[key].as_f64().expect("number");
        assert_eq!(
            bytes("memory_total"),
            value(&all, "gpu_memory_total_bytes", index)
        );
        // v1's used memory includes what the driver reserves; v2 (metricsd) reports it apart.
        assert_eq!(
            bytes("memory_used"),
            value(&all, "gpu_memory_used_bytes", index)
                + value(&all, "gpu_memory_reserved_bytes", index)
        );
        assert_eq!(
            bytes("memory_free"),
            value(&all, "gpu_memory_free_bytes", index)
        );
        assert_eq!(
            bytes("utilization_gpu") / 100.0,
            value(&all, "gpu_utilization_ratio", index)
        );
        assert_eq!(
            bytes("temperature"),
            value(&all, "gpu_temperature_celsius", index)
        );
        assert_eq!(
            bytes("power_mw") / 1000.0,
            value(&all, "gpu_power_usage_watts", index)
        );
        assert_eq!(
            bytes("power_limit_mw") / 1000.0,
            value(&all, "gpu_power_management_limit_watts", index)
        );
        assert!(bytes("energy_mj") >= 1.0e9);
        let sm: Vec<f64> = rows(&all, "gpu_clock_hertz", Some(index))
            .iter()
            .filter(|r| r["labels"]["clock"] == "sm")
            .map(|r| r["value"].as_f64().expect("number"))
            .collect();
        assert_eq!(vec![bytes("sm_clock_mhz") * 1e6], sm);
        // A fanless SXM board, as the real driver answers.
        assert_eq!(g["fan"], "Invalid Argument");
        assert_eq!(g["compute_capability"], serde_json::json!([9, 0]));
        let pids: std::collections::BTreeSet<String> = g["processes"]
            .as_array()
            .expect("processes")
            .iter()
            .map(|p| p["pid"].to_string())
            .collect();
        let reported: std::collections::BTreeSet<String> =
            rows(&all, "gpu_process_memory_used_bytes", Some(index))
                .iter()
                .map(|r| r["labels"]["pid"].as_str().expect("pid").to_string())
                .collect();
        assert!(!pids.is_empty());
        assert_eq!(pids, reported);
    }
}

#[test]
fn mig_mode_and_instances() {
    let work = Workdir::new();
    let all = once_json(&work, "", "a100.toml", &[]);
    for gpu in ["0", "1", "2", "3"] {
        assert_eq!(value(&all, "gpu_mig_mode_enabled", gpu), 1.0);
        assert_eq!(value(&all, "gpu_mig_mode_pending", gpu), 1.0);
        assert_eq!(value(&all, "gpu_mig_instances", gpu), 3.0);
        let mut instances: Vec<(String, String, f64, f64)> =
            rows(&all, "gpu_mig_memory_total_bytes", Some(gpu))
                .into_iter()
                .map(|r| {
                    let l = &r["labels"];
                    let used = rows(&all, "gpu_mig_memory_used_bytes", Some(gpu))
                        .into_iter()
                        .find(|u| u["labels"] == r["labels"])
                        .and_then(|u| u["value"].as_f64())
                        .expect("used beside total");
                    assert!(l["mig_uuid"]
                        .as_str()
                        .is_some_and(|u| u.starts_with("MIG-")));
                    (
                        l["mig_index"].as_str().unwrap_or("").to_string(),
                        l["mig_profile"].as_str().unwrap_or("").to_string(),
                        r["value"].as_f64().unwrap_or(-1.0),
                        used,
                    )
                })
                .collect();
        instances.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            instances,
            vec![
                (
                    "0".into(),
                    "3g.40gb".into(),
                    42_949_672_960.0,
                    21_474_836_480.0
                ),
                (
                    "1".into(),
                    "2g.20gb".into(),
                    21_474_836_480.0,
                    1_073_741_824.0
                ),
                ("2".into(), "2g.20gb".into(), 21_474_836_480.0, 0.0),
            ]
        );
    }
    // The sampled PCIe call, when switched on.
    let all = once_json(&work, "pcie_throughput_sampled = true", "a100.toml", &[]);
    let tx = rows(&all, "gpu_pcie_throughput_bytes_per_second", Some("0"))
        .into_iter()
        .find(|r| r["labels"]["direction"] == "tx")
        .and_then(|r| r["value"].as_f64())
        .expect("sampled tx");
    assert!((tx - 2.0e9).abs() < 2048.0, "{tx}");
    // MIG not supported (RTX 4090 scenario) leaves the series out.
    let all = once_json(&work, "", "rtx4090.toml", &[]);
    assert!(rows(&all, "gpu_mig_mode_enabled", None).is_empty());
    assert_eq!(rows(&all, "gpu_up", None).len(), 1);
}

#[test]
fn not_supported_queries_are_absent_and_asked_once() {
    let work = Workdir::new();
    let (agent, call_log) = agent_logging_calls(
        &work,
        "rtx4090.toml",
        "200ms",
        "read_every = { processes = 1 }",
    );
    agent
        .wait_stat(
            "metricsd_collector_collections_total{collector=\"gpu\"}",
            4.0,
            Duration::from_secs(15),
        )
        .unwrap_or_else(|e| panic!("four collections: {e}"));
    let calls = std::fs::read_to_string(&call_log).expect("call log");
    let count = |q: &str| calls_to(&calls, q);
    assert_eq!(count("total_energy"), 1, "NOT_SUPPORTED is remembered");
    assert_eq!(count("power_limit_default"), 1);
    assert!(
        count("power_usage") >= 4,
        "supported queries are asked every cycle"
    );
    let all = json_lines(&agent.stdout());
    assert!(rows(&all, "gpu_energy_consumed_joules_total", None).is_empty());
    assert!(
        rows(&all, "gpu_nvlink_up", None).is_empty(),
        "no NVLink on this card"
    );
    assert_eq!(count("nvlink"), 1, "a GPU without NVLink is probed once");
    assert!(count("processes") >= 4);
    assert_eq!(
        count("process_utilization"),
        0,
        "no process, no per-process utilization call (over 2 ms on an H200)"
    );
    assert!(rows(&all, "gpu_power_default_limit_watts", None).is_empty());
    let fan = rows(&all, "gpu_fan_speed_ratio", Some("0"));
    assert!(
        !fan.is_empty() && fan.iter().all(|r| r["value"] == 0.45),
        "{fan:?}"
    );
    let pstate = rows(&all, "gpu_performance_state", Some("0"));
    assert!(pstate.iter().all(|r| r["value"] == 2.0));
}

/// The metric groups an operator can switch off are neither reported nor asked for.
#[test]
fn switched_off_groups_are_neither_reported_nor_asked_for() {
    let work = Workdir::new();
    let on_log = work.path("on.log");
    let off_log = work.path("off.log");
    let on = once_json(
        &work,
        "",
        "h100-sxm-8.toml",
        &[("NVML_SIM_CALL_LOG", on_log.to_str().expect("path"))],
    );
    let off = once_json(
        &work,
        "processes = false\nnvlink = false\nenergy = false",
        "h100-sxm-8.toml",
        &[("NVML_SIM_CALL_LOG", off_log.to_str().expect("path"))],
    );
    let on_calls = std::fs::read_to_string(&on_log).expect("call log");
    let off_calls = std::fs::read_to_string(&off_log).expect("call log");
    let named = |all: &[Value], prefix: &str| {
        all.iter()
            .filter(|r| r["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
            .count()
    };
    for (prefix, call) in [
        ("gpu_process_", "processes"),
        ("gpu_nvlink_", "nvlink"),
        ("gpu_energy_", "total_energy"),
    ] {
        assert!(named(&on, prefix) > 0, "{prefix}* are on by default");
        assert_eq!(named(&off, prefix), 0, "{prefix}* switched off");
        assert!(calls_to(&on_calls, call) > 0, "{call}");
        assert_eq!(calls_to(&off_calls, call), 0, "{call} not asked when off");
    }
    assert_eq!(rows(&off, "gpu_up", None).len(), 8);
    assert_eq!(rows(&off, "gpu_power_usage_watts", None).len(), 8);
}

/// Reads of a tiered group of GPU `gpu` in `cycles` collections when it is read every
/// `every`: at the first collection, then after `every - gpu % every` collections and every
/// `every` after that (the plugin spreads the GPUs' reads).
fn reads_of(gpu: u32, every: u32, cycles: u32) -> u32 {
    let first = every - gpu % every;
    1 + if cycles > first {
        (cycles - first - 1) / every + 1
    } else {
        0
    }
}

/// [`reads_of`] summed over GPUs 0 to `gpus - 1`.
fn tier_reads(gpus: u32, every: u32, cycles: u32) -> u32 {
    (0..gpus).map(|gpu| reads_of(gpu, every, cycles)).sum()
}

/// What never changes while a GPU runs (max clocks, temperature thresholds, default power
/// limit, max PCIe link, ECC mode) is read once per GPU; a tiered group (`read_every`) every N
/// collections; all of it is reported every cycle. A board without fans (INVALID_ARGUMENT for
/// fan 0, as an H200 SXM answers) is asked once.
#[test]
fn constant_and_tiered_queries_are_read_on_their_schedule_and_reported_every_cycle() {
    let work = Workdir::new();
    let (mut agent, call_log) = agent_logging_calls(
        &work,
        "h100-sxm-8.toml",
        "200ms",
        "read_every = { energy = 2, errors = 3, state = 4, processes = 5 }",
    );
    wait_for("twelve cycles", Duration::from_secs(30), || {
        (rows(&json_lines(&agent.stdout()), "gpu_up", Some("0")).len() >= 12).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    let status = agent.terminate().expect("terminate");
    assert!(status.success());
    // Everything collected is written out by now; a collection the shutdown cut short may be
    // in the call log without its batch.
    let all = json_lines(&agent.stdout());
    let cycles = rows(&all, "gpu_up", Some("0")).len() as u32;
    let calls = std::fs::read_to_string(&call_log).expect("call log");
    let count = |q: &str| calls_to(&calls, q) as u32;
    // Eight GPUs: once each, per call.
    assert_eq!(count("max_clocks"), 8 * 4, "four clocks per GPU, once");
    assert_eq!(count("temperature_threshold"), 8 * 2);
    assert_eq!(count("power_limit_default"), 8);
    assert_eq!(count("pcie_max"), 8 * 2);
    assert_eq!(count("ecc"), 8);
    assert_eq!(count("fan_speed"), 8, "a fanless board is asked once");
    // Each tiered group on its schedule: one call per read.
    for (query, every) in [
        ("total_energy", 2),
        ("pcie_replay", 3),
        ("power_management_limit", 4),
        ("bar1", 4),
    ] {
        let reads = count(query);
        let (low, high) = (
            tier_reads(8, every, cycles),
            tier_reads(8, every, cycles + 1),
        );
        assert!(
            (low..=high).contains(&reads),
            "{query}: {reads} calls in {cycles} cycles, read every {every}: expected {low}..={high}"
        );
    }
    // Two calls per read (the list's size, then the list).
    let process_reads = count("processes") / 2;
    assert!(
        (tier_reads(8, 5, cycles)..=tier_reads(8, 5, cycles + 1)).contains(&process_reads),
        "{process_reads} process-list reads in {cycles} cycles"
    );
    // What changes fast is asked every cycle.
    assert!(
        count("pcie") >= 8 * 2 * cycles,
        "current PCIe link every cycle"
    );
    assert!(count("utilization") >= 8 * cycles);
    // Served every cycle from what was read: the constants, and each tiered group's last
    // reading, which changes only when the group is read again.
    let max_sm: Vec<_> = rows(&all, "gpu_clock_max_hertz", Some("0"))
        .into_iter()
        .filter(|r| r["labels"]["clock"] == "sm")
        .collect();
    assert_eq!(
        max_sm.len() as u32,
        cycles,
        "served every cycle from what was read"
    );
    assert!(max_sm.iter().all(|r| r["value"] == 1.98e9), "{max_sm:?}");
    assert_eq!(
        rows(
            &all,
            "gpu_temperature_shutdown_threshold_celsius",
            Some("7")
        )
        .len() as u32,
        cycles
    );
    assert!(rows(&all, "gpu_fan_speed_ratio", None).is_empty());
    for gpu in ["0", "5"] {
        let energy: Vec<f64> = rows(&all, "gpu_energy_consumed_joules_total", Some(gpu))
            .iter()
            .map(|r| r["value"].as_f64().expect("number"))
            .collect();
        assert_eq!(energy.len() as u32, cycles, "GPU {gpu}: energy every cycle");
        // The simulated counter grows with time: a new value means a new read.
        let reads = 1 + energy.windows(2).filter(|w| w[1] != w[0]).count() as u32;
        let expected = reads_of(gpu.parse().expect("index"), 2, cycles);
        assert_eq!(
            reads, expected,
            "GPU {gpu}: {reads} distinct energy readings in {cycles} cycles: {energy:?}"
        );
        assert!(energy.windows(2).all(|w| w[1] >= w[0]), "{energy:?}");
        let ecc = rows(&all, "gpu_ecc_errors_total", Some(gpu));
        assert_eq!(
            ecc.len() as u32,
            4 * cycles,
            "four ECC counters every cycle"
        );
        let processes = rows(&all, "gpu_process_memory_used_bytes", Some(gpu));
        assert!(
            processes.len() as u32 >= cycles,
            "processes served every cycle"
        );
    }
}

/// A constant query that fails with a passing driver error (not NOT_SUPPORTED) is asked again at
/// the next collection, not left out until the next refresh; once answered it is not asked again.
#[test]
fn a_constant_query_that_fails_for_a_while_is_asked_again_until_it_answers() {
    let work = Workdir::new();
    let scenario_text = std::fs::read_to_string(scenario("rtx4090.toml")).expect("scenario");
    let failing = work.write(
        "failing.toml",
        format!("{scenario_text}fail = {{ query = \"max_clocks\", until_s = 1.5 }}\n"),
    );
    let call_log = work.path("nvml-calls.log");
    let mut agent = Agent::start(
        &work,
        &stdout_agent_config("200ms"),
        &[
            ("NVML_SIM_SCENARIO", failing.to_str().expect("path")),
            ("NVML_SIM_CALL_LOG", call_log.to_str().expect("path")),
        ],
    )
    .expect("start");
    agent.wait_ready().expect("ready");
    wait_for(
        "max clocks after the failure",
        Duration::from_secs(15),
        || {
            let all = json_lines(&agent.stdout());
            (rows(&all, "gpu_clock_max_hertz", Some("0")).len() >= 4).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    let asked = || {
        calls_to(
            &std::fs::read_to_string(&call_log).expect("log"),
            "max_clocks",
        )
    };
    let settled = asked();
    assert!(settled > 4, "asked again after failing: {settled}");
    let cycles = |agent: &Agent| rows(&json_lines(&agent.stdout()), "gpu_up", Some("0")).len();
    let now = cycles(&agent);
    wait_for("three more cycles", Duration::from_secs(10), || {
        (cycles(&agent) >= now + 3).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_eq!(asked(), settled, "read once it answered");
    let status = agent.terminate().expect("terminate");
    assert!(status.success());
    let all = json_lines(&agent.stdout());
    let first_up = rows(&all, "gpu_up", Some("0"))[0]["timestamp_ms"].as_i64();
    let first_max = rows(&all, "gpu_clock_max_hertz", Some("0"))[0]["timestamp_ms"].as_i64();
    assert!(
        first_max > first_up,
        "absent while failing, never a stale or zero value"
    );
}

#[test]
fn a_lost_gpu_reports_up_0_while_the_others_continue_and_comes_back() {
    let work = Workdir::new();
    let config = stdout_agent_config("250ms");
    let mut agent = Agent::start(
        &work,
        &config,
        &[("NVML_SIM_SCENARIO", &scenario("lost-gpu.toml"))],
    )
    .expect("start");
    agent.wait_ready().expect("ready");
    let up_rows = |agent: &Agent, gpu: &str| -> Vec<Value> {
        rows(&json_lines(&agent.stdout()), "gpu_up", Some(gpu))
            .into_iter()
            .cloned()
            .collect()
    };
    let lost = wait_for("GPU 2 to be lost", Duration::from_secs(15), || {
        up_rows(&agent, "2").into_iter().find(|r| r["value"] == 0.0)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    // Reported under its last identity.
    assert_eq!(
        lost["labels"]["uuid"],
        "GPU-5f7c0002-1d2e-4c3b-9a8f-0e1d2c3b0002"
    );
    assert_eq!(lost["labels"]["name"], "NVIDIA H100 80GB HBM3");
    assert!(agent.stderr().contains("GPU 2 has fallen off the bus"));
    // While it is lost, its other metrics are not served, and the others carry on.
    let lost_ts = lost["timestamp_ms"].as_i64().expect("ts");
    let all = json_lines(&agent.stdout());
    assert!(!all.iter().any(|r| r["name"] == "gpu_temperature_celsius"
        && r["labels"]["gpu"] == "2"
        && r["timestamp_ms"] == lost_ts));
    for other in ["0", "1", "3"] {
        assert!(all.iter().any(|r| r["name"] == "gpu_up"
            && r["labels"]["gpu"] == other
            && r["timestamp_ms"] == lost_ts
            && r["value"] == 1.0));
    }
    let back = wait_for("GPU 2 to come back", Duration::from_secs(20), || {
        up_rows(&agent, "2")
            .into_iter()
            .filter(|r| r["timestamp_ms"].as_i64() > Some(lost_ts))
            .find(|r| r["value"] == 1.0)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    // What is read once per GPU is read again when it comes back (a reset may change it).
    let back_ts = back["timestamp_ms"].as_i64();
    assert!(rows(
        &json_lines(&agent.stdout()),
        "gpu_clock_max_hertz",
        Some("2")
    )
    .iter()
    .any(|r| r["timestamp_ms"].as_i64() == back_ts));
    // Lost for 5 s at 250 ms: one line when it went and one when it came back, not one per
    // collection.
    let logs = agent.stderr();
    let went = logs.matches("has fallen off the bus").count();
    assert_eq!(went, 1, "{logs}");
    assert!(logs.contains("GPU answers NVML again"), "{logs}");
    let status = agent.terminate().expect("terminate");
    assert!(status.success());
}

/// A GPU that was lost and is back has every tiered group and constant read again at once (a
/// reset may have changed them), however long until the group would be due; the GPUs that
/// stayed keep serving their last reading.
#[test]
fn tiered_values_are_read_again_when_a_lost_gpu_comes_back() {
    let work = Workdir::new();
    let (mut agent, call_log) = agent_logging_calls(
        &work,
        "lost-gpu.toml",
        "250ms",
        "read_every = { energy = 1000, errors = 1000, state = 1000, processes = 1000 }",
    );
    let energy_of = |agent: &Agent, gpu: &str| -> Vec<(i64, f64)> {
        rows(
            &json_lines(&agent.stdout()),
            "gpu_energy_consumed_joules_total",
            Some(gpu),
        )
        .iter()
        .map(|r| {
            (
                r["timestamp_ms"].as_i64().expect("ts"),
                r["value"].as_f64().expect("number"),
            )
        })
        .collect()
    };
    let up_rows = |agent: &Agent| -> Vec<Value> {
        rows(&json_lines(&agent.stdout()), "gpu_up", Some("2"))
            .into_iter()
            .cloned()
            .collect()
    };
    let lost_ts = wait_for("GPU 2 to be lost", Duration::from_secs(15), || {
        up_rows(&agent)
            .into_iter()
            .find(|r| r["value"] == 0.0)
            .and_then(|r| r["timestamp_ms"].as_i64())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    let back_ts = wait_for("GPU 2 to come back", Duration::from_secs(20), || {
        up_rows(&agent)
            .into_iter()
            .filter(|r| r["timestamp_ms"].as_i64() > Some(lost_ts))
            .find(|r| r["value"] == 1.0)
            .and_then(|r| r["timestamp_ms"].as_i64())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    let status = agent.terminate().expect("terminate");
    assert!(status.success());
    let before: Vec<f64> = energy_of(&agent, "2")
        .into_iter()
        .filter(|(ts, _)| *ts < lost_ts)
        .map(|(_, v)| v)
        .collect();
    let after: Vec<f64> = energy_of(&agent, "2")
        .into_iter()
        .filter(|(ts, _)| *ts >= back_ts)
        .map(|(_, v)| v)
        .collect();
    assert!(
        !before.is_empty() && !after.is_empty(),
        "{before:?} {after:?}"
    );
    // One reading before the loss, served every cycle; a new one from the first cycle back.
    assert!(before.iter().all(|v| *v == before[0]), "{before:?}");
    assert!(after.iter().all(|v| *v == after[0]), "{after:?}");
    // 100 W for the 5 s it was away: 500 J more in the simulated counter.
    assert!(
        after[0] > before[0] + 400.0,
        "read again when back: {} then {}",
        before[0],
        after[0]
    );
    // GPU 0 stayed: its first reading is served throughout.
    let stayed = energy_of(&agent, "0");
    assert!(stayed.len() > before.len() + after.len());
    assert!(stayed.iter().all(|(_, v)| *v == stayed[0].1), "{stayed:?}");
    let calls = std::fs::read_to_string(&call_log).expect("call log");
    // Four GPUs read once, GPU 2 again when back.
    assert_eq!(calls_to(&calls, "total_energy"), 5);
    assert_eq!(calls_to(&calls, "power_management_limit"), 5);
    // The constants too: four max clocks per GPU, and GPU 2's four again when back; while it
    // was lost, each cycle's first query to it answered GPU_IS_LOST: a max clock from the
    // second lost cycle on (the first still had its constants).
    let lost_cycles = up_rows(&agent).iter().filter(|r| r["value"] == 0.0).count();
    let max_clocks = calls_to(&calls, "max_clocks");
    assert!(
        (5 * 4 + lost_cycles - 1..=5 * 4 + lost_cycles).contains(&max_clocks),
        "{max_clocks} max-clock calls, {lost_cycles} cycles lost"
    );
}

/// An agent collecting the simulated GPUs of `scenario` every 250 ms into a Prometheus sink
/// `prom` (with `sink_extra` appended to its table), ready.
fn prometheus_agent(work: &Workdir, scenario_file: &str, sink_extra: &str) -> Agent {
    let config = format!(
        "[agent]\ninterval = \"250ms\"\n[http]\nhealth_listen = \"127.0.0.1:{{health}}\"\nmetrics_listen = \"127.0.0.1:{{metrics}}\"\n{}[[sinks]]\nname = \"prom\"\nplugin = \"prometheus\"\n{sink_extra}",
        nvml_collector(&sim_library(), "")
    );
    let mut agent = Agent::start(
        work,
        &config,
        &[("NVML_SIM_SCENARIO", &scenario(scenario_file))],
    )
    .expect("start");
    agent.wait_ready().expect("ready");
    agent
}

/// The agent's `/metrics` body (empty when it does not answer).
fn scrape(agent: &Agent) -> String {
    metricsd_e2e::http_get(agent.metrics_port, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default()
}

#[test]
fn processes_that_end_go_stale_in_the_prometheus_exposition() {
    let work = Workdir::new();
    let agent = prometheus_agent(
        &work,
        "h100-sxm-8.toml",
        "[sinks.config]\nstale_after = \"1s\"\n",
    );
    wait_for("both processes", Duration::from_secs(10), || {
        let body = scrape(&agent);
        (body.contains("pid=\"4343\"") && body.contains("pid=\"4242\"")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    // The scenario ends process 4343 at 3 s; its series leave the exposition after stale_after.
    let body = wait_for("process 4343 to go stale", Duration::from_secs(15), || {
        let body = scrape(&agent);
        (!body.contains("pid=\"4343\"") && body.contains("pid=\"4242\"")).then_some(body)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", scrape(&agent)));
    assert!(body.contains("gpu_up{"));
}

#[test]
fn a_hanging_nvml_call_is_timed_out_and_the_next_cycle_recovers() {
    let work = Workdir::new();
    let config = format!(
        "[agent]\ninterval = \"250ms\"\ntimeout = \"500ms\"\nmax_backoff = \"1s\"\n[http]\nhealth_listen = \"127.0.0.1:{{health}}\"\nmetrics_listen = \"\"\n{}[[collectors]]\nname = \"hi\"\nplugin = \"hello\"\n",
        nvml_collector(&sim_library(), "")
    );
    let mut agent = Agent::start(
        &work,
        &config,
        &[("NVML_SIM_SCENARIO", &scenario("hang.toml"))],
    )
    .expect("start");
    agent.wait_ready().expect("ready");
    agent
        .wait_stat(
            "metricsd_collector_timeouts_total{collector=\"gpu\"}",
            1.0,
            Duration::from_secs(15),
        )
        .unwrap_or_else(|e| panic!("a timeout: {e}"));
    let before = agent
        .stat("metricsd_collector_collections_total{collector=\"gpu\"}")
        .unwrap_or(0.0);
    agent
        .wait_stat(
            "metricsd_collector_collections_total{collector=\"gpu\"}",
            before + 3.0,
            Duration::from_secs(15),
        )
        .unwrap_or_else(|e| panic!("collections after the hang: {e}"));
    assert_eq!(
        agent.stat("metricsd_collector_stale{collector=\"gpu\"}"),
        Some(0.0)
    );
    assert_eq!(
        agent.stat("metricsd_collector_up{collector=\"gpu\",plugin=\"nvml\"}"),
        Some(1.0)
    );
    assert!(agent
        .stat("metricsd_collector_collections_total{collector=\"hi\"}")
        .is_some_and(|v| v >= 4.0));
}

#[test]
fn a_missing_nvml_library_gives_a_clear_error_and_a_running_host() {
    let work = Workdir::new();
    let config = format!(
        "[agent]\ninterval = \"200ms\"\n[http]\nhealth_listen = \"127.0.0.1:{{health}}\"\nmetrics_listen = \"\"\n{}[[collectors]]\nname = \"hi\"\nplugin = \"hello\"\n",
        nvml_collector("/nonexistent/libnvidia-ml.so.1", "")
    );
    let mut agent = Agent::start(&work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    let health = wait_for("the NVML error in /health", Duration::from_secs(10), || {
        let (_, body) = agent.get_health("/health").ok()?;
        let v: Value = serde_json::from_str(&body).ok()?;
        (v["instances"]["gpu"]["state"] == "failing" && v["instances"]["hi"]["state"] == "ok")
            .then_some(v)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    let error = health["instances"]["gpu"]["last_error"]
        .as_str()
        .expect("error");
    assert!(
        error.contains("cannot load the NVML library /nonexistent/libnvidia-ml.so.1"),
        "{error}"
    );
    assert!(error.contains("is the NVIDIA driver installed?"), "{error}");
    assert_eq!(health["instances"]["hi"]["state"], "ok");
    assert!(agent.is_running());
}

/// DCGM field names, types and units from the reference table (dcgm-exporter's
/// default-counters), expanding its `NAME / _OTHER` shorthand.
fn dcgm_reference() -> Vec<(String, String, String)> {
    let text =
        std::fs::read_to_string(root().join("plugins/nvml/testdata/dcgm-exporter-fields.md"))
            .expect("reference table");
    let mut fields = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("| DCGM_")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (names, kind, unit) = (cells[1], cells[2], cells[3]);
        let mut parts = names.split(" / ");
        let first = parts.next().expect("a name").to_string();
        // "_X" abbreviates within the row's family of names (DCGM_FI_DEV_…, or
        // DCGM_FI_DEV_PCIE_… for the PCIe link row, as in dcgm_fields.h).
        let prefix = if first.starts_with("DCGM_FI_DEV_PCIE_") {
            "DCGM_FI_DEV_PCIE"
        } else {
            "DCGM_FI_DEV"
        };
        // "_X_" replaces the varying middle of the first name: in the NVLink error row,
        // `DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL / _CRC_DATA_ / _REPLAY_ / _RECOVERY_`.
        let infix = first
            .split_once("_CRC_FLIT_")
            .map(|(head, tail)| (head.to_string(), tail.to_string()));
        let mut names = vec![first];
        for p in parts {
            names.push(if p.starts_with("DCGM_") {
                p.to_string()
            } else if let (true, Some((head, tail))) = (p.ends_with('_'), &infix) {
                format!("{head}{p}{tail}")
            } else if p.starts_with("_PCIE") && prefix == "DCGM_FI_DEV_PCIE" {
                format!("DCGM_FI_DEV{p}")
            } else {
                format!("{prefix}{p}")
            });
        }
        for n in names {
            fields.push((n, kind.to_string(), unit.to_string()));
        }
    }
    fields
}

#[test]
fn the_dcgm_profile_matches_dcgm_exporter_names_types_units_and_labels() {
    let work = Workdir::new();
    let all = once_json(
        &work,
        "naming = \"dcgm\"",
        "h100-sxm-8.toml",
        &[("NODE_NAME", "gpu-node-17")],
    );
    let reference = dcgm_reference();
    assert!(reference.len() > 30, "reference parsed: {reference:?}");
    let mut emitted = std::collections::BTreeSet::new();
    for row in all
        .iter()
        .filter(|r| r["name"].as_str().is_some_and(|n| n.starts_with("DCGM_")))
    {
        let name = row["name"].as_str().expect("name");
        emitted.insert(name.to_string());
        let (_, kind, unit) = reference
            .iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("{name} is not a dcgm-exporter field"));
        assert!(
            kind.contains(row["kind"].as_str().expect("kind")),
            "{name}: {kind} vs {row}"
        );
        assert_eq!(row["unit"].as_str(), Some(unit.as_str()), "{name}");
        let labels = &row["labels"];
        for key in [
            "gpu",
            "UUID",
            "pci_bus_id",
            "device",
            "modelName",
            "Hostname",
            "DCGM_FI_DRIVER_VERSION",
        ] {
            assert!(
                labels[key].is_string(),
                "{name} lacks label {key}: {labels}"
            );
        }
        assert_eq!(labels["Hostname"], "gpu-node-17");
        assert_eq!(labels["DCGM_FI_DRIVER_VERSION"], "550.54.15");
        assert_eq!(labels["modelName"], "NVIDIA H100 80GB HBM3");
        assert_eq!(
            labels["device"],
            format!("nvidia{}", labels["gpu"].as_str().expect("gpu"))
        );
    }
    let dcgm = |name: &str| -> f64 {
        all.iter()
            .find(|r| r["name"] == name && r["labels"]["gpu"] == "0")
            .and_then(|r| r["value"].as_f64())
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert_eq!(dcgm("DCGM_FI_DEV_SM_CLOCK"), 1980.0);
    assert_eq!(dcgm("DCGM_FI_DEV_MEM_CLOCK"), 2619.0);
    assert_eq!(dcgm("DCGM_FI_DEV_GPU_TEMP"), 61.0);
    assert_eq!(dcgm("DCGM_FI_DEV_POWER_USAGE"), 512.345);
    assert_eq!(dcgm("DCGM_FI_DEV_GPU_UTIL"), 87.0);
    assert_eq!(dcgm("DCGM_FI_DEV_MEM_COPY_UTIL"), 41.0);
    assert_eq!(dcgm("DCGM_FI_DEV_FB_USED"), 40960.0);
    assert_eq!(dcgm("DCGM_FI_DEV_FB_RESERVED"), 540.0);
    assert_eq!(dcgm("DCGM_FI_DEV_CLOCKS_EVENT_REASONS"), 4.0);
    assert_eq!(dcgm("DCGM_FI_DEV_ECC_DBE_AGG_TOTAL"), 1.0);
    assert_eq!(dcgm("DCGM_FI_DEV_MEMORY_TEMP"), 48.0);
    assert_eq!(dcgm("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS"), 3.0);
    assert_eq!(dcgm("DCGM_FI_DEV_RETIRED_SBE"), 2.0);
    assert_eq!(dcgm("DCGM_FI_DEV_RETIRED_DBE"), 1.0);
    assert!(dcgm("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION") >= 1.0e9);
    // NVLink errors: per GPU by default (the field-values totals, one series per type), per
    // link with `nvlink_link_errors` (one per link and type); the per-link counters sum to the
    // totals, and the dcgm names carry the totals.
    let plain = once_json(&work, "", "h100-sxm-8.toml", &[]);
    let per_link = once_json(&work, "nvlink_link_errors = true", "h100-sxm-8.toml", &[]);
    for (kind, field) in [
        ("replay", "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL"),
        ("recovery", "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL"),
        ("crc_flit", "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL"),
        ("crc_data", "DCGM_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL"),
    ] {
        let of_kind = |all: &[Value]| -> Vec<Value> {
            rows(all, "gpu_nvlink_errors_total", Some("0"))
                .into_iter()
                .filter(|r| r["labels"]["type"] == kind)
                .cloned()
                .collect()
        };
        let totals = of_kind(&plain);
        assert_eq!(totals.len(), 1, "{kind}: {totals:?}");
        assert!(totals[0]["labels"]["link"].is_null(), "{totals:?}");
        let links = of_kind(&per_link);
        assert!(links.len() >= 17, "{kind}: {links:?}");
        assert!(links.iter().all(|r| r["labels"]["link"].is_string()));
        let sum: f64 = links.iter().filter_map(|r| r["value"].as_f64()).sum();
        assert_eq!(totals[0]["value"].as_f64(), Some(sum), "{kind}");
        assert_eq!(dcgm(field), sum, "{field}");
    }
    assert!(dcgm("DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL") > 0.0);
    // A card without NVLink (the RTX 4090 scenario) has no NVLink series: checked in
    // not_supported_queries_are_absent_and_asked_once.
    assert!(emitted.len() >= 25, "{emitted:?}");
    // Metrics dcgm-exporter lacks keep metricsd's names.
    assert!(all
        .iter()
        .any(|r| r["name"] == "gpu_up" && r["labels"]["uuid"].is_string()));
    assert!(!all.iter().any(|r| r["name"] == "gpu_temperature_celsius"));
}

#[test]
fn xid_errors_are_counted_per_gpu_and_code_from_the_event_thread() {
    let work = Workdir::new();
    let config = stdout_agent_config("250ms");
    let mut agent = Agent::start(
        &work,
        &config,
        &[("NVML_SIM_SCENARIO", &scenario("xid.toml"))],
    )
    .expect("start");
    agent.wait_ready().expect("ready");
    let latest = |agent: &Agent, name: &str, gpu: &str, xid: Option<&str>| -> Option<f64> {
        let all = json_lines(&agent.stdout());
        all.iter()
            .rev()
            .find(|r| {
                r["name"] == name
                    && r["labels"]["gpu"] == gpu
                    && xid.is_none_or(|x| r["labels"]["xid"] == x)
            })
            .and_then(|r| r["value"].as_f64())
    };
    wait_for("all three Xid events", Duration::from_secs(15), || {
        (latest(&agent, "gpu_xid_errors_total", "3", Some("79")) == Some(1.0)
            && latest(&agent, "gpu_xid_errors_total", "1", Some("48")) == Some(1.0))
        .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_eq!(
        latest(&agent, "gpu_xid_errors_total", "1", Some("79")),
        Some(1.0)
    );
    assert_eq!(latest(&agent, "gpu_last_xid", "1", None), Some(48.0));
    assert_eq!(latest(&agent, "gpu_last_xid", "3", None), Some(79.0));
    assert!(
        latest(&agent, "gpu_last_xid", "0", None).is_none(),
        "no Xid, no series"
    );
    let at = latest(&agent, "gpu_last_xid_timestamp_seconds", "1", None).expect("timestamp");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(now - at < 60.0 && at <= now, "{at} vs {now}");
    let rows = json_lines(&agent.stdout());
    let xid_row = rows
        .iter()
        .find(|r| r["name"] == "gpu_xid_errors_total" && r["labels"]["gpu"] == "1")
        .expect("row");
    assert_eq!(
        xid_row["labels"]["uuid"],
        "GPU-5f7c0001-1d2e-4c3b-9a8f-0e1d2c3b0001"
    );
    assert!(agent.stderr().contains("critical Xid error 79"));
    let status = agent.terminate().expect("terminate");
    assert!(status.success(), "the event thread stops with the instance");
}

#[test]
fn gpm_metrics_come_from_the_plugins_own_thread_once_per_collection() {
    let work = Workdir::new();
    let (mut agent, call_log) = agent_logging_calls(&work, "h100-sxm-8.toml", "250ms", "");
    let latest = |agent: &Agent, name: &str, gpu: &str| -> Option<f64> {
        json_lines(&agent.stdout())
            .iter()
            .rev()
            .find(|r| r["name"] == name && r["labels"]["gpu"] == gpu)
            .and_then(|r| r["value"].as_f64())
    };
    wait_for("GPM metrics", Duration::from_secs(15), || {
        latest(&agent, "gpu_sm_active_ratio", "7")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    for (name, want) in [
        ("gpu_graphics_engine_active_ratio", 0.92),
        ("gpu_sm_active_ratio", 0.88),
        ("gpu_sm_occupancy_ratio", 0.47),
        ("gpu_tensor_active_ratio", 0.63),
        ("gpu_dram_active_ratio", 0.71),
        ("gpu_fp64_active_ratio", 0.02),
        ("gpu_fp32_active_ratio", 0.15),
        ("gpu_fp16_active_ratio", 0.30),
    ] {
        let got = latest(&agent, name, "0").unwrap_or_else(|| panic!("{name} missing"));
        assert!((got - want).abs() < 1e-9, "{name}: {got} vs {want}");
    }
    let status = agent.terminate().expect("terminate");
    assert!(status.success(), "the GPM thread stops with the instance");
    // One sample per GPU at the start and one per collection (a sample costs about 2.7 ms of
    // CPU on an H200, so none is taken between collections).
    let cycles = rows(&json_lines(&agent.stdout()), "gpu_up", Some("0")).len();
    let samples = calls_to(
        &std::fs::read_to_string(&call_log).expect("call log"),
        "gpm_sample",
    );
    assert!(
        samples >= 8 * cycles && samples <= 8 * (cycles + 2),
        "{samples} GPM samples for {cycles} collections of 8 GPUs"
    );

    // A GPU without GPM (the A100 scenario) has no GPM series.
    let all = once_json(&work, "", "a100.toml", &[]);
    assert!(rows(&all, "gpu_sm_active_ratio", None).is_empty());
}

#[test]
fn a_lost_gpus_series_leave_the_exposition_at_once_not_after_stale_after() {
    let work = Workdir::new();
    // The sink's default stale_after (1 m): only the staleness markers the agent sends for
    // the series a collection no longer has can remove them within the test.
    let agent = prometheus_agent(&work, "lost-gpu.toml", "");
    let temperature_of = |body: &str, gpu: &str| {
        body.lines().any(|l| {
            l.starts_with("gpu_temperature_celsius{") && l.contains(&format!("gpu=\"{gpu}\""))
        })
    };
    wait_for("GPU 2's temperature", Duration::from_secs(10), || {
        temperature_of(&scrape(&agent), "2").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    // Lost at 3 s: gpu_up 0, and its other series gone within a few collections.
    let body = wait_for(
        "GPU 2 lost and its series gone",
        Duration::from_secs(10),
        || {
            let body = scrape(&agent);
            (series_line(&body, "gpu_up", "2").is_some_and(|l| l.ends_with(" 0"))
                && !temperature_of(&body, "2"))
            .then_some(body)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", scrape(&agent)));
    assert!(temperature_of(&body, "1"), "the other GPUs stay: {body}");
    // Back at 8 s: its series return.
    wait_for("GPU 2 back", Duration::from_secs(15), || {
        temperature_of(&scrape(&agent), "2").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
}

/// The line of `metric` for one GPU.
fn series_line(body: &str, metric: &str, gpu: &str) -> Option<String> {
    body.lines()
        .find(|l| l.starts_with(&format!("{metric}{{")) && l.contains(&format!("gpu=\"{gpu}\"")))
        .map(str::to_string)
}
