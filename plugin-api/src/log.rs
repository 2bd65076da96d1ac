//! Forwards a plugin's `tracing` events to the host.
//!
//! A plugin `.so` has its own copy of `tracing`, so a subscriber installed by the host never
//! sees the plugin's events. The SDK wraps every call into an instance in
//! `tracing::dispatcher::with_default` with a [`ForwardingSubscriber`] that hands each event, as
//! plain data, to the host's [`HostLogger`] callback tagged with the instance name. Plugin code
//! just uses `tracing::info!` and friends.
//!
//! Threads a plugin spawns itself do not inherit that default: wrap their body in
//! `tracing::dispatcher::with_default(ctx.log_dispatch(), || …)` (see [`Context`](crate::Context)).

use std::fmt::{self, Write as _};

use abi_stable::std_types::{RStr, RString};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_core::LevelFilter;

use crate::abi::{HostLogger, LogLevel};

/// A `tracing` subscriber that forwards events to the host; spans are ignored.
pub struct ForwardingSubscriber {
    instance: RString,
    logger: HostLogger,
}

impl ForwardingSubscriber {
    /// Forwards events to `logger`, tagged with `instance`.
    pub fn new(instance: &str, logger: HostLogger) -> Self {
        Self {
            instance: instance.into(),
            logger,
        }
    }
}

fn level_of(level: &Level) -> LogLevel {
    match *level {
        Level::ERROR => LogLevel::ERROR,
        Level::WARN => LogLevel::WARN,
        Level::INFO => LogLevel::INFO,
        Level::DEBUG => LogLevel::DEBUG,
        Level::TRACE => LogLevel::TRACE,
    }
}

/// Collects an event's `message` and its other fields as ` key=value`.
#[derive(Default)]
struct MessageVisitor {
    message: String,
    fields: String,
}

impl Visit for MessageVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={:?}", field.name(), value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={:?}", field.name(), value);
        }
    }
}

impl Subscriber for ForwardingSubscriber {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        // Drop and status reports reach the host whatever its log level.
        metadata.target() == DROPPED_TARGET
            || metadata.target() == ALTERED_TARGET
            || metadata.target() == STATUS_TARGET
            || level_of(metadata.level()) <= self.logger.max_level
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(match self.logger.max_level {
            LogLevel::OFF => LevelFilter::OFF,
            LogLevel::ERROR => LevelFilter::ERROR,
            LogLevel::WARN => LevelFilter::WARN,
            LogLevel::INFO => LevelFilter::INFO,
            LogLevel::DEBUG => LevelFilter::DEBUG,
            _ => LevelFilter::TRACE,
        })
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut visitor = MessageVisitor::default();
        event.record(&mut visitor);
        visitor.message.push_str(&visitor.fields);
        let meta = event.metadata();
        (self.logger.log)(
            self.instance.as_rstr(),
            level_of(meta.level()),
            RStr::from_str(meta.target()),
            RStr::from_str(&visitor.message),
        );
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

/// The `tracing` target of a drop report: the host counts it in
/// `metricsd_sink_dropped_samples_total`; see [`report_dropped`].
pub const DROPPED_TARGET: &str = "metricsd::dropped";

/// Why a sink dropped samples it was given, for [`report_dropped`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The server refused them (a bad line, a type conflict, a partial write).
    Rejected,
    /// The sink cannot encode them for its protocol (NaN or infinite values where the protocol
    /// has none, names it cannot represent).
    Invalid,
}

impl DropReason {
    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Rejected => "rejected",
            DropReason::Invalid => "invalid",
        }
    }
}

/// Reports that a sink dropped `samples` of the batch it was writing while the rest was
/// delivered (a write that fails as a whole returns an [`Error`](crate::Error) instead). The
/// host logs it under the instance's name and adds it to
/// `metricsd_sink_dropped_samples_total{reason}`, whatever the log level.
pub fn report_dropped(samples: usize, reason: DropReason, why: &str) {
    if samples > 0 {
        tracing::warn!(target: "metricsd::dropped", "{samples} {} {why}", reason.as_str());
    }
}

/// The `tracing` target of an alteration report: the host counts it; see [`report_altered`].
pub const ALTERED_TARGET: &str = "metricsd::altered";

/// Reports that a sink delivered `samples` of the batch it was writing with a label changed or
/// left out, because its protocol cannot carry the label as it is (a line break in an InfluxDB
/// tag value, for example). The samples were written, not dropped. The host adds them to
/// `metricsd_sink_altered_samples_total` and logs the cause, whatever the log level.
pub fn report_altered(samples: usize, why: &str) {
    if samples > 0 {
        tracing::warn!(target: "metricsd::altered", "{samples} {why}");
    }
}

/// Parses an alteration report's message (`"<samples> <why>"`), for the host.
pub fn parse_altered(message: &str) -> Option<(usize, &str)> {
    let (samples, why) = message.split_once(' ')?;
    Some((samples.parse().ok()?, why))
}

/// The `tracing` target of a status report: the host shows it in `/health`; see
/// [`report_degraded`].
pub const STATUS_TARGET: &str = "metricsd::status";

/// Reports that the instance works, but with less than it should: a collector whose service is
/// unreachable and that falls back to what it has, for example. Call it from `collect` (or
/// `write`) while the condition lasts; the host shows the instance as `degraded` with `why` in
/// `/health` (the agent's status becomes `degraded`, not failing) and logs it once when it
/// starts. [`report_recovered`] ends it.
pub fn report_degraded(why: &str) {
    tracing::warn!(target: "metricsd::status", "degraded {why}");
}

/// Ends a [`report_degraded`] condition.
pub fn report_recovered() {
    tracing::warn!(target: "metricsd::status", "ok");
}

/// Parses a status report's message, for the host: `Some(Some(why))` for degraded,
/// `Some(None)` for recovered.
pub fn parse_status(message: &str) -> Option<Option<&str>> {
    if message == "ok" {
        return Some(None);
    }
    message.strip_prefix("degraded ").map(Some)
}

/// Parses a drop report's message (`"<samples> <reason> <why>"`), for the host.
pub fn parse_dropped(message: &str) -> Option<(usize, DropReason, &str)> {
    let mut parts = message.splitn(3, ' ');
    let samples = parts.next()?.parse().ok()?;
    let reason = match parts.next()? {
        "rejected" => DropReason::Rejected,
        "invalid" => DropReason::Invalid,
        _ => return None,
    };
    Some((samples, reason, parts.next().unwrap_or("")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_reports_parse() {
        assert_eq!(parse_status("ok"), Some(None));
        assert_eq!(
            parse_status("degraded server down"),
            Some(Some("server down"))
        );
        assert_eq!(parse_status("something"), None);
    }

    #[test]
    fn drop_reports_round_trip() {
        assert_eq!(
            parse_dropped("12 invalid NaN values: gpu_x"),
            Some((12, DropReason::Invalid, "NaN values: gpu_x"))
        );
        assert_eq!(parse_dropped("x rejected"), None);
        assert_eq!(parse_dropped("3 other y"), None);
    }
}
