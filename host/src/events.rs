//! Everything worth reporting is one typed [`Event`]: its `emit` writes the log line and bumps
//! the matching `metricsd_*` metric, so logs and metrics never disagree.

use std::time::Duration;

use metricsd_plugin_api::{Batch, BatchBuilder, Label, MetricKind};
use prometheus::{CounterVec, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// The agent's own metrics.
pub struct Telemetry {
    registry: Registry,
    collector_up: IntGaugeVec,
    collector_stale: IntGaugeVec,
    collections: IntCounterVec,
    collector_errors: IntCounterVec,
    collector_timeouts: IntCounterVec,
    collector_panics: IntCounterVec,
    collector_crashes: IntCounterVec,
    collector_restarts: IntCounterVec,
    collector_skipped: IntCounterVec,
    collector_samples: IntCounterVec,
    collector_invalid: IntCounterVec,
    collector_last_duration: GaugeVec,
    collector_duration_total: CounterVec,
    sink_up: IntGaugeVec,
    sink_queue: IntGaugeVec,
    sink_queue_capacity: IntGaugeVec,
    sink_dropped: IntCounterVec,
    sink_altered: IntCounterVec,
    spool_errors: IntCounterVec,
    spool_corrupt: IntCounterVec,
    sink_write_errors: IntCounterVec,
    sink_writes: IntCounterVec,
    sink_samples: IntCounterVec,
    sink_received: IntCounterVec,
    sink_last_duration: GaugeVec,
    plugin_files: IntGaugeVec,
    build_info: IntGaugeVec,
    http_connections: IntGaugeVec,
    http_connections_closed: IntCounterVec,
    http_requests_rejected: IntCounterVec,
    http_accept_errors: IntCounterVec,
    /// Causes that repeat, by `kind/instance`: logged once, then summarised.
    invalid_log: std::sync::Mutex<std::collections::HashMap<String, crate::ratelimit::Repeating>>,
    /// Failed spool appends and syncs, per sink.
    spool_log: std::sync::Mutex<std::collections::HashMap<String, crate::ratelimit::Repeating>>,
}

/// Registers a metric whose definition is a constant, so neither step can fail at run time.
fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let metric = metric.expect("valid metric definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels))
}

fn float_counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> CounterVec {
    register(registry, CounterVec::new(Opts::new(name, help), labels))
}

fn int_gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(registry, IntGaugeVec::new(Opts::new(name, help), labels))
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    register(registry, GaugeVec::new(Opts::new(name, help), labels))
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// Registers every metric (names are constants, so registration cannot fail).
    pub fn new() -> Self {
        let r = Registry::new();
        let c = ["collector"];
        let s = ["sink"];
        let t = Self {
            collector_up: int_gauge(&r, "metricsd_collector_up", "1 if the collector's last call succeeded.", &["collector", "plugin"]),
            collector_stale: int_gauge(&r, "metricsd_collector_stale", "1 while a call of the collector is overdue (timed out and not yet returned).", &c),
            collections: counter(&r, "metricsd_collector_collections_total", "Successful collections.", &c),
            collector_errors: counter(&r, "metricsd_collector_errors_total", "Failed collector calls by kind (transient, config, fatal, panic, crash, timeout, create).", &["collector", "kind"]),
            collector_timeouts: counter(&r, "metricsd_collector_timeouts_total", "Collector calls that exceeded their timeout.", &c),
            collector_panics: counter(&r, "metricsd_collector_panics_total", "Panics caught in the collector plugin.", &c),
            collector_crashes: counter(&r, "metricsd_collector_crashes_total", "Child processes of isolation = \"process\" collectors that died, by cause (SIGSEGV, SIGABRT, timeout: killed past the call's timeout, ...).", &["collector", "cause"]),
            collector_restarts: counter(&r, "metricsd_collector_restarts_total", "Times the collector instance was created again after a failure.", &c),
            collector_skipped: counter(&r, "metricsd_collector_skipped_total", "Interval ticks without a call, by reason (in_flight, backoff).", &["collector", "reason"]),
            collector_samples: counter(&r, "metricsd_collector_samples_total", "Samples collected.", &c),
            collector_invalid: counter(&r, "metricsd_collector_invalid_samples_total", "Samples dropped because they were invalid (bad name, family index or late).", &c),
            collector_last_duration: gauge(&r, "metricsd_collector_last_duration_seconds", "Duration of the collector's last completed call.", &c),
            collector_duration_total: float_counter(&r, "metricsd_collector_duration_seconds_total", "Total time spent in the collector's calls.", &c),
            sink_up: int_gauge(&r, "metricsd_sink_up", "1 if the sink's last write succeeded (or none failed yet).", &["sink", "plugin"]),
            sink_queue: int_gauge(&r, "metricsd_sink_queue_samples", "Samples waiting in the sink's queue (in memory and in its spool) or being written.", &s),
            sink_queue_capacity: int_gauge(&r, "metricsd_sink_queue_capacity_samples", "Capacity of the sink's queue.", &s),
            sink_dropped: counter(&r, "metricsd_sink_dropped_samples_total", "Samples the sink lost, by reason (queue_full, rejected, invalid, disabled, shutdown, spool_unreadable).", &["sink", "reason"]),
            sink_altered: counter(&r, "metricsd_sink_altered_samples_total", "Samples the sink wrote with a label changed or left out because its protocol cannot carry it as it is.", &s),
            spool_errors: counter(&r, "metricsd_sink_spool_errors_total", "Batches the disk spool could not take (kept in memory instead).", &s),
            spool_corrupt: counter(&r, "metricsd_sink_spool_corrupt_bytes_total", "Bytes of torn or corrupt spool records skipped at start-up.", &s),
            sink_write_errors: counter(&r, "metricsd_sink_write_errors_total", "Failed writes by kind (transient, rejected, fatal, config, panic, timeout).", &["sink", "kind"]),
            sink_writes: counter(&r, "metricsd_sink_writes_total", "Successful writes.", &s),
            sink_samples: counter(&r, "metricsd_sink_samples_written_total", "Samples written successfully.", &s),
            sink_received: counter(&r, "metricsd_sink_received_samples_total", "Samples routed to the sink (staleness markers excluded): received = written + dropped (all reasons) + queued.", &s),
            sink_last_duration: gauge(&r, "metricsd_sink_last_write_duration_seconds", "Duration of the sink's last write.", &s),
            plugin_files: int_gauge(&r, "metricsd_plugin_files", "Plugin files found, by verdict (loaded, shadowed, refused, unused: not opened, the config does not use it).", &["verdict"]),
            build_info: int_gauge(&r, "metricsd_build_info", "Always 1; the labels carry the agent and plugin API versions, the git revision and the target triple.", &["version", "plugin_api_version", "revision", "target"]),
            http_connections: int_gauge(&r, "metricsd_http_connections", "Open connections of the listener.", &["listener"]),
            http_connections_closed: counter(&r, "metricsd_http_connections_closed_total", "Connections the agent closed or refused, by reason (header_timeout, idle_timeout, evicted: the oldest idle one, closed for a new one at http.max_connections; refused: every one busy; tls_handshake).", &["listener", "reason"]),
            http_requests_rejected: counter(&r, "metricsd_http_requests_rejected_total", "Requests answered 503 because http.max_requests were in flight.", &["listener"]),
            http_accept_errors: counter(&r, "metricsd_http_accept_errors_total", "Failed accepts (EMFILE: out of file descriptors).", &["listener"]),
            registry: r,
            invalid_log: std::sync::Mutex::default(),
            spool_log: std::sync::Mutex::default(),
        };
        t.registry
            .register(Box::new(crate::process::ProcessMetrics::new()))
            .expect("process metrics registered once");
        t.build_info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                metricsd_plugin_api::API_VERSION,
                env!("METRICSD_BUILD_REVISION"),
                env!("METRICSD_BUILD_TARGET"),
            ])
            .set(1);
        t
    }

    /// Samples the sink itself reported as dropped (rejected by its server or invalid for its
    /// protocol) so far: the delivery loop subtracts those reported during a write from the
    /// samples that write counts as written.
    pub fn reported_drops(&self, sink: &str) -> u64 {
        ["rejected", "invalid"]
            .iter()
            .map(|reason| self.sink_dropped.with_label_values(&[sink, reason]).get())
            .sum()
    }

    /// The open connections of a listener.
    pub fn set_http_connections(&self, listener: &str, open: usize) {
        self.http_connections
            .with_label_values(&[listener])
            .set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    /// A request answered 503 at `http.max_requests` (not logged: the counter says it).
    pub fn http_request_rejected(&self, listener: &str) {
        self.http_requests_rejected
            .with_label_values(&[listener])
            .inc();
    }

    /// Invalid samples of `collector` once more: whether and how to log it.
    fn invalid_again(&self, collector: &str) -> crate::ratelimit::Log {
        again(&self.invalid_log, collector)
    }

    /// A collection of `collector` without invalid samples: if they had been repeating, the
    /// end is logged once.
    pub fn valid_samples(&self, collector: &str) {
        let ended = self
            .invalid_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(collector)
            .and_then(|r| r.ended());
        if let Some(n) = ended {
            tracing::info!(
                collector,
                "samples are valid again ({n} collections had invalid samples)"
            );
        }
    }

    /// The registry, for `/metrics/stats`.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text of every metric.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)
        {
            tracing::error!("cannot encode internal metrics: {e}");
        }
        out
    }

    /// Declares a collector so its series exist (at 0) before anything happens.
    pub fn register_collector(&self, name: &str, plugin: &str) {
        self.collector_up.with_label_values(&[name, plugin]).set(0);
        self.collector_stale.with_label_values(&[name]).set(0);
        for m in [
            &self.collections,
            &self.collector_timeouts,
            &self.collector_panics,
            &self.collector_restarts,
            &self.collector_samples,
            &self.collector_invalid,
        ] {
            m.with_label_values(&[name]);
        }
    }

    /// A collector call or creation failed: `up` is 0, and the failure is counted by kind.
    fn collector_failed(&self, collector: &str, plugin: &str, kind: &str) {
        self.collector_up
            .with_label_values(&[collector, plugin])
            .set(0);
        self.collector_errors
            .with_label_values(&[collector, kind])
            .inc();
    }

    /// Declares a sink so its series exist before anything happens.
    pub fn register_sink(&self, name: &str, plugin: &str, capacity: usize) {
        self.sink_up.with_label_values(&[name, plugin]).set(1);
        self.sink_queue.with_label_values(&[name]).set(0);
        self.sink_queue_capacity
            .with_label_values(&[name])
            .set(capacity as i64);
        self.sink_writes.with_label_values(&[name]);
        self.sink_samples.with_label_values(&[name]);
        self.sink_received.with_label_values(&[name]);
        self.sink_dropped.with_label_values(&[name, "queue_full"]);
        self.sink_altered.with_label_values(&[name]);
    }

    /// Counts samples routed to a sink.
    pub fn sink_received(&self, sink: &str, samples: usize) {
        self.sink_received
            .with_label_values(&[sink])
            .inc_by(samples as u64);
    }

    /// Sets the queue depth gauge.
    pub fn set_queue_depth(&self, sink: &str, samples: usize) {
        self.sink_queue
            .with_label_values(&[sink])
            .set(samples as i64);
    }

    /// Sets the plugin file gauges.
    pub fn set_plugin_files(&self, files: &[crate::loader::PluginFile]) {
        for verdict in ["loaded", "shadowed", "refused", "unused"] {
            let n = files
                .iter()
                .filter(|f| f.verdict.as_str() == verdict)
                .count();
            self.plugin_files
                .with_label_values(&[verdict])
                .set(n as i64);
        }
    }

    /// The registry's metrics as a batch for the pipeline.
    pub fn to_batch(&self) -> Batch {
        let mut out = BatchBuilder::new();
        for mf in self.registry.gather() {
            let kind = match mf.get_field_type() {
                prometheus::proto::MetricType::COUNTER => MetricKind::COUNTER,
                prometheus::proto::MetricType::GAUGE => MetricKind::GAUGE,
                _ => MetricKind::UNTYPED,
            };
            let name = mf.name();
            let unit = if name.ends_with("_seconds") || name.ends_with("_seconds_total") {
                "seconds"
            } else {
                ""
            };
            let family = out.family(name, mf.help(), unit, kind);
            for m in mf.get_metric() {
                let labels = m
                    .get_label()
                    .iter()
                    .map(|l| Label::new(l.name(), l.value()))
                    .collect();
                let value = match kind {
                    MetricKind::COUNTER => m.get_counter().get_value(),
                    _ => m.get_gauge().get_value(),
                };
                let set = out.label_set_owned(labels);
                out.sample_in(family, set, value);
            }
        }
        out.finish()
    }
}

/// A thing worth reporting.
pub enum Event<'a> {
    /// A listener could not accept a connection.
    AcceptFailed {
        /// `health` or `metrics`.
        listener: &'a str,
        /// The error.
        message: &'a str,
        /// Whether to log it (it repeats while the cause lasts).
        log: crate::ratelimit::Log,
    },
    /// A listener closed or refused a connection for one of its limits.
    ConnectionClosed {
        /// `health` or `metrics`.
        listener: &'a str,
        /// `header_timeout`, `idle_timeout`, `evicted`, `refused` or `tls_handshake`.
        reason: &'static str,
    },
    /// A collection succeeded.
    Collected {
        /// Instance.
        collector: &'a str,
        /// Plugin.
        plugin: &'a str,
        /// Valid samples.
        samples: usize,
        /// Call duration.
        duration: Duration,
    },
    /// A collector call failed (plugin error).
    CollectFailed {
        /// Instance.
        collector: &'a str,
        /// Plugin.
        plugin: &'a str,
        /// `transient`, `config`, `fatal`, …
        kind: &'a str,
        /// The plugin's message.
        message: &'a str,
        /// The failure streak, for log-once behaviour.
        consecutive: u32,
        /// When the next attempt is.
        retry_in: Duration,
    },
    /// A collector panicked.
    CollectorPanicked {
        /// Instance.
        collector: &'a str,
        /// Plugin.
        plugin: &'a str,
        /// Panic message.
        message: &'a str,
        /// When the instance is re-created.
        restart_in: Duration,
    },
    /// A collector's child process (`isolation = "process"`) died or was killed.
    CollectorCrashed {
        /// Instance.
        collector: &'a str,
        /// Plugin.
        plugin: &'a str,
        /// The signal's name, `timeout`, `exit` or `protocol`.
        cause: &'static str,
        /// What happened (names the signal).
        message: &'a str,
        /// When a new child is started.
        restart_in: Duration,
    },
    /// A collector call exceeded its timeout.
    CollectorTimedOut {
        /// Instance.
        collector: &'a str,
        /// The timeout.
        timeout: Duration,
    },
    /// A timed-out call returned at last.
    CollectorRecovered {
        /// Instance.
        collector: &'a str,
        /// How long it took.
        took: Duration,
    },
    /// A tick passed without a call.
    CollectorSkipped {
        /// Instance.
        collector: &'a str,
        /// `in_flight` or `backoff`.
        reason: &'static str,
    },
    /// The instance could not be created.
    CollectorCreateFailed {
        /// Instance.
        collector: &'a str,
        /// Plugin.
        plugin: &'a str,
        /// Why.
        message: &'a str,
        /// When the next attempt is.
        retry_in: Duration,
    },
    /// An instance was created again after a failure.
    CollectorRestarted {
        /// Instance.
        collector: &'a str,
    },
    /// Samples of a batch were dropped as invalid.
    InvalidSamples {
        /// Instance.
        collector: &'a str,
        /// How many.
        count: usize,
        /// Why (first problem found).
        reason: &'a str,
    },
    /// A sink's queue was full and dropped its oldest samples.
    QueueOverflow {
        /// Sink.
        sink: &'a str,
        /// Samples dropped.
        samples: usize,
    },
    /// A batch could not be appended to the sink's spool (full or failing disk); it is kept
    /// in memory instead.
    SpoolFailed {
        /// Sink.
        sink: &'a str,
        /// The I/O error.
        message: &'a str,
    },
    /// Opening a spool found torn or corrupt records (power loss); they are skipped.
    SpoolDamaged {
        /// Sink.
        sink: &'a str,
        /// Bytes skipped.
        bytes: u64,
        /// Which segment, where, and what is wrong.
        message: &'a str,
    },
    /// A sink write succeeded.
    SinkWritten {
        /// Sink.
        sink: &'a str,
        /// Plugin.
        plugin: &'a str,
        /// Samples.
        samples: usize,
        /// Duration.
        duration: Duration,
    },
    /// A sink write failed.
    SinkWriteFailed {
        /// Sink.
        sink: &'a str,
        /// Plugin.
        plugin: &'a str,
        /// Error kind.
        kind: &'a str,
        /// Message.
        message: &'a str,
    },
    /// A sink lost samples.
    SinkDropped {
        /// Sink.
        sink: &'a str,
        /// Why: `rejected`, `disabled`, `shutdown`, `write_error`.
        reason: &'static str,
        /// Samples.
        samples: usize,
    },
    /// A sink wrote samples with a label changed or left out (logged like a drop report).
    SinkReportedAltered {
        /// Sink.
        sink: &'a str,
        /// Samples.
        samples: usize,
        /// The sink's explanation.
        why: &'a str,
        /// Whether this cause was seen before.
        repeated: bool,
    },
    /// A sink reported samples of a write it delivered otherwise (the server refused some
    /// lines, some values cannot be encoded). Logged at warn the first time per sink, reason
    /// and cause, then at debug: the counter has every one.
    SinkReportedDrop {
        /// Sink.
        sink: &'a str,
        /// `rejected` or `invalid`.
        reason: &'static str,
        /// Samples.
        samples: usize,
        /// The sink's explanation.
        why: &'a str,
        /// Whether this cause was seen before.
        repeated: bool,
    },
}

impl Event<'_> {
    /// Logs the event and updates its metric.
    pub fn emit(&self, t: &Telemetry) {
        match *self {
            Event::AcceptFailed {
                listener,
                message,
                log,
            } => {
                t.http_accept_errors.with_label_values(&[listener]).inc();
                log.warn(
                    &format!("{listener} listener cannot accept connections: {message}"),
                    "metricsd_http_accept_errors_total",
                );
            }
            Event::ConnectionClosed { listener, reason } => {
                t.http_connections_closed
                    .with_label_values(&[listener, reason])
                    .inc();
                tracing::debug!(listener, reason, "connection closed");
            }
            Event::Collected {
                collector,
                plugin,
                samples,
                duration,
            } => {
                t.collector_up
                    .with_label_values(&[collector, plugin])
                    .set(1);
                t.collections.with_label_values(&[collector]).inc();
                t.collector_samples
                    .with_label_values(&[collector])
                    .inc_by(samples as u64);
                observe(t, collector, duration);
                tracing::trace!(collector, samples, ?duration, "collected");
            }
            Event::CollectFailed {
                collector,
                plugin,
                kind,
                message,
                consecutive,
                retry_in,
            } => {
                t.collector_failed(collector, plugin, kind);
                // A failure streak logs its first error loudly, then only at debug level.
                if consecutive <= 1 {
                    tracing::warn!(
                        collector,
                        plugin,
                        kind,
                        "collection failed: {message}; next attempt in {}",
                        humantime::format_duration(retry_in)
                    );
                } else {
                    tracing::debug!(collector, consecutive, "collection failed again: {message}");
                }
            }
            Event::CollectorPanicked {
                collector,
                plugin,
                message,
                restart_in,
            } => {
                t.collector_panics.with_label_values(&[collector]).inc();
                t.collector_failed(collector, plugin, "panic");
                tracing::error!(
                    collector,
                    plugin,
                    "{message}; instance disabled, re-created in {}",
                    humantime::format_duration(restart_in)
                );
            }
            Event::CollectorCrashed {
                collector,
                plugin,
                cause,
                message,
                restart_in,
            } => {
                t.collector_crashes
                    .with_label_values(&[collector, cause])
                    .inc();
                t.collector_failed(collector, plugin, "crash");
                tracing::error!(
                    collector,
                    plugin,
                    "collector `{collector}` (plugin `{plugin}`): {message}; a new process starts in {}",
                    humantime::format_duration(restart_in)
                );
            }
            Event::CollectorTimedOut { collector, timeout } => {
                t.collector_timeouts.with_label_values(&[collector]).inc();
                t.collector_errors
                    .with_label_values(&[collector, "timeout"])
                    .inc();
                t.collector_stale.with_label_values(&[collector]).set(1);
                tracing::warn!(
                    collector,
                    "collection did not finish within {}; instance is stale until the call returns (no new call is started meanwhile)",
                    humantime::format_duration(timeout)
                );
            }
            Event::CollectorRecovered { collector, took } => {
                t.collector_stale.with_label_values(&[collector]).set(0);
                tracing::info!(
                    collector,
                    "overdue collection returned after {}; its samples were dropped as late",
                    humantime::format_duration(round_ms(took))
                );
            }
            Event::CollectorSkipped { collector, reason } => {
                t.collector_skipped
                    .with_label_values(&[collector, reason])
                    .inc();
                tracing::trace!(collector, reason, "tick skipped");
            }
            Event::CollectorCreateFailed {
                collector,
                plugin,
                message,
                retry_in,
            } => {
                t.collector_failed(collector, plugin, "create");
                tracing::error!(
                    collector,
                    plugin,
                    "cannot start collector: {message}; next attempt in {}",
                    humantime::format_duration(retry_in)
                );
            }
            Event::CollectorRestarted { collector } => {
                t.collector_restarts.with_label_values(&[collector]).inc();
                tracing::info!(collector, "collector instance re-created");
            }
            Event::InvalidSamples {
                collector,
                count,
                reason,
            } => {
                t.collector_invalid
                    .with_label_values(&[collector])
                    .inc_by(count as u64);
                t.invalid_again(collector).warn(
                    &format!("collector {collector}: dropped {count} invalid samples: {reason}"),
                    "metricsd_collector_invalid_samples_total",
                );
            }
            Event::SpoolFailed { sink, message } => {
                t.spool_errors.with_label_values(&[sink]).inc();
                again(&t.spool_log, sink).error(
                    &format!(
                        "sink {sink}: the disk spool failed ({message}); batches it cannot take wait in memory (up to queue_capacity)"
                    ),
                    "metricsd_sink_spool_errors_total",
                );
            }
            Event::SpoolDamaged {
                sink,
                bytes,
                message,
            } => {
                t.spool_corrupt.with_label_values(&[sink]).inc_by(bytes);
                tracing::warn!(sink, bytes, "damaged spool segment: {message}");
            }
            Event::QueueOverflow { sink, samples } => {
                t.sink_dropped
                    .with_label_values(&[sink, "queue_full"])
                    .inc_by(samples as u64);
                tracing::warn!(sink, samples, "sink queue full: dropped the oldest samples");
            }
            Event::SinkWritten {
                sink,
                plugin,
                samples,
                duration,
            } => {
                t.sink_up.with_label_values(&[sink, plugin]).set(1);
                t.sink_writes.with_label_values(&[sink]).inc();
                t.sink_samples
                    .with_label_values(&[sink])
                    .inc_by(samples as u64);
                t.sink_last_duration
                    .with_label_values(&[sink])
                    .set(duration.as_secs_f64());
                tracing::trace!(sink, samples, ?duration, "written");
            }
            Event::SinkWriteFailed {
                sink,
                plugin,
                kind,
                message,
            } => {
                t.sink_up.with_label_values(&[sink, plugin]).set(0);
                t.sink_write_errors.with_label_values(&[sink, kind]).inc();
                tracing::warn!(sink, plugin, kind, "write failed: {message}");
            }
            Event::SinkReportedAltered {
                sink,
                samples,
                why,
                repeated,
            } => {
                t.sink_altered
                    .with_label_values(&[sink])
                    .inc_by(samples as u64);
                if repeated {
                    tracing::debug!(sink, samples, "samples altered: {why}");
                } else {
                    tracing::warn!(
                        sink,
                        samples,
                        "samples written with a label changed: {why} (counted in metricsd_sink_altered_samples_total; logged again only at debug level)"
                    );
                }
            }
            Event::SinkReportedDrop {
                sink,
                reason,
                samples,
                why,
                repeated,
            } => {
                t.sink_dropped
                    .with_label_values(&[sink, reason])
                    .inc_by(samples as u64);
                if repeated {
                    tracing::debug!(sink, reason, samples, "samples dropped: {why}");
                } else {
                    tracing::warn!(
                        sink,
                        reason,
                        samples,
                        "samples dropped: {why} (counted in metricsd_sink_dropped_samples_total; logged again only at debug level)"
                    );
                }
            }
            Event::SinkDropped {
                sink,
                reason,
                samples,
            } => {
                t.sink_dropped
                    .with_label_values(&[sink, reason])
                    .inc_by(samples as u64);
                tracing::warn!(sink, reason, samples, "samples dropped");
            }
        }
    }
}

/// One more event of the cause `key`: whether and how to log it.
fn again(
    log: &std::sync::Mutex<std::collections::HashMap<String, crate::ratelimit::Repeating>>,
    key: &str,
) -> crate::ratelimit::Log {
    let mut map = log.lock().unwrap_or_else(|p| p.into_inner());
    match map.get_mut(key) {
        Some(r) => r.event(),
        None => map.entry(key.to_string()).or_default().event(),
    }
}

fn observe(t: &Telemetry, collector: &str, duration: Duration) {
    let secs = duration.as_secs_f64();
    t.collector_last_duration
        .with_label_values(&[collector])
        .set(secs);
    t.collector_duration_total
        .with_label_values(&[collector])
        .inc_by(secs);
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}
