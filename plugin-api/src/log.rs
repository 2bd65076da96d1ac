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
        level_of(metadata.level()) <= self.logger.max_level
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
