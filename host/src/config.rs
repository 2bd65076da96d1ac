//! The agent's configuration: a TOML file, `METRICSD_<SECTION>__<KEY>` environment overrides,
//! the environment names operators already use, and a built-in default when there is no file.
//!
//! Every struct here denies unknown keys; errors name the key path (`agent.interval`,
//! `collectors[1].plugin`) or the environment variable.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where an error in the configuration is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read or is not valid TOML.
    #[error("cannot read config {path}: {message}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A key is unknown or its value is wrong.
    #[error("config key `{key}`: {message}")]
    Key {
        /// Key path, e.g. `agent.interval`.
        key: String,
        /// What went wrong.
        message: String,
    },
    /// An environment variable has a wrong value.
    #[error("environment variable {name}: {message}")]
    Env {
        /// The variable.
        name: String,
        /// What went wrong.
        message: String,
    },
}

fn key_error(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Agent-wide settings.
    #[serde(default)]
    pub agent: AgentConfig,
    /// Listeners.
    #[serde(default)]
    pub http: HttpConfig,
    /// Collector instances.
    #[serde(default)]
    pub collectors: Vec<CollectorConfig>,
    /// Sink instances.
    #[serde(default)]
    pub sinks: Vec<SinkConfig>,
    /// Which collectors feed which sinks; without routes every collector feeds every sink.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Rename and drop rules, applied in order to every batch.
    #[serde(default)]
    pub relabel: Vec<RelabelConfig>,
    /// Window aggregations (downsampled history), each a source routes can name.
    #[serde(default)]
    pub aggregate: Vec<AggregateConfig>,
    /// Label joins: series of some collectors get the labels of another's info series.
    #[serde(default)]
    pub enrich: Vec<EnrichConfig>,
    /// Instances that an operator environment variable added or changed, with the variable:
    /// errors about them name it.
    #[serde(skip)]
    pub set_by_env: BTreeMap<String, &'static str>,
}

/// The shortest collection interval accepted (`agent.interval`, `collectors[].interval`,
/// `GPU_COLLECTION_INTERVAL`). Shorter ones cost a CPU core in scheduling alone and sample
/// faster than any counter they read changes.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// The discovery service's port when `GPU_DISCOVERY_HOST` names only a host.
const DISCOVERY_DEFAULT_PORT: u16 = 50051;

/// One `[[enrich]]` entry: the series of the `from` collectors whose `on` label matches an
/// info series of the `info` collector get that info series' labels.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichConfig {
    /// Collector instances whose series are enriched.
    pub from: Vec<String>,
    /// The collector instance whose info series carry the labels.
    pub info: String,
    /// The info metric.
    #[serde(default = "default_enrich_metric")]
    pub metric: String,
    /// The label both sides carry (the join key).
    #[serde(default = "default_enrich_on")]
    pub on: String,
    /// The labels copied (all of the info series' labels but `on` when empty).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Labels never copied (applied after `labels`).
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Replace a label the series already has (by default the series keeps its own).
    #[serde(default)]
    pub overwrite: bool,
    /// Info older than this is not applied (its collector stopped reporting).
    #[serde(
        default = "default_enrich_max_age",
        with = "metricsd_plugin_api::duration"
    )]
    pub max_age: Duration,
}

fn default_enrich_metric() -> String {
    "gpu_discovery_info".to_string()
}

fn default_enrich_on() -> String {
    "uuid".to_string()
}

fn default_enrich_max_age() -> Duration {
    Duration::from_secs(300)
}

/// One `[[aggregate]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// The source name of the aggregated batches (for `routes.from`).
    pub name: String,
    /// Collector instances (or `metricsd`) whose batches are aggregated.
    pub from: Vec<String>,
    /// Metric name globs to aggregate (all when empty).
    #[serde(default)]
    pub metrics: Vec<String>,
    /// The window, aligned to the clock.
    #[serde(with = "metricsd_plugin_api::duration")]
    pub window: Duration,
    /// Statistics of gauges (counters always give their increase).
    #[serde(default = "Stat::all")]
    pub stats: Vec<Stat>,
}

/// A statistic of a gauge over a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stat {
    /// `<name>_min`.
    Min,
    /// `<name>_max`.
    Max,
    /// `<name>_mean`.
    Mean,
    /// `<name>_last`.
    Last,
    /// `<name>_count`: samples in the window.
    Count,
}

impl Stat {
    /// Every statistic.
    pub fn all() -> Vec<Stat> {
        vec![Stat::Min, Stat::Max, Stat::Mean, Stat::Last, Stat::Count]
    }
}

/// `[agent]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Plugin directories, searched after `METRICSD_PLUGIN_PATH` and before the directory of
    /// the executable and `/usr/lib/metricsd/plugins`.
    pub plugin_path: Vec<PathBuf>,
    /// If not empty, only plugin files whose SHA-256 (hex) is listed may load.
    pub plugin_sha256: Vec<String>,
    /// Default collection interval.
    #[serde(with = "metricsd_plugin_api::duration")]
    pub interval: Duration,
    /// Default timeout of one plugin call.
    #[serde(with = "metricsd_plugin_api::duration")]
    pub timeout: Duration,
    /// Longest back-off after repeated failures of a collector instance (sinks have their own
    /// `max_backoff`).
    #[serde(with = "metricsd_plugin_api::duration")]
    pub max_backoff: Duration,
    /// Static labels added to every sample (a sample's own label of the same name wins).
    pub labels: BTreeMap<String, String>,
    /// `error`, `warn` (`warning`), `info`, `debug`, `trace`, `off`, or tracing directives
    /// (normalised by [`log_filter`]).
    pub log_level: String,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// Default capacity of each sink's queue, in samples.
    pub queue_capacity: usize,
    /// How long shutdown may take to flush the sinks.
    #[serde(with = "metricsd_plugin_api::duration")]
    pub shutdown_timeout: Duration,
    /// Emit the agent's own `metricsd_*` metrics through the pipeline.
    pub internal_metrics: bool,
    /// Where sinks with `spool = true` keep their disk spool (a subdirectory per sink).
    pub spool_dir: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            plugin_path: Vec::new(),
            plugin_sha256: Vec::new(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(4),
            max_backoff: Duration::from_secs(300),
            labels: BTreeMap::new(),
            log_level: "info".to_string(),
            log_format: LogFormat::Text,
            queue_capacity: 100_000,
            shutdown_timeout: Duration::from_secs(10),
            internal_metrics: true,
            spool_dir: PathBuf::from("/var/lib/metricsd/spool"),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[http]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the listener that serves the paths pull sinks register (`/metrics`);
    /// empty disables it.
    pub metrics_listen: String,
    /// Address of the listener that serves `/health`, `/metrics/stats` and `/plugins`;
    /// empty disables it.
    pub health_listen: String,
    /// TLS and basic auth for both listeners, in the web-config format of Prometheus
    /// exporters.
    pub web_config_file: Option<PathBuf>,
    /// Time a client has to send a complete request head (and the TLS handshake before it),
    /// from the connection's start or from the first byte of its next request.
    #[serde(with = "metricsd_plugin_api::duration")]
    pub header_read_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    #[serde(with = "metricsd_plugin_api::duration")]
    pub idle_timeout: Duration,
    /// Open connections per listener; at the cap, the oldest idle connection is closed for a
    /// new one (a new one is refused only when every connection has a request in flight).
    pub max_connections: usize,
    /// Requests answered at once per listener; more are answered 503 at once.
    pub max_requests: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            metrics_listen: "0.0.0.0:8080".to_string(),
            health_listen: "0.0.0.0:8081".to_string(),
            web_config_file: None,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 512,
            max_requests: 40,
        }
    }
}

impl HttpConfig {
    /// The listeners' limits.
    pub fn limits(&self) -> crate::http::Limits {
        crate::http::Limits {
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections,
            max_requests: self.max_requests,
        }
    }

    /// The parsed metrics address, `None` when disabled.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        parse_listen("http.metrics_listen", &self.metrics_listen)
    }

    /// The parsed health address, `None` when disabled.
    pub fn health_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        parse_listen("http.health_listen", &self.health_listen)
    }
}

fn parse_listen(key: &str, text: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let text = text.trim();
    // ":8080" is the exporter convention for "all interfaces".
    let full = if text.starts_with(':') {
        format!("0.0.0.0{text}")
    } else {
        text.to_string()
    };
    full.parse().map(Some).map_err(|_| {
        key_error(
            key,
            format!("`{text}` is not an address like 0.0.0.0:8080 or [::1]:8080"),
        )
    })
}

/// One `[[collectors]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// Instance name, unique among collectors and sinks.
    pub name: String,
    /// The plugin name the `.so` declares.
    pub plugin: String,
    /// Collection interval (default: `agent.interval`).
    #[serde(default, with = "metricsd_plugin_api::duration::option")]
    pub interval: Option<Duration>,
    /// Call timeout (default: `agent.timeout`).
    #[serde(default, with = "metricsd_plugin_api::duration::option")]
    pub timeout: Option<Duration>,
    /// Start-up fails if the plugin cannot load, and `/health` answers 503 while it fails.
    #[serde(default)]
    pub required: bool,
    /// Where the plugin runs: in the agent's process (default) or in a child process of its
    /// own, which a crash or a hung call costs instead of the agent.
    #[serde(default)]
    pub isolation: Isolation,
    /// Handed to the plugin as JSON; the plugin validates it.
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
}

/// Where a collector instance's plugin runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Isolation {
    /// In the agent's process: the cheapest; a panic is caught, but a segfault or `abort()`
    /// in the plugin ends the agent.
    #[default]
    InProcess,
    /// In a child process (this binary in its runner mode): a crash of the plugin, or a call
    /// past its timeout, costs the child, which is restarted with back-off.
    Process,
}

impl TryFrom<String> for Isolation {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        match text.as_str() {
            "in-process" => Ok(Self::InProcess),
            "process" => Ok(Self::Process),
            other => Err(format!(
                "expected `in-process` or `process`, found `{other}`"
            )),
        }
    }
}

/// One `[[sinks]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Instance name, unique among collectors and sinks.
    pub name: String,
    /// The plugin name the `.so` declares.
    pub plugin: String,
    /// Timeout of one write (default: `agent.timeout`).
    #[serde(default, with = "metricsd_plugin_api::duration::option")]
    pub timeout: Option<Duration>,
    /// Start-up fails if the plugin cannot load, and `/health` answers 503 while it fails.
    #[serde(default)]
    pub required: bool,
    /// Queue capacity in samples (default: `agent.queue_capacity`).
    pub queue_capacity: Option<usize>,
    /// Keep undelivered batches in a disk spool under `agent.spool_dir`, so that they survive
    /// a restart; the queue in memory then only caches the newest of them.
    #[serde(default)]
    pub spool: bool,
    /// Most bytes the spool may hold; the oldest batches are dropped beyond it.
    #[serde(default = "default_spool_max_bytes")]
    pub spool_max_bytes: u64,
    /// What goes to the spool: only what waits (`overflow`) or every batch (`always`).
    #[serde(default)]
    pub spool_mode: SpoolMode,
    /// How often the spool's new batches and progress are made durable (fsync); `0s`: at
    /// every batch and every acknowledgement.
    #[serde(default = "default_spool_sync", with = "metricsd_plugin_api::duration")]
    pub spool_sync: Duration,
    /// Longest back-off between retries of a failing write.
    #[serde(
        default = "default_sink_max_backoff",
        with = "metricsd_plugin_api::duration"
    )]
    pub max_backoff: Duration,
    /// Most samples in one write; queued batches are merged up to it.
    #[serde(default = "default_batch_max_samples")]
    pub batch_max_samples: usize,
    /// How long a write waits for more batches to join it (0: write what is queued).
    #[serde(default, with = "metricsd_plugin_api::duration")]
    pub batch_wait: Duration,
    /// Handed to the plugin as JSON; the plugin validates it.
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
}

fn default_batch_max_samples() -> usize {
    20_000
}

fn default_spool_max_bytes() -> u64 {
    256 * 1024 * 1024
}

fn default_spool_sync() -> Duration {
    Duration::from_secs(1)
}

fn default_sink_max_backoff() -> Duration {
    Duration::from_secs(5)
}

/// What a sink with `spool = true` writes to disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum SpoolMode {
    /// Batches the memory queue cannot hold, and every batch while the sink fails (from its
    /// first failed write until a write succeeds): a healthy sink costs no disk writes.
    #[default]
    Overflow,
    /// Every batch before the sink sees it (write-ahead): an agent crash while the sink is
    /// healthy loses nothing either, at the cost of writing everything to disk.
    Always,
}

impl TryFrom<String> for SpoolMode {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        match text.as_str() {
            "overflow" => Ok(Self::Overflow),
            "always" => Ok(Self::Always),
            other => Err(format!("expected `overflow` or `always`, found `{other}`")),
        }
    }
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Collector instance names (`metricsd` is the agent's own metrics).
    pub from: Vec<String>,
    /// Sink instance names.
    pub to: Vec<String>,
    /// Only metric names matching one of these globs pass (default: all).
    #[serde(default)]
    pub include: Vec<String>,
    /// Metric names matching one of these globs do not pass.
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// What a relabel rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelabelAction {
    /// Drop metrics whose name matches `metrics`.
    Drop,
    /// Keep only metrics whose name matches `metrics`.
    Keep,
    /// Rename metrics matching `from` to `to`; a `*` in both carries the matched text over.
    Rename,
    /// Remove labels whose name matches `labels` from matching metrics.
    DropLabels,
}

/// One `[[relabel]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelabelConfig {
    /// What to do.
    pub action: RelabelAction,
    /// Metric name globs (`drop`, `keep`, `drop_labels`; default for `drop_labels`: all).
    #[serde(default)]
    pub metrics: Vec<String>,
    /// Label name globs (`drop_labels`).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Name pattern with at most one `*` (`rename`).
    pub from: Option<String>,
    /// Replacement with the same number of `*` (`rename`).
    pub to: Option<String>,
    /// Only batches of these collectors (default: all).
    #[serde(default)]
    pub collectors: Vec<String>,
}

/// The name under which the agent's own metrics enter the pipeline.
pub const INTERNAL_SOURCE: &str = "metricsd";

/// The built-in configuration used when no file is given. Entries whose plugin is not
/// installed are skipped with a warning (see [`Config::is_builtin_default`]).
pub const BUILTIN_DEFAULT: &str = r#"
[[collectors]]
name = "system"
plugin = "system"

[[collectors]]
name = "gpu"
plugin = "nvml"

[[sinks]]
name = "prometheus"
plugin = "prometheus"
"#;

/// Where a configuration came from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// A file.
    File(PathBuf),
    /// [`BUILTIN_DEFAULT`].
    BuiltinDefault,
}

/// A configuration and where it came from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    /// The configuration.
    pub config: Config,
    /// Its origin.
    pub source: ConfigSource,
}

impl LoadedConfig {
    /// Whether missing plugins are skipped rather than errors.
    pub fn is_builtin_default(&self) -> bool {
        matches!(self.source, ConfigSource::BuiltinDefault)
    }
}

/// Reads the environment; a function so tests can pass their own.
pub trait Env {
    /// The variable's value, if set and not empty.
    fn var(&self, name: &str) -> Option<String>;
    /// All variables with this prefix.
    fn vars_with_prefix(&self, prefix: &str) -> Vec<(String, String)>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }

    fn vars_with_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        std::env::vars()
            .filter(|(k, _)| k.starts_with(prefix))
            .collect()
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).filter(|v| !v.is_empty()).cloned()
    }

    fn vars_with_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        self.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Loads the config file (or the built-in default), applies environment overrides, and
/// validates what can be validated without plugins.
pub fn load(path: Option<&Path>, env: &dyn Env) -> Result<LoadedConfig, ConfigError> {
    let (text, source) = match path {
        Some(p) => (
            std::fs::read_to_string(p).map_err(|e| ConfigError::Read {
                path: p.to_path_buf(),
                message: e.to_string(),
            })?,
            ConfigSource::File(p.to_path_buf()),
        ),
        None => (BUILTIN_DEFAULT.to_string(), ConfigSource::BuiltinDefault),
    };
    let config = from_toml_with_env(&text, &source, env)?;
    Ok(LoadedConfig { config, source })
}

/// Parses TOML text, merges `METRICSD_*` overrides, deserialises with key paths in errors, and
/// applies the operator environment names.
pub fn from_toml_with_env(
    text: &str,
    source: &ConfigSource,
    env: &dyn Env,
) -> Result<Config, ConfigError> {
    let read_error = |message: String| ConfigError::Read {
        path: match source {
            ConfigSource::File(p) => p.clone(),
            ConfigSource::BuiltinDefault => PathBuf::from("<built-in default>"),
        },
        message,
    };
    let mut builder = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml));
    // METRICSD_HTTP__METRICS_LISTEN=… → http.metrics_listen. METRICSD_PLUGIN_PATH (the plugin
    // directories) and METRICSD_CONFIG (the file) are read by the CLI, not config overrides.
    for (name, value) in env.vars_with_prefix("METRICSD_") {
        if name == "METRICSD_PLUGIN_PATH" || name == "METRICSD_CONFIG" {
            continue;
        }
        let key = name["METRICSD_".len()..].to_lowercase().replace("__", ".");
        if !key.contains('.') {
            return Err(ConfigError::Env {
                name,
                message: "expected METRICSD_<SECTION>__<KEY>, e.g. METRICSD_AGENT__INTERVAL"
                    .to_string(),
            });
        }
        builder = builder
            .set_override(key, value)
            .map_err(|e| read_error(e.to_string()))?;
    }
    let merged = builder.build().map_err(|e| read_error(e.to_string()))?;
    let mut config: Config = serde_path_to_error::deserialize(merged).map_err(|err| {
        let key = err.path().to_string();
        let message = err.inner().to_string();
        key_error(key, message)
    })?;
    config.agent.log_level = log_filter(&config.agent.log_level)
        .map_err(|message| key_error("agent.log_level", message))?;
    apply_operator_env(&mut config, env)?;
    validate(&config)?;
    Ok(config)
}

/// The tracing filter for `agent.log_level` / `LOG_LEVEL`: a level (`trace`, `debug`, `info`,
/// `warn` or `warning`, `error`, `off`, in any case), or directives such as
/// `info,metricsd=debug`. A bare word that is not a level is refused: tracing would read it as
/// a target name and silence every other log line, errors included. Empty stays empty (the
/// command's default level).
pub fn log_filter(text: &str) -> Result<String, String> {
    let level = |word: &str| -> Option<&'static str> {
        match word.trim().to_ascii_lowercase().as_str() {
            "trace" => Some("trace"),
            "debug" => Some("debug"),
            "info" => Some("info"),
            "warn" | "warning" => Some("warn"),
            "error" => Some("error"),
            "off" => Some("off"),
            _ => None,
        }
    };
    let mut parts = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let normalised = match part.rsplit_once('=') {
            Some((target, value)) => match level(value) {
                Some(l) => format!("{target}={l}"),
                None => part.to_string(),
            },
            None => level(part).map(str::to_string).ok_or_else(|| {
                format!(
                    "`{part}` is not a log level: use trace, debug, info, warn, error or off, \
                     or directives such as `info,metricsd=debug`"
                )
            })?,
        };
        parts.push(normalised);
    }
    let filter = parts.join(",");
    tracing_subscriber::EnvFilter::try_new(&filter).map_err(|e| format!("`{text}`: {e}"))?;
    Ok(filter)
}

/// The environment names operators of GPU fleets already use.
fn apply_operator_env(config: &mut Config, env: &dyn Env) -> Result<(), ConfigError> {
    if let Some(level) = env.var("LOG_LEVEL") {
        config.agent.log_level = log_filter(&level).map_err(|message| ConfigError::Env {
            name: "LOG_LEVEL".to_string(),
            message,
        })?;
    }
    if let Some(text) = env.var("GPU_COLLECTION_INTERVAL") {
        let interval = parse_env_interval("GPU_COLLECTION_INTERVAL", &text)?;
        for c in config.collectors.iter_mut().filter(|c| c.plugin == "nvml") {
            c.interval = Some(interval);
            config
                .set_by_env
                .insert(c.name.clone(), "GPU_COLLECTION_INTERVAL");
        }
    }
    if let Some(host) = env.var("GPU_DISCOVERY_HOST") {
        let endpoint = serde_json::Value::String(parse_discovery_host(&host)?);
        let mut found = false;
        for c in config
            .collectors
            .iter_mut()
            .filter(|c| c.plugin == "discovery")
        {
            c.config.insert("endpoint".to_string(), endpoint.clone());
            config
                .set_by_env
                .insert(c.name.clone(), "GPU_DISCOVERY_HOST");
            found = true;
        }
        if !found {
            let mut table = serde_json::Map::new();
            table.insert("endpoint".to_string(), endpoint);
            config.collectors.push(CollectorConfig {
                name: "discovery".to_string(),
                plugin: "discovery".to_string(),
                interval: None,
                timeout: None,
                required: false,
                isolation: Isolation::default(),
                config: table,
            });
            config
                .set_by_env
                .insert("discovery".to_string(), "GPU_DISCOVERY_HOST");
        }
        // With no join configured, the discovery labels go onto the NVML collectors' series.
        if config.enrich.is_empty() {
            let gpus: Vec<String> = config
                .collectors
                .iter()
                .filter(|c| c.plugin == "nvml")
                .map(|c| c.name.clone())
                .collect();
            let info = config
                .collectors
                .iter()
                .find(|c| c.plugin == "discovery")
                .map(|c| c.name.clone());
            if let (false, Some(info)) = (gpus.is_empty(), info) {
                config.enrich.push(EnrichConfig {
                    from: gpus,
                    info,
                    metric: default_enrich_metric(),
                    on: default_enrich_on(),
                    labels: Vec::new(),
                    // NVML's series already carry the GPU's index, name and PCI bus id.
                    exclude: ["index", "model", "pci_bus_id"].map(String::from).to_vec(),
                    overwrite: false,
                    max_age: default_enrich_max_age(),
                });
            }
        }
    }
    if let Some(list) = env.var("TIMESERIES_BACKEND") {
        let wanted: Vec<String> = list
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if wanted.is_empty() {
            return Err(ConfigError::Env {
                name: "TIMESERIES_BACKEND".into(),
                message: "expected a sink plugin name, e.g. prometheus or influxdb".into(),
            });
        }
        if let Some(bad) = wanted.iter().find(|w| !is_plugin_name(w)) {
            return Err(ConfigError::Env {
                name: "TIMESERIES_BACKEND".into(),
                message: format!(
                    "`{bad}` is not a sink plugin name; list names separated by commas, e.g. prometheus,influxdb"
                ),
            });
        }
        config.sinks.retain(|s| wanted.contains(&s.plugin));
        for plugin in wanted {
            if !config.sinks.iter().any(|s| s.plugin == plugin) {
                config
                    .set_by_env
                    .insert(plugin.clone(), "TIMESERIES_BACKEND");
                let table = backend_defaults(&plugin, env);
                config.sinks.push(env_sink(&plugin, table));
            }
        }
    }
    if let Some(flag) = env.var("PROMETHEUS_ENABLED") {
        let enabled = parse_env_bool("PROMETHEUS_ENABLED", &flag)?;
        let has = config.sinks.iter().any(|s| s.plugin == "prometheus");
        if !enabled {
            config.sinks.retain(|s| s.plugin != "prometheus");
        } else if !has {
            config
                .sinks
                .push(env_sink("prometheus", serde_json::Map::new()));
            config
                .set_by_env
                .insert("prometheus".to_string(), "PROMETHEUS_ENABLED");
        }
    }
    Ok(())
}

/// A sink an environment variable adds, named after its plugin, with the default settings.
fn env_sink(plugin: &str, table: serde_json::Map<String, serde_json::Value>) -> SinkConfig {
    SinkConfig {
        name: plugin.to_string(),
        plugin: plugin.to_string(),
        timeout: None,
        required: false,
        queue_capacity: None,
        spool: false,
        spool_max_bytes: default_spool_max_bytes(),
        spool_mode: SpoolMode::default(),
        spool_sync: default_spool_sync(),
        max_backoff: default_sink_max_backoff(),
        batch_max_samples: default_batch_max_samples(),
        batch_wait: Duration::ZERO,
        config: table,
    }
}

/// A collection interval from an environment variable: a bare number is seconds, as these
/// variables are commonly set, or a duration like `500ms`; at least [`MIN_INTERVAL`].
fn parse_env_interval(name: &str, text: &str) -> Result<Duration, ConfigError> {
    let env_error = |message: String| ConfigError::Env {
        name: name.to_string(),
        message,
    };
    let d = match text.trim().parse::<f64>() {
        Ok(secs) => Duration::try_from_secs_f64(secs)
            .ok()
            .filter(|d| *d <= metricsd_plugin_api::duration::MAX)
            .ok_or_else(|| env_error(format!("`{text}` is not a number of seconds we can use")))?,
        Err(_) => metricsd_plugin_api::duration::parse(text).map_err(env_error)?,
    };
    if d < MIN_INTERVAL {
        return Err(env_error(format!(
            "`{text}` is shorter than the shortest interval, {}",
            humantime::format_duration(MIN_INTERVAL)
        )));
    }
    Ok(d)
}

/// `GPU_DISCOVERY_HOST`: `host`, `host:port` or `http(s)://host[:port]`; the port defaults to
/// the discovery service's 50051.
fn parse_discovery_host(text: &str) -> Result<String, ConfigError> {
    let env_error = |message: String| ConfigError::Env {
        name: "GPU_DISCOVERY_HOST".to_string(),
        message,
    };
    let text = text.trim();
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme @ ("http" | "https"), rest)) => (Some(scheme), rest),
        Some((scheme, _)) => {
            return Err(env_error(format!(
                "`{text}`: the scheme `{scheme}` is not http or https"
            )))
        }
        None => (None, text),
    };
    let rest = rest.trim_end_matches('/');
    // `[v6]:port`, `host:port`, or a bare host (an IPv6 address needs brackets with a port).
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => (host, Some(port)),
        _ => (rest, None),
    };
    if host.is_empty()
        || host.contains(['/', '?', '#', '@'])
        || host.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(env_error(format!(
            "`{text}` is not a host or host:port, e.g. gpu-discovery or gpu-discovery:50051"
        )));
    }
    let port = match port {
        None => DISCOVERY_DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => {
                return Err(env_error(format!(
                    "`{text}`: `{p}` is not a port (1 to 65535)"
                )))
            }
        },
    };
    Ok(match scheme {
        Some(scheme) => format!("{scheme}://{host}:{port}"),
        None => format!("{host}:{port}"),
    })
}

/// Whether `name` can be a plugin name (what `TIMESERIES_BACKEND` lists).
fn is_plugin_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The `[sinks.config]` of a sink that `TIMESERIES_BACKEND` adds: working defaults, and the
/// connection from the environment where the plugin has one (InfluxDB).
fn backend_defaults(plugin: &str, env: &dyn Env) -> serde_json::Map<String, serde_json::Value> {
    let mut table = serde_json::Map::new();
    if plugin == "influxdb" {
        table.insert("url".into(), "http://localhost:8086".into());
        table.insert("database".into(), "metricsd".into());
        table.insert("create_database".into(), true.into());
        apply_influxdb_env(&mut table, env);
    }
    table
}

/// `INFLUXDB_*` variables into an InfluxDB sink's table: `INFLUXDB_URL`, v1
/// `INFLUXDB_DATABASE`, `INFLUXDB_USERNAME`, `INFLUXDB_PASSWORD`, v2 `INFLUXDB_ORG`,
/// `INFLUXDB_BUCKET`, `INFLUXDB_TOKEN`. Secrets are referenced by variable name (`*_env`) so
/// they never enter the config. Any v2 variable selects the v2 API.
fn apply_influxdb_env(table: &mut serde_json::Map<String, serde_json::Value>, env: &dyn Env) {
    let mut set = |key: &str, var: &str| {
        if let Some(v) = env.var(var) {
            table.insert(key.to_string(), v.into());
        }
    };
    set("url", "INFLUXDB_URL");
    set("database", "INFLUXDB_DATABASE");
    set("username", "INFLUXDB_USERNAME");
    set("org", "INFLUXDB_ORG");
    set("bucket", "INFLUXDB_BUCKET");
    if env.var("INFLUXDB_PASSWORD").is_some() {
        table.insert("password_env".into(), "INFLUXDB_PASSWORD".into());
    }
    if env.var("INFLUXDB_TOKEN").is_some() {
        table.insert("token_env".into(), "INFLUXDB_TOKEN".into());
    }
    let v2 = ["INFLUXDB_ORG", "INFLUXDB_BUCKET", "INFLUXDB_TOKEN"]
        .iter()
        .any(|v| env.var(v).is_some());
    if v2 {
        table.insert("api".into(), "v2".into());
        for v1_key in ["database", "create_database", "username", "password_env"] {
            table.remove(v1_key);
        }
    }
}

fn parse_env_bool(name: &str, text: &str) -> Result<bool, ConfigError> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(ConfigError::Env {
            name: name.to_string(),
            message: format!("`{text}` is not true or false"),
        }),
    }
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Whether `name` is a valid label name.
pub fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether `name` is a valid metric name.
pub fn is_valid_metric_name(name: &str) -> bool {
    is_metric_name(name)
}

fn check_glob(key: String, pattern: &str) -> Result<(), ConfigError> {
    globset::Glob::new(pattern)
        .map(|_| ())
        .map_err(|e| key_error(key, format!("`{pattern}` is not a valid glob: {e}")))
}

/// Checks what can be checked without plugins: names, durations, references, globs.
/// What is valid but almost certainly not what the operator meant, one line each (logged at
/// start and printed by `check`).
pub fn warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if !config.routes.is_empty() {
        for s in &config.sinks {
            if !config.routes.iter().any(|r| r.to.contains(&s.name)) {
                out.push(format!(
                    "sink `{}` is in no [[routes]] `to` list: no collector reaches it, it receives nothing",
                    s.name
                ));
            }
        }
    }
    // Pull sinks answer on the metrics listener under their `path`; the prometheus plugin's
    // default is /metrics. (Other plugins' paths are known once they run, and checked then.)
    let mut paths: BTreeMap<String, &str> = BTreeMap::new();
    for s in config.sinks.iter().filter(|s| s.plugin == "prometheus") {
        let path = s
            .config
            .get("path")
            .and_then(|p| p.as_str())
            .unwrap_or("/metrics")
            .to_string();
        if let Some(first) = paths.insert(path.clone(), &s.name) {
            out.push(format!(
                "sinks `{first}` and `{}` both serve {path} on the metrics listener: only `{}` is reachable; give one a different `path`",
                s.name, s.name
            ));
        }
    }
    out
}

/// A collection interval of at least [`MIN_INTERVAL`].
fn check_interval(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d < MIN_INTERVAL {
        return Err(key_error(
            key,
            format!(
                "{} is shorter than the shortest interval, {} (shorter ones cost a CPU core in scheduling alone)",
                humantime::format_duration(d),
                humantime::format_duration(MIN_INTERVAL)
            ),
        ));
    }
    Ok(())
}

fn validate(config: &Config) -> Result<(), ConfigError> {
    let agent = &config.agent;
    check_interval("agent.interval", agent.interval)?;
    if agent.timeout.is_zero() {
        return Err(key_error("agent.timeout", "must be greater than 0"));
    }
    if agent.queue_capacity == 0 {
        return Err(key_error("agent.queue_capacity", "must be greater than 0"));
    }
    for (i, digest) in agent.plugin_sha256.iter().enumerate() {
        if digest.len() != 64 || !digest.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(key_error(
                format!("agent.plugin_sha256[{i}]"),
                format!("`{digest}` is not a SHA-256 digest (64 hex digits)"),
            ));
        }
    }
    for name in agent.labels.keys() {
        if !is_label_name(name) || name.starts_with("__") {
            return Err(key_error(
                format!("agent.labels.{name}"),
                "not a valid label name ([a-zA-Z_][a-zA-Z0-9_]*, not starting with __)",
            ));
        }
    }
    config.http.metrics_addr()?;
    config.http.health_addr()?;
    let http = &config.http;
    for (key, d) in [
        ("http.header_read_timeout", http.header_read_timeout),
        ("http.idle_timeout", http.idle_timeout),
    ] {
        if d.is_zero() {
            return Err(key_error(key, "must be greater than 0"));
        }
    }
    for (key, n) in [
        ("http.max_connections", http.max_connections),
        ("http.max_requests", http.max_requests),
    ] {
        if n == 0 {
            return Err(key_error(key, "must be at least 1"));
        }
    }

    let mut names = BTreeSet::new();
    names.insert(INTERNAL_SOURCE.to_string());
    for (i, c) in config.collectors.iter().enumerate() {
        check_instance_name(&format!("collectors[{i}]"), &c.name, &mut names)?;
        if c.plugin.is_empty() {
            return Err(key_error(
                format!("collectors[{i}].plugin"),
                "must not be empty",
            ));
        }
        if let Some(d) = c.interval {
            check_interval(&format!("collectors[{i}].interval"), d)?;
        }
        if c.timeout.is_some_and(|d| d.is_zero()) {
            return Err(key_error(
                format!("collectors[{i}].timeout"),
                "must be greater than 0",
            ));
        }
    }
    for (i, s) in config.sinks.iter().enumerate() {
        check_instance_name(&format!("sinks[{i}]"), &s.name, &mut names)?;
        if s.plugin.is_empty() {
            return Err(key_error(format!("sinks[{i}].plugin"), "must not be empty"));
        }
        if s.queue_capacity == Some(0) {
            return Err(key_error(
                format!("sinks[{i}].queue_capacity"),
                "must be greater than 0",
            ));
        }
        if s.batch_max_samples == 0 {
            return Err(key_error(
                format!("sinks[{i}].batch_max_samples"),
                "must be greater than 0",
            ));
        }
        if s.max_backoff < MIN_INTERVAL {
            return Err(key_error(
                format!("sinks[{i}].max_backoff"),
                format!(
                    "must be at least {}",
                    humantime::format_duration(MIN_INTERVAL)
                ),
            ));
        }
        if s.spool && s.spool_max_bytes < 1024 * 1024 {
            return Err(key_error(
                format!("sinks[{i}].spool_max_bytes"),
                "must be at least 1 MiB (1048576)",
            ));
        }
    }
    let collectors: BTreeSet<&str> = config
        .collectors
        .iter()
        .map(|c| c.name.as_str())
        .chain([INTERNAL_SOURCE])
        .collect();
    for (i, a) in config.aggregate.iter().enumerate() {
        check_instance_name(&format!("aggregate[{i}]"), &a.name, &mut names)?;
        if a.from.is_empty() {
            return Err(key_error(
                format!("aggregate[{i}].from"),
                "needs at least one collector",
            ));
        }
        for (j, from) in a.from.iter().enumerate() {
            if !collectors.contains(from.as_str()) {
                return Err(key_error(
                    format!("aggregate[{i}].from[{j}]"),
                    format!(
                        "no collector named `{from}`{}",
                        did_you_mean(from, &collectors)
                    ),
                ));
            }
        }
        if a.window < Duration::from_secs(1) {
            return Err(key_error(
                format!("aggregate[{i}].window"),
                "must be at least 1s",
            ));
        }
        if a.stats.is_empty() {
            return Err(key_error(
                format!("aggregate[{i}].stats"),
                "needs at least one of min, max, mean, last, count",
            ));
        }
        for (j, g) in a.metrics.iter().enumerate() {
            check_glob(format!("aggregate[{i}].metrics[{j}]"), g)?;
        }
    }
    for (i, e) in config.enrich.iter().enumerate() {
        let check_collector = |key: String, name: &str| {
            if collectors.contains(name) {
                Ok(())
            } else {
                Err(key_error(
                    key,
                    format!(
                        "no collector named `{name}`{}",
                        did_you_mean(name, &collectors)
                    ),
                ))
            }
        };
        if e.from.is_empty() {
            return Err(key_error(
                format!("enrich[{i}].from"),
                "needs at least one collector",
            ));
        }
        for (j, from) in e.from.iter().enumerate() {
            check_collector(format!("enrich[{i}].from[{j}]"), from)?;
            if *from == e.info {
                return Err(key_error(
                    format!("enrich[{i}].from[{j}]"),
                    "a collector cannot enrich its own series",
                ));
            }
        }
        check_collector(format!("enrich[{i}].info"), &e.info)?;
        if !is_valid_metric_name(&e.metric) {
            return Err(key_error(
                format!("enrich[{i}].metric"),
                format!("`{}` is not a valid metric name", e.metric),
            ));
        }
        for (key, name) in std::iter::once((format!("enrich[{i}].on"), &e.on))
            .chain(
                e.labels
                    .iter()
                    .enumerate()
                    .map(|(j, l)| (format!("enrich[{i}].labels[{j}]"), l)),
            )
            .chain(
                e.exclude
                    .iter()
                    .enumerate()
                    .map(|(j, l)| (format!("enrich[{i}].exclude[{j}]"), l)),
            )
        {
            if !is_label_name(name) {
                return Err(key_error(
                    key,
                    format!("`{name}` is not a valid label name"),
                ));
            }
        }
        if e.max_age.is_zero() {
            return Err(key_error(
                format!("enrich[{i}].max_age"),
                "must be more than 0s",
            ));
        }
    }
    let sources: BTreeSet<&str> = collectors
        .iter()
        .copied()
        .chain(config.aggregate.iter().map(|a| a.name.as_str()))
        .collect();
    let sinks: BTreeSet<&str> = config.sinks.iter().map(|s| s.name.as_str()).collect();
    for (i, r) in config.routes.iter().enumerate() {
        for (j, from) in r.from.iter().enumerate() {
            if !sources.contains(from.as_str()) {
                return Err(key_error(
                    format!("routes[{i}].from[{j}]"),
                    format!(
                        "no collector or aggregate named `{from}`{}",
                        did_you_mean(from, &sources)
                    ),
                ));
            }
        }
        for (j, to) in r.to.iter().enumerate() {
            if !sinks.contains(to.as_str()) {
                return Err(key_error(
                    format!("routes[{i}].to[{j}]"),
                    format!("no sink named `{to}`{}", did_you_mean(to, &sinks)),
                ));
            }
        }
        for (j, g) in r.include.iter().enumerate() {
            check_glob(format!("routes[{i}].include[{j}]"), g)?;
        }
        for (j, g) in r.exclude.iter().enumerate() {
            check_glob(format!("routes[{i}].exclude[{j}]"), g)?;
        }
    }
    for (i, r) in config.relabel.iter().enumerate() {
        validate_relabel(i, r, &collectors)?;
    }
    Ok(())
}

fn validate_relabel(
    i: usize,
    r: &RelabelConfig,
    collectors: &BTreeSet<&str>,
) -> Result<(), ConfigError> {
    for (j, g) in r.metrics.iter().enumerate() {
        check_glob(format!("relabel[{i}].metrics[{j}]"), g)?;
    }
    for (j, g) in r.labels.iter().enumerate() {
        check_glob(format!("relabel[{i}].labels[{j}]"), g)?;
    }
    for (j, c) in r.collectors.iter().enumerate() {
        if !collectors.contains(c.as_str()) {
            return Err(key_error(
                format!("relabel[{i}].collectors[{j}]"),
                format!("no collector named `{c}`{}", did_you_mean(c, collectors)),
            ));
        }
    }
    match r.action {
        RelabelAction::Drop | RelabelAction::Keep if r.metrics.is_empty() => Err(key_error(
            format!("relabel[{i}].metrics"),
            "needs at least one metric name glob",
        )),
        RelabelAction::DropLabels if r.labels.is_empty() => Err(key_error(
            format!("relabel[{i}].labels"),
            "needs at least one label name glob",
        )),
        RelabelAction::Rename => {
            let from = r
                .from
                .as_deref()
                .ok_or_else(|| key_error(format!("relabel[{i}].from"), "missing for rename"))?;
            let to =
                r.to.as_deref()
                    .ok_or_else(|| key_error(format!("relabel[{i}].to"), "missing for rename"))?;
            let stars = from.matches('*').count();
            if stars > 1 {
                return Err(key_error(
                    format!("relabel[{i}].from"),
                    "may contain at most one `*`",
                ));
            }
            if to.matches('*').count() != stars {
                return Err(key_error(
                    format!("relabel[{i}].to"),
                    "must contain a `*` exactly when `from` does",
                ));
            }
            if !is_metric_name(&to.replace('*', "x")) {
                return Err(key_error(
                    format!("relabel[{i}].to"),
                    format!("`{to}` does not give valid metric names"),
                ));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn check_instance_name(
    key: &str,
    name: &str,
    seen: &mut BTreeSet<String>,
) -> Result<(), ConfigError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    {
        return Err(key_error(
            format!("{key}.name"),
            format!("`{name}` is not a valid instance name (letters, digits, _ - .)"),
        ));
    }
    if name == INTERNAL_SOURCE {
        return Err(key_error(
            format!("{key}.name"),
            format!("`{INTERNAL_SOURCE}` is reserved for the agent's own metrics"),
        ));
    }
    if !seen.insert(name.to_string()) {
        return Err(key_error(
            format!("{key}.name"),
            format!("`{name}` is used by another instance; names must be unique"),
        ));
    }
    Ok(())
}

/// ` (did you mean `x`?)` when a known name is close, else empty.
pub fn did_you_mean<'a>(name: &str, known: impl IntoIterator<Item = &'a &'a str>) -> String {
    known
        .into_iter()
        .map(|k| (strsim::levenshtein(name, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min()
        .map(|(_, k)| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        parse_env(text, &[])
    }

    fn parse_env(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        from_toml_with_env(text, &ConfigSource::File("test.toml".into()), &env)
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("must be refused").to_string()
    }

    #[test]
    fn intervals_have_a_floor_and_durations_a_ceiling() {
        let e = err("[agent]\ninterval = \"1ns\"\n");
        assert!(
            e.contains("agent.interval") && e.contains("shortest interval, 100ms"),
            "{e}"
        );
        let e = err("[[collectors]]\nname = \"a\"\nplugin = \"hello\"\ninterval = \"10ms\"\n");
        assert!(e.contains("collectors[0].interval"), "{e}");
        assert!(parse("[agent]\ninterval = \"100ms\"\n").is_ok());
        for key in ["timeout", "max_backoff", "shutdown_timeout"] {
            let e = err(&format!("[agent]\n{key} = \"300000000000years\"\n"));
            assert!(e.contains(&format!("agent.{key}")), "{e}");
            assert!(
                e.contains("longer than the longest duration accepted"),
                "{e}"
            );
        }
        let e = parse_env("", &[("METRICSD_AGENT__TIMEOUT", "300000000000years")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("agent.timeout"), "{e}");
    }

    #[test]
    fn errors_from_operator_variables_name_the_variable() {
        for (var, value) in [
            ("GPU_COLLECTION_INTERVAL", "0"),
            ("GPU_COLLECTION_INTERVAL", "0.01"),
            ("GPU_COLLECTION_INTERVAL", "1e30"),
            ("GPU_COLLECTION_INTERVAL", "-5"),
            ("TIMESERIES_BACKEND", "a;b"),
            ("TIMESERIES_BACKEND", "influxdb prometheus"),
            ("GPU_DISCOVERY_HOST", "host:99999"),
            ("GPU_DISCOVERY_HOST", "host:0"),
            ("GPU_DISCOVERY_HOST", "ftp://host"),
            ("GPU_DISCOVERY_HOST", "http://"),
        ] {
            let e = parse_env(BUILTIN_DEFAULT, &[(var, value)])
                .expect_err(value)
                .to_string();
            assert!(e.contains(var) && e.contains(value), "{var}={value}: {e}");
            assert!(!e.contains("collectors["), "{var}={value}: {e}");
        }
        let endpoint = |host: &str| {
            let c = parse_env(BUILTIN_DEFAULT, &[("GPU_DISCOVERY_HOST", host)]).unwrap();
            let d = c
                .collectors
                .iter()
                .find(|c| c.plugin == "discovery")
                .unwrap();
            assert_eq!(c.set_by_env.get(&d.name), Some(&"GPU_DISCOVERY_HOST"));
            d.config["endpoint"].as_str().unwrap().to_string()
        };
        assert_eq!(endpoint("gpu-discovery"), "gpu-discovery:50051");
        assert_eq!(endpoint("gpu-discovery:7000"), "gpu-discovery:7000");
        assert_eq!(
            endpoint("https://gpu-discovery/"),
            "https://gpu-discovery:50051"
        );
        assert_eq!(endpoint("[fd00::1]:7000"), "[fd00::1]:7000");
    }

    #[test]
    fn the_seed_production_environment_gets_a_working_influxdb_sink() {
        let seed = [
            ("PROMETHEUS_ENABLED", "true"),
            ("GPU_COLLECTION_INTERVAL", "5"),
            ("TIMESERIES_BACKEND", "influxdb"),
            ("GPU_DISCOVERY_HOST", "gpu-discovery"),
            ("LOG_LEVEL", "INFO"),
        ];
        let c = parse_env(BUILTIN_DEFAULT, &seed).unwrap();
        let plugins: Vec<_> = c.sinks.iter().map(|s| s.plugin.as_str()).collect();
        assert_eq!(plugins, ["influxdb", "prometheus"]);
        let influx = &c.sinks[0].config;
        assert_eq!(influx["url"], "http://localhost:8086");
        assert_eq!(influx["database"], "metricsd");
        assert_eq!(influx["create_database"], true);
        assert_eq!(c.set_by_env.get("influxdb"), Some(&"TIMESERIES_BACKEND"));

        let mut env = seed.to_vec();
        env.extend([
            ("INFLUXDB_URL", "http://influx:8086"),
            ("INFLUXDB_DATABASE", "gpus"),
            ("INFLUXDB_USERNAME", "writer"),
            ("INFLUXDB_PASSWORD", "secret"),
        ]);
        let c = parse_env(BUILTIN_DEFAULT, &env).unwrap();
        let influx = &c.sinks[0].config;
        assert_eq!(influx["url"], "http://influx:8086");
        assert_eq!(influx["database"], "gpus");
        assert_eq!(influx["username"], "writer");
        assert_eq!(
            influx["password_env"], "INFLUXDB_PASSWORD",
            "the secret stays in the environment"
        );
        assert!(!influx.values().any(|v| v == "secret"));

        let mut env = seed.to_vec();
        env.extend([
            ("INFLUXDB_ORG", "fleet"),
            ("INFLUXDB_BUCKET", "gpus"),
            ("INFLUXDB_TOKEN", "t0ken"),
        ]);
        let c = parse_env(BUILTIN_DEFAULT, &env).unwrap();
        let influx = &c.sinks[0].config;
        assert_eq!(influx["api"], "v2");
        assert_eq!(influx["org"], "fleet");
        assert_eq!(influx["bucket"], "gpus");
        assert_eq!(influx["token_env"], "INFLUXDB_TOKEN");
        assert!(!influx.contains_key("database") && !influx.contains_key("create_database"));
    }

    #[test]
    fn collectors_run_in_process_unless_isolation_says_process() {
        let c = parse("[[collectors]]\nname = \"c\"\nplugin = \"hello\"\n").expect("parses");
        assert_eq!(c.collectors[0].isolation, Isolation::InProcess);
        let c =
            parse("[[collectors]]\nname = \"c\"\nplugin = \"hello\"\nisolation = \"process\"\n")
                .expect("parses");
        assert_eq!(c.collectors[0].isolation, Isolation::Process);
        let e =
            err("[[collectors]]\nname = \"c\"\nplugin = \"hello\"\nisolation = \"container\"\n");
        assert!(
            e.contains("collectors[0].isolation") && e.contains("`in-process` or `process`"),
            "{e}"
        );
    }

    #[test]
    fn sinks_retry_within_seconds_and_spool_only_what_waits_by_default() {
        let c =
            parse("[[sinks]]\nname = \"s\"\nplugin = \"stdout\"\nspool = true\n").expect("parses");
        let s = &c.sinks[0];
        assert_eq!(s.max_backoff, Duration::from_secs(5));
        assert_eq!(s.spool_mode, SpoolMode::Overflow);
        assert_eq!(s.spool_sync, Duration::from_secs(1));
        let c = parse(
            "[[sinks]]\nname = \"s\"\nplugin = \"stdout\"\nspool_mode = \"always\"\nspool_sync = \"0s\"\nmax_backoff = \"30s\"\n",
        )
        .expect("parses");
        assert_eq!(c.sinks[0].spool_mode, SpoolMode::Always);
        assert_eq!(c.sinks[0].spool_sync, Duration::ZERO);
        assert_eq!(c.sinks[0].max_backoff, Duration::from_secs(30));
        let e = err("[[sinks]]\nname = \"s\"\nplugin = \"stdout\"\nmax_backoff = \"1ms\"\n");
        assert!(
            e.contains("sinks[0].max_backoff") && e.contains("100ms"),
            "{e}"
        );
        let e = err("[[sinks]]\nname = \"s\"\nplugin = \"stdout\"\nspool_mode = \"sometimes\"\n");
        assert!(e.contains("spool_mode") && e.contains("overflow"), "{e}");
    }

    #[test]
    fn unreachable_sinks_and_shared_paths_are_warned_about() {
        let c = parse("[[collectors]]\nname = \"a\"\nplugin = \"hello\"\n[[sinks]]\nname = \"p1\"\nplugin = \"prometheus\"\n[[sinks]]\nname = \"p2\"\nplugin = \"prometheus\"\n[[sinks]]\nname = \"out\"\nplugin = \"stdout\"\n[[routes]]\nfrom = [\"a\"]\nto = [\"p1\", \"p2\"]\n").unwrap();
        let w = warnings(&c);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("sink `out`") && w[0].contains("receives nothing"),
            "{w:?}"
        );
        assert!(w[1].contains("`p1` and `p2` both serve /metrics"), "{w:?}");
        let c = parse("[[sinks]]\nname = \"p1\"\nplugin = \"prometheus\"\n[[sinks]]\nname = \"p2\"\nplugin = \"prometheus\"\n[sinks.config]\npath = \"/gpu\"\n").unwrap();
        assert!(warnings(&c).is_empty());
    }

    #[test]
    fn built_in_default_parses() {
        let c = parse(BUILTIN_DEFAULT).unwrap();
        assert_eq!(c.collectors.len(), 2);
        assert_eq!(c.sinks[0].plugin, "prometheus");
        assert_eq!(c.agent.interval, Duration::from_secs(5));
        assert_eq!(c.http.metrics_listen, "0.0.0.0:8080");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err("[agent]\nintervall = \"5s\"\n");
        assert!(e.contains("agent"), "{e}");
        assert!(e.contains("unknown field `intervall`"), "{e}");
        let e = err("[[collectors]]\nname=\"a\"\nplugin=\"b\"\ncolour=1\n");
        assert!(e.contains("collectors[0]"), "{e}");
        assert!(e.contains("`colour`"), "{e}");
    }

    #[test]
    fn bad_duration_is_named() {
        let e = err("[agent]\ninterval = \"fast\"\n");
        assert!(e.contains("`agent.interval`"), "{e}");
        let e = err("[[collectors]]\nname=\"a\"\nplugin=\"b\"\ninterval=\"5 parsecs\"\n");
        assert!(e.contains("`collectors[0].interval`"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e = err("[agent]\nqueue_capacity = \"lots\"\n");
        assert!(e.contains("`agent.queue_capacity`"), "{e}");
        let e = err("[[sinks]]\nname = \"s\"\nplugin = \"x\"\nrequired = \"maybe\"\n");
        assert!(e.contains("sinks[0].required"), "{e}");
    }

    #[test]
    fn duplicate_and_reserved_names_are_refused() {
        let e =
            err("[[collectors]]\nname=\"a\"\nplugin=\"x\"\n[[sinks]]\nname=\"a\"\nplugin=\"y\"\n");
        assert!(e.contains("sinks[0].name") && e.contains("unique"), "{e}");
        let e = err("[[collectors]]\nname=\"metricsd\"\nplugin=\"x\"\n");
        assert!(e.contains("reserved"), "{e}");
    }

    #[test]
    fn routes_must_name_instances() {
        let e = err("[[collectors]]\nname=\"gpu\"\nplugin=\"nvml\"\n[[sinks]]\nname=\"prom\"\nplugin=\"prometheus\"\n[[routes]]\nfrom=[\"gpus\"]\nto=[\"prom\"]\n");
        assert!(e.contains("routes[0].from[0]"), "{e}");
        assert!(e.contains("did you mean `gpu`"), "{e}");
    }

    #[test]
    fn env_overrides_with_section_separator() {
        let c = parse_env(
            "",
            &[
                ("METRICSD_HTTP__METRICS_LISTEN", "127.0.0.1:9999"),
                ("METRICSD_AGENT__INTERVAL", "250ms"),
            ],
        )
        .unwrap();
        assert_eq!(c.http.metrics_listen, "127.0.0.1:9999");
        assert_eq!(c.agent.interval, Duration::from_millis(250));

        let e = parse_env("", &[("METRICSD_AGENT__INTERVAL", "soon")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("agent.interval"), "{e}");
    }

    #[test]
    fn cli_variables_are_not_config_and_other_bare_names_are_errors() {
        let c = parse_env(
            "",
            &[
                ("METRICSD_PLUGIN_PATH", "/opt/plugins"),
                ("METRICSD_CONFIG", "/etc/metricsd/metricsd.toml"),
                ("METRICSD_AGENT__INTERVAL", "2s"),
            ],
        )
        .unwrap();
        assert_eq!(c.agent.interval, Duration::from_secs(2));
        let e = parse_env("", &[("METRICSD_INTERVAL", "2s")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("METRICSD_<SECTION>__<KEY>"), "{e}");
    }

    #[test]
    fn log_levels_are_normalised_and_bare_words_that_are_not_levels_refused() {
        assert_eq!(log_filter("warning").as_deref(), Ok("warn"));
        assert_eq!(log_filter("INFO").as_deref(), Ok("info"));
        assert_eq!(log_filter(" Error ").as_deref(), Ok("error"));
        assert_eq!(log_filter("").as_deref(), Ok(""));
        assert_eq!(
            log_filter("warning,metricsd=DEBUG").as_deref(),
            Ok("warn,metricsd=debug")
        );
        for bad in ["loud", "metricsd", "info,verbose"] {
            let e = log_filter(bad).unwrap_err();
            assert!(e.contains("is not a log level"), "{bad}: {e}");
        }
        assert!(log_filter("metricsd=[").is_err());

        let e = parse_env("", &[("LOG_LEVEL", "loud")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("LOG_LEVEL") && e.contains("`loud`"), "{e}");
        let e = parse_env("[agent]\nlog_level = \"chatty\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("agent.log_level") && e.contains("`chatty`"),
            "{e}"
        );
        let c = parse_env("", &[("LOG_LEVEL", "WARNING")]).unwrap();
        assert_eq!(c.agent.log_level, "warn");
    }

    #[test]
    fn operator_env_names() {
        let c = parse_env(
            BUILTIN_DEFAULT,
            &[
                ("GPU_COLLECTION_INTERVAL", "10"),
                ("LOG_LEVEL", "debug"),
                ("PROMETHEUS_ENABLED", "false"),
                ("GPU_DISCOVERY_HOST", "http://127.0.0.1:50051"),
            ],
        )
        .unwrap();
        let gpu = c.collectors.iter().find(|c| c.plugin == "nvml").unwrap();
        assert_eq!(gpu.interval, Some(Duration::from_secs(10)));
        assert_eq!(c.agent.log_level, "debug");
        assert!(c.sinks.is_empty());
        let d = c
            .collectors
            .iter()
            .find(|c| c.plugin == "discovery")
            .unwrap();
        assert_eq!(d.config["endpoint"], "http://127.0.0.1:50051");
        assert_eq!(
            c.enrich.len(),
            1,
            "discovery labels joined onto the NVML series"
        );
        assert_eq!(c.enrich[0].from, ["gpu"]);
        assert_eq!(c.enrich[0].info, "discovery");
        assert_eq!(c.enrich[0].exclude, ["index", "model", "pci_bus_id"]);

        let c = parse_env(BUILTIN_DEFAULT, &[("TIMESERIES_BACKEND", "influxdb")]).unwrap();
        let plugins: Vec<_> = c.sinks.iter().map(|s| s.plugin.as_str()).collect();
        assert_eq!(plugins, ["influxdb"]);

        let e = parse_env(BUILTIN_DEFAULT, &[("GPU_COLLECTION_INTERVAL", "often")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("GPU_COLLECTION_INTERVAL"), "{e}");
        let e = parse_env(BUILTIN_DEFAULT, &[("PROMETHEUS_ENABLED", "perhaps")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("PROMETHEUS_ENABLED"), "{e}");
    }

    #[test]
    fn listen_addresses() {
        let c = parse("[http]\nmetrics_listen = \":9100\"\nhealth_listen = \"\"\n").unwrap();
        assert_eq!(
            c.http.metrics_addr().unwrap(),
            Some("0.0.0.0:9100".parse().unwrap())
        );
        assert_eq!(c.http.health_addr().unwrap(), None);
        let e = err("[http]\nmetrics_listen = \"localhost\"\n");
        assert!(e.contains("http.metrics_listen"), "{e}");
    }

    #[test]
    fn relabel_rules_are_checked() {
        let e = err("[[relabel]]\naction = \"rename\"\nfrom = \"a_*\"\nto = \"b\"\n");
        assert!(e.contains("relabel[0].to"), "{e}");
        let e = err("[[relabel]]\naction = \"drop\"\n");
        assert!(e.contains("relabel[0].metrics"), "{e}");
        let e = err("[[relabel]]\naction = \"explode\"\nmetrics=[\"x\"]\n");
        assert!(e.contains("relabel[0].action"), "{e}");
        parse("[[relabel]]\naction = \"rename\"\nfrom = \"a_*\"\nto = \"b_*\"\n").unwrap();
    }

    #[test]
    fn did_you_mean_suggests_close_names() {
        assert_eq!(
            did_you_mean("nvlm", &["nvml", "system"]),
            " (did you mean `nvml`?)"
        );
        assert_eq!(did_you_mean("zzzzzz", &["nvml", "system"]), "");
    }
}
