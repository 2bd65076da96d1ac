//! `isolation = "process"`: a collector plugin that segfaults, aborts or hangs costs its child
//! process, not the agent, and is restarted.

use std::time::Duration;

use metricsd_e2e::{http_get, wait_for, Agent, Workdir};

/// The child processes of `pid` (every thread's).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// An agent with one testkit collector `name` in a child process (300 ms timeout) and
/// `testkit` as its plugin config, writing to stdout.
fn one_isolated_testkit(work: &Workdir, name: &str, testkit: &str) -> Agent {
    let config = format!(
        r#"
[agent]
interval = "200ms"
max_backoff = "400ms"
[http]
health_listen = "127.0.0.1:{{health}}"
metrics_listen = ""
[[collectors]]
name = "{name}"
plugin = "testkit"
isolation = "process"
timeout = "300ms"
[collectors.config]
{testkit}
[[sinks]]
name = "out"
plugin = "stdout"
"#
    );
    let mut agent = Agent::start(work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    agent
}

#[test]
fn a_segfaulting_and_an_aborting_plugin_cost_their_child_processes_not_the_agent() {
    let work = Workdir::new();
    let mut agent = Agent::start(
        &work,
        r#"
[agent]
interval = "200ms"
max_backoff = "400ms"
[http]
health_listen = "127.0.0.1:{health}"
metrics_listen = "127.0.0.1:{metrics}"
[[collectors]]
name = "segv"
plugin = "testkit"
isolation = "process"
[collectors.config]
segfault_on = 2
labels = { who = "segv" }
[[collectors]]
name = "abrt"
plugin = "testkit"
isolation = "process"
[collectors.config]
abort_on = 2
labels = { who = "abrt" }
# What a plugin prints must not get into the frames of its socket.
print = true
[[collectors]]
name = "fine"
plugin = "hello"
[[sinks]]
name = "prom"
plugin = "prometheus"
"#,
        &[],
    )
    .expect("start");
    agent.wait_ready().expect("ready");
    // Each child collects once (call 1), dies on call 2, and a new one starts: again and again.
    for (collector, cause) in [("segv", "SIGSEGV"), ("abrt", "SIGABRT")] {
        agent
            .wait_stat(
                &format!(
                    "metricsd_collector_crashes_total{{cause=\"{cause}\",collector=\"{collector}\"}}"
                ),
                2.0,
                Duration::from_secs(30),
            )
            .unwrap_or_else(|e| panic!("{e}\n{}", agent.stats().unwrap_or_default()));
        agent
            .wait_stat(
                &format!("metricsd_collector_restarts_total{{collector=\"{collector}\"}}"),
                1.0,
                Duration::from_secs(10),
            )
            .expect("restarted");
    }
    assert!(agent.is_running(), "the agent died:\n{}", agent.stderr());
    // Everything else is served, and so is what the children collected before they died:
    // their batches crossed the process boundary whole.
    let before = agent
        .stat("metricsd_collector_collections_total{collector=\"fine\"}")
        .unwrap_or(0.0);
    agent
        .wait_stat(
            "metricsd_collector_collections_total{collector=\"fine\"}",
            before + 5.0,
            Duration::from_secs(10),
        )
        .expect("the in-process collector goes on");
    let (_, body) = http_get(agent.metrics_port, "/metrics").expect("scrape");
    for (name, label) in [
        ("hello_collections_total", ""),
        ("testkit_value{", "who=\"segv\""),
        ("testkit_value{", "who=\"abrt\""),
    ] {
        assert!(
            body.lines()
                .any(|l| l.starts_with(name) && l.contains(label)),
            "{name}{label} not served:\n{body}"
        );
    }
    // The operator is told which signal, in the log and in /health.
    let log = agent.stderr();
    assert!(
        log.contains(
            "collector `segv` (plugin `testkit`): its process was killed by signal SIGSEGV (11"
        ),
        "{log}"
    );
    assert!(log.contains("killed by signal SIGABRT (6"), "{log}");
    assert!(
        log.contains("testkit: call 1 says hello on stdout"),
        "{log}"
    );
    assert!(!log.contains("answered out of turn"), "{log}");
    // The plugin's own log records cross too, tagged with the instance.
    assert!(
        log.lines()
            .any(|l| l.contains("testkit: raising SIGSEGV") && l.contains("segv")),
        "{log}"
    );
    wait_for("/health naming SIGSEGV", Duration::from_secs(10), || {
        let (_, health) = agent.get_health("/health").ok()?;
        health.contains("killed by signal SIGSEGV").then_some(())
    })
    .expect("/health");

    // No child outlives the agent.
    let pid = agent.pid();
    // (Each child lives for two calls, then waits out a back-off before the next starts.)
    let kids = wait_for("a child process", Duration::from_secs(10), || {
        Some(children(pid)).filter(|k| !k.is_empty())
    })
    .expect("children");
    agent.terminate().expect("stop");
    wait_for("the children to be gone", Duration::from_secs(10), || {
        kids.iter()
            .all(|k| {
                !std::path::Path::new(&format!("/proc/{k}")).exists()
                    || std::fs::read_to_string(format!("/proc/{k}/stat"))
                        .map(|s| s.contains(") Z "))
                        .unwrap_or(true)
            })
            .then_some(())
    })
    .expect("children gone");
}

#[test]
fn a_call_past_its_timeout_gets_the_child_killed_and_a_new_one_started() {
    let work = Workdir::new();
    let mut agent = one_isolated_testkit(&work, "stuck", "hang = 60000\nhang_from = 2");
    // In-process, the hung call would hold its thread for a minute and the instance would
    // collect nothing more; here its child is killed and a new one collects again.
    agent
        .wait_stat(
            "metricsd_collector_crashes_total{cause=\"timeout\",collector=\"stuck\"}",
            2.0,
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.stats().unwrap_or_default()));
    let collections = agent
        .stat("metricsd_collector_collections_total{collector=\"stuck\"}")
        .unwrap_or(0.0);
    assert!(
        collections >= 2.0,
        "each new child collected once: {collections}"
    );
    assert!(agent
        .stat("metricsd_collector_timeouts_total{collector=\"stuck\"}")
        .is_some_and(|t| t >= 2.0));
    let log = agent.stderr();
    assert!(
        log.contains("its process was killed: the call did not finish within 300ms"),
        "{log}"
    );
    assert!(
        !log.contains("overdue collection returned"),
        "a killed child did not return: {log}"
    );
    // Killed children do not pile up: at most the current one is running.
    let kids = children(agent.pid());
    assert!(kids.len() <= 1, "{kids:?}");
    agent.terminate().expect("stop");
}

#[test]
fn a_child_stuck_in_new_is_killed_at_the_timeout_and_tried_again() {
    let work = Workdir::new();
    let mut agent = one_isolated_testkit(&work, "slow", "hang_in_new = 60000");
    agent
        .wait_stat(
            "metricsd_collector_errors_total{collector=\"slow\",kind=\"create\"}",
            2.0,
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.stats().unwrap_or_default()));
    let log = agent.stderr();
    assert!(
        log.contains(
            "collector `slow` (plugin `testkit`): its process was killed: the call did not finish within 300ms"
        ),
        "{log}"
    );
    // Each attempt's child is gone before the next starts.
    let kids = children(agent.pid());
    assert!(kids.len() <= 1, "{kids:?}");
    agent.terminate().expect("stop");
}
