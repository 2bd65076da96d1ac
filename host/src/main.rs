//! `metricsd`: the command-line interface.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use metricsd::agent::{self, ExitError, EXIT_CONFIG};
use metricsd::config::{self, LoadedConfig, LogFormat, ProcessEnv};
use metricsd::http::plugin_report;
use metricsd::loader::PluginSet;
use tracing_subscriber::EnvFilter;

/// `metricsd --version`: the version, what `build.rs` found out about the build, and the
/// plugin API the host serves (a plugin built against another major version is refused).
fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        format!(
            "{} (git {}, {}, built {}; plugin API {})",
            env!("CARGO_PKG_VERSION"),
            env!("METRICSD_BUILD_REVISION"),
            env!("METRICSD_BUILD_TARGET"),
            env!("METRICSD_BUILD_DATE"),
            metricsd_plugin_api::API_VERSION
        )
    })
}

/// Metrics agent for GPU nodes.
#[derive(Parser)]
#[command(name = "metricsd", version = version(), about, long_about = None)]
struct Cli {
    /// Config file (TOML). Without one, the built-in default runs.
    #[arg(short, long, global = true, env = "METRICSD_CONFIG")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Check the config and the plugins it names, without starting anything.
    Check,
    /// List the plugin files found and whether each can load.
    Plugins {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Ask the running agent's health listener (`http.health_listen`) for `/health`: exit 0
    /// when it answers 200 (ok or degraded), 1 otherwise. For container health checks, where
    /// no HTTP client is installed. It reads the same web config as the agent: over TLS it
    /// trusts the certificate in `cert_file`.
    Health {
        /// Basic-auth user, when the web config has users.
        #[arg(long)]
        user: Option<String>,
        /// File whose first line is that user's password.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Client certificate (PEM), when the listener requires one.
        #[arg(long)]
        client_cert: Option<PathBuf>,
        /// The client certificate's key (PEM).
        #[arg(long)]
        client_key: Option<PathBuf>,
    },
    /// Collect from every collector once and print the samples.
    Once {
        /// Output format.
        #[arg(long, value_enum, default_value_t = OnceFormat::Text)]
        format: OnceFormat,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum OnceFormat {
    Text,
    Json,
}

fn init_logging(config: &config::Config, default_level: &str) {
    let level = if config.agent.log_level.is_empty() {
        default_level
    } else {
        config.agent.log_level.as_str()
    };
    let filter = EnvFilter::try_new(level).unwrap_or_else(|e| {
        eprintln!("metricsd: agent.log_level `{level}` is not valid ({e}); using info");
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_writer(std::io::stderr);
    match config.agent.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn load_config(cli: &Cli) -> Result<LoadedConfig, ExitError> {
    config::load(cli.config.as_deref(), &ProcessEnv).map_err(|e| ExitError {
        code: EXIT_CONFIG,
        message: e.to_string(),
    })
}

fn print_plugins(set: &PluginSet, as_json: bool) -> Result<(), ExitError> {
    let rows = plugin_report(set);
    if as_json {
        let text = serde_json::to_string_pretty(&rows).map_err(|e| ExitError {
            code: 1,
            message: e.to_string(),
        })?;
        println!("{text}");
        return Ok(());
    }
    println!(
        "plugin directories: {}",
        set.dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for d in &set.refused_dirs {
        println!("REFUSED DIR  {}", d.reason);
    }
    for r in rows {
        match r.verdict {
            "loaded" => {
                println!(
                    "loaded    {:<12} {:<9} v{:<8} api {:<6} sha256 {:.12}  {}",
                    r.name.unwrap_or_default(),
                    r.kind.unwrap_or_default(),
                    r.version.unwrap_or_default(),
                    r.api_version.unwrap_or_default(),
                    r.sha256.unwrap_or_default(),
                    r.path
                );
                println!("          {}", r.description.unwrap_or_default());
            }
            verdict => println!(
                "{verdict:<9} {}",
                r.reason.unwrap_or_else(|| r.path.clone())
            ),
        }
    }
    Ok(())
}

fn check(loaded: &LoadedConfig, set: &PluginSet) -> Result<(), ExitError> {
    let plan = agent::plan(loaded, set);
    for s in &plan.skipped {
        println!("skipped: built-in default {s}: its plugin is not installed");
    }
    for w in metricsd::config::warnings(&loaded.config) {
        println!("warning: {w}");
    }
    for c in &plan.collectors {
        if let Ok(p) = &c.plugin {
            println!(
                "ok: collector `{}` (plugin `{}` {})",
                c.config.name,
                p.name,
                p.path.display()
            );
        }
    }
    for s in &plan.sinks {
        if let Ok(p) = &s.plugin {
            println!(
                "ok: sink `{}` (plugin `{}` {})",
                s.config.name,
                p.name,
                p.path.display()
            );
        }
    }
    let mut problems = plan.problems();
    match agent::load_security(&loaded.config) {
        Ok(security) => {
            if let Some(path) = &loaded.config.http.web_config_file {
                let (tls, users) = security.summary();
                println!(
                    "ok: web config {} (tls: {}, basic auth users: {users})",
                    path.display(),
                    if tls { "on" } else { "off" }
                );
            }
        }
        Err(e) => problems.push(e),
    }
    for p in &problems {
        println!("error: {p}");
    }
    if problems.is_empty() {
        println!("config ok");
        Ok(())
    } else {
        Err(ExitError {
            code: EXIT_CONFIG,
            message: format!("{} problem(s) in the config", problems.len()),
        })
    }
}

/// `metricsd health`: GET /health on the configured health listener.
fn health(config: &config::Config, login: &metricsd::healthcheck::Login) -> Result<(), ExitError> {
    match metricsd::healthcheck::check(config, login) {
        Ok(body) => {
            println!("{body}");
            Ok(())
        }
        Err(message) => Err(ExitError { code: 1, message }),
    }
}

fn main_inner(cli: Cli) -> Result<(), ExitError> {
    let loaded = load_config(&cli)?;
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::Health {
        user,
        password_file,
        client_cert,
        client_key,
    } = &command
    {
        let login = metricsd::healthcheck::Login {
            user: user.clone(),
            password_file: password_file.clone(),
            cert_file: client_cert.clone(),
            key_file: client_key.clone(),
        };
        return health(&loaded.config, &login);
    }
    let quiet = !matches!(command, Command::Run);
    init_logging(&loaded.config, if quiet { "warn" } else { "info" });
    if quiet && std::env::var_os("LOG_LEVEL").is_none() && loaded.config.agent.log_level == "info" {
        // `check`, `plugins` and `once` print their results; logs would only repeat them.
        tracing::debug!("quiet command");
    }
    // `plugins` looks at every file; the others open only what the config names.
    let mut needed = agent::plugins_named(&loaded.config);
    if matches!(command, Command::Once { .. }) {
        needed.insert("stdout".to_string());
    }
    let all = matches!(command, Command::Plugins { .. });
    let plugins = agent::load_plugins(&loaded.config, (!all).then_some(&needed));
    // One async thread serves the listeners and runs the scheduling and the pipeline; each
    // collector and sink instance calls its plugin on a thread of its own (`call_thread`), and
    // scrapes render on the blocking pool. The async work is light (a 10,000-series cycle is
    // about 0.2 ms of pipeline), so a multi-thread scheduler would add threads, not speed, and
    // its code alone loads libm (0.5 MiB resident) for one `pow` in its statistics: the
    // workspace builds tokio without `rt-multi-thread` (docs/benchmarks-history.md, "One runtime thread").
    let runtime = || {
        if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
            tracing::warn!(
                "TOKIO_WORKER_THREADS is ignored: the agent's listeners and scheduling run on one \
                 thread, its collections and sink writes on threads of their own"
            );
        }
        tokio::runtime::Builder::new_current_thread()
            .thread_name("metricsd-blocking")
            .enable_all()
            .build()
            .map_err(|e| ExitError {
                code: 1,
                message: format!("cannot start the runtime: {e}"),
            })
    };
    match command {
        Command::Plugins { json } => print_plugins(&plugins, json),
        // Answered before logging starts, above.
        Command::Health { .. } => Ok(()),
        Command::Check => check(&loaded, &plugins),
        Command::Once { format } => {
            let format = match format {
                OnceFormat::Text => "text",
                OnceFormat::Json => "json",
            };
            runtime()?
                .block_on(agent::once(loaded, plugins, format))
                .map(|_| ())
        }
        Command::Run => runtime()?.block_on(agent::run(loaded, plugins, cli.config.as_deref())),
    }
}

fn main() -> ExitCode {
    // A child process of an `isolation = "process"` collector: no CLI, no config.
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(metricsd::isolation::RUNNER_ARG))
    {
        return ExitCode::from(metricsd::isolation::child_main());
    }
    let cli = Cli::parse();
    match main_inner(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("metricsd: {}", e.message);
            ExitCode::from(e.code.clamp(1, 255) as u8)
        }
    }
}
