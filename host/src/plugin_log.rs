//! The callback through which plugins log into the host's `tracing` output.

use std::panic::{catch_unwind, AssertUnwindSafe};

use abi_stable::std_types::RStr;
use metricsd_plugin_api::abi::HostLogger;
use metricsd_plugin_api::LogLevel;
use tracing::level_filters::LevelFilter;

extern "C" fn log_from_plugin(
    instance: RStr<'_>,
    level: LogLevel,
    target: RStr<'_>,
    message: RStr<'_>,
) {
    // Nothing may unwind back into the plugin.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let instance = instance.as_str();
        let target = target.as_str();
        let message = message.as_str();
        match level {
            LogLevel::ERROR => {
                tracing::error!(target: "plugin", instance, plugin_target = target, "{message}")
            }
            LogLevel::WARN => {
                tracing::warn!(target: "plugin", instance, plugin_target = target, "{message}")
            }
            LogLevel::INFO => {
                tracing::info!(target: "plugin", instance, plugin_target = target, "{message}")
            }
            LogLevel::DEBUG => {
                tracing::debug!(target: "plugin", instance, plugin_target = target, "{message}")
            }
            _ => tracing::trace!(target: "plugin", instance, plugin_target = target, "{message}"),
        }
    }));
}

/// The logger handed to every instance; plugins filter at the host's current level.
pub fn host_logger() -> HostLogger {
    let max_level = match LevelFilter::current() {
        LevelFilter::OFF => LogLevel::OFF,
        LevelFilter::ERROR => LogLevel::ERROR,
        LevelFilter::WARN => LogLevel::WARN,
        LevelFilter::INFO => LogLevel::INFO,
        LevelFilter::DEBUG => LogLevel::DEBUG,
        _ => LogLevel::TRACE,
    };
    HostLogger {
        log: log_from_plugin,
        max_level,
    }
}
