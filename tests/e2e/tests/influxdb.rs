//! The InfluxDB sink against real servers: Debian's InfluxDB 1.x (v1 write API, InfluxQL read
//! back) and VictoriaMetrics (v2 write API), plus a scripted HTTP server for the answers a
//! real server will not give on demand (429 with Retry-After, 413).

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metricsd_e2e::scripted::{self, Request};
use metricsd_e2e::servers::{InfluxServer, VictoriaMetrics};
use metricsd_e2e::{build, wait_for, Agent, Workdir};

const ODD: &str = "a b,c=d\"e'f\\g ünïcødé 🚀 =x";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A testkit collector every `interval` with an awkward label, the agent's own metrics off,
/// and the given sinks.
fn config(interval: &str, sinks: &str) -> String {
    format!(
        r#"[agent]
interval = "{interval}"
max_backoff = "1s"
internal_metrics = false
[http]
health_listen = "127.0.0.1:{{health}}"
metrics_listen = "127.0.0.1:{{metrics}}"
[[collectors]]
name = "tk"
plugin = "testkit"
[collectors.config]
series = 2
labels = {{ odd = {odd} }}
{sinks}"#,
        odd = toml_string(ODD),
    )
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn influx_sink(name: &str, port: u16, extra: &str) -> String {
    format!(
        "[[sinks]]\nname = \"{name}\"\nplugin = \"influxdb\"\n[sinks.config]\nurl = \"http://127.0.0.1:{port}\"\n{extra}\n"
    )
}

/// The `calls_total` values InfluxDB holds for the testkit collector, sorted.
/// `rp` is a qualified prefix (`"metricsd".`) or empty for the default policy.
fn calls_written(influx: &InfluxServer, db: &str, rp: &str) -> Vec<i64> {
    let mut calls: Vec<i64> = influx
        .rows(db, &format!("SELECT \"calls_total\" FROM {rp}\"testkit\""))
        .unwrap_or_default()
        .iter()
        .filter_map(|r| r.get("calls_total").and_then(|v| v.as_f64()))
        .map(|v| v as i64)
        .collect();
    calls.sort_unstable();
    calls
}

/// Waits (up to 20 s) until `/health` mentions `needle`; returns the body.
fn wait_health(agent: &Agent, needle: &str) -> String {
    wait_for(
        &format!("/health to say {needle:?}"),
        Duration::from_secs(20),
        || {
            let (_, body) = agent.get_health("/health").ok()?;
            body.contains(needle).then_some(body)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()))
}

/// A spooled InfluxDB sink `influx` writing to database `db`, with the agent's spool under
/// the work directory: the agent config.
fn spooled_config(work: &Workdir, port: u16, db: &str) -> String {
    let sinks = format!(
        "[[sinks]]\nname = \"influx\"\nplugin = \"influxdb\"\nspool = true\n[sinks.config]\nurl = \"http://127.0.0.1:{port}\"\ndatabase = \"{db}\"\n"
    );
    config("200ms", &sinks).replace(
        "internal_metrics = false\n",
        &format!(
            "internal_metrics = false\nspool_dir = \"{}\"\n",
            work.path("spool").display()
        ),
    )
}

/// Waits (up to 30 s) until `query` returns at least `n` rows; fails with the agent's log.
fn wait_rows(
    influx: &InfluxServer,
    agent: &Agent,
    db: &str,
    query: &str,
    n: usize,
) -> Vec<serde_json::Map<String, serde_json::Value>> {
    wait_for(
        &format!("{n} rows of {query}"),
        Duration::from_secs(30),
        || {
            let rows = influx.rows(db, query).ok()?;
            (rows.len() >= n).then_some(rows)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()))
}

/// Every call from 1 to the highest written is there exactly once.
fn assert_gapless(calls: &[i64], what: &str) {
    let expected: Vec<i64> = (1..=calls.last().copied().unwrap_or(0)).collect();
    assert_eq!(calls, expected.as_slice(), "{what}: calls written");
}

#[test]
fn points_come_back_with_their_measurement_tags_fields_and_timestamps() {
    build();
    let work = Workdir::new();
    let influx = InfluxServer::start(&work, false).expect("influxd");
    let started = now_ms();
    let sinks = format!(
        "{}{}",
        influx_sink(
            "grouped",
            influx.port,
            "database = \"metrics db\"\ncreate_database = true\nretention_duration = \"30days\""
        ),
        influx_sink(
            "flat",
            influx.port,
            "database = \"flat\"\ncreate_database = true\nlayout = \"per_metric\"\nprecision = \"ns\"\ngzip = false"
        ),
    );
    let mut agent = Agent::start(&work, &config("250ms", &sinks), &[]).expect("start");
    agent.wait_ready().expect("ready");
    // Grouped layout: testkit_value → measurement `testkit`, field `value`, tags as labels.
    let rows = wait_rows(
        &influx,
        &agent,
        "metrics db",
        "SELECT * FROM \"metricsd\".\"testkit\" WHERE \"series\" = '1'",
        3,
    );
    for row in &rows {
        assert_eq!(row["odd"], ODD, "{row:?}");
        assert_eq!(row["series"], "1");
        let time = row["time"].as_i64().expect("time");
        assert!(
            time >= started - 1000 && time <= now_ms(),
            "{time} vs {started}"
        );
    }
    // testkit_value is series + call number, and calls_total the call number, on one line.
    let joined = influx
        .rows(
            "metrics db",
            "SELECT \"value\", \"calls_total\" FROM \"metricsd\".\"testkit\" WHERE \"series\" = '1'",
        )
        .expect("query");
    assert!(!joined.is_empty());
    // Fields of different label sets sit on different lines: the series-1 line has `value`
    // only; calls_total has no `series` tag.
    for row in &joined {
        assert!(row["calls_total"].is_null(), "{row:?}");
    }
    let calls = calls_written(&influx, "metrics db", "\"metricsd\".");
    assert!(calls.len() >= 3, "{calls:?}");
    let value_of_call = |call: i64| -> Option<f64> {
        let calls_rows = influx
            .rows(
                "metrics db",
                "SELECT \"calls_total\" FROM \"metricsd\".\"testkit\"",
            )
            .ok()?;
        let time = calls_rows
            .iter()
            .find(|r| r["calls_total"].as_f64() == Some(call as f64))?["time"]
            .as_i64()?;
        influx
            .rows(
                "metrics db",
                &format!("SELECT \"value\" FROM \"metricsd\".\"testkit\" WHERE \"series\" = '1' AND time = {time}ms"),
            )
            .ok()?
            .first()?["value"]
            .as_f64()
    };
    assert_eq!(value_of_call(2), Some(3.0), "series 1 at call 2 is 1 + 2");
    // The retention policy was created with the configured duration and is written to.
    let policies = influx
        .rows("", "SHOW RETENTION POLICIES ON \"metrics db\"")
        .expect("policies");
    let ours = policies
        .iter()
        .find(|p| p["name"] == "metricsd")
        .unwrap_or_else(|| panic!("{policies:?}"));
    assert_eq!(ours["duration"], "720h0m0s");
    let in_rp = influx
        .rows(
            "metrics db",
            "SELECT count(\"value\") FROM \"metricsd\".\"testkit\"",
        )
        .expect("count");
    assert!(in_rp[0]["count"].as_f64().unwrap_or(0.0) >= 3.0);
    // Per-metric layout with ns precision: measurement = metric name, field `value`.
    let flat = wait_for("per-metric points", Duration::from_secs(20), || {
        let rows = influx
            .rows(
                "flat",
                "SELECT * FROM \"metricsd\".\"testkit_value\" WHERE \"series\" = '0'",
            )
            .ok()?;
        (!rows.is_empty()).then_some(rows)
    })
    .expect("flat");
    assert_eq!(flat[0]["odd"], ODD);
    assert!(flat[0]["value"].as_f64().is_some());
    let time = flat[0]["time"].as_i64().expect("time");
    assert!(time >= started - 1000 && time <= now_ms());
    assert!(agent.stderr().find("password").is_none());
}

#[test]
fn an_outage_of_the_server_loses_no_point() {
    build();
    let work = Workdir::new();
    let mut influx = InfluxServer::start(&work, false).expect("influxd");
    let sinks = influx_sink(
        "influx",
        influx.port,
        "database = \"m\"\ncreate_database = true",
    );
    let mut agent = Agent::start(&work, &config("200ms", &sinks), &[]).expect("start");
    agent.wait_ready().expect("ready");
    wait_for("first points", Duration::from_secs(20), || {
        (calls_written(&influx, "m", "\"metricsd\".").len() >= 3).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    influx.stop();
    // The sink fails while the server is away, and the points wait in the queue.
    wait_health(&agent, "cannot reach InfluxDB");
    let calls_at_stop = agent.stat("metricsd_collector_collections_total{collector=\"tk\"}");
    wait_for("calls during the outage", Duration::from_secs(20), || {
        let now = agent.stat("metricsd_collector_collections_total{collector=\"tk\"}")?;
        (now >= calls_at_stop? + 10.0).then_some(())
    })
    .expect("collections go on during the outage");
    influx.restart().expect("restart influxd");
    let during = agent
        .stat("metricsd_collector_collections_total{collector=\"tk\"}")
        .expect("collections");
    let calls = wait_for("the gap to be filled", Duration::from_secs(30), || {
        let calls = calls_written(&influx, "m", "\"metricsd\".");
        (calls.len() as f64 >= during).then_some(calls)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_gapless(&calls, "after the outage");
    assert_eq!(
        agent
            .stat("metricsd_sink_dropped_samples_total{reason=\"queue_full\",sink=\"influx\"}")
            .unwrap_or(0.0),
        0.0,
        "nothing dropped"
    );
}

#[test]
fn a_missing_database_is_reported_and_its_points_wait_until_it_exists() {
    build();
    let work = Workdir::new();
    let influx = InfluxServer::start(&work, false).expect("influxd");
    let sinks = influx_sink(
        "influx",
        influx.port,
        "database = \"later\"\nconfig_error_retry = \"1s\"",
    );
    let mut agent = Agent::start(&work, &config("200ms", &sinks), &[]).expect("start");
    agent.wait_ready().expect("ready");
    let health = wait_health(&agent, "not found");
    assert!(health.contains("database \\\"later\\\""), "{health}");
    assert!(agent.stderr().contains("has no database \"later\""));
    influx
        .query("", "CREATE DATABASE \"later\"")
        .expect("create");
    let collections = agent
        .stat("metricsd_collector_collections_total{collector=\"tk\"}")
        .expect("collections");
    let calls = wait_for("the waiting points", Duration::from_secs(30), || {
        let calls = calls_written(&influx, "later", "");
        (calls.len() as f64 >= collections).then_some(calls)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_gapless(&calls, "after the database appeared");
    // Nothing was lost while the database was missing, and nothing written twice.
    let accounts = agent.settled_accounts("influx", 100.0).expect("accounts");
    assert_eq!(accounts.dropped, 0.0, "{accounts:?}");
    assert_stored_is_written(&agent, &influx, "later", 0.0);
}

#[test]
fn wrong_credentials_are_reported_without_the_secret_and_retried() {
    build();
    let work = Workdir::new();
    let influx = InfluxServer::start(&work, true).expect("influxd");
    influx
        .query(
            "",
            "CREATE USER admin WITH PASSWORD 'right-pass' WITH ALL PRIVILEGES",
        )
        .expect("first user");
    influx
        .query_as(
            "",
            "CREATE DATABASE \"secure\"",
            Some(("admin", "right-pass")),
        )
        .expect("create db");
    let password_file = work.write("password", "wrong-pass-7f3a\n");
    let sinks = influx_sink(
        "influx",
        influx.port,
        &format!(
            "database = \"secure\"\nusername = \"admin\"\npassword_file = \"{}\"\nconfig_error_retry = \"1s\"",
            password_file.display()
        ),
    );
    let mut agent = Agent::start(&work, &config("200ms", &sinks), &[]).expect("start");
    agent.wait_ready().expect("ready");
    wait_health(&agent, "credentials refused");
    // Fix the password on the server side; the buffered points then arrive.
    influx
        .query_as(
            "",
            "SET PASSWORD FOR admin = 'wrong-pass-7f3a'",
            Some(("admin", "right-pass")),
        )
        .expect("set password");
    let collections = agent
        .stat("metricsd_collector_collections_total{collector=\"tk\"}")
        .expect("collections");
    wait_for("the points after the fix", Duration::from_secs(30), || {
        let rows = influx
            .query_as(
                "secure",
                "SELECT count(\"calls_total\") FROM \"testkit\"",
                Some(("admin", "wrong-pass-7f3a")),
            )
            .ok()?;
        let count = rows["results"][0]["series"][0]["values"][0][1].as_f64()?;
        (count >= collections).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    let logs = agent.stderr();
    assert!(logs.contains("refused the credentials"), "{logs}");
    assert!(
        !logs.contains("wrong-pass-7f3a"),
        "the password leaked into the log"
    );
    let accounts = agent.settled_accounts("influx", 100.0).expect("accounts");
    assert_eq!(
        accounts.dropped, 0.0,
        "refused credentials keep the points: {accounts:?}"
    );
}

#[test]
fn too_many_requests_honours_retry_after_and_too_large_splits_the_batch() {
    build();
    let work = Workdir::new();
    // The first request gets 429 with Retry-After: 2; bodies of more than 10 lines get 413.
    let (port, seen) = scripted::serve(|n, r| {
        if n == 1 {
            (429, vec![("Retry-After".into(), "2".into())], String::new())
        } else if r.lines > 10 {
            (413, vec![], String::new())
        } else {
            (204, vec![], String::new())
        }
    });
    let sinks = influx_sink(
        "influx",
        port,
        "database = \"m\"\ngzip = false\nlayout = \"per_metric\"",
    );
    let config = config("300ms", &sinks).replace("series = 2", "series = 25");
    let mut agent = Agent::start(&work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    // Wait until every line of the retried (merged, then split) write has been accepted:
    // how many requests that takes depends on how many collections were merged into it.
    let accepted_lines = |seen: &[Request]| -> BTreeSet<String> {
        seen.iter()
            .filter(|r| r.lines <= 10)
            .flat_map(|r| r.body.lines().map(str::to_string))
            .collect()
    };
    let requests = wait_for(
        "the retried write to be accepted",
        Duration::from_secs(60),
        || {
            let seen = seen.lock().ok()?.clone();
            let retried = seen.get(1)?;
            let accepted = accepted_lines(&seen);
            retried
                .body
                .lines()
                .all(|l| accepted.contains(l))
                .then_some(seen)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    // After the 429, the retry waited for Retry-After (2 s), not the first back-off (0.5 s),
    // and carried the same lines.
    let gap = requests[1].at.duration_since(requests[0].at);
    assert!(gap >= Duration::from_millis(1900), "retried after {gap:?}");
    // The retry carries the same lines first, and the batches collected meanwhile after them
    // (merged into one write).
    assert!(
        requests[1].body.starts_with(&requests[0].body),
        "the same lines again"
    );
    // A collection is 29 lines (25 values, calls, generation, 2 concurrency gauges); the
    // merged write is refused whole with 413, then sent in halves, quarters, … of at most 10
    // lines. Every line of it is accepted exactly once.
    assert_eq!(requests[0].lines, 29);
    assert!(requests[1].lines >= 29 && requests[1].lines % 29 == 0);
    let accepted: Vec<&str> = requests
        .iter()
        .filter(|r| r.lines <= 10)
        .flat_map(|r| r.body.lines())
        .collect();
    let unique: BTreeSet<&str> = accepted.iter().copied().collect();
    assert_eq!(unique.len(), accepted.len(), "no line accepted twice");
    for line in requests[1].body.lines() {
        assert!(unique.contains(line), "{line} was never accepted");
    }
    assert_eq!(
        agent
            .stat("metricsd_sink_dropped_samples_total{reason=\"rejected\",sink=\"influx\"}")
            .unwrap_or(0.0),
        0.0
    );
    // One line is one sample here: what the agent counts written is what the server accepted
    // (2xx), checked at a moment no write is in flight.
    agent.wait_written_is_accepted("influx", || {
        let seen = seen.lock().ok()?.clone();
        Some(
            seen.iter()
                .skip(1)
                .filter(|r| r.lines <= 10)
                .map(|r| r.lines as f64)
                .sum(),
        )
    });
}

#[test]
fn the_v2_write_api_reaches_victoria_metrics() {
    build();
    let work = Workdir::new();
    let vm = VictoriaMetrics::start(&work).expect("victoria-metrics");
    let token = "vm-token-123";
    let sinks = influx_sink(
        "vm",
        vm.port,
        "api = \"v2\"\norg = \"fleet\"\nbucket = \"gpu\"\ntoken_env = \"INFLUX_TOKEN\"",
    );
    let started = now_ms();
    let mut agent =
        Agent::start(&work, &config("250ms", &sinks), &[("INFLUX_TOKEN", token)]).expect("start");
    agent.wait_ready().expect("ready");
    // VictoriaMetrics names an InfluxDB field `{measurement}_{field}`.
    let series = wait_for("series in VictoriaMetrics", Duration::from_secs(30), || {
        let series = vm.export("testkit_value").ok()?;
        (series.len() >= 2
            && series
                .iter()
                .all(|s| s["values"].as_array().is_some_and(|v| v.len() >= 2)))
        .then_some(series)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", agent.stderr(), vm.log()));
    for s in &series {
        assert_eq!(s["metric"]["odd"], ODD, "{s}");
        let n: f64 = s["metric"]["series"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .expect("series label");
        let values: Vec<f64> = s["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_f64())
            .collect();
        // series + call number, call numbers counting up from 1.
        assert_eq!(values[0], n + 1.0, "{s}");
        for t in s["timestamps"].as_array().into_iter().flatten() {
            let t = t.as_i64().expect("timestamp");
            assert!(t >= started - 1000 && t <= now_ms());
        }
    }
    assert!(!agent.stderr().contains(token));
}

#[test]
fn refused_and_unencodable_samples_are_dropped_alone_and_counted() {
    build();
    let work = Workdir::new();
    let influx = InfluxServer::start(&work, false).expect("influxd");
    influx.query("", "CREATE DATABASE \"c\"").expect("create");
    // `value` of testkit_value is now an integer field: metricsd's floats conflict with it.
    seed(&influx, "c", "testkit_value,series=old value=1i");
    let sinks = influx_sink(
        "c",
        influx.port,
        "database = \"c\"\nlayout = \"per_metric\"",
    );
    let config = config("250ms", &sinks).replace("series = 2", "series = 2\nnon_finite = true");
    let mut agent = Agent::start(&work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    let stat = |agent: &Agent, series: &str| agent.stat(series).unwrap_or(0.0);
    wait_for("a few writes", Duration::from_secs(20), || {
        (stat(&agent, "metricsd_sink_writes_total{sink=\"c\"}") >= 3.0).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    let writes = stat(&agent, "metricsd_sink_writes_total{sink=\"c\"}");
    let rejected = stat(
        &agent,
        "metricsd_sink_dropped_samples_total{reason=\"rejected\",sink=\"c\"}",
    );
    let invalid = stat(
        &agent,
        "metricsd_sink_dropped_samples_total{reason=\"invalid\",sink=\"c\"}",
    );
    // Per write: the two testkit_value lines refused by the server (partial write), NaN and
    // +Inf never sent. A write may be between its report and its completion.
    for (what, n) in [("rejected", rejected), ("invalid", invalid)] {
        assert!(
            n == 2.0 * writes || n == 2.0 * (writes + 1.0),
            "{what}: {n} for {writes} writes\n{}",
            agent.stderr()
        );
    }
    // Each batch has 8 samples (calls_total, generation, concurrent now and max, two values,
    // NaN and +Inf); 4 were written, and only those count as written.
    let written = stat(&agent, "metricsd_sink_samples_written_total{sink=\"c\"}");
    let writes_now = stat(&agent, "metricsd_sink_writes_total{sink=\"c\"}");
    assert!(
        written == 4.0 * writes_now || written == 4.0 * writes || written == 4.0 * (writes + 1.0),
        "{written} samples counted as written for {writes_now} writes"
    );
    // The rest of each batch was written.
    let calls = influx
        .rows("c", "SELECT \"value\" FROM \"testkit_calls_total\"")
        .expect("calls");
    assert!(calls.len() as f64 >= writes);
    let values = influx
        .rows("c", "SELECT \"value\" FROM \"testkit_value\"")
        .expect("values");
    assert_eq!(values.len(), 1, "only the seeded integer point: {values:?}");
    let logs = agent.stderr();
    assert!(logs.contains("InfluxDB refused 2 of 6 lines"), "{logs}");
    assert!(logs.contains("field type conflict"), "{logs}");
    assert!(logs.contains("`testkit_nan` has the value NaN"), "{logs}");
    // received = written + rejected + invalid (+ queued): nothing unaccounted.
    let accounts = agent.settled_accounts("c", 100.0).expect("accounts");
    assert!(accounts.written > 0.0, "{accounts:?}");
    let (_, health) = agent.get_health("/health").expect("health");
    assert!(health.contains("\"ok\""), "{health}");
}

/// Writes one line of line protocol into `db` directly, as another client would.
fn seed(influx: &InfluxServer, db: &str, line: &str) {
    let status = ureq::post(&format!(
        "http://127.0.0.1:{}/write?db={db}&precision=ms",
        influx.port
    ))
    .send_string(line)
    .expect("seed write")
    .status();
    assert_eq!(status, 204);
}

/// `calls_total` values written between `from_ms` and `to_ms`, sorted.
fn calls_between(influx: &InfluxServer, db: &str, from_ms: i64, to_ms: i64) -> Vec<i64> {
    let mut calls: Vec<i64> = influx
        .rows(
            db,
            &format!(
                "SELECT \"calls_total\" FROM \"testkit\" WHERE time >= {from_ms}ms AND time < {to_ms}ms"
            ),
        )
        .unwrap_or_default()
        .iter()
        .filter_map(|r| r.get("calls_total").and_then(|v| v.as_f64()))
        .map(|v| v as i64)
        .collect();
    calls.sort_unstable();
    calls
}

#[test]
fn the_disk_spool_carries_an_outage_across_an_agent_restart() {
    build();
    let work = Workdir::new();
    let mut influx = InfluxServer::start(&work, false).expect("influxd");
    influx.query("", "CREATE DATABASE \"s\"").expect("db");
    let config = spooled_config(&work, influx.port, "s");
    assert!(
        config.contains("plugin = \"influxdb\"\nspool = true"),
        "{config}"
    );
    let first_start = now_ms();
    let mut agent = Agent::start(&work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    wait_for("first points", Duration::from_secs(20), || {
        (calls_between(&influx, "s", first_start, now_ms() + 1000).len() >= 3).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    influx.stop();
    wait_for(
        "collections during the outage",
        Duration::from_secs(20),
        || {
            let (_, body) = agent.get_health("/health").ok()?;
            let depth = agent.stat("metricsd_sink_queue_samples{sink=\"influx\"}")?;
            (body.contains("cannot reach InfluxDB") && depth >= 50.0).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    let collected = agent
        .stat("metricsd_collector_collections_total{collector=\"tk\"}")
        .expect("collections");
    let status = agent.terminate().expect("terminate");
    assert!(status.success(), "{status:?}\n{}", agent.stderr());
    let first_log = agent.stderr();
    assert!(
        first_log.contains("wait in the spool for the next start"),
        "{first_log}"
    );
    let between = now_ms();
    // The second run starts while InfluxDB is still down, then InfluxDB comes back.
    let mut agent = Agent::start(&work, &config, &[]).expect("restart");
    agent.wait_ready().expect("ready again");
    let second_log = agent.stderr();
    assert!(
        second_log.contains("left in the spool by the last run are delivered first"),
        "{second_log}"
    );
    influx.restart().expect("influxd back");
    let first_run = wait_for("the first run's points", Duration::from_secs(30), || {
        let calls = calls_between(&influx, "s", first_start, between);
        (calls.len() as f64 >= collected).then_some(calls)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_gapless(&first_run, "first run, across the restart");
    let second_run = wait_for("the second run's points", Duration::from_secs(30), || {
        let calls = calls_between(&influx, "s", between, now_ms() + 1000);
        (calls.len() >= 5).then_some(calls)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_gapless(&second_run, "second run");
    wait_for("the spool to empty", Duration::from_secs(20), || {
        (agent.stat("metricsd_sink_queue_samples{sink=\"influx\"}")? < 20.0).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
}

#[test]
fn rollups_go_to_their_own_retention_policy_and_match_the_raw_points() {
    build();
    let work = Workdir::new();
    let influx = InfluxServer::start(&work, false).expect("influxd");
    let port = influx.port;
    let config = format!(
        r#"[agent]
interval = "100ms"
internal_metrics = false
[http]
health_listen = "127.0.0.1:{{health}}"
metrics_listen = "127.0.0.1:{{metrics}}"
[[collectors]]
name = "tk"
plugin = "testkit"
[collectors.config]
series = 2
[[aggregate]]
name = "rollup"
from = ["tk"]
metrics = ["testkit_value", "testkit_calls_total"]
window = "1s"
[[sinks]]
name = "raw"
plugin = "influxdb"
[sinks.config]
url = "http://127.0.0.1:{port}"
database = "h"
create_database = true
retention_policy = "raw"
retention_duration = "30days"
[[sinks]]
name = "rollups"
plugin = "influxdb"
[sinks.config]
url = "http://127.0.0.1:{port}"
database = "h"
create_database = true
retention_policy = "rollup"
retention_duration = "365days"
[[routes]]
from = ["tk"]
to = ["raw"]
[[routes]]
from = ["rollup"]
to = ["rollups"]
"#
    );
    let mut agent = Agent::start(&work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    let windows = wait_rows(
        &influx,
        &agent,
        "h",
        "SELECT * FROM \"rollup\".\"testkit\" WHERE \"series\" = '1'",
        4,
    );
    let policies = influx
        .rows("", "SHOW RETENTION POLICIES ON \"h\"")
        .expect("rps");
    let duration = |name: &str| {
        policies
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["duration"].clone())
    };
    assert_eq!(duration("raw"), Some("720h0m0s".into()));
    assert_eq!(duration("rollup"), Some("8760h0m0s".into()));
    // The raw policy holds no rollups and the rollup policy no raw points.
    let raw_fields = influx
        .rows("h", "SELECT \"value_min\" FROM \"raw\".\"testkit\"")
        .expect("raw");
    assert!(raw_fields.is_empty(), "{raw_fields:?}");
    // Each window's statistics are those of the raw points in it.
    let calls_in = |from: i64, to: i64| -> Vec<f64> {
        influx
            .rows(
                "h",
                &format!("SELECT \"calls_total\" FROM \"raw\".\"testkit\" WHERE time >= {from}ms AND time < {to}ms"),
            )
            .unwrap_or_default()
            .iter()
            .filter_map(|r| r["calls_total"].as_f64())
            .collect()
    };
    for window in &windows[1..windows.len() - 1] {
        let start = window["time"].as_i64().expect("time");
        assert_eq!(start % 1000, 0, "windows are aligned to the second");
        let raw: Vec<f64> = influx
            .rows(
                "h",
                &format!(
                    "SELECT \"value\" FROM \"raw\".\"testkit\" WHERE \"series\" = '1' AND time >= {start}ms AND time < {}ms",
                    start + 1000
                ),
            )
            .expect("raw")
            .iter()
            .filter_map(|r| r["value"].as_f64())
            .collect();
        assert!(!raw.is_empty());
        let min = raw.iter().copied().fold(f64::INFINITY, f64::min);
        let max = raw.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mean = raw.iter().sum::<f64>() / raw.len() as f64;
        assert_eq!(window["value_min"].as_f64(), Some(min), "{window:?}");
        assert_eq!(window["value_max"].as_f64(), Some(max));
        assert!((window["value_mean"].as_f64().unwrap_or(0.0) - mean).abs() < 1e-9);
        assert_eq!(window["value_last"].as_f64(), raw.last().copied());
        assert_eq!(window["value_count"].as_f64(), Some(raw.len() as f64));
        // calls_total counts up by one per collection: its increase over a window is the
        // number of collections in it.
        let increase = influx
            .rows(
                "h",
                &format!(
                    "SELECT \"calls_increase\" FROM \"rollup\".\"testkit\" WHERE time = {start}ms"
                ),
            )
            .expect("increase");
        let calls = calls_in(start, start + 1000);
        assert_eq!(
            increase.first().and_then(|r| r["calls_increase"].as_f64()),
            Some(calls.len() as f64),
            "window {start}"
        );
    }
}

#[test]
fn batches_wait_for_each_other_and_go_out_in_one_request() {
    build();
    let work = Workdir::new();
    let (port, seen) = scripted::serve(|_, _| (204, vec![], String::new()));
    let sinks = influx_sink(
        "influx",
        port,
        "database = \"m\"\ngzip = false\nlayout = \"per_metric\"",
    )
    .replacen(
        "plugin = \"influxdb\"\n",
        "plugin = \"influxdb\"\nbatch_wait = \"1s\"\n",
        1,
    );
    let mut agent = Agent::start(&work, &config("100ms", &sinks), &[]).expect("start");
    agent.wait_ready().expect("ready");
    let requests = wait_for("four requests", Duration::from_secs(20), || {
        let seen = seen.lock().ok()?.clone();
        (seen.len() >= 4).then_some(seen)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    // A collection is 6 lines (calls, generation, 2 concurrency gauges, 2 values); each write
    // waited 0.5 to 1 s for the collections of 100 ms each to join it.
    for r in &requests {
        assert!(r.lines >= 18, "a request of {} lines", r.lines);
        assert_eq!(r.lines % 6, 0, "whole collections: {}", r.body);
    }
    // Merged batches keep each collection's own timestamp.
    let stamps: BTreeSet<&str> = requests[1]
        .body
        .lines()
        .filter(|l| l.starts_with("testkit_calls_total"))
        .filter_map(|l| l.rsplit(' ').next())
        .collect();
    assert_eq!(stamps.len(), requests[1].lines / 6);
}

#[test]
fn a_corrupt_spool_is_reported_and_skipped_and_the_agent_runs() {
    build();
    let work = Workdir::new();
    let influx = InfluxServer::start(&work, false).expect("influxd");
    influx.query("", "CREATE DATABASE \"c\"").expect("db");
    // What a power loss can leave: a segment whose record header promises more than is there,
    // and one of random bytes.
    let spool = work.path("spool/influx");
    std::fs::create_dir_all(&spool).expect("mkdir");
    let mut torn = 4000u32.to_le_bytes().to_vec();
    torn.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3]);
    std::fs::write(spool.join("00000000000000000000.seg"), torn).expect("write");
    // A complete record whose checksum is wrong.
    let mut bad = 4u32.to_le_bytes().to_vec();
    bad.extend_from_slice(&[0, 0, 0, 0, 1, 2, 3, 4]);
    bad.extend_from_slice(&[0x5a; 288]);
    std::fs::write(spool.join("00000000000000000001.seg"), bad).expect("write");
    let config = spooled_config(&work, influx.port, "c");
    let mut agent = Agent::start(&work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    wait_for("new points", Duration::from_secs(20), || {
        (calls_written(&influx, "c", "").len() >= 3).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_eq!(
        agent.stat("metricsd_sink_spool_corrupt_bytes_total{sink=\"influx\"}"),
        Some(311.0),
        "{}",
        agent.stderr()
    );
    let logs = agent.stderr();
    assert!(logs.contains("damaged spool segment"), "{logs}");
    assert!(logs.contains("torn write"), "{logs}");
    assert!(logs.contains("checksum does not match"), "{logs}");
}

#[test]
fn a_spool_in_use_by_another_agent_disables_the_sink_and_the_agent_runs() {
    build();
    let work = Workdir::new();
    let config = spooled_config(&work, metricsd_e2e::free_port(), "c");
    let mut first = Agent::start(&work, &config, &[]).expect("first");
    first.wait_ready().expect("first ready");
    let second_dir = Workdir::new();
    let mut second = Agent::start(&second_dir, &config, &[]).expect("second");
    second.wait_ready().expect("second ready");
    let health = wait_health(&second, "in use by another metricsd");
    assert!(health.contains("\"disabled\""), "{health}");
    // Its collector goes on.
    second
        .wait_stat(
            "metricsd_collector_collections_total{collector=\"tk\"}",
            3.0,
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("collections in the second agent: {e}"));
    assert!(first.is_running());
}

#[test]
fn a_label_value_line_protocol_cannot_carry_as_it_is_does_not_hide_the_series() {
    build();
    let work = Workdir::new();
    let influx = InfluxServer::start(&work, false).expect("influxd");
    // A GPU name with quotes and a trailing backslash, a line break, and a backslash before a
    // comma (which no escaping can carry through InfluxDB 1.x).
    let labels =
        r#"labels = { name = "NVIDIA \"H100\" 80GB\\", note = "line\nbreak", path = "C:\\x\\,y" }"#;
    let config = config(
        "250ms",
        &influx_sink(
            "c",
            influx.port,
            "database = \"odd\"\ncreate_database = true",
        ),
    )
    .replace(
        &format!("labels = {{ odd = {} }}", toml_string(ODD)),
        labels,
    );
    assert!(config.contains("line\\nbreak"), "{config}");
    let agent = Agent::start(&work, &config, &[]).expect("start");
    let rows = wait_rows(
        &influx,
        &agent,
        "odd",
        "SELECT * FROM \"metricsd\".\"testkit\" WHERE \"series\" = '1'",
        2,
    );
    for row in &rows {
        assert_eq!(row["name"], "NVIDIA \"H100\" 80GB", "{row:?}");
        assert_eq!(row["note"], "line\\nbreak", "{row:?}");
        assert!(row.get("path").is_none_or(|v| v.is_null()), "{row:?}");
    }
    let altered = agent
        .stat("metricsd_sink_altered_samples_total{sink=\"c\"}")
        .unwrap_or(0.0);
    assert!(altered >= 2.0, "altered samples counted: {altered}");
    let dropped = agent
        .stat("metricsd_sink_dropped_samples_total{reason=\"invalid\",sink=\"c\"}")
        .unwrap_or(0.0);
    assert_eq!(dropped, 0.0, "nothing dropped");
    assert!(agent
        .stderr()
        .contains("samples written with a label changed"));
}

/// Field values InfluxDB holds in measurement `testkit` of `db`: the samples it stored.
fn stored_samples(influx: &InfluxServer, db: &str) -> f64 {
    influx
        .rows(db, "SELECT COUNT(*) FROM \"testkit\"")
        .unwrap_or_default()
        .iter()
        .flat_map(|row| row.iter())
        .filter(|(k, _)| k.starts_with("count_"))
        .filter_map(|(_, v)| v.as_f64())
        .sum()
}

/// A size-limited tmpfs, unmounted when dropped.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(path: std::path::PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&path).expect("mkdir");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and must run as root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(path)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the filesystem of `dir` with one file until the disk refuses more.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let chunk = [0u8; 4096];
    loop {
        if let Err(e) = f.write_all(&chunk) {
            assert_eq!(e.raw_os_error(), Some(28), "ENOSPC expected: {e}");
            break;
        }
    }
    path
}

#[test]
fn a_full_disk_during_an_outage_loses_nothing_and_leaves_the_spool_readable() {
    build();
    let work = Workdir::new();
    let mut influx = InfluxServer::start(&work, false).expect("influxd");
    influx.query("", "CREATE DATABASE \"full\"").expect("db");
    let disk = SmallFs::mount(work.path("spool"), "1m");
    // The default spool mode; a memory queue (and spool cache) of 2,000 samples, so that an
    // outage of more than ~4 s is read back from disk.
    let config = spooled_config(&work, influx.port, "full")
        .replace("interval = \"200ms\"", "interval = \"100ms\"")
        .replace("series = 2", "series = 50")
        .replace("spool = true\n", "spool = true\nqueue_capacity = 2000\n");
    let mut agent = Agent::start(&work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    wait_for("first points", Duration::from_secs(20), || {
        (calls_written(&influx, "full", "").len() >= 3).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    let segments = |agent: &Agent| -> u64 {
        std::fs::read_dir(work.path("spool/influx"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
                    .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                    .sum()
            })
            .unwrap_or_else(|e| panic!("spool dir: {e}\n{}", agent.stderr()))
    };
    assert_eq!(segments(&agent), 0, "a healthy sink writes nothing to disk");
    influx.stop();
    let queued = "metricsd_sink_queue_samples{sink=\"influx\"}";
    agent
        .wait_stat(queued, 3000.0, Duration::from_secs(30))
        .expect("an outage longer than the memory queue");
    assert!(segments(&agent) > 0, "the outage goes to disk");
    // The disk fills: appends fail (the last one part-way), the batches wait in memory.
    let filler = fill(&work.path("spool"));
    let errors = "metricsd_sink_spool_errors_total{sink=\"influx\"}";
    agent
        .wait_stat(errors, 3.0, Duration::from_secs(20))
        .expect("appends refused by the full disk");
    std::fs::remove_file(&filler).expect("room again");
    let depth = agent.stat(queued).expect("depth");
    agent
        .wait_stat(queued, depth + 3000.0, Duration::from_secs(30))
        .expect("the spool grows again, past its memory cache");
    influx.restart().expect("influxd back");
    let calls = wait_for("the outage delivered", Duration::from_secs(60), || {
        let depth = agent.stat(queued)?;
        (depth < 1000.0).then(|| calls_written(&influx, "full", ""))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_gapless(&calls, "across the full disk");
    let accounts = agent.settled_accounts("influx", 1000.0).expect("accounts");
    assert_eq!(accounts.dropped, 0.0, "{accounts:?}");
    assert_stored_is_written(&agent, &influx, "full", 0.0);
    let logs = agent.stderr();
    assert!(!logs.contains("cannot be read back"), "{logs}");
    let status = agent.terminate().expect("terminate");
    assert!(status.success(), "{status:?}");
    let first_log = agent.stderr();
    let before = calls_written(&influx, "full", "").len();
    // The next start finds a clean spool.
    let mut agent = Agent::start(&work, &config, &[]).expect("restart");
    agent.wait_ready().expect("ready again");
    wait_for("new points", Duration::from_secs(20), || {
        (calls_written(&influx, "full", "").len() >= before + 5).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_eq!(
        agent
            .stat("metricsd_sink_spool_corrupt_bytes_total{sink=\"influx\"}")
            .unwrap_or(0.0),
        0.0,
        "{}\n--- first run ---\n{first_log}",
        agent.stderr()
    );
    assert!(!agent.stderr().contains("damaged spool segment"));
    drop(agent);
    drop(disk);
}

/// Checks, against what InfluxDB holds, that the agent counts written exactly what was
/// stored (less the `seeded` samples the test wrote itself): the written count read just
/// before and just after the query brackets it.
fn assert_stored_is_written(agent: &Agent, influx: &InfluxServer, db: &str, seeded: f64) {
    let before = agent.accounts("influx").expect("accounts");
    let stored = stored_samples(influx, db) - seeded;
    let after = agent.accounts("influx").expect("accounts");
    assert!(
        before.written <= stored && stored <= after.written,
        "InfluxDB holds {stored} samples; the agent counted {} written before the query, {} after",
        before.written,
        after.written
    );
}

#[test]
fn what_influxdb_stores_is_what_the_agent_counts_written() {
    build();
    let work = Workdir::new();
    let mut influx = InfluxServer::start(&work, false).expect("influxd");
    influx.query("", "CREATE DATABASE \"acct\"").expect("db");
    let config = config(
        "100ms",
        &influx_sink("influx", influx.port, "database = \"acct\""),
    );
    let mut agent = Agent::start(&work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    wait_for("first points", Duration::from_secs(20), || {
        (calls_written(&influx, "acct", "").len() >= 5).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    // An outage without a spool: the memory queue keeps it.
    influx.stop();
    agent
        .wait_stat(
            "metricsd_sink_write_errors_total{kind=\"transient\",sink=\"influx\"}",
            2.0,
            Duration::from_secs(20),
        )
        .expect("failed writes");
    influx.restart().expect("influxd back");
    let settled = agent.settled_accounts("influx", 100.0).expect("accounts");
    // Nothing was refused; what the agent counts written is exactly what InfluxDB holds.
    assert_eq!(settled.dropped, 0.0, "{settled:?}");
    assert_stored_is_written(&agent, &influx, "acct", 0.0);
}

#[test]
fn a_partial_write_of_lines_of_different_sizes_counts_exactly_what_was_refused() {
    build();
    let work = Workdir::new();
    let influx = InfluxServer::start(&work, false).expect("influxd");
    influx.query("", "CREATE DATABASE \"g\"").expect("create");
    // In the grouped layout a testkit collection is 5 lines of different sizes, two of them
    // one `value` field each (per series). `value` is now an integer field: InfluxDB refuses
    // those two lines (2 samples of 6), says `dropped=2` and names field and measurement of
    // the conflict.
    seed(&influx, "g", "testkit,series=old value=1i");
    let config = config(
        "250ms",
        &influx_sink("influx", influx.port, "database = \"g\""),
    );
    let mut agent = Agent::start(&work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    agent
        .wait_stat(
            "metricsd_sink_writes_total{sink=\"influx\"}",
            4.0,
            Duration::from_secs(20),
        )
        .expect("writes");
    let accounts = agent.settled_accounts("influx", 100.0).expect("accounts");
    // Every refusal is of exactly the two `value` samples: received is a multiple of 6, and
    // a third of what left the queue was refused.
    let done = accounts.received - accounts.queued;
    let dropped: Vec<&(String, f64)> = accounts
        .dropped_by_reason
        .iter()
        .filter(|(_, n)| *n > 0.0)
        .collect();
    assert_eq!(
        dropped,
        vec![&(
            "reason=\"rejected\",sink=\"influx\"".to_string(),
            done / 3.0
        )],
        "{accounts:?}\n{}",
        agent.stderr()
    );
    assert_stored_is_written(&agent, &influx, "g", 1.0);
    let logs = agent.stderr();
    assert!(logs.contains("InfluxDB refused 2 of 5 lines"), "{logs}");
}

#[test]
fn a_crash_during_an_outage_loses_nothing_that_was_spooled() {
    build();
    let work = Workdir::new();
    let mut influx = InfluxServer::start(&work, false).expect("influxd");
    influx.query("", "CREATE DATABASE \"k\"").expect("db");
    // The default `spool_mode = "overflow"`: from the first failed write every batch goes to
    // disk, so a crash (SIGKILL) in the middle of an outage loses none of them.
    let config = spooled_config(&work, influx.port, "k");
    let first_start = now_ms();
    let mut agent = Agent::start(&work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    wait_for("first points", Duration::from_secs(20), || {
        (calls_written(&influx, "k", "").len() >= 3).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    influx.stop();
    agent
        .wait_stat(
            "metricsd_sink_queue_samples{sink=\"influx\"}",
            50.0,
            Duration::from_secs(30),
        )
        .expect("collections during the outage");
    let status = std::process::Command::new("kill")
        .args(["-KILL", &agent.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    wait_for("the agent gone", Duration::from_secs(10), || {
        (!agent.is_running()).then_some(())
    })
    .expect("killed");
    let crashed = now_ms();
    influx.restart().expect("influxd back");
    let mut agent = Agent::start(&work, &config, &[]).expect("restart");
    agent.wait_ready().expect("ready again");
    assert!(
        agent
            .stderr()
            .contains("left in the spool by the last run are delivered first"),
        "{}",
        agent.stderr()
    );
    // Every collection of the first run, up to the crash, is in InfluxDB once the spool is
    // delivered: its calls count 1, 2, … without a gap, and there are at least as many as
    // were queued when it was killed (5 samples a collection).
    let first_run = wait_for("the first run's points", Duration::from_secs(30), || {
        let calls = calls_between(&influx, "k", first_start, crashed);
        let queued = agent.stat("metricsd_sink_queue_samples{sink=\"influx\"}")?;
        (queued < 20.0 && calls.len() >= 10).then_some(calls)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_gapless(&first_run, "first run, across the crash");
}
