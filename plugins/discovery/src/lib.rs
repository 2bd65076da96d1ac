//! metricsd collector: the node's GPU inventory from a GPU discovery service
//! (`gpudiscovery.v1` over gRPC).
//!
//! A thread of the plugin's own, with a small single-threaded tokio runtime, connects to the
//! service, lists the GPUs, then follows the `WatchGpus` stream; when the connection fails it
//! reconnects with exponential back-off and jitter. A collection only reads what that thread
//! holds, so a slow or absent service never holds up the host: while it is away the collector
//! reports `gpu_discovery_up 0`, no info series (GPU series keep their NVML identity only, see
//! the host's `[[enrich]]`) and a degraded status in `/health`.
//!
//! What the service sends is bounded and checked: at most `max_gpus` GPUs and
//! `max_labels` free-form labels per GPU, label values of at most `max_label_value_bytes`,
//! messages of at most `max_message_bytes`, a GPU's uuid once; what breaks a rule is left out
//! and logged.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use metricsd_discovery_proto::v1::gpu_event::Kind;
use metricsd_discovery_proto::{
    Gpu, GpuDiscoveryClient, Health, ListGpusRequest, WatchGpusRequest,
};
use metricsd_plugin_api::log::{report_degraded, report_recovered};
use metricsd_plugin_api::{export_plugin, BatchBuilder, Collector, Context, Error, Result};
use serde::Deserialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The instance's `[collectors.config]` table.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The service: `http://host:port`, `https://host:port` or `host:port` (plain). The
    /// `GPU_DISCOVERY_HOST` environment variable sets it.
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    /// The node asked about (empty: the node the service runs for).
    #[serde(default)]
    pub node_id: String,
    /// A PEM file of CA certificates for an https endpoint (default: the bundled web roots).
    pub tls_ca_file: Option<PathBuf>,
    /// Timeout of connecting.
    #[serde(
        default = "default_connect_timeout",
        with = "metricsd_plugin_api::duration"
    )]
    pub connect_timeout: Duration,
    /// Timeout of `ListGpus`.
    #[serde(
        default = "default_request_timeout",
        with = "metricsd_plugin_api::duration"
    )]
    pub request_timeout: Duration,
    /// Longest wait between reconnection attempts.
    #[serde(
        default = "default_max_backoff",
        with = "metricsd_plugin_api::duration"
    )]
    pub max_backoff: Duration,
    /// Most GPUs kept from the service.
    #[serde(default = "default_max_gpus")]
    pub max_gpus: usize,
    /// Most free-form labels kept per GPU.
    #[serde(default = "default_max_labels")]
    pub max_labels: usize,
    /// Longest label value kept, in bytes.
    #[serde(default = "default_max_label_value_bytes")]
    pub max_label_value_bytes: usize,
    /// Largest message accepted from the service, in bytes.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
}

fn default_endpoint() -> String {
    "http://127.0.0.1:50051".to_string()
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}

fn default_max_gpus() -> usize {
    256
}

fn default_max_labels() -> usize {
    32
}

fn default_max_label_value_bytes() -> usize {
    256
}

fn default_max_message_bytes() -> usize {
    4 * 1024 * 1024
}

/// Label names the collector sets itself on `gpu_discovery_info`.
const FIXED_LABELS: &[&str] = &[
    "uuid",
    "gpu_id",
    "node_id",
    "provider",
    "model",
    "pci_bus_id",
    "index",
];

/// One GPU as kept, checked.
#[derive(Debug, Clone, PartialEq)]
struct GpuInfo {
    memory_bytes: u64,
    health: Health,
    /// `gpu_discovery_info`'s labels, `uuid` first.
    labels: Vec<(String, String)>,
}

/// What the connection thread knows, read by `collect`.
#[derive(Default)]
struct State {
    gpus: BTreeMap<String, GpuInfo>,
    /// The list answer was taken and the watch stream is open.
    connected: bool,
    /// When the inventory was last known current (connected: now).
    confirmed_at: Option<Instant>,
    /// Why the last connection failed.
    last_error: Option<String>,
    /// The first connection attempt has ended (until then nothing is reported as degraded).
    attempted: bool,
    /// Entries of the service's answers and events left out (`gpu_discovery_problems_total`).
    problems_total: u64,
    /// Logging of those problems (once, then summarised).
    problems_log: metricsd_plugin_api::ratelimit::Repeating,
}

/// Whether `name` is a valid Prometheus label name.
fn is_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    !name.starts_with("__")
        && matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Checks one GPU from the service; `problems` collects what was left out.
fn check_gpu(config: &Config, gpu: &Gpu, problems: &mut Vec<String>) -> Option<(String, GpuInfo)> {
    let uuid = gpu.uuid.trim();
    if uuid.is_empty() {
        problems.push("a GPU without uuid".to_string());
        return None;
    }
    if uuid.len() > config.max_label_value_bytes {
        problems.push(format!(
            "a uuid of {} bytes (more than max_label_value_bytes)",
            uuid.len()
        ));
        return None;
    }
    let mut labels = vec![("uuid".to_string(), uuid.to_string())];
    // A value longer than max_label_value_bytes is left out, and said so.
    let fits = |name: &str, value: &str, problems: &mut Vec<String>| {
        let fits = value.len() <= config.max_label_value_bytes;
        if !fits {
            problems.push(format!(
                "{uuid}: label `{name}` of {} bytes (more than max_label_value_bytes)",
                value.len()
            ));
        }
        fits
    };
    let index = gpu.index.to_string();
    for (name, value) in [
        ("gpu_id", gpu.gpu_id.as_str()),
        ("node_id", gpu.node_id.as_str()),
        ("provider", gpu.provider.as_str()),
        ("model", gpu.model.as_str()),
        ("pci_bus_id", gpu.pci_bus_id.as_str()),
        ("index", index.as_str()),
    ] {
        if !value.is_empty() && fits(name, value, problems) {
            labels.push((name.to_string(), value.to_string()));
        }
    }
    // Free-form labels, in name order, up to max_labels.
    let mut free: Vec<(&String, &String)> = gpu.labels.iter().collect();
    free.sort();
    let mut kept = 0;
    for (name, value) in free {
        if !is_label_name(name) || FIXED_LABELS.contains(&name.as_str()) {
            problems.push(format!(
                "{uuid}: label name {:?} is not a Prometheus label name or is reserved",
                name.chars().take(64).collect::<String>()
            ));
            continue;
        }
        if value.is_empty() || !fits(name, value, problems) {
            continue;
        }
        if kept == config.max_labels {
            problems.push(format!(
                "{uuid}: more than max_labels ({}) labels",
                config.max_labels
            ));
            break;
        }
        labels.push((name.clone(), value.clone()));
        kept += 1;
    }
    Some((
        uuid.to_string(),
        GpuInfo {
            memory_bytes: gpu.memory_bytes,
            health: Health::try_from(gpu.health).unwrap_or(Health::Unspecified),
            labels,
        },
    ))
}

/// Checks a `ListGpus` answer: the GPUs kept, and what was left out.
fn check_inventory(config: &Config, gpus: &[Gpu]) -> (BTreeMap<String, GpuInfo>, Vec<String>) {
    let mut kept = BTreeMap::new();
    let mut problems = Vec::new();
    for gpu in gpus {
        let Some((uuid, info)) = check_gpu(config, gpu, &mut problems) else {
            continue;
        };
        if kept.contains_key(&uuid) {
            problems.push(format!(
                "uuid {uuid} listed more than once (the first is kept)"
            ));
            continue;
        }
        if kept.len() == config.max_gpus {
            // First: it is the one an operator must see.
            problems.insert(
                0,
                format!(
                    "more than max_gpus ({}) GPUs (the rest are left out)",
                    config.max_gpus
                ),
            );
            break;
        }
        kept.insert(uuid, info);
    }
    (kept, problems)
}

/// Counts what was left out of an answer and logs it: the count and the first few, once when
/// the problems start, then summarised once a minute while they go on (a service streaming bad
/// events cannot flood the log), and once when a full inventory (`ListGpus`) is clean again.
fn note_problems(state: &Mutex<State>, what: &str, problems: &[String]) {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    if problems.is_empty() {
        if what == "ListGpus" {
            if let Some(n) = s.problems_log.ended() {
                tracing::info!(
                    "the discovery service's inventory is valid again ({n} answers or events with problems in all)"
                );
            }
        }
        return;
    }
    s.problems_total += problems.len() as u64;
    let first: Vec<&str> = problems.iter().take(5).map(String::as_str).collect();
    s.problems_log.event().error(
        &format!(
            "{what}: {} problem(s) in the discovery service's answer, left out: {}{}",
            problems.len(),
            first.join("; "),
            if problems.len() > 5 { "; …" } else { "" }
        ),
        "gpu_discovery_problems_total",
    );
}

/// `host:port` → `http://host:port`.
fn endpoint_url(endpoint: &str) -> String {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    }
}

fn build_endpoint(config: &Config) -> Result<Endpoint> {
    let url = endpoint_url(&config.endpoint);
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| Error::config(format!("`endpoint`: {url:?} is not a valid URI: {e}")))?
        .connect_timeout(config.connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_webpki_roots();
        if let Some(path) = &config.tls_ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                Error::config(format!(
                    "`tls_ca_file`: cannot read {}: {e}",
                    path.display()
                ))
            })?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| Error::config(format!("TLS for {url}: {e}")))?;
    } else if config.tls_ca_file.is_some() {
        return Err(Error::config(
            "`tls_ca_file` is given but `endpoint` is not https://",
        ));
    }
    Ok(endpoint)
}

/// One connection: list, then follow the watch stream until it ends or fails.
async fn session(
    config: &Config,
    endpoint: &Endpoint,
    state: &Mutex<State>,
) -> std::result::Result<(), String> {
    let url = endpoint_url(&config.endpoint);
    let channel: Channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {url}: {}", error_chain(&e)))?;
    let mut client =
        GpuDiscoveryClient::new(channel).max_decoding_message_size(config.max_message_bytes);
    let listed = tokio::time::timeout(
        config.request_timeout,
        client.list_gpus(ListGpusRequest {
            node_id: config.node_id.clone(),
        }),
    )
    .await
    .map_err(|_| {
        format!(
            "ListGpus at {url} did not answer within {:?}",
            config.request_timeout
        )
    })?
    .map_err(|s| format!("ListGpus at {url} failed: {}", status_text(&s)))?
    .into_inner();
    let (gpus, problems) = check_inventory(config, &listed.gpus);
    note_problems(state, "ListGpus", &problems);
    let count = gpus.len();
    {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        let was_connected = s.connected;
        s.gpus = gpus;
        s.connected = true;
        s.confirmed_at = Some(Instant::now());
        s.last_error = None;
        s.attempted = true;
        if !was_connected {
            tracing::info!(
                "GPU discovery at {url}: {count} GPU(s), revision {}",
                listed.revision
            );
        }
    }
    let mut stream = client
        .watch_gpus(WatchGpusRequest {
            node_id: config.node_id.clone(),
            since_revision: listed.revision,
        })
        .await
        .map_err(|s| format!("WatchGpus at {url} failed: {}", status_text(&s)))?
        .into_inner();
    loop {
        match stream.message().await {
            Ok(Some(event)) => apply_event(config, state, &event),
            Ok(None) => return Err(format!("{url} ended the WatchGpus stream")),
            Err(s) => return Err(format!("WatchGpus at {url}: {}", status_text(&s))),
        }
    }
}

/// Applies one pushed change.
fn apply_event(config: &Config, state: &Mutex<State>, event: &metricsd_discovery_proto::GpuEvent) {
    let Some(gpu) = &event.gpu else {
        tracing::error!("a WatchGpus event without a GPU (ignored)");
        return;
    };
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    s.confirmed_at = Some(Instant::now());
    match Kind::try_from(event.kind).unwrap_or(Kind::Unspecified) {
        Kind::Removed => {
            s.gpus.remove(gpu.uuid.trim());
        }
        Kind::Added | Kind::LabelsChanged | Kind::HealthChanged => {
            let mut problems = Vec::new();
            if let Some((uuid, info)) = check_gpu(config, gpu, &mut problems) {
                if s.gpus.contains_key(&uuid) || s.gpus.len() < config.max_gpus {
                    s.gpus.insert(uuid, info);
                } else {
                    problems.push(format!(
                        "more than max_gpus ({}) GPUs (the rest are left out)",
                        config.max_gpus
                    ));
                }
            }
            drop(s);
            note_problems(state, "WatchGpus", &problems);
        }
        Kind::Unspecified => {
            tracing::error!("a WatchGpus event of unknown kind {} (ignored)", event.kind);
        }
    }
}

fn status_text(status: &tonic::Status) -> String {
    let message = status.message();
    let message: String = message.chars().take(300).collect();
    format!("{:?}: {message}", status.code())
}

/// An error and its sources, each text once, with a hint for an untrusted certificate.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    if text.contains("UnknownIssuer") {
        text.push_str(
            " (the server's certificate is not signed by a trusted CA: set `tls_ca_file` to the CA that signed it)",
        );
    }
    text
}

/// The connection thread's loop: sessions with back-off between them, until `stop`.
async fn run(
    config: Config,
    endpoint: Endpoint,
    state: Arc<Mutex<State>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            r = session(&config, &endpoint, &state) => r,
            _ = stop.changed() => return,
        };
        let why = match result {
            Ok(()) => "the session ended".to_string(),
            Err(e) => e,
        };
        {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            if s.connected {
                tracing::warn!(
                    "GPU discovery lost: {why}; GPUs keep their NVML identity until it is back"
                );
            } else if s.last_error.as_deref() != Some(why.as_str()) {
                tracing::warn!("GPU discovery unavailable: {why}");
            }
            s.connected = false;
            s.gpus.clear();
            s.last_error = Some(why);
            s.attempted = true;
        }
        // A session that lasted resets the back-off.
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(500);
        }
        let wait = backoff / 2 + (backoff / 2).mul_f64(fastrand::f64());
        backoff = (backoff * 2).min(config.max_backoff);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The collector instance.
pub struct DiscoveryCollector {
    config: Config,
    state: Arc<Mutex<State>>,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Collector for DiscoveryCollector {
    type Config = Config;

    fn new(config: Config, ctx: &Context) -> Result<Self> {
        Self::validate(&config)?;
        let endpoint = build_endpoint(&config)?;
        let state = Arc::new(Mutex::new(State::default()));
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::fatal(format!("cannot start the discovery runtime: {e}")))?;
        let dispatch = ctx.log_dispatch().clone();
        let thread_state = Arc::clone(&state);
        let thread_config = config.clone();
        let thread = std::thread::Builder::new()
            .name("gpu-discovery".into())
            .spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || {
                    runtime.block_on(run(thread_config, endpoint, thread_state, stop_rx));
                });
            })
            .map_err(|e| Error::fatal(format!("cannot start the discovery thread: {e}")))?;
        Ok(Self {
            config,
            state,
            stop,
            thread: Some(thread),
        })
    }

    fn validate(config: &Config) -> Result<()> {
        if config.max_gpus == 0 || config.max_label_value_bytes == 0 {
            return Err(Error::config(
                "`max_gpus` and `max_label_value_bytes` must be at least 1",
            ));
        }
        if config.max_message_bytes < 1024 {
            return Err(Error::config("`max_message_bytes` must be at least 1024"));
        }
        build_endpoint(config).map(|_| ())
    }

    fn collect(&mut self, out: &mut BatchBuilder) -> Result<()> {
        let up = out.gauge(
            "gpu_discovery_up",
            "1 if the GPU discovery service answered and its watch stream is open.",
            "",
        );
        let age = out.gauge(
            "gpu_discovery_inventory_age_seconds",
            "Seconds since the inventory was last known current (0 while the watch stream is open).",
            "seconds",
        );
        let problems = out.counter(
            "gpu_discovery_problems_total",
            "Entries of the discovery service's answers and events left out as invalid (bad uuid or labels, duplicates, beyond max_gpus).",
            "",
        );
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        out.sample(up, &[], if s.connected { 1.0 } else { 0.0 });
        out.sample(problems, &[], s.problems_total as f64);
        if let Some(at) = s.confirmed_at {
            let seconds = if s.connected {
                0.0
            } else {
                at.elapsed().as_secs_f64()
            };
            out.sample(age, &[], seconds);
        }
        if s.connected {
            let count = out.gauge(
                "gpu_discovery_gpus",
                "GPUs the discovery service lists for this node.",
                "",
            );
            out.sample(count, &[], s.gpus.len() as f64);
            let info = out.info(
                "gpu_discovery_info",
                "The GPU's identity in the GPU network: always 1, the labels carry it.",
            );
            let memory = out.gauge(
                "gpu_discovery_memory_total_bytes",
                "GPU memory as the discovery service lists it.",
                "bytes",
            );
            let health = out.gauge(
                "gpu_discovery_gpu_health",
                "1 for the GPU's health state as the discovery service reports it, 0 for the others.",
                "",
            );
            for (uuid, gpu) in &s.gpus {
                let labels: Vec<(&str, &str)> = gpu
                    .labels
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .collect();
                out.sample(info, &labels, 1.0);
                let key = out.label_set(&[("uuid", uuid.as_str())]);
                out.sample_in(memory, key, gpu.memory_bytes as f64);
                for (state, h) in [
                    ("unknown", Health::Unspecified),
                    ("healthy", Health::Healthy),
                    ("degraded", Health::Degraded),
                    ("unhealthy", Health::Unhealthy),
                ] {
                    out.sample(
                        health,
                        &[("uuid", uuid.as_str()), ("state", state)],
                        if gpu.health == h { 1.0 } else { 0.0 },
                    );
                }
            }
            report_recovered();
        } else if s.attempted {
            let why = s
                .last_error
                .clone()
                .unwrap_or_else(|| "not connected yet".to_string());
            report_degraded(&format!(
                "GPU discovery at {} is unavailable ({why}); GPUs are labelled with their NVML identity only",
                endpoint_url(&self.config.endpoint)
            ));
        }
        Ok(())
    }

    fn close(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for DiscoveryCollector {
    fn drop(&mut self) {
        self.close();
    }
}

export_plugin! {
    name: "discovery",
    description: "The node's GPU inventory from a GPU discovery service (gpudiscovery.v1 over gRPC)",
    collector: DiscoveryCollector,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        metricsd_plugin_api::parse_config(
            r#"{"max_gpus":2,"max_labels":2,"max_label_value_bytes":16}"#,
        )
        .expect("config")
    }

    fn gpu(uuid: &str, labels: &[(&str, &str)]) -> Gpu {
        Gpu {
            uuid: uuid.into(),
            gpu_id: format!("net-{uuid}"),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Gpu::default()
        }
    }

    #[test]
    fn hostile_inventories_are_bounded_and_reported() {
        let c = config();
        let (kept, problems) = check_inventory(
            &c,
            &[
                gpu(
                    "GPU-a",
                    &[("rental", "idle"), ("zone", "z1"), ("extra", "x")],
                ),
                gpu("GPU-a", &[]),
                gpu("", &[]),
                gpu(
                    "GPU-b",
                    &[
                        ("huge", &"v".repeat(1000)),
                        ("bad-name", "x"),
                        ("uuid", "spoof"),
                    ],
                ),
                gpu("GPU-c", &[]),
            ],
        );
        assert_eq!(kept.keys().collect::<Vec<_>>(), ["GPU-a", "GPU-b"]);
        let a: Vec<&str> = kept["GPU-a"]
            .labels
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        // Free-form labels in name order, two at most.
        assert_eq!(a, ["uuid", "gpu_id", "index", "extra", "rental"]);
        let b: Vec<&str> = kept["GPU-b"]
            .labels
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(b, ["uuid", "gpu_id", "index"]);
        let text = problems.join("\n");
        for expected in [
            "more than max_labels",
            "listed more than once",
            "without uuid",
            "`huge` of 1000 bytes",
            "\"bad-name\"",
            "\"uuid\"",
            "more than max_gpus",
        ] {
            assert!(text.contains(expected), "{expected}: {text}");
        }
    }

    #[test]
    fn endpoints_take_host_port_or_urls() {
        assert_eq!(endpoint_url("10.0.0.1:50051"), "http://10.0.0.1:50051");
        assert_eq!(endpoint_url("https://d:1"), "https://d:1");
        let mut c = config();
        c.endpoint = "http://bad host:1".into();
        assert!(DiscoveryCollector::validate(&c).is_err());
        let mut c = config();
        c.tls_ca_file = Some("/x.pem".into());
        let e = DiscoveryCollector::validate(&c).expect_err("plain + CA");
        assert!(e.message().contains("not https"), "{}", e.message());
    }
}
