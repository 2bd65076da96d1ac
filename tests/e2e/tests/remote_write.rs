//! The remote-write sink against a real VictoriaMetrics (Debian's `victoria-metrics`): series
//! read back through its query API, an outage filled from the agent's buffer, and a fleet of
//! agents pushing into one server.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use metricsd_e2e::servers::VictoriaMetrics;
use metricsd_e2e::{build, json_lines, root, rss_kib, scripted, wait_for, Agent, Workdir};
use metricsd_prompb::{MetricMetadata, MetricType, WriteRequest};
use prost::Message as _;
use serde_json::Value;

fn nvml_collector_from(dir: &std::path::Path) -> String {
    format!(
        "[[collectors]]\nname = \"gpu\"\nplugin = \"nvml\"\n[collectors.config]\nlibrary_path = \"{}\"\n",
        dir.join("libnvml_sim.so").display()
    )
}

fn scenario(name: &str) -> String {
    let path: PathBuf = root().join("tests/nvml-sim/scenarios").join(name);
    assert!(path.is_file(), "{}", path.display());
    path.display().to_string()
}

/// An agent config: `[agent]` with `labels`, the health listener only, the given collectors
/// and sinks.
fn config(interval: &str, labels: &str, collectors: &str, sinks: &str) -> String {
    format!(
        "[agent]\ninterval = \"{interval}\"\nmax_backoff = \"1s\"\ninternal_metrics = false\n[agent.labels]\n{labels}\n[http]\nhealth_listen = \"127.0.0.1:{{health}}\"\nmetrics_listen = \"\"\n{collectors}{sinks}"
    )
}

fn nvml_collector() -> String {
    nvml_collector_from(&build())
}

fn remote_write_sink(url: &str, extra: &str) -> String {
    format!(
        "[[sinks]]\nname = \"vm\"\nplugin = \"remote_write\"\n{extra}\n[sinks.config]\nurl = \"{url}\"\n"
    )
}

/// A series' identity: its name and labels, sorted.
type SeriesKey = (String, BTreeMap<String, String>);

/// (timestamp, value) pairs per series.
type Points = BTreeMap<SeriesKey, BTreeMap<i64, f64>>;

/// What the stdout sink printed, as points (non-finite values left out).
fn printed_points(stdout: &str) -> Points {
    let mut points = Points::new();
    for row in json_lines(stdout) {
        let Some(value) = row["value"].as_f64() else {
            continue;
        };
        let labels: BTreeMap<String, String> = row["labels"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .filter(|(_, v)| !v.is_empty())
            .collect();
        let name = row["name"].as_str().unwrap_or_default().to_string();
        let ts = row["timestamp_ms"].as_i64().expect("timestamp");
        points.entry((name, labels)).or_default().insert(ts, value);
    }
    points
}

/// What VictoriaMetrics holds for `selector`, as points.
fn stored_points(vm: &VictoriaMetrics, selector: &str) -> Points {
    let mut points = Points::new();
    for s in vm.export(selector).unwrap_or_default() {
        let mut labels: BTreeMap<String, String> = s["metric"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect();
        let name = labels.remove("__name__").unwrap_or_default();
        let values = s["values"].as_array().cloned().unwrap_or_default();
        let stamps = s["timestamps"].as_array().cloned().unwrap_or_default();
        let entry = points.entry((name, labels)).or_default();
        for (t, v) in stamps.iter().zip(values.iter()) {
            if let (Some(t), Some(v)) = (t.as_i64(), v.as_f64()) {
                entry.insert(t, v);
            }
        }
    }
    points
}

fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

#[test]
fn series_read_back_from_victoria_metrics_match_what_the_agent_collected() {
    build();
    let work = Workdir::new();
    let vm = VictoriaMetrics::start(&work).expect("victoria-metrics");
    // The stdout sink receives the same samples: what it printed is what must arrive.
    let sinks = format!(
        "{}[[sinks]]\nname = \"out\"\nplugin = \"stdout\"\n",
        remote_write_sink(&vm.write_url(), "")
    );
    let collectors = format!(
        "{}[[collectors]]\nname = \"system\"\nplugin = \"system\"\n",
        nvml_collector()
    );
    let labels = "node_id = \"node-7\"\nprovider = \"acme gpu\"\nregion = \"eu-west\"";
    let scenario = scenario("h100-sxm-2.toml");
    let mut agent = Agent::start(
        &work,
        &config("500ms", labels, &collectors, &sinks),
        &[("NVML_SIM_SCENARIO", scenario.as_str())],
    )
    .expect("start");
    agent.wait_ready().expect("ready");
    wait_for("three writes", Duration::from_secs(30), || {
        (agent
            .stat("metricsd_sink_writes_total{sink=\"vm\"}")
            .unwrap_or(0.0)
            >= 3.0)
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    // A clean stop delivers what is queued.
    assert!(agent.terminate().expect("stop").success());
    let printed = printed_points(&agent.stdout());
    let names: BTreeSet<&str> = printed.keys().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "gpu_temperature_celsius",
        "gpu_power_usage_watts",
        "gpu_info",
        "node_cpu_seconds_total",
        "node_memory_MemTotal_bytes",
        "node_load1",
    ] {
        assert!(
            names.contains(expected),
            "{expected} not collected: {names:?}"
        );
    }
    let stored = wait_for(
        "every printed sample in VictoriaMetrics",
        Duration::from_secs(30),
        || {
            let stored = stored_points(&vm, "{node_id=\"node-7\"}");
            printed
                .iter()
                .all(|(k, p)| stored.get(k).is_some_and(|s| s.len() >= p.len()))
                .then_some(stored)
        },
    )
    .unwrap_or_else(|e| {
        let stored = stored_points(&vm, "{node_id=\"node-7\"}");
        let missing: Vec<_> = printed
            .keys()
            .filter(|k| !stored.contains_key(*k))
            .take(5)
            .collect();
        panic!(
            "{e}: missing e.g. {missing:?}\n{}\n{}",
            agent.stderr(),
            vm.log()
        )
    });
    assert_eq!(
        stored.keys().collect::<Vec<_>>(),
        printed.keys().collect::<Vec<_>>(),
        "the same series, names and labels (static labels included)"
    );
    for (key, points) in &printed {
        let got = &stored[key];
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            points.keys().collect::<Vec<_>>(),
            "timestamps of {key:?}"
        );
        for (t, v) in points {
            assert!(
                close(got[t], *v),
                "{key:?} at {t}: stored {} printed {v}",
                got[t]
            );
        }
    }
    let temp = printed
        .iter()
        .find(|((n, l), _)| {
            n == "gpu_temperature_celsius" && l.get("gpu").map(String::as_str) == Some("0")
        })
        .expect("gpu 0 temperature");
    assert_eq!(temp.0 .1["provider"], "acme gpu");
    assert_eq!(temp.0 .1["region"], "eu-west");
    // The scenario's temperature: 55 °C ± 10 over two minutes.
    assert!(
        temp.1.values().all(|v| (45.0..=65.0).contains(v)),
        "{:?}",
        temp.1
    );
}

/// The testkit's `testkit_calls_total` values stored in VictoriaMetrics, sorted.
fn calls_stored(vm: &VictoriaMetrics) -> Vec<i64> {
    let mut calls: Vec<i64> = stored_points(vm, "testkit_calls_total")
        .into_values()
        .flat_map(|p| p.into_values())
        .map(|v| v as i64)
        .collect();
    calls.sort_unstable();
    calls
}

/// An agent with `collectors` (a testkit one among them) every 200 ms into `vm`, once `calls`
/// of its collections are stored.
fn testkit_into(work: &Workdir, vm: &VictoriaMetrics, collectors: &str, calls: usize) -> Agent {
    let mut agent = Agent::start(
        work,
        &config(
            "200ms",
            "node_id = \"n1\"",
            collectors,
            &remote_write_sink(&vm.write_url(), ""),
        ),
        &[],
    )
    .expect("start");
    agent.wait_ready().expect("ready");
    wait_for(
        &format!("{calls} calls stored"),
        Duration::from_secs(30),
        || (calls_stored(vm).len() >= calls).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    agent
}

#[test]
fn an_outage_is_filled_from_the_buffer_when_the_server_returns() {
    build();
    let work = Workdir::new();
    let mut vm = VictoriaMetrics::start(&work).expect("victoria-metrics");
    let agent = testkit_into(
        &work,
        &vm,
        "[[collectors]]\nname = \"tk\"\nplugin = \"testkit\"\n",
        5,
    );
    vm.stop();
    let stopped = Instant::now();
    wait_for("failed writes", Duration::from_secs(20), || {
        (agent
            .stat("metricsd_sink_write_errors_total{kind=\"transient\",sink=\"vm\"}")
            .unwrap_or(0.0)
            >= 2.0)
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    // Down for at least 4 s: some 20 collections wait in the queue.
    std::thread::sleep(Duration::from_secs(4).saturating_sub(stopped.elapsed()));
    let (_, health) = agent.get_health("/health").expect("health");
    assert!(health.contains("vm"), "{health}");
    let calls_during = agent
        .stat("metricsd_collector_collections_total{collector=\"tk\"}")
        .unwrap_or(0.0) as i64;
    vm.restart().expect("restart");
    let calls = wait_for("the gap filled", Duration::from_secs(40), || {
        let calls = calls_stored(&vm);
        let highest = calls.last().copied().unwrap_or(0);
        let distinct: BTreeSet<i64> = calls.iter().copied().collect();
        (highest >= calls_during + 5 && distinct.len() as i64 == highest).then_some(calls)
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", calls_stored(&vm), agent.stderr()));
    let distinct: BTreeSet<i64> = calls.iter().copied().collect();
    assert_eq!(
        distinct.into_iter().collect::<Vec<_>>(),
        (1..=*calls.last().expect("some")).collect::<Vec<_>>(),
        "every collection, before, during and after the outage"
    );
    assert_eq!(
        agent
            .stat("metricsd_sink_dropped_samples_total{reason=\"queue_full\",sink=\"vm\"}")
            .unwrap_or(0.0),
        0.0
    );
    assert_stored_is_written(&agent, &vm);
}

/// Samples VictoriaMetrics holds (each series' distinct timestamps).
fn stored_count(vm: &VictoriaMetrics) -> f64 {
    stored_points(vm, "{__name__=~\".+\"}")
        .values()
        .map(|p| p.len() as f64)
        .sum()
}

/// Checks the agent's accounts (received = written + dropped + queued, nothing dropped) and
/// that VictoriaMetrics comes to hold what the agent counted written (it makes new samples
/// searchable after a second or so), and no more than the agent counts written after.
fn assert_stored_is_written(agent: &Agent, vm: &VictoriaMetrics) {
    let accounts = agent.settled_accounts("vm", 1000.0).expect("accounts");
    assert_eq!(accounts.dropped, 0.0, "{accounts:?}");
    let stored = wait_for(
        "VictoriaMetrics to hold what was written",
        Duration::from_secs(30),
        || {
            let stored = stored_count(vm);
            (stored >= accounts.written).then_some(stored)
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {} stored, {accounts:?}", stored_count(vm)));
    let after = agent.accounts("vm").expect("accounts");
    assert!(
        stored <= after.written,
        "VictoriaMetrics holds {stored} samples, more than the {} the agent counts written",
        after.written
    );
}

#[test]
fn a_reserved_label_is_refused_by_the_host_alone_and_counted() {
    build();
    let work = Workdir::new();
    let vm = VictoriaMetrics::start(&work).expect("victoria-metrics");
    // A label name Prometheus reserves (`__…`): refused by the host for every sink and counted
    // as invalid there; the collector's other samples are written.
    let collectors =
        "[[collectors]]\nname = \"tk\"\nplugin = \"testkit\"\n[collectors.config]\nlabels = { __reserved = \"x\" }\n";
    let agent = testkit_into(&work, &vm, collectors, 3);
    let invalid = agent
        .stat("metricsd_collector_invalid_samples_total{collector=\"tk\"}")
        .unwrap_or(0.0);
    assert!(invalid >= 3.0, "{invalid}\n{}", agent.stderr());
    assert!(stored_points(&vm, "testkit_value").is_empty());
    assert!(!stored_points(&vm, "testkit_calls_total").is_empty());
    let log = agent.stderr();
    assert!(log.contains("reserved label name `__reserved`"), "{log}");
    assert_eq!(
        log.matches("reserved label name").count(),
        1,
        "logged once: {log}"
    );
}

/// /proc/<pid>/stat: user + system CPU in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0);
    let stime: u64 = fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
    utime + stime
}

/// Number of agents, and how long they push (`METRICSD_FLEET_AGENTS`, `METRICSD_FLEET_SECS`
/// change them for a benchmark run; the test suite runs the 50 for a minute).
fn fleet_size() -> (usize, u64) {
    let agents = std::env::var("METRICSD_FLEET_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let secs = std::env::var("METRICSD_FLEET_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    (agents, secs)
}

/// 50 agents, each its own node with 8 simulated GPUs collected every second, push into one
/// VictoriaMetrics for a minute; what each agent counted as written is stored, no GPU's
/// series has a gap. Optimised builds (`fleet` profile): 50 debug agents would need more than
/// this machine's two cores.
#[test]
fn a_fleet_of_fifty_agents_loses_nothing() {
    let dir = metricsd_e2e::build_optimised();
    let (n, secs) = fleet_size();
    let work = Workdir::new();
    let vm = VictoriaMetrics::start(&work).expect("victoria-metrics");
    let scenario = scenario("h100-sxm-8.toml");
    let mut agents: Vec<Agent> = (0..n)
        .map(|i| {
            let labels = format!("node_id = \"node-{i:02}\"\nprovider = \"p{}\"", i % 3);
            Agent::start_named_from(
                &dir,
                &work,
                &format!("node-{i:02}"),
                &config(
                    "1s",
                    &labels,
                    &nvml_collector_from(&dir),
                    &remote_write_sink(&vm.write_url(), ""),
                ),
                &[("NVML_SIM_SCENARIO", scenario.as_str())],
            )
            .expect("start")
        })
        .collect();
    for a in agents.iter_mut() {
        a.wait_ready().expect("ready");
    }
    let started = Instant::now();
    let ticks_at_start: Vec<u64> = agents.iter().map(|a| cpu_ticks(a.pid())).collect();
    std::thread::sleep(Duration::from_secs(secs));
    let cpu_secs: f64 = agents
        .iter()
        .zip(&ticks_at_start)
        .map(|(a, t0)| cpu_ticks(a.pid()).saturating_sub(*t0))
        .sum::<u64>() as f64
        / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
    let elapsed = started.elapsed().as_secs_f64();
    let rss: Vec<u64> = agents.iter().map(|a| rss_kib(a.pid())).collect();
    // What each agent says it wrote, then a clean stop (all at once), which may write one more
    // collection.
    let mut written = Vec::new();
    for a in agents.iter() {
        let w = a
            .stat("metricsd_sink_samples_written_total{sink=\"vm\"}")
            .unwrap_or(0.0);
        let per_collection = a
            .stat("metricsd_collector_samples_total{collector=\"gpu\"}")
            .unwrap_or(0.0)
            / a.stat("metricsd_collector_collections_total{collector=\"gpu\"}")
                .unwrap_or(1.0);
        let dropped: f64 = a
            .stats()
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("metricsd_sink_dropped_samples_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        assert_eq!(dropped, 0.0, "{}", a.stderr());
        let pid = nix::unistd::Pid::from_raw(a.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        written.push((w, per_collection));
    }
    for a in agents.iter_mut() {
        assert!(a.terminate().expect("stopped").success(), "{}", a.stderr());
    }
    eprintln!(
        "fleet: {n} agents x 8 simulated GPUs, 1 s interval, {elapsed:.0} s: agents' CPU {:.2} s in all ({:.2} % of one core per agent), RSS mean {:.1} MiB, max {:.1} MiB, total {:.0} MiB",
        cpu_secs,
        100.0 * cpu_secs / elapsed / n as f64,
        rss.iter().sum::<u64>() as f64 / n as f64 / 1024.0,
        rss.iter().copied().max().unwrap_or(0) as f64 / 1024.0,
        rss.iter().sum::<u64>() as f64 / 1024.0,
    );
    let samples_per_node = |node: &str| -> f64 {
        let text = ureq::get(&format!("http://127.0.0.1:{}/api/v1/query", vm.port))
            .query(
                "query",
                &format!("sum(count_over_time({{node_id=\"{node}\"}}[1h]))"),
            )
            .call()
            .ok()
            .and_then(|r| r.into_string().ok())
            .unwrap_or_default();
        serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| {
                v["data"]["result"][0]["value"][1]
                    .as_str()
                    .map(String::from)
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    for (i, (written, per_collection)) in written.iter().enumerate() {
        let node = format!("node-{i:02}");
        assert!(
            *written >= (secs as f64 - 5.0) * per_collection,
            "{node} wrote only {written} samples"
        );
        // Everything the agent counted as written is stored (at most one more collection,
        // written during the clean stop).
        let stored = wait_for(
            &format!("{node}'s samples stored"),
            Duration::from_secs(60),
            || {
                let stored = samples_per_node(&node);
                (stored >= *written).then_some(stored)
            },
        )
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", samples_per_node(&node), agents[i].stderr()));
        assert!(
            stored <= written + per_collection,
            "{node}: {stored} stored, {written} written"
        );
    }
    // Every GPU of every node has a gap-free temperature series.
    let temps = stored_points(&vm, "gpu_temperature_celsius");
    assert_eq!(temps.len(), n * 8);
    for ((_, labels), points) in &temps {
        let stamps: Vec<i64> = points.keys().copied().collect();
        assert!(
            stamps.len() as u64 >= secs - 5,
            "{labels:?}: {}",
            stamps.len()
        );
        for w in stamps.windows(2) {
            // Under load a tick can be skipped (counted in metricsd_collector_skipped_total,
            // never collected, so not a delivery loss); two in a row would mean a stall.
            assert!(
                w[1] - w[0] <= 2500,
                "{labels:?}: gap from {} to {}",
                w[0],
                w[1]
            );
        }
    }
}

/// A request's `WriteRequest`, decompressed and decoded.
fn decode(request: &scripted::Request) -> WriteRequest {
    let raw = snap::raw::Decoder::new()
        .decompress_vec(&request.raw)
        .expect("a snappy block");
    WriteRequest::decode(raw.as_slice()).expect("a WriteRequest")
}

/// (value, timestamp) of every sample of `testkit_calls_total` in a request.
fn calls_in(request: &WriteRequest) -> Vec<(f64, i64)> {
    request
        .timeseries
        .iter()
        .filter(|t| {
            t.labels
                .iter()
                .any(|l| l.name == "__name__" && l.value == "testkit_calls_total")
        })
        .flat_map(|t| t.samples.iter().map(|s| (s.value, s.timestamp)))
        .collect()
}

fn testkit_agent(work: &Workdir, port: u16, extra: &str, env: &[(&str, &str)]) -> Agent {
    let url = format!("http://127.0.0.1:{port}/api/v1/write");
    let mut agent = Agent::start(
        work,
        &config(
            "300ms",
            "node_id = \"n1\"",
            "[[collectors]]\nname = \"tk\"\nplugin = \"testkit\"\n",
            &format!("{}{extra}", remote_write_sink(&url, "")),
        ),
        env,
    )
    .expect("start");
    agent.wait_ready().expect("ready");
    agent
}

#[test]
fn requests_carry_the_protocol_headers_auth_tenant_and_metadata() {
    build();
    let work = Workdir::new();
    let (port, seen) = scripted::serve(|_, _| (204, vec![], String::new()));
    let token = "rw-token-8f2a";
    let agent = testkit_agent(
        &work,
        port,
        "bearer_token_env = \"RW_TOKEN\"\nmetadata_interval = \"2s\"\n[sinks.config.headers]\nX-Scope-OrgID = \"tenant-1\"\n",
        &[("RW_TOKEN", token)],
    );
    let requests = wait_for("requests over 3 s", Duration::from_secs(30), || {
        let seen = seen.lock().ok()?.clone();
        (seen.len() >= 2 && seen.last()?.at.duration_since(seen[0].at) >= Duration::from_secs(3))
            .then_some(seen)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    for r in &requests {
        assert_eq!(r.header("content-encoding"), Some("snappy"));
        assert_eq!(r.header("content-type"), Some("application/x-protobuf"));
        assert_eq!(r.header("x-prometheus-remote-write-version"), Some("0.1.0"));
        assert_eq!(r.header("x-scope-orgid"), Some("tenant-1"));
        let bearer = format!("Bearer {token}");
        assert_eq!(r.header("authorization"), Some(bearer.as_str()));
        assert!(r
            .header("user-agent")
            .is_some_and(|u| u.starts_with("metricsd-remote-write/")));
    }
    let decoded: Vec<WriteRequest> = requests.iter().map(decode).collect();
    // Every series: `__name__`, the static label, labels sorted.
    for w in &decoded {
        for t in &w.timeseries {
            let names: Vec<&str> = t.labels.iter().map(|l| l.name.as_str()).collect();
            let mut sorted = names.clone();
            sorted.sort_unstable();
            assert_eq!(names, sorted);
            assert!(names.contains(&"__name__") && names.contains(&"node_id"));
        }
    }
    // Calls counted 1, 2, 3, … across the requests.
    let calls: Vec<f64> = decoded.iter().flat_map(calls_in).map(|c| c.0).collect();
    let expected: Vec<f64> = (1..=calls.len()).map(|c| c as f64).collect();
    assert_eq!(calls, expected);
    // Metadata in the first request, not in the next ones until 2 s have passed.
    let meta = |w: &WriteRequest| -> Option<MetricMetadata> {
        w.metadata
            .iter()
            .find(|m| m.metric_family_name == "testkit_calls_total")
            .cloned()
    };
    let first = meta(&decoded[0]).expect("metadata in the first request");
    assert_eq!(first.r#type, MetricType::Counter as i32);
    assert!(!first.help.is_empty());
    assert!(meta(&decoded[1]).is_none(), "not again at once");
    let again = requests
        .iter()
        .zip(&decoded)
        .skip(1)
        .find(|(_, w)| meta(w).is_some())
        .map(|(r, _)| r.at.duration_since(requests[0].at))
        .expect("metadata sent again");
    assert!(
        again >= Duration::from_millis(1900),
        "again after {again:?}"
    );
    assert!(!agent.stderr().contains(token));
}

#[test]
fn retry_after_is_honoured_refused_credentials_keep_the_points_and_too_large_splits() {
    build();
    let work = Workdir::new();
    // 1: 429 with Retry-After: 2; 2: 401; then bodies of more than one series: 413.
    let (port, seen) = scripted::serve(|n, r| match n {
        1 => (429, vec![("Retry-After".into(), "2".into())], String::new()),
        2 => (401, vec![], "bad token".into()),
        _ if decode(r).timeseries.len() > 1 => (413, vec![], String::new()),
        _ => (204, vec![], String::new()),
    });
    let agent = testkit_agent(&work, port, "auth_error_retry = \"1s\"\n", &[]);
    let requests = wait_for(
        "the held write accepted series by series",
        Duration::from_secs(60),
        || {
            let seen = seen.lock().ok()?.clone();
            let first = calls_in(&decode(seen.first()?));
            let accepted: Vec<(f64, i64)> = seen
                .iter()
                .map(decode)
                .filter(|w| w.timeseries.len() == 1)
                .flat_map(|w| calls_in(&w))
                .collect();
            first.iter().all(|c| accepted.contains(c)).then_some(seen)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    let gap = requests[1].at.duration_since(requests[0].at);
    assert!(
        gap >= Duration::from_millis(1900),
        "429 retried after {gap:?}"
    );
    let gap = requests[2].at.duration_since(requests[1].at);
    assert!(
        gap >= Duration::from_millis(900),
        "401 retried after {gap:?}"
    );
    // The write refused with 401 was not dropped: its samples came again.
    let held = calls_in(&decode(&requests[1]));
    let accepted: Vec<(f64, i64)> = requests
        .iter()
        .map(decode)
        .filter(|w| w.timeseries.len() == 1)
        .flat_map(|w| calls_in(&w))
        .collect();
    assert!(held.iter().all(|c| accepted.contains(c)), "{held:?}");
    assert!(agent.stderr().contains("refused the credentials"));
    assert_eq!(
        agent
            .stat("metricsd_sink_dropped_samples_total{reason=\"rejected\",sink=\"vm\"}")
            .unwrap_or(0.0),
        0.0
    );
}

#[test]
fn a_bad_request_drops_only_that_write_counts_it_and_logs_once() {
    build();
    let work = Workdir::new();
    // Requests 2 to 4 are refused with 400 and a message.
    let (port, seen) = scripted::serve(|n, _| {
        if (2..=4).contains(&n) {
            (400, vec![], "out of order sample".into())
        } else {
            (204, vec![], String::new())
        }
    });
    let agent = testkit_agent(&work, port, "", &[]);
    let requests = wait_for("six requests", Duration::from_secs(30), || {
        let seen = seen.lock().ok()?.clone();
        (seen.len() >= 6).then_some(seen)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    let samples = |r: &scripted::Request| -> usize {
        decode(r).timeseries.iter().map(|t| t.samples.len()).sum()
    };
    let refused: usize = requests[1..4].iter().map(samples).sum();
    let rejected = wait_for("the drops counted", Duration::from_secs(10), || {
        let n = agent
            .stat("metricsd_sink_dropped_samples_total{reason=\"rejected\",sink=\"vm\"}")
            .unwrap_or(0.0);
        (n >= refused as f64).then_some(n)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_eq!(rejected, refused as f64);
    // Every other sample the agent counts written is one the server accepted (204), and the
    // other way round: checked at a moment when no write is in flight.
    agent.wait_written_is_accepted("vm", || {
        let seen = seen.lock().ok()?.clone();
        Some(
            seen.iter()
                .enumerate()
                .filter(|(i, _)| !(1..=3).contains(i))
                .map(|(_, r)| samples(r) as f64)
                .sum(),
        )
    });
    // Not retried: each request carries new calls.
    let calls: Vec<Vec<(f64, i64)>> = requests.iter().map(|r| calls_in(&decode(r))).collect();
    for pair in calls.windows(2) {
        assert!(pair[0].iter().all(|c| !pair[1].contains(c)), "{calls:?}");
    }
    let log = agent.stderr();
    assert_eq!(
        log.matches("out of order sample").count(),
        1,
        "the server's message logged once: {log}"
    );
    assert!(log.contains("Bad Request (HTTP 400)"), "{log}");
}

#[test]
fn a_receiver_that_comes_back_gets_the_backlog_within_the_sink_max_backoff() {
    build();
    let work = Workdir::new();
    // The first 7 requests fail with 503; with a back-off doubling from 0.5 s and no cap the
    // 7th retry would come 32 s after the 6th. The sink's `max_backoff` (5 s by default)
    // bounds every wait, so the backlog goes out within 5 s of the receiver's return.
    let (port, seen) = scripted::serve(|n, _| {
        if n <= 7 {
            (503, vec![], "down for maintenance".into())
        } else {
            (204, vec![], String::new())
        }
    });
    // The agent's `max_backoff` (collectors') is long: it no longer holds sinks back.
    let url = format!("http://127.0.0.1:{port}/api/v1/write");
    let config = config(
        "300ms",
        "node_id = \"n1\"",
        "[[collectors]]\nname = \"tk\"\nplugin = \"testkit\"\n",
        &remote_write_sink(&url, ""),
    )
    .replace("max_backoff = \"1s\"", "max_backoff = \"5m\"");
    let mut agent = Agent::start(&work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    let requests = wait_for("nine requests", Duration::from_secs(60), || {
        let seen = seen.lock().ok()?.clone();
        (seen.len() >= 9).then_some(seen)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    let gaps: Vec<Duration> = requests
        .windows(2)
        .map(|w| w[1].at.duration_since(w[0].at))
        .collect();
    assert!(
        gaps.iter().all(|g| *g <= Duration::from_millis(5500)),
        "waits between requests: {gaps:?}"
    );
    // The backlog of the outage arrived: every call from the first on.
    let calls: BTreeSet<i64> = requests
        .iter()
        .skip(7)
        .flat_map(|r| calls_in(&decode(r)))
        .map(|(v, _)| v as i64)
        .collect();
    let first_calls: BTreeSet<i64> = (1..=3).collect();
    assert!(calls.is_superset(&first_calls), "{calls:?}");
}
