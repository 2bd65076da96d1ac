//! GPU discovery over gRPC: the reference server (examples/discovery-server) as a real
//! process on loopback, serving the NVML simulator's GPUs with an inventory file's labels; the
//! agent's discovery collector and `[[enrich]]` joining them onto the NVML series; the server
//! changing, dying and coming back; and a hostile server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use metricsd_discovery_proto::{
    Gpu, GpuDiscovery, GpuDiscoveryServer, GpuEvent, ListGpusRequest, ListGpusResponse,
    WatchGpusRequest,
};
use metricsd_e2e::servers::InfluxServer;
use metricsd_e2e::{
    build, free_port, http_get, root, rss_kib, series_value, wait_for, Agent, Workdir,
};

fn scenario() -> String {
    root()
        .join("tests/nvml-sim/scenarios/h100-sxm-2.toml")
        .display()
        .to_string()
}

/// The simulator's uuid of GPU `index` (tests/nvml-sim: `GPU-5f7c{index:04x}-…`).
fn sim_uuid(index: usize) -> String {
    format!("GPU-5f7c{index:04x}-1d2e-4c3b-9a8f-0e1d2c3b{index:04x}")
}

fn inventory_text(rental0: &str) -> String {
    format!(
        "node_id = \"node-7\"\nprovider = \"acme\"\n[[gpus]]\nuuid = \"{}\"\ngpu_id = \"net-gpu-0\"\nhealth = \"healthy\"\nlabels = {{ rental = \"{rental0}\" }}\n[[gpus]]\nuuid = \"{}\"\ngpu_id = \"net-gpu-1\"\nlabels = {{ rental = \"rented\" }}\n",
        sim_uuid(0),
        sim_uuid(1)
    )
}

/// The reference server, a child process.
struct DiscoveryServer {
    child: Option<Child>,
    port: u16,
    inventory: PathBuf,
    log: PathBuf,
    /// `--tls-cert` and `--tls-key`.
    tls: Option<(PathBuf, PathBuf)>,
}

impl DiscoveryServer {
    fn start(work: &Workdir, port: u16, inventory: &Path) -> Self {
        Self::start_tls(work, port, inventory, None)
    }

    fn start_tls(
        work: &Workdir,
        port: u16,
        inventory: &Path,
        tls: Option<(PathBuf, PathBuf)>,
    ) -> Self {
        let mut server = Self {
            child: None,
            port,
            inventory: inventory.to_path_buf(),
            log: work.path("discovery-server.log"),
            tls,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let dir = build();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let mut cmd = Command::new(dir.join("discovery-server"));
        if let Some((cert, key)) = &self.tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        let child = cmd
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--inventory")
            .arg(&self.inventory)
            .arg("--nvml")
            .arg("--nvml-library")
            .arg(dir.join("libnvml_sim.so"))
            .arg("--poll-interval")
            .arg("200ms")
            .env("NVML_SIM_SCENARIO", scenario())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start discovery-server");
        self.child = Some(child);
        let port = self.port;
        wait_for(
            "the discovery server to listen",
            Duration::from_secs(20),
            || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", self.log()));
    }

    /// Kills it (SIGKILL: a crash, not a clean stop).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for DiscoveryServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn agent_config(discovery_port: u16) -> String {
    agent_config_to(&format!("127.0.0.1:{discovery_port}"), "")
}

/// The agent's config with the discovery collector at `endpoint` and `extra` discovery keys.
fn agent_config_to(endpoint: &str, extra: &str) -> String {
    let dir = build();
    format!(
        r#"[agent]
interval = "300ms"
max_backoff = "1s"
internal_metrics = false
[agent.labels]
node_id = "static-node"
[http]
health_listen = "127.0.0.1:{{health}}"
metrics_listen = "127.0.0.1:{{metrics}}"
[[collectors]]
name = "gpu"
plugin = "nvml"
[collectors.config]
library_path = "{sim}"
[[collectors]]
name = "discovery"
plugin = "discovery"
[collectors.config]
endpoint = "{endpoint}"
max_backoff = "1s"
{extra}
[[sinks]]
name = "prom"
plugin = "prometheus"
[sinks.config]
stale_after = "1500ms"
[[enrich]]
from = ["gpu"]
info = "discovery"
labels = ["gpu_id", "provider", "rental", "node_id"]
"#,
        sim = dir.join("libnvml_sim.so").display()
    )
}

/// The `/metrics` line of `metric` for GPU `gpu`, if exactly one is there.
fn gpu_line(body: &str, metric: &str, gpu: &str) -> Option<String> {
    let lines: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| l.contains(&format!("gpu=\"{gpu}\"")))
        .collect();
    (lines.len() == 1).then(|| lines[0].to_string())
}

/// `gpu_discovery_up` with the agent's static label.
const UP: &str = "gpu_discovery_up{node_id=\"static-node\"}";

fn scrape(agent: &Agent) -> String {
    http_get(agent.metrics_port, "/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default()
}

#[test]
fn gpu_series_carry_the_inventory_labels_follow_changes_and_fall_back_when_the_service_dies() {
    build();
    let work = Workdir::new();
    let port = free_port();
    let inventory = work.write("inventory.toml", inventory_text("idle"));
    let mut server = DiscoveryServer::start(&work, port, &inventory);
    let mut agent = Agent::start(
        &work,
        &agent_config(port),
        &[("NVML_SIM_SCENARIO", scenario().as_str())],
    )
    .expect("start");
    agent.wait_ready().expect("ready");
    let fail = |e: anyhow::Error, agent: &Agent, server: &DiscoveryServer| -> ! {
        panic!(
            "{e}\n--- agent\n{}\n--- server\n{}",
            agent.stderr(),
            server.log()
        )
    };

    // Enriched: the NVML series of GPU 0 carry the inventory's labels; the node id of the
    // inventory replaces the static one on GPU series.
    let line = wait_for("enriched GPU series", Duration::from_secs(30), || {
        gpu_line(&scrape(&agent), "gpu_temperature_celsius", "0")
            .filter(|l| l.contains("gpu_id=\"net-gpu-0\""))
    })
    .unwrap_or_else(|e| fail(e, &agent, &server));
    for label in [
        "rental=\"idle\"",
        "provider=\"acme\"",
        "node_id=\"node-7\"",
        &format!("uuid=\"{}\"", sim_uuid(0)),
    ] {
        assert!(line.contains(label), "{label} in {line}");
    }
    let body = scrape(&agent);
    assert_eq!(series_value(&body, UP), Some(1.0), "{body}");
    assert_eq!(
        series_value(&body, "gpu_discovery_gpus{node_id=\"static-node\"}"),
        Some(2.0)
    );
    let info = body
        .lines()
        .find(|l| l.starts_with("gpu_discovery_info{") && l.contains("net-gpu-1"))
        .expect("info of GPU 1");
    assert!(
        info.contains("model=\"NVIDIA H100 80GB HBM3\""),
        "NVML's identity merged: {info}"
    );
    assert!(gpu_line(&body, "gpu_power_usage_watts", "1")
        .is_some_and(|l| l.contains("rental=\"rented\"")));

    // A change of the inventory is pushed (WatchGpus) and shows without a restart.
    std::fs::write(&inventory, inventory_text("maintenance")).expect("write");
    wait_for("the changed label", Duration::from_secs(30), || {
        gpu_line(&scrape(&agent), "gpu_temperature_celsius", "0")
            .filter(|l| l.contains("rental=\"maintenance\""))
    })
    .unwrap_or_else(|e| fail(e, &agent, &server));
    assert!(server.log().contains("LabelsChanged"), "{}", server.log());

    // The service dies: discovery down, NVML identity only, everything else goes on.
    server.kill();
    let collections = |agent: &Agent| {
        agent
            .stat("metricsd_collector_collections_total{collector=\"gpu\"}")
            .unwrap_or(0.0)
    };
    let line = wait_for("NVML-only labels", Duration::from_secs(30), || {
        let body = scrape(&agent);
        (series_value(&body, UP) == Some(0.0))
            .then(|| gpu_line(&body, "gpu_temperature_celsius", "0"))
            .flatten()
            .filter(|l| !l.contains("gpu_id="))
    })
    .unwrap_or_else(|e| fail(e, &agent, &server));
    assert!(line.contains("node_id=\"static-node\""), "{line}");
    assert!(scrape(&agent)
        .lines()
        .all(|l| !l.starts_with("gpu_discovery_info{")));
    let (status, health) = agent.get_health("/health").expect("health");
    assert_eq!(status, 200, "degraded is not failing: {health}");
    let health: serde_json::Value = serde_json::from_str(&health).expect("json");
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(
        health["instances"]["discovery"]["state"], "degraded",
        "{health}"
    );
    assert!(health["instances"]["discovery"]["degraded"]
        .as_str()
        .is_some_and(|d| d.contains("NVML identity only")));
    assert_eq!(health["instances"]["gpu"]["state"], "ok", "{health}");
    let before = collections(&agent);
    wait_for(
        "the GPU collector to go on",
        Duration::from_secs(10),
        || (collections(&agent) >= before + 3.0).then_some(()),
    )
    .unwrap_or_else(|e| fail(e, &agent, &server));
    assert_eq!(
        agent.stderr().matches("degraded: GPU discovery").count(),
        1,
        "logged once: {}",
        agent.stderr()
    );

    // It comes back: labels again.
    server.spawn();
    wait_for("recovery", Duration::from_secs(30), || {
        let body = scrape(&agent);
        (series_value(&body, UP) == Some(1.0))
            .then(|| gpu_line(&body, "gpu_temperature_celsius", "0"))
            .flatten()
            .filter(|l| l.contains("gpu_id=\"net-gpu-0\""))
    })
    .unwrap_or_else(|e| fail(e, &agent, &server));
    let (_, health) = agent.get_health("/health").expect("health");
    let health: serde_json::Value = serde_json::from_str(&health).expect("json");
    assert_eq!(health["instances"]["discovery"]["state"], "ok", "{health}");
}

#[test]
fn discovery_over_tls_with_a_private_ca() {
    build();
    let work = Workdir::new();
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .signed_by(&key, &ca, &ca_key)
        .expect("certificate");
    let ca_path = work.write("tls/ca.pem", ca.pem());
    let tls = (
        work.write("tls/server.pem", cert.pem()),
        work.write("tls/server.key", key.serialize_pem()),
    );
    let port = free_port();
    let inventory = work.write("inventory.toml", inventory_text("idle"));
    let server = DiscoveryServer::start_tls(&work, port, &inventory, Some(tls));
    let config = agent_config_to(
        &format!("https://localhost:{port}"),
        &format!("tls_ca_file = \"{}\"", ca_path.display()),
    );
    let mut agent = Agent::start(
        &work,
        &config,
        &[("NVML_SIM_SCENARIO", scenario().as_str())],
    )
    .expect("start");
    agent.wait_ready().expect("ready");
    wait_for("enriched series over TLS", Duration::from_secs(30), || {
        gpu_line(&scrape(&agent), "gpu_temperature_celsius", "1")
            .filter(|l| l.contains("gpu_id=\"net-gpu-1\""))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", agent.stderr(), server.log()));
    // Without the CA the server's certificate is refused, and that is what the log says.
    let work2 = Workdir::new();
    let config = agent_config_to(&format!("https://localhost:{port}"), "");
    let mut untrusting = Agent::start(
        &work2,
        &config,
        &[("NVML_SIM_SCENARIO", scenario().as_str())],
    )
    .expect("start");
    untrusting.wait_ready().expect("ready");
    wait_for("a refused certificate", Duration::from_secs(30), || {
        let log = untrusting.stderr();
        (log.contains("GPU discovery unavailable") && log.to_lowercase().contains("certificate"))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", untrusting.stderr()));
    assert_eq!(series_value(&scrape(&untrusting), UP), Some(0.0));
    let log = untrusting.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("GPU discovery unavailable"))
        .unwrap_or_default();
    assert!(line.contains("set `tls_ca_file`"), "{line}");
    assert_eq!(line.matches("UnknownIssuer").count(), 1, "{line}");
}

/// A discovery service that answers with what a test sets.
struct Hostile {
    gpus: Vec<Gpu>,
    /// Stream new GPUs on WatchGpus as fast as the connection takes them.
    flood: bool,
}

type EventStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<GpuEvent, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl GpuDiscovery for Hostile {
    async fn list_gpus(
        &self,
        _: tonic::Request<ListGpusRequest>,
    ) -> Result<tonic::Response<ListGpusResponse>, tonic::Status> {
        Ok(tonic::Response::new(ListGpusResponse {
            gpus: self.gpus.clone(),
            revision: 1,
        }))
    }

    type WatchGpusStream = EventStream;

    async fn watch_gpus(
        &self,
        _: tonic::Request<WatchGpusRequest>,
    ) -> Result<tonic::Response<EventStream>, tonic::Status> {
        if !self.flood {
            return Ok(tonic::Response::new(Box::pin(tokio_stream::pending())));
        }
        let events = tokio_stream::iter((0u64..).map(|i| {
            Ok(GpuEvent {
                kind: 1, // KIND_ADDED
                gpu: Some(Gpu {
                    uuid: format!("GPU-FLOOD-{i}"),
                    ..Gpu::default()
                }),
                revision: i + 2,
            })
        }));
        Ok(tonic::Response::new(Box::pin(events)))
    }
}

/// Serves `gpus` on a loopback port from a thread of the test; returns the port.
fn serve_hostile(gpus: Vec<Gpu>) -> u16 {
    serve_hostile_with(gpus, false)
}

fn serve_hostile_with(gpus: Vec<Gpu>, flood: bool) -> u16 {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(
                    GpuDiscoveryServer::new(Hostile { gpus, flood })
                        .max_encoding_message_size(usize::MAX),
                )
                .serve(addr)
                .await;
        });
    });
    wait_for("the hostile server", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .expect("listening");
    port
}

fn discovery_only_agent(work: &Workdir, port: u16) -> Agent {
    let config = format!(
        "[agent]\ninterval = \"300ms\"\ninternal_metrics = false\n[http]\nhealth_listen = \"127.0.0.1:{{health}}\"\nmetrics_listen = \"127.0.0.1:{{metrics}}\"\n[[collectors]]\nname = \"discovery\"\nplugin = \"discovery\"\n[collectors.config]\nendpoint = \"127.0.0.1:{port}\"\nmax_backoff = \"1s\"\n[[sinks]]\nname = \"prom\"\nplugin = \"prometheus\"\n"
    );
    let mut agent = Agent::start(work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    agent
}

#[test]
fn a_hostile_inventory_is_bounded_logged_and_survived() {
    build();
    let work = Workdir::new();
    // Duplicate uuids, a 100 KiB label value, a label name Prometheus refuses, 300 GPUs
    // (more than max_gpus = 256).
    let mut gpus: Vec<Gpu> = (0..300)
        .map(|i| Gpu {
            uuid: format!("GPU-{i:04}"),
            gpu_id: format!("net-{i}"),
            ..Gpu::default()
        })
        .collect();
    gpus[1].uuid = "GPU-0000".into();
    gpus[2].labels.insert("huge".into(), "x".repeat(100 * 1024));
    gpus[3].labels.insert("bad-name".into(), "x".into());
    let port = serve_hostile(gpus);
    let agent = discovery_only_agent(&work, port);
    let body = wait_for("the bounded inventory", Duration::from_secs(30), || {
        let body = scrape(&agent);
        (series_value(&body, "gpu_discovery_up") == Some(1.0)).then_some(body)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_eq!(series_value(&body, "gpu_discovery_gpus"), Some(256.0));
    assert!(
        body.lines().all(|l| l.len() < 2048),
        "no huge label value served"
    );
    assert_eq!(
        body.lines()
            .filter(|l| l.starts_with("gpu_discovery_info{") && l.contains("uuid=\"GPU-0000\""))
            .count(),
        1
    );
    let log = agent.stderr();
    for expected in [
        "listed more than once",
        "`huge` of 102400 bytes",
        "\"bad-name\"",
        "more than max_gpus",
    ] {
        assert!(log.contains(expected), "{expected}: {log}");
    }

    // An answer over max_message_bytes (4 MiB): refused by the decoder, reported, memory bounded.
    let work2 = Workdir::new();
    let giant: Vec<Gpu> = (0..64)
        .map(|i| Gpu {
            uuid: format!("GPU-{i}"),
            model: "m".repeat(128 * 1024),
            ..Gpu::default()
        })
        .collect();
    let port = serve_hostile(giant);
    let agent = discovery_only_agent(&work2, port);
    wait_for("the refusal", Duration::from_secs(30), || {
        agent.stderr().contains("ListGpus").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    let body = scrape(&agent);
    assert_eq!(series_value(&body, "gpu_discovery_up"), Some(0.0), "{body}");
    let log = agent.stderr();
    assert!(
        log.contains("message length too large") || log.contains("OutOfRange"),
        "{log}"
    );
    assert!(
        rss_kib(agent.pid()) < 200 * 1024,
        "{} KiB",
        rss_kib(agent.pid())
    );
}

#[test]
fn a_stream_of_bad_events_is_counted_and_logged_once_not_per_event() {
    build();
    let work = Workdir::new();
    let gpus = (0..2)
        .map(|i| Gpu {
            uuid: format!("GPU-{i:04}"),
            ..Gpu::default()
        })
        .collect();
    // Two GPUs listed (max_gpus = 2), then an endless stream of new ones, each one too many.
    let port = serve_hostile_with(gpus, true);
    let config = format!(
        "[agent]\ninterval = \"300ms\"\ninternal_metrics = false\n[http]\nhealth_listen = \"127.0.0.1:{{health}}\"\nmetrics_listen = \"127.0.0.1:{{metrics}}\"\n[[collectors]]\nname = \"discovery\"\nplugin = \"discovery\"\n[collectors.config]\nendpoint = \"127.0.0.1:{port}\"\nmax_gpus = 2\n[[sinks]]\nname = \"prom\"\nplugin = \"prometheus\"\n"
    );
    let mut agent = Agent::start(&work, &config, &[]).expect("start");
    agent.wait_ready().expect("ready");
    // Every event is counted …
    let body = wait_for(
        "thousands of refused events",
        Duration::from_secs(30),
        || {
            let body = scrape(&agent);
            (series_value(&body, "gpu_discovery_problems_total")? >= 5000.0).then_some(body)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert_eq!(series_value(&body, "gpu_discovery_gpus"), Some(2.0));
    // … and logged once (a summary follows a minute later, not one line per event).
    let log = agent.stderr();
    let lines = log
        .matches("problem(s) in the discovery service's answer")
        .count();
    assert_eq!(lines, 1, "{}", &log[..log.len().min(4000)]);
    assert!(
        log.contains("gpu_discovery_problems_total counts every one"),
        "{log}"
    );
    assert!(log.len() < 64 * 1024, "{} bytes of log", log.len());
    assert!(agent.is_running());
    let status = agent.terminate().expect("terminate");
    assert!(status.success());
}

/// The environment the agent this one replaces ran with in production, and no config file:
/// the built-in default (system, NVML, Prometheus) changed by the operator variables, against
/// a real InfluxDB and a real discovery server. Only the addresses differ (loopback ports).
#[test]
fn the_seed_production_environment_runs_without_a_config_file() {
    let dir = build();
    let work = Workdir::new();
    let influx = InfluxServer::start(&work, false).expect("influxd");
    let port = free_port();
    let inventory = work.write("inventory.toml", inventory_text("idle"));
    let _server = DiscoveryServer::start(&work, port, &inventory);
    // The simulator where the driver's NVML library would be.
    let lib = work.path("nvidia");
    std::fs::create_dir_all(&lib).expect("dir");
    std::os::unix::fs::symlink(dir.join("libnvml_sim.so"), lib.join("libnvidia-ml.so.1"))
        .expect("symlink");
    let influx_url = format!("http://127.0.0.1:{}", influx.port);
    let discovery = format!("127.0.0.1:{port}");
    let scenario = scenario();
    let lib = lib.display().to_string();
    let mut agent = Agent::start_without_config(
        &work,
        &[
            ("PROMETHEUS_ENABLED", "true"),
            ("GPU_COLLECTION_INTERVAL", "5"),
            ("TIMESERIES_BACKEND", "influxdb"),
            ("GPU_DISCOVERY_HOST", &discovery),
            ("LOG_LEVEL", "INFO"),
            ("INFLUXDB_URL", &influx_url),
            ("LD_LIBRARY_PATH", &lib),
            ("NVML_SIM_SCENARIO", &scenario),
        ],
    )
    .expect("start");
    agent
        .wait_ready()
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    // Prometheus: the GPUs, with the discovery service's labels joined on.
    let line = wait_for("an enriched GPU series", Duration::from_secs(30), || {
        scrape(&agent)
            .lines()
            .find(|l| l.starts_with("gpu_up{") && l.contains("gpu_id=\"net-gpu-0\""))
            .map(str::to_string)
    })
    .unwrap_or_else(|e| {
        let body = scrape(&agent);
        let gpu: Vec<&str> = body.lines().filter(|l| l.starts_with("gpu_")).collect();
        panic!("{e}\n{}\n{}", gpu.join("\n"), agent.stderr())
    });
    assert!(line.contains("rental=\"idle\""), "{line}");
    // The first NVML collection may precede the service's first answer; the plain series it
    // made end with the next collection (staleness markers), so each GPU is served once.
    wait_for("one series per GPU", Duration::from_secs(20), || {
        let body = scrape(&agent);
        let up: Vec<&str> = body.lines().filter(|l| l.starts_with("gpu_up{")).collect();
        (up.len() == 2 && up.iter().all(|l| l.contains("gpu_id="))).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", scrape(&agent)));
    // InfluxDB: the default database, created with the 30-day retention policy, holds them.
    let rows = wait_for("GPU points in InfluxDB", Duration::from_secs(30), || {
        influx
            .rows(
                "metricsd",
                "SELECT * FROM \"metricsd\".\"metricsd\".\"gpu\" WHERE \"gpu_id\" = 'net-gpu-0'",
            )
            .ok()
            .filter(|rows| rows.iter().any(|r| r["up"] == 1.0))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.stderr()));
    assert!(rows.iter().all(|r| r["rental"] == "idle"), "{rows:?}");
    let policies = influx
        .rows("", "SHOW RETENTION POLICIES ON \"metricsd\"")
        .expect("policies");
    assert!(
        policies
            .iter()
            .any(|p| p["name"] == "metricsd" && p["duration"] == "720h0m0s"),
        "{policies:?}"
    );
    let logs = agent.stderr();
    assert!(!logs.contains("ERROR"), "{logs}");
    let status = agent.terminate().expect("terminate");
    assert!(status.success());
}
