//! Wires config, plugins, pipeline, collectors, sinks and listeners together, and runs them
//! until SIGTERM / Ctrl-C.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use metricsd_plugin_api::PluginKind;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{CollectorConfig, Config, LoadedConfig, SinkConfig, INTERNAL_SOURCE};
use crate::delivery::{SinkQueue, SinkRuntime};
use crate::events::Telemetry;
use crate::health::Health;
use crate::instance::{create_isolated, create_sink, validate_config};
use crate::isolation::CollectError;
use crate::loader::{scan, search_dirs, Plugin, PluginSet};
use crate::pipeline::Pipeline;
use crate::scheduler::CollectorTask;
use crate::spool::Spool;
use crate::webconfig::WebSecurity;

/// An error that ends the process with a specific exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ExitError {
    /// Process exit code.
    pub code: i32,
    /// One line for the operator.
    pub message: String,
}

/// Exit code for configuration problems and required plugins that cannot load: restarting
/// with the same config cannot help (the systemd unit's `RestartPreventExitStatus`).
pub const EXIT_CONFIG: i32 = 2;

/// Exit code for failures that a later start may not meet: a listen address that another
/// process holds, or that is not configured on the node yet. systemd restarts on it.
pub const EXIT_RUNTIME: i32 = 1;

fn exit(code: i32, message: impl Into<String>) -> ExitError {
    ExitError {
        code,
        message: message.into(),
    }
}

/// The plugins this config's collectors and sinks name.
pub fn plugins_named(config: &Config) -> BTreeSet<String> {
    config
        .collectors
        .iter()
        .map(|c| c.plugin.clone())
        .chain(config.sinks.iter().map(|s| s.plugin.clone()))
        .collect()
}

/// Scans the plugin directories of this config and loads the plugins `needed` names (every
/// plugin file with `None`).
pub fn load_plugins(config: &Config, needed: Option<&BTreeSet<String>>) -> PluginSet {
    let env_path = std::env::var("METRICSD_PLUGIN_PATH").ok();
    let dirs = search_dirs(env_path.as_deref(), &config.agent.plugin_path);
    scan(&dirs, &config.agent.plugin_sha256, needed)
}

/// A config entry matched with its plugin, or why it cannot run.
pub struct Resolved<C> {
    /// The config entry.
    pub config: C,
    /// The plugin, or the reason it is unavailable.
    pub plugin: Result<Plugin, String>,
}

/// What the config asks for, matched against the plugins found.
pub struct Plan {
    /// Collectors.
    pub collectors: Vec<Resolved<CollectorConfig>>,
    /// Sinks.
    pub sinks: Vec<Resolved<SinkConfig>>,
    /// Entries of the built-in default whose plugin is not installed.
    pub skipped: Vec<String>,
}

fn lookup(
    plugins: &PluginSet,
    instance: &str,
    plugin: &str,
    kind: PluginKind,
    config: &serde_json::Map<String, serde_json::Value>,
) -> Result<Plugin, String> {
    let what = format!("{} `{instance}`", kind.as_str());
    let p = plugins
        .get(plugin)
        .ok_or_else(|| format!("{what}: {}", plugins.why_missing(plugin)))?;
    if p.kind != kind {
        return Err(format!(
            "{what}: plugin `{plugin}` ({}) is a {}, not a {}",
            p.path.display(),
            p.kind.as_str(),
            kind.as_str()
        ));
    }
    let json = serde_json::Value::Object(config.clone()).to_string();
    validate_config(p, &json).map_err(|e| format!("{what} (plugin `{plugin}`): {e}"))?;
    Ok(p.clone())
}

/// Matches the config against the plugins. With the built-in default, entries whose plugin is
/// not installed are skipped rather than reported.
pub fn plan(loaded: &LoadedConfig, plugins: &PluginSet) -> Plan {
    let builtin = loaded.is_builtin_default();
    let set_by_env = &loaded.config.set_by_env;
    // What an operator variable asked for is never skipped, and its errors name the variable.
    let skippable = |name: &str| {
        builtin && !matches!(set_by_env.get(name), Some(var) if *var != "GPU_COLLECTION_INTERVAL")
    };
    let named = |name: &str, result: Result<Plugin, String>| {
        result.map_err(|e| match set_by_env.get(name) {
            Some(var) => format!("{e} (set by the environment variable {var})"),
            None => e,
        })
    };
    let mut skipped = Vec::new();
    let mut collectors = Vec::new();
    for c in &loaded.config.collectors {
        if skippable(&c.name) && plugins.get(&c.plugin).is_none() {
            skipped.push(format!("collector `{}` (plugin `{}`)", c.name, c.plugin));
            continue;
        }
        let plugin = named(
            &c.name,
            lookup(
                plugins,
                &c.name,
                &c.plugin,
                PluginKind::COLLECTOR,
                &c.config,
            ),
        );
        collectors.push(Resolved {
            config: c.clone(),
            plugin,
        });
    }
    let mut sinks = Vec::new();
    for s in &loaded.config.sinks {
        if skippable(&s.name) && plugins.get(&s.plugin).is_none() {
            skipped.push(format!("sink `{}` (plugin `{}`)", s.name, s.plugin));
            continue;
        }
        let plugin = named(
            &s.name,
            lookup(plugins, &s.name, &s.plugin, PluginKind::SINK, &s.config),
        );
        sinks.push(Resolved {
            config: s.clone(),
            plugin,
        });
    }
    Plan {
        collectors,
        sinks,
        skipped,
    }
}

impl Plan {
    /// Every problem, one line each.
    pub fn problems(&self) -> Vec<String> {
        self.collectors
            .iter()
            .filter_map(|c| c.plugin.as_ref().err().cloned())
            .chain(
                self.sinks
                    .iter()
                    .filter_map(|s| s.plugin.as_ref().err().cloned()),
            )
            .collect()
    }

    /// The first problem of a required instance.
    pub fn required_problem(&self) -> Option<String> {
        self.collectors
            .iter()
            .filter(|c| c.config.required)
            .filter_map(|c| c.plugin.as_ref().err().cloned())
            .chain(
                self.sinks
                    .iter()
                    .filter(|s| s.config.required)
                    .filter_map(|s| s.plugin.as_ref().err().cloned()),
            )
            .next()
    }
}

fn config_json(table: &serde_json::Map<String, serde_json::Value>) -> String {
    serde_json::Value::Object(table.clone()).to_string()
}

/// Why a run of the pipeline ended.
pub enum StopReason {
    /// SIGTERM or Ctrl-C: exit.
    Shutdown,
    /// SIGHUP with a valid new configuration, its web config loaded and its listeners bound:
    /// run again with it.
    Reload(Box<LoadedConfig>, Box<PluginSet>, Arc<WebSecurity>),
}

/// The listening sockets, kept across reloads while their address stays the same: a reload
/// never lets go of its ports, and a new address that cannot be bound is found while the
/// running pipeline still runs.
#[derive(Default)]
pub struct Sockets {
    held: BTreeMap<SocketAddr, Arc<TcpListener>>,
}

/// The sockets, shared by the running pipeline and the reload that prepares the next one.
pub type SharedSockets = Arc<std::sync::Mutex<Sockets>>;

fn lock(sockets: &SharedSockets) -> std::sync::MutexGuard<'_, Sockets> {
    sockets.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sockets {
    /// The socket for `addr`: the one held, or a new one.
    fn get(&mut self, addr: SocketAddr) -> std::io::Result<Arc<TcpListener>> {
        if let Some(l) = self.held.get(&addr) {
            return Ok(Arc::clone(l));
        }
        let l = crate::http::bind(addr)?;
        self.held.insert(addr, Arc::clone(&l));
        Ok(l)
    }

    /// Binds every listener address of `config` not held yet.
    fn prepare(&mut self, config: &Config) -> Result<(), String> {
        for (key, addr) in [
            ("http.health_listen", config.http.health_addr()),
            ("http.metrics_listen", config.http.metrics_addr()),
        ] {
            if let Some(addr) = addr.map_err(|e| e.to_string())? {
                self.get(addr)
                    .map_err(|e| format!("cannot listen on {addr} ({key}): {e}"))?;
            }
        }
        Ok(())
    }

    /// Closes the sockets that are not in `used`.
    fn keep_only(&mut self, used: &BTreeSet<SocketAddr>) {
        self.held.retain(|addr, _| used.contains(addr));
    }
}

/// Loads the web config `config` names (plain HTTP without one).
pub fn load_security(config: &Config) -> Result<WebSecurity, String> {
    match &config.http.web_config_file {
        Some(path) => WebSecurity::load(path).map_err(|e| format!("http.web_config_file: {e}")),
        None => Ok(WebSecurity::none()),
    }
}

/// Reads and checks the configuration again, its plugins, web config and listen addresses;
/// `None` (with the reason logged) keeps the running pipeline.
fn reload(path: Option<&Path>, sockets: &SharedSockets) -> Option<StopReason> {
    let fail = |e: &dyn std::fmt::Display| {
        tracing::error!(
            "SIGHUP: config reload failed, keeping the running config and pipeline: {e}"
        );
        None
    };
    let loaded = match crate::config::load(path, &crate::config::ProcessEnv) {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    let plugins = load_plugins(&loaded.config, Some(&plugins_named(&loaded.config)));
    if let Some(problem) = plan(&loaded, &plugins).required_problem() {
        return fail(&format!("required {problem}"));
    }
    let security = match load_security(&loaded.config) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    if let Err(e) = lock(sockets).prepare(&loaded.config) {
        return fail(&e);
    }
    Some(StopReason::Reload(
        Box::new(loaded),
        Box::new(plugins),
        Arc::new(security),
    ))
}

/// SIGTERM, SIGINT and SIGHUP, registered once for the life of the process: a signal that
/// arrives while one pipeline stops and the next starts waits in its stream, where a stream
/// registered afterwards would never see it (a `systemctl stop` right after a reload).
struct Signals {
    term: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn register() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Waits for SIGTERM / Ctrl-C (shutdown) or SIGHUP with a valid config (reload).
async fn next_stop(
    signals: &mut Option<Signals>,
    path: Option<&Path>,
    sockets: &SharedSockets,
) -> StopReason {
    let Some(signals) = signals else {
        let _ = tokio::signal::ctrl_c().await;
        return StopReason::Shutdown;
    };
    loop {
        tokio::select! {
            _ = signals.term.recv() => {
                tracing::info!("SIGTERM received: shutting down");
                return StopReason::Shutdown;
            }
            _ = signals.interrupt.recv() => {
                tracing::info!("interrupt received: shutting down");
                return StopReason::Shutdown;
            }
            _ = signals.hup.recv() => {
                tracing::info!("SIGHUP received: reloading the configuration");
                if let Some(reason) = reload(path, sockets) {
                    return reason;
                }
            }
        }
    }
}

/// Runs the agent until SIGTERM or Ctrl-C; SIGHUP re-reads the config file and restarts the
/// pipeline with it (an invalid new config is reported and the running one kept).
pub async fn run(
    mut loaded: LoadedConfig,
    mut plugins: PluginSet,
    path: Option<&Path>,
) -> Result<(), ExitError> {
    let mut signals = match Signals::register() {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot listen for SIGTERM/SIGHUP ({e}); only Ctrl-C stops the agent");
            None
        }
    };
    crate::http::raise_fd_limit();
    let mut security = Arc::new(load_security(&loaded.config).map_err(|e| exit(EXIT_CONFIG, e))?);
    let sockets = SharedSockets::default();
    loop {
        let stop = next_stop(&mut signals, path, &sockets);
        match run_until(loaded, plugins, security, &sockets, stop).await? {
            StopReason::Shutdown => {
                tracing::info!("metricsd stopped");
                return Ok(());
            }
            StopReason::Reload(new_config, new_plugins, new_security) => {
                loaded = *new_config;
                plugins = *new_plugins;
                security = new_security;
                tracing::info!("configuration reloaded: starting the new pipeline");
            }
        }
    }
}

/// Runs the agent until `stop` resolves, stops it (draining and flushing every sink), and
/// returns what `stop` resolved to.
pub async fn run_until<T>(
    loaded: LoadedConfig,
    plugins: PluginSet,
    security: Arc<WebSecurity>,
    sockets: &SharedSockets,
    stop: impl std::future::Future<Output = T>,
) -> Result<T, ExitError> {
    let config = &loaded.config;
    let plan = plan(&loaded, &plugins);
    for s in &plan.skipped {
        tracing::info!("built-in default: {s} skipped, its plugin is not installed");
    }
    for w in crate::config::warnings(config) {
        tracing::warn!("{w}");
    }
    if let Some(problem) = plan.required_problem() {
        return Err(exit(EXIT_CONFIG, format!("required {problem}")));
    }
    let telemetry = Arc::new(Telemetry::new());
    crate::plugin_log::count_drops_in(&telemetry);
    let health = Arc::new(Health::new());
    crate::plugin_log::report_status_in(&health);
    telemetry.set_plugin_files(&plugins.files);

    // Sinks first, so that the pipeline has its queues.
    let mut queues = BTreeMap::new();
    let mut sink_runtimes = Vec::new();
    let mut http_routes = BTreeMap::new();
    for s in &plan.sinks {
        let name = &s.config.name;
        let plugin = match &s.plugin {
            Ok(p) => p,
            Err(why) => {
                tracing::error!("{why}; the sink is disabled");
                health.register(
                    name,
                    "sink",
                    &s.config.plugin,
                    s.config.required,
                    Some(why.clone()),
                );
                continue;
            }
        };
        let timeout = s.config.timeout.unwrap_or(config.agent.timeout);
        let instance =
            match create_sink(plugin, name, &config_json(&s.config.config), timeout).await {
                Ok(i) => Some(Arc::new(i)),
                Err(why) if s.config.required => {
                    return Err(exit(EXIT_CONFIG, format!("required {why}")))
                }
                Err(why) => {
                    tracing::error!("{why}; the sink is disabled");
                    health.register(name, "sink", &plugin.name, false, Some(why.message));
                    continue;
                }
            };
        health.register(name, "sink", &plugin.name, s.config.required, None);
        let capacity = s
            .config
            .queue_capacity
            .unwrap_or(config.agent.queue_capacity);
        telemetry.register_sink(name, &plugin.name, capacity);
        let queue = if s.config.spool {
            let dir = config.agent.spool_dir.join(name);
            // Opening reads the spool's segments and may wait up to 5 s for the lock that a
            // reloaded pipeline is letting go of: a blocking thread's work, not the runtime's.
            let opened = {
                let dir = dir.clone();
                let options = crate::spool::Options {
                    max_bytes: s.config.spool_max_bytes,
                    cache_limit: capacity,
                    sync: s.config.spool_sync,
                };
                tokio::task::spawn_blocking(move || Spool::open(&dir, options))
                    .await
                    .unwrap_or_else(|e| {
                        Err(std::io::Error::other(format!("opening panicked: {e}")))
                    })
            };
            let (spool, recovered) = match opened {
                Ok(opened) => opened,
                Err(e) => {
                    let why = format!(
                        "sink `{name}`: cannot open its spool {} ({e}); check agent.spool_dir",
                        dir.display()
                    );
                    if s.config.required {
                        return Err(exit(EXIT_CONFIG, format!("required {why}")));
                    }
                    // Like a sink that cannot be created: disabled, visible in /health.
                    tracing::error!("{why}; the sink is disabled");
                    if let Some(i) = &instance {
                        i.close();
                    }
                    health.failure(name, crate::health::State::Disabled, why);
                    continue;
                }
            };
            for (bytes, problem) in &recovered.problems {
                crate::events::Event::SpoolDamaged {
                    sink: name,
                    bytes: *bytes,
                    message: problem,
                }
                .emit(&telemetry);
            }
            if recovered.lost_samples > 0 {
                crate::events::Event::SinkDropped {
                    sink: name,
                    reason: "spool_corrupt",
                    samples: recovered.lost_samples,
                }
                .emit(&telemetry);
            }
            if recovered.batches > 0 {
                tracing::info!(
                    sink = %name,
                    "{} batches ({} samples) left in the spool by the last run are delivered first",
                    recovered.batches,
                    recovered.samples
                );
            }
            Arc::new(SinkQueue::with_spool(
                name,
                capacity,
                Arc::clone(&telemetry),
                spool,
                s.config.spool_mode,
                recovered.batches,
            ))
        } else {
            Arc::new(SinkQueue::new(name, capacity, Arc::clone(&telemetry)))
        };
        let paths: Vec<String> = instance
            .as_ref()
            .map(|i| i.http_paths().into_iter().map(|p| p.to_string()).collect())
            .unwrap_or_default();
        let runtime = Arc::new(SinkRuntime {
            name: name.clone(),
            batch_max_samples: s.config.batch_max_samples,
            batch_wait: s.config.batch_wait,
            plugin: plugin.name.clone(),
            timeout,
            max_backoff: s.config.max_backoff,
            instance: RwLock::new(instance),
            queue: Arc::clone(&queue),
            calls: crate::call_thread::CallThread::spawn(&format!("write-{name}")),
            telemetry: Arc::clone(&telemetry),
            health: Arc::clone(&health),
            rendered: crate::http::RenderCache::default(),
        });
        for path in paths {
            if let Some(other) = http_routes.insert(path.clone(), Arc::clone(&runtime)) {
                tracing::error!(
                    "sinks `{}` and `{name}` both register {path}; `{name}` answers it",
                    other.name
                );
            }
        }
        queues.insert(name.clone(), queue);
        sink_runtimes.push(runtime);
    }
    let pipeline = Arc::new(Pipeline::new(config, queues, Arc::clone(&telemetry)));

    // Listeners.
    let (tls, users) = security.summary();
    if config.http.web_config_file.is_some() {
        tracing::info!(tls, basic_auth_users = users, "web config loaded");
    }
    let (stop_http_tx, stop_http_rx) = watch::channel(false);
    let stop_http = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let setup = |listener| crate::http::ListenerSetup {
        listener,
        security: Arc::clone(&security),
        limits: config.http.limits(),
        telemetry: Arc::clone(&telemetry),
    };
    let mut servers = JoinSet::new();
    let mut used = BTreeSet::new();
    let health_addr = config
        .http
        .health_addr()
        .map_err(|e| exit(EXIT_CONFIG, e.to_string()))?;
    if let Some(addr) = health_addr {
        let listener = lock(sockets).get(addr).map_err(|e| {
            exit(
                EXIT_RUNTIME,
                format!("cannot listen on {addr} (http.health_listen): {e}"),
            )
        })?;
        let bound = listener.local_addr().unwrap_or(addr);
        used.insert(addr);
        servers.spawn(crate::http::serve_health(
            setup(listener),
            Arc::clone(&health),
            Arc::new(plugins.clone()),
            stop_http(stop_http_rx.clone()),
        ));
        tracing::info!("health listener on {bound} (/health, /metrics/stats, /plugins)");
    }
    let metrics_addr = config
        .http
        .metrics_addr()
        .map_err(|e| exit(EXIT_CONFIG, e.to_string()))?;
    if let Some(addr) = metrics_addr {
        if http_routes.is_empty() {
            tracing::info!("no pull sink registers a path: the metrics listener is not started");
        } else {
            let listener = lock(sockets).get(addr).map_err(|e| {
                exit(
                    EXIT_RUNTIME,
                    format!("cannot listen on {addr} (http.metrics_listen): {e}"),
                )
            })?;
            let bound = listener.local_addr().unwrap_or(addr);
            used.insert(addr);
            let paths: Vec<String> = http_routes.keys().cloned().collect();
            servers.spawn(crate::http::serve_metrics(
                setup(listener),
                http_routes,
                stop_http(stop_http_rx.clone()),
            ));
            tracing::info!("metrics listener on {bound} ({})", paths.join(", "));
        }
    }
    lock(sockets).keep_only(&used);

    // Sink workers.
    let mut sink_tasks = JoinSet::new();
    for rt in &sink_runtimes {
        sink_tasks.spawn(Arc::clone(rt).run());
    }

    // Collectors.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut collector_tasks = JoinSet::new();
    for c in &plan.collectors {
        let name = &c.config.name;
        let plugin = match &c.plugin {
            Ok(p) => p.clone(),
            Err(why) => {
                tracing::error!("{why}; the collector is disabled");
                health.register(
                    name,
                    "collector",
                    &c.config.plugin,
                    c.config.required,
                    Some(why.clone()),
                );
                continue;
            }
        };
        let timeout = c.config.timeout.unwrap_or(config.agent.timeout);
        // A required collector is created here: if its `new` says the config is wrong, the
        // start ends with status 2 as for a failing `validate` (any other failure is retried
        // by its task, since what it opens can appear later).
        let initial = if c.config.required {
            match create_isolated(
                &plugin,
                name,
                &config_json(&c.config.config),
                timeout,
                c.config.isolation,
            )
            .await
            {
                Ok(instance) => Some(instance),
                Err(e) if e.config => {
                    // Stop what this start already runs before returning.
                    let _ = stop_tx.send(true);
                    while collector_tasks.join_next().await.is_some() {}
                    return Err(exit(EXIT_CONFIG, format!("required {e}")));
                }
                Err(_) => None,
            }
        } else {
            None
        };
        health.register(name, "collector", &plugin.name, c.config.required, None);
        telemetry.register_collector(name, &plugin.name);
        let task = CollectorTask {
            name: name.clone(),
            config_json: config_json(&c.config.config),
            interval: c.config.interval.unwrap_or(config.agent.interval),
            timeout,
            max_backoff: config.agent.max_backoff,
            isolation: c.config.isolation,
            plugin,
            pipeline: Arc::clone(&pipeline),
            telemetry: Arc::clone(&telemetry),
            health: Arc::clone(&health),
        };
        collector_tasks.spawn(task.run(initial, stop_rx.clone()));
    }
    for rt in &sink_runtimes {
        // Spooled batches and progress are made durable every `spool_sync` (and at shutdown).
        let Some(every) = rt.queue.spool_sync() else {
            continue;
        };
        let queue = Arc::clone(&rt.queue);
        let mut stop = stop_rx.clone();
        collector_tasks.spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = ticker.tick() => {
                        let queue = Arc::clone(&queue);
                        let _ = tokio::task::spawn_blocking(move || queue.sync_spool()).await;
                    }
                }
            }
        });
    }
    if let Some(shortest) = pipeline.shortest_window() {
        // Close each aggregation window once its last batches can have arrived.
        let pipeline = Arc::clone(&pipeline);
        let grace = config.agent.timeout.min(shortest / 2);
        let tick = (shortest / 10).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut stop = stop_rx.clone();
        collector_tasks.spawn(async move {
            let mut ticker = tokio::time::interval(tick);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = ticker.tick() => pipeline.flush_aggregates(
                        crate::health::now_ms(),
                        i64::try_from(grace.as_millis()).unwrap_or(i64::MAX),
                    ),
                }
            }
        });
    }
    if config.agent.internal_metrics {
        let pipeline = Arc::clone(&pipeline);
        let telemetry = Arc::clone(&telemetry);
        let interval = config.agent.interval;
        let mut stop = stop_rx.clone();
        collector_tasks.spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = ticker.tick() => pipeline.process(INTERNAL_SOURCE, telemetry.to_batch()),
                }
            }
            // A last snapshot, so sinks see the final counters.
            pipeline.process(INTERNAL_SOURCE, telemetry.to_batch());
        });
    }
    tracing::info!(
        collectors = plan.collectors.len(),
        sinks = sink_runtimes.len(),
        "metricsd {} running",
        env!("CARGO_PKG_VERSION")
    );

    let reason = stop.await;

    // Stop collecting, then drain and flush every sink within the shutdown timeout.
    let _ = stop_tx.send(true);
    while collector_tasks.join_next().await.is_some() {}
    // The open aggregation windows go out as they are.
    pipeline.flush_aggregates_now();
    for rt in &sink_runtimes {
        rt.queue.close();
    }
    let deadline = config.agent.shutdown_timeout;
    let drained = tokio::time::timeout(deadline, async {
        while sink_tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "sinks did not drain within agent.shutdown_timeout ({})",
            humantime::format_duration(deadline)
        );
        sink_tasks.abort_all();
    }
    let flush_all = async {
        for rt in &sink_runtimes {
            let (spooled, left) = rt.queue.shutdown();
            if spooled > 0 {
                tracing::info!(
                    sink = %rt.name,
                    "{spooled} samples wait in the spool for the next start"
                );
            }
            if left > 0 {
                crate::events::Event::SinkDropped {
                    sink: &rt.name,
                    reason: "shutdown",
                    samples: left,
                }
                .emit(&telemetry);
            }
            rt.finish().await;
        }
    };
    if tokio::time::timeout(deadline, flush_all).await.is_err() {
        tracing::warn!("sink flush did not finish within agent.shutdown_timeout");
    }
    let _ = stop_http_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while servers.join_next().await.is_some() {}
    })
    .await;
    Ok(reason)
}

/// Collects every collector once and prints the samples through the stdout sink plugin.
pub async fn once(
    loaded: LoadedConfig,
    plugins: PluginSet,
    format: &str,
) -> Result<usize, ExitError> {
    let config = &loaded.config;
    let plan = plan(&loaded, &plugins);
    let stdout = plugins
        .get("stdout")
        .filter(|p| p.kind == PluginKind::SINK)
        .ok_or_else(|| {
            exit(
                1,
                format!(
                    "`metricsd once` prints through the stdout sink plugin: {}",
                    plugins.why_missing("stdout")
                ),
            )
        })?;
    let sink_config = serde_json::json!({ "format": format }).to_string();
    let sink = create_sink(stdout, "once", &sink_config, config.agent.timeout)
        .await
        .map_err(|e| exit(EXIT_RUNTIME, e.message))?;
    let telemetry = Arc::new(Telemetry::new());
    let pipeline = Pipeline::new(config, BTreeMap::new(), Arc::clone(&telemetry));
    let mut failed = 0;
    for c in &plan.collectors {
        let plugin = match &c.plugin {
            Ok(p) => p,
            Err(why) => {
                eprintln!("metricsd once: {why}");
                failed += 1;
                continue;
            }
        };
        let name = c.config.name.clone();
        let timeout = c.config.timeout.unwrap_or(config.agent.timeout);
        let mut instance = match create_isolated(
            plugin,
            &name,
            &config_json(&c.config.config),
            timeout,
            c.config.isolation,
        )
        .await
        {
            Ok(i) => i,
            Err(why) => {
                eprintln!("metricsd once: {why}");
                failed += 1;
                continue;
            }
        };
        let killer = instance.killer();
        let call = tokio::task::spawn_blocking(move || {
            let result = instance.collect();
            instance.close();
            result
        });
        let mut batch = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(Ok(batch))) => batch,
            Ok(Ok(Err(CollectError::Plugin(e)))) => {
                eprintln!(
                    "metricsd once: collector `{name}`: {} error: {}",
                    e.kind.as_str(),
                    e.message
                );
                failed += 1;
                continue;
            }
            Ok(Ok(Err(CollectError::Crashed { message, .. }))) => {
                eprintln!("metricsd once: collector `{name}`: {message}");
                failed += 1;
                continue;
            }
            Ok(Err(e)) => {
                eprintln!("metricsd once: collector `{name}`: {e}");
                failed += 1;
                continue;
            }
            Err(_) => {
                if let Some(killer) = killer {
                    killer.kill();
                }
                eprintln!(
                    "metricsd once: collector `{name}` did not finish within {}",
                    humantime::format_duration(timeout)
                );
                failed += 1;
                continue;
            }
        };
        pipeline.prepare(&name, &mut batch);
        if let Err(e) = sink.write(&batch).into_result() {
            return Err(exit(
                EXIT_RUNTIME,
                format!("cannot print samples: {}", e.message),
            ));
        }
    }
    let _ = sink.flush();
    sink.close();
    for s in &plan.skipped {
        eprintln!("metricsd once: built-in default: {s} skipped, its plugin is not installed");
    }
    if failed > 0 {
        return Err(exit(EXIT_RUNTIME, format!("{failed} collector(s) failed")));
    }
    Ok(plan.collectors.len())
}
