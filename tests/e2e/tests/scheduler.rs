//! Collectors that panic or hang, loaded through the real loader: the host keeps running,
//! counts and reports what happened, and the other collectors keep their schedule.

use std::time::{Duration, Instant};

use metricsd_e2e::{json_lines, wait_for, Agent, Workdir};

const HELLO_EVERY_200MS: &str = r#"
[agent]
interval = "200ms"
timeout = "300ms"
max_backoff = "1s"
[http]
health_listen = "127.0.0.1:{health}"
metrics_listen = ""
[[collectors]]
name = "hi"
plugin = "hello"
[[sinks]]
name = "out"
plugin = "stdout"
"#;

fn stat(agent: &Agent, series: &str) -> f64 {
    agent.stat(series).unwrap_or(0.0)
}

/// hello keeps collecting at its interval: `n` more collections within a deadline that allows
/// for scheduling noise but not for a stalled schedule.
fn assert_hello_keeps_schedule(agent: &Agent, n: f64) {
    let series = "metricsd_collector_collections_total{collector=\"hi\"}";
    let before = stat(agent, series);
    let started = Instant::now();
    wait_for("hello to keep collecting", Duration::from_secs(5), || {
        (stat(agent, series) >= before + n).then_some(())
    })
    .expect("the other collector keeps its schedule");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_panicking_collector_is_disabled_counted_and_recreated() {
    let work = Workdir::new();
    let config = format!(
        "{HELLO_EVERY_200MS}\n[[collectors]]\nname = \"tk\"\nplugin = \"testkit\"\n[collectors.config]\npanic_on = 2\n"
    );
    let mut agent = Agent::start(&work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");

    // Each instance panics on its second call; the host re-creates it after a back-off.
    wait_for("two restarts", Duration::from_secs(20), || {
        (stat(
            &agent,
            "metricsd_collector_restarts_total{collector=\"tk\"}",
        ) >= 2.0)
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert!(stat(&agent, "metricsd_collector_panics_total{collector=\"tk\"}") >= 2.0);
    assert!(agent.is_running());
    assert_hello_keeps_schedule(&agent, 3.0);

    let logs = agent.stderr();
    assert!(
        logs.contains("plugin panicked: testkit: panic_on = 2"),
        "{logs}"
    );
    assert!(logs.contains("instance disabled, re-created in"), "{logs}");
    assert!(logs.contains("collector instance re-created"), "{logs}");

    // A re-created instance is a new one (its own call count starts again), and a panicked
    // call never overlapped another.
    let rows = json_lines(&agent.stdout());
    let generations: Vec<f64> = rows
        .iter()
        .filter(|r| r["name"] == "testkit_generation")
        .filter_map(|r| r["value"].as_f64())
        .collect();
    assert!(generations.iter().any(|g| *g >= 2.0), "{generations:?}");
    let status = agent.terminate().expect("terminate");
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_hanging_collector_is_timed_out_without_pile_up() {
    let work = Workdir::new();
    let config = format!(
        "{HELLO_EVERY_200MS}\n[[collectors]]\nname = \"tk\"\nplugin = \"testkit\"\ninterval = \"100ms\"\n[collectors.config]\nhang = 1500\nhang_from = 2\n"
    );
    let mut agent = Agent::start(&work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");

    wait_for("a timeout", Duration::from_secs(10), || {
        (stat(
            &agent,
            "metricsd_collector_timeouts_total{collector=\"tk\"}",
        ) >= 1.0)
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    // While the call hangs, the instance is stale in /health and no second call starts.
    let (_, body) = agent.get_health("/health").expect("health");
    let health: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(health["instances"]["tk"]["state"], "stale", "{body}");
    assert_eq!(
        stat(&agent, "metricsd_collector_stale{collector=\"tk\"}"),
        1.0
    );
    assert_hello_keeps_schedule(&agent, 3.0);

    // Two more hanging calls: each one times out, ticks meanwhile are skipped.
    wait_for("three timeouts", Duration::from_secs(15), || {
        (stat(
            &agent,
            "metricsd_collector_timeouts_total{collector=\"tk\"}",
        ) >= 3.0)
            .then_some(())
    })
    .expect("every hanging call times out");
    assert!(
        stat(
            &agent,
            "metricsd_collector_skipped_total{collector=\"tk\",reason=\"in_flight\"}"
        ) >= 5.0
    );
    let logs = agent.stderr();
    assert!(
        logs.contains("collection did not finish within 300ms"),
        "{logs}"
    );

    // The plugin itself saw at most one call at a time. Late results are dropped, so read
    // the maximum from the plugin's own report of the first (fast) call and the counter.
    let rows = json_lines(&agent.stdout());
    let max_concurrent = rows
        .iter()
        .filter(|r| r["name"] == "testkit_concurrent_calls" && r["labels"]["of"] == "max")
        .filter_map(|r| r["value"].as_f64())
        .fold(0.0, f64::max);
    assert_eq!(max_concurrent, 1.0);
    assert!(
        stat(
            &agent,
            "metricsd_collector_invalid_samples_total{collector=\"tk\"}"
        ) > 0.0,
        "samples of calls that returned late are dropped and counted"
    );
    assert!(agent.is_running());
    let status = agent.terminate().expect("terminate");
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_failing_collector_backs_off_and_a_required_one_fails_health() {
    let work = Workdir::new();
    let config = format!(
        "{HELLO_EVERY_200MS}\n[[collectors]]\nname = \"tk\"\nplugin = \"testkit\"\nrequired = true\ninterval = \"100ms\"\n[collectors.config]\nfail_from = 3\n"
    );
    let mut agent = Agent::start(&work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    let (status, body) = wait_for("/health to fail", Duration::from_secs(10), || {
        agent.get_health("/health").ok().filter(|(s, body)| {
            // The failing required instance, once the healthy one has run too.
            *s == 503 && body.contains("\"state\": \"ok\"")
        })
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_eq!(status, 503);
    let health: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(health["status"], "failing");
    assert_eq!(health["instances"]["tk"]["state"], "failing");
    assert!(health["instances"]["tk"]["last_error"]
        .as_str()
        .is_some_and(|e| e.contains("testkit: failing on call")));
    assert_eq!(health["instances"]["hi"]["state"], "ok");

    // Back-off: ticks are skipped instead of calling a failing plugin every 100 ms.
    wait_for("back-off skips", Duration::from_secs(10), || {
        (stat(
            &agent,
            "metricsd_collector_skipped_total{collector=\"tk\",reason=\"backoff\"}",
        ) >= 3.0)
            .then_some(())
    })
    .expect("failures back off");
    // The first failure of a streak is logged once at warn level, not every cycle.
    let warnings = agent.stderr().matches("collection failed: testkit").count();
    assert_eq!(warnings, 1, "{}", agent.stderr());
    assert!(
        stat(
            &agent,
            "metricsd_collector_errors_total{collector=\"tk\",kind=\"transient\"}"
        ) >= 2.0
    );
}

#[test]
fn invalid_samples_are_counted_every_time_and_logged_when_they_start_and_end() {
    let work = Workdir::new();
    let config = format!(
        "{HELLO_EVERY_200MS}\n[[collectors]]\nname = \"tk\"\nplugin = \"testkit\"\ninterval = \"100ms\"\n[collectors.config]\ninvalid_sample = true\ninvalid_until = 60\n"
    );
    let mut agent = Agent::start(&work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    let invalid = "metricsd_collector_invalid_samples_total{collector=\"tk\"}";
    agent
        .wait_stat(invalid, 60.0, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    wait_for(
        "the end of the invalid samples",
        Duration::from_secs(15),
        || {
            agent
                .stderr()
                .contains("samples are valid again (60 collections had invalid samples)")
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    // 60 collections with an invalid sample in 6 s: one line when it started (the summary
    // would come after a minute), one when it ended; the counter has every one.
    let logs = agent.stderr();
    assert_eq!(logs.matches("invalid samples:").count(), 1, "{logs}");
    assert!(
        logs.contains("metricsd_collector_invalid_samples_total counts every one"),
        "{logs}"
    );
    assert_eq!(stat(&agent, invalid), 60.0);
    let status = agent.terminate().expect("terminate");
    assert!(status.success(), "{status:?}");
}
