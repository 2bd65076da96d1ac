//! Creating plugin instances: on a blocking thread, with a timeout, with the host's logger.

use std::time::Duration;

use metricsd_plugin_api::abi::{CollectorBox, InstanceArgs, SinkBox};
use metricsd_plugin_api::PluginError;

use crate::loader::Plugin;
use crate::plugin_log::host_logger;

fn args(instance: &str, config_json: &str) -> InstanceArgs {
    InstanceArgs {
        instance: instance.into(),
        config_json: config_json.into(),
        logger: host_logger(),
    }
}

/// Why an instance could not be created: one line for the operator.
#[derive(Debug)]
pub struct CreateError {
    /// The plugin's `new` said the config is wrong (`ErrorKind::CONFIG`).
    pub config: bool,
    /// What happened, naming the instance and its plugin.
    pub message: String,
}

impl std::fmt::Display for CreateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

async fn create<T: Send + 'static>(
    what: &str,
    timeout: Duration,
    call: impl FnOnce() -> Result<T, PluginError> + Send + 'static,
) -> Result<T, CreateError> {
    let other = |message| CreateError {
        config: false,
        message,
    };
    match tokio::time::timeout(timeout, tokio::task::spawn_blocking(call)).await {
        Ok(Ok(Ok(instance))) => Ok(instance),
        Ok(Ok(Err(e))) if e.kind == metricsd_plugin_api::ErrorKind::CONFIG => Err(CreateError {
            config: true,
            message: format!("{what}: {}", e.message),
        }),
        Ok(Ok(Err(e))) => Err(other(format!(
            "{what}: {} error: {}",
            e.kind.as_str(),
            e.message
        ))),
        Ok(Err(e)) => Err(other(format!("{what}: creating the instance failed: {e}"))),
        Err(_) => Err(other(format!(
            "{what}: creating the instance did not finish within {}",
            humantime::format_duration(timeout)
        ))),
    }
}

/// Creates a collector instance.
pub async fn create_collector(
    plugin: &Plugin,
    name: &str,
    config_json: &str,
    timeout: Duration,
) -> Result<CollectorBox, CreateError> {
    let new = plugin.module.new_collector();
    let args = args(name, config_json);
    let what = format!("collector `{name}` (plugin `{}`)", plugin.name);
    create(&what, timeout, move || new(args).into_result()).await
}

/// Creates a collector instance where its `isolation` says: in this process, or in a child
/// process of its own (started from `/proc/self/exe`, this very binary).
pub async fn create_isolated(
    plugin: &Plugin,
    name: &str,
    config_json: &str,
    timeout: Duration,
    isolation: crate::config::Isolation,
) -> Result<crate::isolation::Collector, CreateError> {
    use crate::isolation::{spawn_collector, Collector};
    if isolation == crate::config::Isolation::InProcess {
        return create_collector(plugin, name, config_json, timeout)
            .await
            .map(Collector::InProcess);
    }
    let (plugin, name, config_json) = (plugin.clone(), name.to_string(), config_json.to_string());
    tokio::task::spawn_blocking(move || {
        spawn_collector(
            &plugin,
            &name,
            &config_json,
            timeout,
            std::path::Path::new("/proc/self/exe"),
        )
    })
    .await
    .map_err(|e| CreateError {
        config: false,
        message: format!("creating the instance failed: {e}"),
    })?
    .map(Collector::Process)
    .map_err(|(config, message)| CreateError { config, message })
}

/// Creates a sink instance.
pub async fn create_sink(
    plugin: &Plugin,
    name: &str,
    config_json: &str,
    timeout: Duration,
) -> Result<SinkBox, CreateError> {
    let new = plugin.module.new_sink();
    let args = args(name, config_json);
    let what = format!("sink `{name}` (plugin `{}`)", plugin.name);
    create(&what, timeout, move || new(args).into_result()).await
}

/// Asks the plugin whether a config is valid, without creating anything.
pub fn validate_config(plugin: &Plugin, config_json: &str) -> Result<(), String> {
    let validate = plugin.module.validate_config();
    validate(config_json.into())
        .into_result()
        .map_err(|e| e.message.to_string())
}
