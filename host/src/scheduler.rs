//! One task per collector instance: interval ticks (missed ticks skipped, not bunched), each
//! call on the instance's own thread ([`CallThread`]) with a timeout, never two calls of one
//! instance at once, failures backed off, panicked instances re-created.

use std::sync::Arc;
use std::time::{Duration, Instant};

use metricsd_plugin_api::{Batch, ErrorKind};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use crate::call_thread::{Call, CallThread};
use crate::config::Isolation;
use crate::events::{Event, Telemetry};
use crate::health::{Health, State};
use crate::instance::create_isolated;
use crate::isolation::{CollectError, Collector, Killer};
use crate::loader::Plugin;
use crate::pipeline::Pipeline;

/// What a collector task needs.
pub struct CollectorTask {
    /// Instance name.
    pub name: String,
    /// The plugin.
    pub plugin: Plugin,
    /// The instance's config as JSON.
    pub config_json: String,
    /// Collection interval.
    pub interval: Duration,
    /// Call timeout.
    pub timeout: Duration,
    /// Longest back-off.
    pub max_backoff: Duration,
    /// In this process or a child process of its own.
    pub isolation: Isolation,
    /// Where batches go.
    pub pipeline: Arc<Pipeline>,
    /// Shared telemetry.
    pub telemetry: Arc<Telemetry>,
    /// Shared health.
    pub health: Arc<Health>,
}

type CallResult = (Collector, Result<Batch, CollectError>);

struct InFlight {
    started: Instant,
    timed_out: bool,
    handle: Call<CallResult>,
    /// Kills the call's child process (`isolation = "process"`) when it times out.
    killer: Option<Killer>,
}

/// The delay before attempt number `failures + 1`: the interval doubled per failure, capped.
pub fn backoff(interval: Duration, max: Duration, failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.min(20));
    interval.saturating_mul(factor).min(max.max(interval))
}

impl CollectorTask {
    /// Runs until `shutdown` turns true. `initial`: an instance created before the task
    /// started (a required collector's first, created at start so that a config error stops
    /// the start); `None` creates one on the first tick.
    pub async fn run(self, initial: Option<Collector>, mut shutdown: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut instance: Option<Collector> = initial;
        let mut in_flight: Option<InFlight> = None;
        let mut failures: u32 = 0;
        let mut not_before = Instant::now();
        let mut created_once = instance.is_some();
        let calls = CallThread::spawn(&format!("collect-{}", self.name));

        loop {
            let deadline = in_flight
                .as_ref()
                .filter(|f| !f.timed_out)
                .map(|f| tokio::time::Instant::from_std(f.started + self.timeout));
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = ticker.tick() => {
                    if in_flight.is_some() {
                        self.emit(Event::CollectorSkipped { collector: &self.name, reason: "in_flight" });
                        continue;
                    }
                    if Instant::now() < not_before {
                        self.emit(Event::CollectorSkipped { collector: &self.name, reason: "backoff" });
                        continue;
                    }
                    if instance.is_none() {
                        match self.create().await {
                            Ok(created) => {
                                if created_once {
                                    self.emit(Event::CollectorRestarted { collector: &self.name });
                                }
                                created_once = true;
                                instance = Some(created);
                            }
                            Err(message) => {
                                failures += 1;
                                let wait = backoff(self.interval, self.max_backoff, failures);
                                not_before = Instant::now() + wait;
                                self.health.failure(&self.name, State::Failing, message.clone());
                                self.emit(Event::CollectorCreateFailed {
                                    collector: &self.name,
                                    plugin: &self.plugin.name,
                                    message: &message,
                                    retry_in: wait,
                                });
                                continue;
                            }
                        }
                    }
                    if let Some(mut inst) = instance.take() {
                        let started = Instant::now();
                        let killer = inst.killer();
                        let handle = calls.call(move || {
                            let result = inst.collect();
                            (inst, result)
                        });
                        in_flight = Some(InFlight { started, timed_out: false, handle, killer });
                    }
                }
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(f) = in_flight.as_mut() {
                        f.timed_out = true;
                        // A child process can be stopped: killed, and a new one started after
                        // the back-off (the call ends as a crash that says so).
                        if let Some(killer) = &f.killer {
                            killer.kill();
                        }
                        self.health.stale(
                            &self.name,
                            format!("collection did not finish within {}", humantime::format_duration(self.timeout)),
                        );
                        self.emit(Event::CollectorTimedOut { collector: &self.name, timeout: self.timeout });
                    }
                }
                joined = async {
                    match in_flight.as_mut() {
                        Some(f) => (&mut f.handle).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let Some(f) = in_flight.take() else { continue };
                    let took = f.started.elapsed();
                    match joined {
                        Ok((inst, result)) => {
                            let late = f.timed_out;
                            // (A child killed for its timeout did not recover: it crashed.)
                            if late && !matches!(result, Err(CollectError::Crashed { .. })) {
                                self.emit(Event::CollectorRecovered { collector: &self.name, took });
                            }
                            match self.finish_call(result, took, late, &mut failures) {
                                Outcome::Keep => instance = Some(inst),
                                Outcome::Discard(wait) => {
                                    not_before = Instant::now() + wait;
                                    // Dropping runs the plugin's destructor: off the runtime.
                                    tokio::task::spawn_blocking(move || drop(inst));
                                }
                                Outcome::Backoff(wait) => {
                                    not_before = Instant::now() + wait;
                                    instance = Some(inst);
                                }
                            }
                        }
                        Err(e) => {
                            // The SDK catches panics; this is a panic in the host's side of the
                            // call (the instance went with it: it is created again).
                            failures += 1;
                            let wait = backoff(self.interval, self.max_backoff, failures);
                            not_before = Instant::now() + wait;
                            let message = format!("collector call failed: {e}");
                            self.health.failure(&self.name, State::Failing, message.clone());
                            self.emit(Event::CollectorPanicked {
                                collector: &self.name,
                                plugin: &self.plugin.name,
                                message: &message,
                                restart_in: wait,
                            });
                        }
                    }
                }
            }
        }

        // Shutdown: a call still running is abandoned (its thread finishes on its own).
        if let Some(f) = in_flight.take() {
            if let Ok(Ok((inst, _))) =
                tokio::time::timeout(Duration::from_millis(100), f.handle).await
            {
                instance = Some(inst);
            }
        }
        if let Some(mut inst) = instance {
            let _ = tokio::task::spawn_blocking(move || inst.close()).await;
        }
    }

    fn emit(&self, event: Event<'_>) {
        event.emit(&self.telemetry);
    }

    async fn create(&self) -> Result<Collector, String> {
        create_isolated(
            &self.plugin,
            &self.name,
            &self.config_json,
            self.timeout,
            self.isolation,
        )
        .await
        .map_err(|e| e.message)
    }

    fn finish_call(
        &self,
        result: Result<Batch, CollectError>,
        took: Duration,
        late: bool,
        failures: &mut u32,
    ) -> Outcome {
        match result {
            Ok(mut batch) => {
                *failures = 0;
                if late {
                    // Values from an overdue call are not served as if fresh.
                    self.emit(Event::InvalidSamples {
                        collector: &self.name,
                        count: batch.samples.len(),
                        reason: "late: the call exceeded its timeout",
                    });
                    self.health.success(&self.name);
                    return Outcome::Keep;
                }
                let samples = self.pipeline.prepare(&self.name, &mut batch);
                self.health.success(&self.name);
                self.emit(Event::Collected {
                    collector: &self.name,
                    plugin: &self.plugin.name,
                    samples,
                    duration: took,
                });
                self.pipeline.route_prepared(&self.name, batch);
                Outcome::Keep
            }
            Err(CollectError::Crashed { cause, message }) => {
                *failures += 1;
                let wait = backoff(self.interval, self.max_backoff, *failures);
                self.health
                    .failure(&self.name, State::Failing, message.clone());
                self.emit(Event::CollectorCrashed {
                    collector: &self.name,
                    plugin: &self.plugin.name,
                    cause,
                    message: &message,
                    restart_in: wait,
                });
                Outcome::Discard(wait)
            }
            Err(CollectError::Plugin(err)) => {
                *failures += 1;
                let wait = backoff(self.interval, self.max_backoff, *failures);
                let message = err.message.to_string();
                self.health
                    .failure(&self.name, State::Failing, message.clone());
                if err.kind == ErrorKind::PANIC {
                    self.emit(Event::CollectorPanicked {
                        collector: &self.name,
                        plugin: &self.plugin.name,
                        message: &message,
                        restart_in: wait,
                    });
                    Outcome::Discard(wait)
                } else {
                    self.emit(Event::CollectFailed {
                        collector: &self.name,
                        plugin: &self.plugin.name,
                        kind: err.kind.as_str(),
                        message: &message,
                        consecutive: *failures,
                        retry_in: wait,
                    });
                    Outcome::Backoff(wait)
                }
            }
        }
    }
}

enum Outcome {
    Keep,
    Backoff(Duration),
    Discard(Duration),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let s = Duration::from_secs;
        assert_eq!(backoff(s(5), s(300), 1), s(10));
        assert_eq!(backoff(s(5), s(300), 3), s(40));
        assert_eq!(backoff(s(5), s(300), 30), s(300));
        assert_eq!(
            backoff(s(600), s(300), 1),
            s(600),
            "never below the interval"
        );
    }
}
