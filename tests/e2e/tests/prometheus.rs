//! The system collector and the Prometheus sink against real tools: `promtool check metrics`
//! on a live scrape, a real Prometheus server scraping metricsd (plain, and over TLS with basic
//! auth) and queried back through its HTTP API.

use std::time::Duration;

use metricsd_e2e::{
    http_get, http_get_with, promtool_check_metrics, series_value, wait_for, Agent,
    PrometheusServer, Workdir,
};

/// Label values that stress the exposition format's escaping.
const WEIRD: &str =
    "quote \" backslash \\ newline \n tab \t UTF-8 é 漢字 🚀 {brace} =equals, comma";

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn agent_config(extra_sink_config: &str, extra_http: &str) -> String {
    format!(
        r#"
[agent]
interval = "250ms"
labels = {{ node_id = "node-7", provider = "acme" }}
[http]
health_listen = "127.0.0.1:{{health}}"
metrics_listen = "127.0.0.1:{{metrics}}"
{extra_http}
[[collectors]]
name = "system"
plugin = "system"
[[collectors]]
name = "weird"
plugin = "testkit"
[collectors.config]
series = 2
labels = {{ weird = {weird} }}
[[sinks]]
name = "prom"
plugin = "prometheus"
[sinks.config]
{extra_sink_config}
"#,
        weird = toml_string(WEIRD)
    )
}

fn scrape(agent: &Agent) -> String {
    http_get(agent.metrics_port, "/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default()
}

fn wait_for_series(agent: &Agent, names: &[&str]) -> String {
    wait_for("the series to be exposed", Duration::from_secs(20), || {
        let body = scrape(agent);
        names.iter().all(|n| body.contains(n)).then_some(body)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()))
}

#[test]
fn a_live_scrape_passes_promtool() {
    let work = Workdir::new();
    let mut agent = Agent::start(&work, &agent_config("", ""), &[]).expect("start");
    agent.wait_ready().expect("ready");
    let body = wait_for_series(
        &agent,
        &[
            "node_cpu_seconds_total{",
            "node_load1 ",
            "testkit_value{",
            "metricsd_collector_up{",
        ],
    );
    let (code, report) = promtool_check_metrics(&body);
    // promtool lints node_exporter's own names: camelCase memory and netstat fields
    // (node_memory_MemTotal_bytes, node_netstat_Tcp_InSegs), entropy in bits. metricsd keeps
    // them so node_exporter dashboards work (promtool reports the same for node_exporter's own
    // exposition). Nothing else may be reported.
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            let camel = (l.starts_with("node_memory_") || l.starts_with("node_netstat_"))
                && l.ends_with("metric names should be written in 'snake_case' not 'camelCase'");
            let bits = l.starts_with("node_entropy_")
                && l.ends_with("use base unit \"bytes\" instead of \"bits\"");
            !(camel || bits)
        })
        .collect();
    assert!(
        problems.is_empty(),
        "promtool (exit {code:?}):\n{report}\n---\n{body}"
    );
    assert!(matches!(code, Some(0) | Some(3)), "{report}");

    // The escaped label value is in the exposition, on one line.
    assert!(
        body.contains(r#"weird="quote \" backslash \\ newline \n tab 	 UTF-8 é 漢字 🚀 {brace} =equals, comma""#),
        "{body}"
    );
    // Static labels reach every series.
    assert!(body
        .lines()
        .filter(|l| l.starts_with("node_load1"))
        .all(|l| l.contains("node_id=\"node-7\"")));
    assert_eq!(
        body.matches("\nnode_load1{").count(),
        1,
        "no duplicate series"
    );

    // OpenMetrics when asked, gzip when allowed.
    let (status, headers, om) = http_get_with(
        agent.metrics_port,
        "/metrics",
        &[("Accept", "application/openmetrics-text; version=1.0.0")],
    )
    .expect("scrape");
    assert_eq!(status, 200);
    let content_type = headers
        .iter()
        .find(|(k, _)| k == "content-type")
        .map(|(_, v)| v.as_str());
    assert_eq!(
        content_type,
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let om = String::from_utf8(om).expect("utf-8");
    assert!(om.ends_with("# EOF\n"));
    assert!(
        om.contains("# TYPE node_cpu_seconds counter\n# UNIT node_cpu_seconds seconds\n"),
        "{om}"
    );
    let (_, headers, gz) = http_get_with(
        agent.metrics_port,
        "/metrics",
        &[("Accept-Encoding", "gzip")],
    )
    .expect("scrape");
    assert!(headers
        .iter()
        .any(|(k, v)| k == "content-encoding" && v == "gzip"));
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip magic");
}

#[test]
fn prometheus_scrapes_metricsd_and_finds_sane_values() {
    let work = Workdir::new();
    let mut agent = Agent::start(&work, &agent_config("", ""), &[]).expect("start");
    agent.wait_ready().expect("ready");
    let prometheus = PrometheusServer::start(
        &work,
        &format!(
            "  - job_name: metricsd\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            agent.metrics_port
        ),
    )
    .expect("prometheus");

    let query = |q: &str| -> Vec<serde_json::Value> {
        wait_for(q, Duration::from_secs(30), || {
            prometheus.query(q).ok().filter(|r| !r.is_empty())
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nprometheus: {}\nagent: {}",
                prometheus.log(),
                agent.stderr()
            )
        })
    };
    let value = |r: &serde_json::Value| -> f64 {
        r["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .expect("numeric value")
    };

    let up = query("up{job=\"metricsd\"}");
    assert_eq!(value(&up[0]), 1.0, "{up:?}");

    let mem_total: f64 = std::fs::read_to_string("/proc/meminfo")
        .expect("meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .expect("MemTotal")
        * 1024.0;
    let mem = query("node_memory_MemTotal_bytes");
    assert_eq!(value(&mem[0]), mem_total);
    assert_eq!(mem[0]["metric"]["node_id"], "node-7");
    assert_eq!(mem[0]["metric"]["provider"], "acme");

    let cpus = query("count(count by (cpu) (node_cpu_seconds_total))");
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    assert!(value(&cpus[0]) >= n, "{cpus:?}");
    let idle = query("sum(rate(node_cpu_seconds_total{mode=\"idle\"}[5s]))");
    let idle = value(&idle[0]);
    assert!(
        (0.0..=n * 1.1).contains(&idle),
        "idle CPU seconds per second: {idle}"
    );
    let load = query("node_load1");
    assert!(value(&load[0]) >= 0.0);
    let root = query("node_filesystem_avail_bytes{mountpoint=\"/\"} <= node_filesystem_size_bytes{mountpoint=\"/\"}");
    assert!(value(&root[0]) > 0.0);

    // The label value full of quotes, backslashes, newlines and UTF-8 survives the round trip.
    let weird = query("testkit_value{series=\"1\"}");
    assert_eq!(weird[0]["metric"]["weird"], WEIRD);
    // The agent's own metrics arrive through the same pipeline.
    let collections = query("metricsd_collector_collections_total{collector=\"system\"}");
    assert!(value(&collections[0]) >= 1.0);
    // Every sample routed to the sink was applied to the exposition (none dropped).
    let accounts = agent.settled_accounts("prom", 5000.0).expect("accounts");
    assert_eq!(accounts.dropped, 0.0, "{accounts:?}");
    assert!(accounts.written > 0.0, "{accounts:?}");
}

#[test]
fn series_that_stop_are_removed_after_the_staleness_window() {
    let work = Workdir::new();
    let config = agent_config("stale_after = \"1s\"", "")
        .replace("series = 2\n", "series = 2\nseries_until = 4\n");
    let mut agent = Agent::start(&work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    wait_for_series(&agent, &["testkit_value{"]);
    let gone = wait_for("testkit_value to go stale", Duration::from_secs(15), || {
        let body = scrape(&agent);
        (!body.contains("testkit_value") && body.contains("testkit_calls_total")).then_some(body)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", scrape(&agent)));
    // The instance keeps reporting its other series.
    let calls = series_value(
        &gone,
        "testkit_calls_total{node_id=\"node-7\",provider=\"acme\"}",
    );
    assert!(calls.is_some_and(|c| c > 4.0), "{gone}");
}

fn tls_material(work: &Workdir) -> (String, String) {
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("certificate");
    let cert_path = work.write("tls/server.crt", cert.pem());
    let key_path = work.write("tls/server.key", key_pair.serialize_pem());
    (
        cert_path.display().to_string(),
        key_path.display().to_string(),
    )
}

#[test]
fn basic_auth_without_tls() {
    let work = Workdir::new();
    let hash = bcrypt::hash("correct horse", 6).expect("bcrypt");
    let web = work.write(
        "web.yml",
        format!("basic_auth_users:\n  scraper: '{hash}'\n"),
    );
    let mut agent = Agent::start(
        &work,
        &agent_config("", &format!("web_config_file = \"{}\"", web.display())),
        &[],
    )
    .expect("start");
    agent.wait_ready().expect("ready");
    let auth = |user: &str, password: &str| {
        use base64::Engine as _;
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!("Basic {encoded}")
    };
    let (status, _, _) = http_get_with(agent.metrics_port, "/metrics", &[]).expect("get");
    assert_eq!(status, 401);
    let (status, headers, _) = http_get_with(
        agent.metrics_port,
        "/metrics",
        &[("Authorization", &auth("scraper", "wrong"))],
    )
    .expect("get");
    assert_eq!(status, 401);
    assert!(headers
        .iter()
        .any(|(k, v)| k == "www-authenticate" && v.contains("Basic")));
    let body = wait_for(
        "an authorized scrape with samples",
        Duration::from_secs(10),
        || {
            let (status, _, body) = http_get_with(
                agent.metrics_port,
                "/metrics",
                &[("Authorization", &auth("scraper", "correct horse"))],
            )
            .ok()?;
            (status == 200 && String::from_utf8_lossy(&body).contains("node_load1")).then_some(body)
        },
    )
    .expect("authorized scrape");
    assert!(!body.is_empty());
    let (status, _, _) = http_get_with(
        agent.health_port,
        "/health",
        &[("Authorization", &auth("scraper", "correct horse"))],
    )
    .expect("health");
    assert_eq!(status, 200, "the health listener uses the same web config");
    let logs = agent.stderr();
    assert!(
        !logs.contains("correct horse") && !logs.contains(&hash),
        "secrets stay out of logs"
    );
}

#[test]
fn prometheus_scrapes_over_tls_with_basic_auth() {
    let work = Workdir::new();
    let (cert, key) = tls_material(&work);
    let hash = bcrypt::hash("s3cret", 6).expect("bcrypt");
    let web = work.write(
        "web.yml",
        format!("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\nbasic_auth_users:\n  prometheus: '{hash}'\n"),
    );
    let mut agent = Agent::start(
        &work,
        &agent_config("", &format!("web_config_file = \"{}\"", web.display())),
        &[],
    )
    .expect("start");
    // Plain HTTP to the TLS port fails cleanly and the agent keeps serving.
    let plain = wait_for("the TLS listener", Duration::from_secs(20), || {
        if !agent.is_running() {
            panic!("agent exited: {}", agent.stderr());
        }
        std::net::TcpStream::connect(("127.0.0.1", agent.metrics_port)).ok()?;
        Some(http_get(agent.metrics_port, "/metrics"))
    })
    .expect("listener");
    assert!(
        plain
            .as_ref()
            .map(|(status, _)| *status >= 400)
            .unwrap_or(true),
        "plain HTTP must not get metrics from a TLS port: {plain:?}"
    );

    let job = |name: &str, password: &str| {
        format!(
            "  - job_name: {name}\n    scheme: https\n    tls_config:\n      ca_file: {cert}\n      server_name: localhost\n    basic_auth:\n      username: prometheus\n      password: {password}\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            agent.metrics_port
        )
    };
    let prometheus = PrometheusServer::start(
        &work,
        &format!("{}{}", job("good", "s3cret"), job("bad", "wrong")),
    )
    .expect("prometheus");
    let targets = wait_for("both targets scraped", Duration::from_secs(30), || {
        let t = prometheus.targets().ok()?;
        let health = |job: &str| {
            t.iter()
                .find(|x| x["labels"]["job"] == job)
                .and_then(|x| x["health"].as_str().map(String::from))
        };
        (health("good").as_deref() == Some("up") && health("bad").as_deref() == Some("down"))
            .then_some(t)
    })
    .unwrap_or_else(|e| panic!("{e}\n{:?}\n{}", prometheus.targets(), prometheus.log()));
    let bad = targets
        .iter()
        .find(|x| x["labels"]["job"] == "bad")
        .expect("bad job");
    assert!(
        bad["lastError"].as_str().is_some_and(|e| e.contains("401")),
        "{bad}"
    );
    let up = wait_for("node_load1 over TLS", Duration::from_secs(20), || {
        prometheus
            .query("node_load1{job=\"good\"}")
            .ok()
            .filter(|r| !r.is_empty())
    })
    .expect("query");
    assert_eq!(up[0]["metric"]["node_id"], "node-7");
    assert!(agent.is_running());
    assert!(!agent.stderr().contains("s3cret"));
}

#[test]
fn a_reserved_label_or_a_clashing_family_costs_its_samples_not_the_scrape() {
    let work = Workdir::new();
    let config = agent_config("", "").replace(
        "labels = { weird",
        "reserved_label = true\nclashing_family = true\nlabels = { weird",
    );
    assert!(config.contains("clashing_family = true"), "{config}");
    let mut agent = Agent::start(&work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    let prometheus = PrometheusServer::start(
        &work,
        &format!(
            "  - job_name: metricsd\n    scrape_interval: 1s\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            agent.metrics_port
        ),
    )
    .expect("prometheus");
    // Prometheus refuses a whole scrape over one `__name__` label or two TYPE lines for one
    // OpenMetrics family: the agent refuses those samples instead, and the scrape is kept.
    let up = wait_for("a scrape", Duration::from_secs(30), || {
        prometheus
            .query("up{job=\"metricsd\"}")
            .ok()
            .filter(|r| !r.is_empty())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", prometheus.log()));
    assert_eq!(up[0]["value"][1], "1", "{up:?}\n{:?}", prometheus.targets());
    for q in [
        "node_load1",
        "testkit_calls_total",
        "testkit_value{series=\"1\"}",
    ] {
        wait_for(q, Duration::from_secs(30), || {
            prometheus.query(q).ok().filter(|r| !r.is_empty())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    }
    assert!(
        prometheus.query("testkit_calls").expect("query").is_empty(),
        "the clashing gauge is not served"
    );
    let body = scrape(&agent);
    assert!(!body.contains("__name__"), "{body}");
    let invalid = agent
        .stat("metricsd_collector_invalid_samples_total{collector=\"weird\"}")
        .unwrap_or(0.0);
    assert!(invalid >= 2.0, "counted: {invalid}");
    let logs = agent.stderr();
    // One line names both causes of the batch, not the first.
    assert!(
        logs.lines()
            .any(|l| l.contains("reserved label name `__name__`")
                && l.contains("clashes with `testkit_calls_total`")),
        "{logs}"
    );
}
