//! The callback through which plugins log into the host's `tracing` output.

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, RwLock};

use abi_stable::std_types::RStr;
use metricsd_plugin_api::abi::HostLogger;
use metricsd_plugin_api::log::{
    parse_altered, parse_dropped, parse_status, ALTERED_TARGET, DROPPED_TARGET, STATUS_TARGET,
};
use metricsd_plugin_api::LogLevel;
use tracing::level_filters::LevelFilter;

use crate::events::{Event, Telemetry};
use crate::health::Health;

/// Drop causes already logged at warn level: (instance, reason, cause).
static SEEN: Mutex<BTreeSet<(String, &'static str, String)>> = Mutex::new(BTreeSet::new());

/// Most distinct drop causes logged at warn level.
const SEEN_MAX: usize = 1024;

/// Where plugins' drop reports are counted; set once by the agent.
static TELEMETRY: RwLock<Option<Arc<Telemetry>>> = RwLock::new(None);

/// Where plugins' status reports go; set once by the agent.
static HEALTH: RwLock<Option<Arc<Health>>> = RwLock::new(None);

/// Shows plugins' status reports (see `metricsd_plugin_api::log::report_degraded`) in this
/// health.
pub fn report_status_in(health: &Arc<Health>) {
    *HEALTH.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(health));
}

/// Counts plugins' drop reports (see `metricsd_plugin_api::log::report_dropped`) in this
/// telemetry: the running pipeline's, replaced by each config reload.
pub fn count_drops_in(telemetry: &Arc<Telemetry>) {
    *TELEMETRY.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(telemetry));
}

/// Whether a sink's report of this kind and cause was seen before (then it is logged at debug
/// only). A cause is its text up to the first digit, so "refused 2 of 6 lines" and "refused 3
/// of 6 lines" are one cause. Causes can carry label values: past SEEN_MAX distinct ones every
/// report counts as seen, so the set cannot grow without bound.
fn seen_before(instance: &str, kind: &'static str, why: &str) -> bool {
    let cause: String = why.chars().take_while(|c| !c.is_ascii_digit()).collect();
    !SEEN
        .lock()
        .map(|mut seen| seen.len() < SEEN_MAX && seen.insert((instance.to_string(), kind, cause)))
        .unwrap_or(true)
}

/// Emits a sink's report into the running pipeline's telemetry; `false` when there is none yet.
fn emit_report(event: Event<'_>) -> bool {
    let telemetry = TELEMETRY.read().unwrap_or_else(|p| p.into_inner()).clone();
    match telemetry.as_ref() {
        Some(t) => {
            event.emit(t);
            true
        }
        None => false,
    }
}

extern "C" fn log_from_plugin(
    instance: RStr<'_>,
    level: LogLevel,
    target: RStr<'_>,
    message: RStr<'_>,
) {
    // Nothing may unwind back into the plugin.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        deliver(instance.as_str(), level, target.as_str(), message.as_str())
    }));
}

/// Handles one log record of a plugin instance: a drop, alteration or status report goes to
/// the running pipeline's telemetry and health, anything else to the agent's log. Records of a
/// plugin in a child process (`isolation = "process"`) arrive here too.
pub fn deliver(instance: &str, level: LogLevel, target: &str, message: &str) {
    if target == DROPPED_TARGET {
        if let Some((samples, reason, why)) = parse_dropped(message) {
            let event = Event::SinkReportedDrop {
                sink: instance,
                reason: reason.as_str(),
                samples,
                why,
                repeated: seen_before(instance, reason.as_str(), why),
            };
            if !emit_report(event) {
                tracing::warn!(
                    instance,
                    samples,
                    reason = reason.as_str(),
                    "samples dropped: {why}"
                );
            }
            return;
        }
    }
    if target == ALTERED_TARGET {
        if let Some((samples, why)) = parse_altered(message) {
            let event = Event::SinkReportedAltered {
                sink: instance,
                samples,
                why,
                repeated: seen_before(instance, "altered", why),
            };
            if !emit_report(event) {
                tracing::warn!(instance, samples, "samples altered: {why}");
            }
            return;
        }
    }
    if target == STATUS_TARGET {
        if let Some(status) = parse_status(message) {
            let health = HEALTH.read().unwrap_or_else(|p| p.into_inner()).clone();
            let changed = health
                .as_ref()
                .is_some_and(|h| h.set_degraded(instance, status));
            match status {
                Some(why) if changed => tracing::warn!(instance, "degraded: {why}"),
                None if changed => tracing::info!(instance, "recovered"),
                _ => tracing::debug!(instance, "status: {message}"),
            }
            return;
        }
    }
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
