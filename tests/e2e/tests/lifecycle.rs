//! Config errors, `/health` of the built binary, and shutdown on SIGTERM.

use std::time::Duration;

use metricsd_e2e::{json_lines, proc_status, wait_for, Agent, Workdir};

fn check(config: &str) -> (Option<i32>, String) {
    let work = Workdir::new();
    let path = work.write("c.toml", config);
    let out = work.metricsd(&["-c", path.to_str().expect("path"), "check"], &[]);
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn config_errors_name_the_key_or_plugin() {
    let cases = [
        ("[agent]\ninterval = \"5s\"\ncolour = \"blue\"\n", &["agent", "unknown field `colour`"][..]),
        ("[agent]\ninterval = \"fast\"\n", &["`agent.interval`", "fast"][..]),
        ("[agent]\nqueue_capacity = \"many\"\n", &["`agent.queue_capacity`"][..]),
        (
            "[[collectors]]\nname = \"gpu\"\nplugin = \"helo\"\n",
            &["collector `gpu`", "no plugin named `helo`", "did you mean `hello`"][..],
        ),
        (
            "[[collectors]]\nname = \"gpu\"\nplugin = \"stdout\"\n",
            &["collector `gpu`", "is a sink, not a collector"][..],
        ),
        (
            "[[collectors]]\nname = \"gpu\"\nplugin = \"hello\"\n[collectors.config]\ngreeting = 7\n",
            &["collector `gpu`", "`greeting`", "invalid type"][..],
        ),
        (
            "[[collectors]]\nname = \"gpu\"\nplugin = \"hello\"\n[collectors.config]\ngreting = \"x\"\n",
            &["unknown field `greting`"][..],
        ),
        // The plugin's own validation (hello's `validate`), not only the parse.
        (
            "[[collectors]]\nname = \"gpu\"\nplugin = \"hello\"\n[collectors.config]\ngreeting = \"\"\n",
            &["collector `gpu`", "`greeting` must not be empty"][..],
        ),
    ];
    for (config, needles) in cases {
        let (code, text) = check(config);
        assert_eq!(code, Some(2), "{config}\n{text}");
        for n in needles {
            assert!(
                text.contains(n),
                "expected `{n}` for\n{config}\ngot:\n{text}"
            );
        }
    }
    let (code, text) = check("[[collectors]]\nname = \"gpu\"\nplugin = \"hello\"\n");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("config ok"));
}

#[test]
fn log_level_warning_keeps_warnings_and_a_word_that_is_not_a_level_is_refused() {
    // tracing reads a bare word as a target name: `warning` or a typo silenced every line.
    let work = Workdir::new();
    let path = work.write(
        "c.toml",
        "[[collectors]]\nname = \"hi\"\nplugin = \"hello\"\n",
    );
    let path = path.to_str().expect("path");
    let out = work.metricsd(&["-c", path, "check"], &[("LOG_LEVEL", "loud")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("LOG_LEVEL") && stderr.contains("`loud` is not a log level"),
        "{stderr}"
    );
    let out = work.metricsd(&["-c", path, "run"], &[("LOG_LEVEL", "verbose")]);
    assert_eq!(out.status.code(), Some(2));

    let mut agent = Agent::start(
        &work,
        r#"
[agent]
interval = "200ms"
[http]
health_listen = "127.0.0.1:{health}"
metrics_listen = ""
[[collectors]]
name = "broken"
plugin = "testkit"
[collectors.config]
fail_from = 1
[[sinks]]
name = "out"
plugin = "stdout"
"#,
        &[("LOG_LEVEL", "warning")],
    )
    .expect("start");
    agent.wait_ready().expect("ready");
    wait_for(
        "the failing collector's warning",
        Duration::from_secs(10),
        || {
            agent
                .stderr()
                .lines()
                .any(|l| l.contains("WARN") && l.contains("collection failed"))
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert!(!agent.stderr().contains(" INFO "), "{}", agent.stderr());
}

#[test]
fn a_config_error_from_new_stops_the_start_of_a_required_collector_and_is_retried_otherwise() {
    let work = Workdir::new();
    let config = |required: bool| {
        format!(
            r#"
[agent]
interval = "200ms"
[http]
health_listen = "127.0.0.1:{{health}}"
metrics_listen = ""
[[collectors]]
name = "dev"
plugin = "testkit"
required = {required}
[collectors.config]
config_error_in_new = true
[[collectors]]
name = "fine"
plugin = "testkit"
[[sinks]]
name = "out"
plugin = "stdout"
"#
        )
    };
    // `check` cannot see it (only `new` can): it says ok.
    let plain = config(true).replace("{health}", "0");
    let path = work.write("check.toml", &plain);
    let out = work.metricsd(&["-c", path.to_str().expect("path"), "check"], &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    // Required: the start ends with status 2 and the plugin's words.
    let mut agent = Agent::start(&work, &config(true), &[]).expect("start");
    let status = agent
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    let stderr = agent.stderr();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "required collector `dev` (plugin `testkit`): testkit: config_error_in_new is set"
        ),
        "{stderr}"
    );

    // Not required: the agent runs, the instance is failing with the message and retried.
    let mut agent = Agent::start(&work, &config(false), &[]).expect("start");
    agent.wait_ready().expect("ready");
    agent
        .wait_stat(
            "metricsd_collector_errors_total{collector=\"dev\",kind=\"create\"}",
            2.0,
            Duration::from_secs(20),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.stats().unwrap_or_default()));
    let (_, health) = agent.get_health("/health").expect("health");
    assert!(health.contains("config_error_in_new is set"), "{health}");
    agent.terminate().expect("stop");
}

#[test]
fn a_bad_config_stops_run_with_exit_code_2() {
    let work = Workdir::new();
    let path = work.write("c.toml", "[agent]\ninterval = \"soon\"\n");
    let out = work.metricsd(&["-c", path.to_str().expect("path"), "run"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("agent.interval"));
    let out = work.metricsd(&["-c", "/nonexistent/metricsd.toml", "run"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/metricsd.toml"));
}

#[test]
fn a_busy_listen_port_is_a_retryable_exit_not_a_config_error() {
    // The systemd unit does not restart on exit code 2 (a config error); a port that another
    // process holds at boot is released later, so it must be another code.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = holder.local_addr().expect("addr").port();
    let work = Workdir::new();
    let path = work.write(
        "c.toml",
        format!(
            "[http]\nhealth_listen = \"127.0.0.1:{port}\"\nmetrics_listen = \"\"\n\
             [[collectors]]\nname = \"hi\"\nplugin = \"hello\"\n"
        ),
    );
    let out = work.metricsd(&["-c", path.to_str().expect("path"), "run"], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot listen on 127.0.0.1:{port} (http.health_listen)"
        )),
        "{stderr}"
    );
}

#[test]
fn version_names_the_revision_target_and_build_date() {
    let work = Workdir::new();
    let out = work.metricsd(&["--version"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let revision = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(metricsd_e2e::root())
        .output()
        .expect("git");
    let revision = String::from_utf8_lossy(&revision.stdout).trim().to_string();
    let manifest = std::fs::read_to_string(metricsd_e2e::root().join("host/Cargo.toml"))
        .expect("host/Cargo.toml");
    let version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("version in host/Cargo.toml");
    let expected_start = format!("metricsd {version} (git {revision}, ");
    assert!(text.starts_with(&expected_start), "{text}");
    let rest = &text[expected_start.len()..];
    let (rest, api) = rest
        .trim_end_matches(')')
        .split_once("; plugin API ")
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(api, metricsd_plugin_api::API_VERSION, "{text}");
    let (target, date) = rest
        .split_once(", built ")
        .unwrap_or_else(|| panic!("{text}"));
    assert!(target.ends_with("-linux-gnu"), "{text}");
    let date: Vec<&str> = date.split('-').collect();
    assert!(
        date.len() == 3 && date[0].len() == 4 && date.iter().all(|p| p.parse::<u32>().is_ok()),
        "{text}"
    );
}

#[test]
fn health_reports_each_instance() {
    let work = Workdir::new();
    let mut agent = Agent::start(
        &work,
        r#"
[agent]
interval = "200ms"
[http]
health_listen = "127.0.0.1:{health}"
metrics_listen = ""
[[collectors]]
name = "hi"
plugin = "hello"
required = true
[[collectors]]
name = "broken"
plugin = "testkit"
[collectors.config]
fail_from = 1
[[sinks]]
name = "out"
plugin = "stdout"
"#,
        &[],
    )
    .expect("start");
    agent.wait_ready().expect("ready");
    let health = wait_for("all instances to have run", Duration::from_secs(10), || {
        let (status, body) = agent.get_health("/health").ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let states: Vec<&str> = ["hi", "broken", "out"]
            .iter()
            .filter_map(|n| v["instances"][n]["state"].as_str())
            .collect();
        (states == ["ok", "failing", "ok"]).then_some((status, v))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_eq!(health.0, 200, "only a non-required instance fails");
    assert_eq!(health.1["status"], "degraded");
    assert_eq!(health.1["instances"]["hi"]["kind"], "collector");
    assert_eq!(health.1["instances"]["hi"]["plugin"], "hello");
    assert_eq!(health.1["instances"]["out"]["kind"], "sink");
    assert!(health.1["instances"]["hi"]["last_success_ms"]
        .as_i64()
        .is_some());
    let (status, stats) = agent.get_health("/metrics/stats").expect("stats");
    assert_eq!(status, 200);
    assert!(
        stats.contains("metricsd_build_info{plugin_api_version=\"1.0.0\""),
        "{stats}"
    );
    let (status, _) = agent.get_health("/nope").expect("404");
    assert_eq!(status, 404);
    // The plugin's own log line reached the host's log output, tagged with the instance.
    let logs = agent.stderr();
    assert!(
        logs.lines()
            .any(|l| l.contains("hello collector `hi` ready") && l.contains("instance=\"hi\"")),
        "{logs}"
    );
}

#[test]
fn sigterm_flushes_the_stdout_sink_and_exits_0() {
    let work = Workdir::new();
    let mut agent = Agent::start(
        &work,
        r#"
[agent]
interval = "100ms"
internal_metrics = false
[http]
health_listen = "127.0.0.1:{health}"
metrics_listen = ""
[[collectors]]
name = "hi"
plugin = "hello"
[[sinks]]
name = "out"
plugin = "stdout"
[sinks.config]
flush = "buffer"
"#,
        &[],
    )
    .expect("start");
    agent.wait_ready().expect("ready");
    let written = agent
        .wait_stat(
            "metricsd_sink_samples_written_total{sink=\"out\"}",
            10.0,
            Duration::from_secs(10),
        )
        .expect("five batches written");
    // Buffered: nothing has reached stdout yet.
    assert_eq!(
        agent.stdout(),
        "",
        "flush = buffer holds output until flushed"
    );
    let status = agent.terminate().expect("terminate");
    assert_eq!(status.code(), Some(0));
    let rows = json_lines(&agent.stdout());
    let collections: Vec<f64> = rows
        .iter()
        .filter(|r| r["name"] == "hello_collections_total")
        .filter_map(|r| r["value"].as_f64())
        .collect();
    assert!(
        rows.len() as f64 >= written,
        "{} rows, {written} written",
        rows.len()
    );
    assert!(collections.len() >= 5, "{collections:?}");
    // In order, none lost: 1, 2, 3, …
    for (i, v) in collections.iter().enumerate() {
        assert_eq!(*v, (i + 1) as f64, "{collections:?}");
    }
    assert!(agent.stderr().contains("metricsd stopped"));
}

#[test]
fn once_prints_every_collector_and_fails_when_one_fails() {
    let work = Workdir::new();
    let path = work.write(
        "c.toml",
        "[agent]\nlabels = { node_id = \"n-1\" }\n[[collectors]]\nname = \"hi\"\nplugin = \"hello\"\n[collectors.config]\nseries = 3\n",
    );
    let out = work.metricsd(&["-c", path.to_str().expect("path"), "once"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("hello_collections_total{greeting=\"hello\",node_id=\"n-1\"} 1 "),
        "{text}"
    );
    assert_eq!(text.matches("hello_sequence{").count(), 3, "{text}");

    let path = work.write(
        "bad.toml",
        "[[collectors]]\nname = \"tk\"\nplugin = \"testkit\"\n[collectors.config]\npanic_on = 1\n",
    );
    let out = work.metricsd(&["-c", path.to_str().expect("path"), "once"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("panic"));
}

#[test]
fn sigterm_right_after_sighup_is_not_lost_in_the_reload() {
    // `systemctl reload` then `systemctl stop`: the SIGTERM arrives while the old pipeline is
    // stopping and the new one starting, and must still stop the agent.
    let work = Workdir::new();
    let mut agent = Agent::start(
        &work,
        r#"
[agent]
interval = "200ms"
[http]
health_listen = "127.0.0.1:{health}"
metrics_listen = ""
[[collectors]]
name = "hi"
plugin = "hello"
[[sinks]]
name = "out"
plugin = "stdout"
"#,
        &[],
    )
    .expect("start");
    agent.wait_ready().expect("ready");
    let pid = nix::unistd::Pid::from_raw(agent.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    wait_for("the reload to start", Duration::from_secs(10), || {
        agent.stderr().contains("SIGHUP received").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    let status = agent
        .terminate()
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_eq!(status.code(), Some(0), "{}", agent.stderr());
}

#[test]
fn sighup_reloads_the_config_and_keeps_it_when_the_new_one_is_invalid() {
    let work = Workdir::new();
    // The spooled sink's new pipeline opens the spool that the old one held.
    let base = r#"
[agent]
interval = "200ms"
spool_dir = "SPOOL"
[http]
health_listen = "127.0.0.1:{health}"
metrics_listen = ""
[[collectors]]
name = "hi"
plugin = "hello"
[[sinks]]
name = "out"
plugin = "stdout"
spool = true
"#
    .replace("SPOOL", work.path("spool").to_str().expect("path"));
    let mut agent = Agent::start(&work, &base, &[]).expect("start");
    agent.wait_ready().expect("ready");
    let config_path = work.path("metricsd.toml");
    let running = std::fs::read_to_string(&config_path).expect("config");
    let instances = |agent: &Agent| -> Option<Vec<String>> {
        let (_, body) = agent.get_health("/health").ok()?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        Some(v["instances"].as_object()?.keys().cloned().collect())
    };
    let hup = |agent: &Agent| {
        let pid = nix::unistd::Pid::from_raw(agent.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    };

    // An invalid config is reported and the running one kept.
    std::fs::write(
        &config_path,
        running.replace("interval = \"200ms\"", "interval = \"soon\""),
    )
    .expect("write");
    hup(&agent);
    wait_for("the reload error", Duration::from_secs(10), || {
        agent
            .stderr()
            .contains("config reload failed, keeping the running config")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert!(agent.is_running());
    assert_eq!(instances(&agent).expect("health"), ["hi", "out"]);

    // A valid one replaces the pipeline, on the same listener.
    std::fs::write(
        &config_path,
        format!("{running}\n[[collectors]]\nname = \"tk\"\nplugin = \"testkit\"\n"),
    )
    .expect("write");
    hup(&agent);
    wait_for("the new instance", Duration::from_secs(15), || {
        let names = instances(&agent)?;
        (names == ["hi", "out", "tk"]).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    // The new pipeline's sink got the spool: it is not disabled, and it writes (the new
    // pipeline's counters start at 0).
    wait_for(
        "the reloaded sink to write",
        Duration::from_secs(10),
        || {
            let (_, body) = agent.get_health("/health").ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let state = v["instances"]["out"]["state"].as_str()?.to_string();
            assert_ne!(state, "disabled", "{}", agent.stderr());
            let written = agent.stat("metricsd_sink_samples_written_total{sink=\"out\"}")?;
            (state == "ok" && written > 0.0).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert!(!agent.stderr().contains("in use"), "{}", agent.stderr());
    agent
        .wait_stat(
            "metricsd_collector_collections_total{collector=\"tk\"}",
            1.0,
            Duration::from_secs(10),
        )
        .expect("the new instance collects");
    let status = agent.terminate().expect("terminate");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn the_runtime_is_one_thread_whatever_tokio_worker_threads_says() {
    let work = Workdir::new();
    let config = r#"
[agent]
interval = "1s"
[http]
health_listen = "127.0.0.1:{health}"
metrics_listen = ""
[[collectors]]
name = "hi"
plugin = "hello"
"#;
    let mut agent =
        Agent::start_named(&work, "big", config, &[("TOKIO_WORKER_THREADS", "8")]).expect("start");
    agent.wait_ready().expect("ready");
    agent
        .wait_stat(
            "metricsd_collector_collections_total{collector=\"hi\"}",
            1.0,
            Duration::from_secs(10),
        )
        .expect("collects");
    // The main thread runs the runtime, `collect-hi` the collector; blocking-pool threads
    // (`metricsd-blocking`) come and go for scrapes and instance creation. Eight workers would
    // have made it at least ten.
    let threads = proc_status(agent.pid(), "Threads").expect("Threads line");
    assert!(
        threads <= 5,
        "{threads} threads with TOKIO_WORKER_THREADS=8"
    );
    assert_eq!(threads_named(agent.pid(), "collect-hi").len(), 1);
    assert_eq!(agent.terminate().expect("terminate").code(), Some(0));
    let log = agent.stderr();
    assert!(
        log.contains("TOKIO_WORKER_THREADS is ignored"),
        "the operator is told the variable has no effect: {log}"
    );
}

/// The thread ids named `name` in the agent's process.
fn threads_named(pid: u32, name: &str) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .filter_map(|t| t.ok())
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .map(|t| t.file_name().to_string_lossy().into_owned())
        .collect();
    ids.sort();
    ids
}

#[test]
fn each_instance_calls_its_plugin_on_one_thread_of_its_own() {
    let work = Workdir::new();
    let config = r#"
[agent]
interval = "200ms"
[http]
health_listen = "127.0.0.1:{health}"
metrics_listen = "127.0.0.1:{metrics}"
[[collectors]]
name = "hi"
plugin = "hello"
[[sinks]]
name = "prom"
plugin = "prometheus"
"#;
    let mut agent = Agent::start(&work, config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    let written = |n: f64| {
        agent
            .wait_stat(
                "metricsd_sink_writes_total{sink=\"prom\"}",
                n,
                Duration::from_secs(10),
            )
            .expect("the sink is written to")
    };
    let first = written(2.0);
    let collect = threads_named(agent.pid(), "collect-hi");
    let write = threads_named(agent.pid(), "write-prom");
    assert_eq!(collect.len(), 1, "one collect-hi thread: {collect:?}");
    assert_eq!(write.len(), 1, "one write-prom thread: {write:?}");
    // Later collections and writes run on the same threads, not new ones.
    written(first + 5.0);
    assert_eq!(threads_named(agent.pid(), "collect-hi"), collect);
    assert_eq!(threads_named(agent.pid(), "write-prom"), write);
    assert_eq!(agent.terminate().expect("terminate").code(), Some(0));
}
