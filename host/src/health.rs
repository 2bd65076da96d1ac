//! Per-instance status, served as `/health`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// What an instance is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Not called yet.
    Starting,
    /// The last call succeeded.
    Ok,
    /// The last call (or creating the instance) failed; retried after a back-off.
    Failing,
    /// A call is overdue: it timed out and has not returned.
    Stale,
    /// Its calls succeed, but it reports working with less than it should (a collector whose
    /// service is unreachable falls back to what it has): see `degraded`.
    Degraded,
    /// Not running: its plugin is unavailable, or it failed in a way that needs the operator.
    Disabled,
}

/// The status of one instance.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceStatus {
    /// `collector` or `sink`.
    pub kind: &'static str,
    /// The plugin name.
    pub plugin: String,
    /// Whether a failure of this instance makes the agent unhealthy.
    pub required: bool,
    /// Current state.
    pub state: State,
    /// Last successful call, ms since the Unix epoch.
    pub last_success_ms: Option<i64>,
    /// The most recent error, cleared by a success.
    pub last_error: Option<String>,
    /// Failed calls in a row.
    pub consecutive_failures: u32,
    /// What the instance reports it lacks, while it does (`report_degraded`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
}

impl InstanceStatus {
    fn is_failing(&self) -> bool {
        matches!(self.state, State::Failing | State::Stale | State::Disabled)
    }
}

/// The status of every instance.
pub struct Health {
    started: Instant,
    instances: Mutex<BTreeMap<String, InstanceStatus>>,
}

/// The `/health` document.
#[derive(Debug, Serialize)]
pub struct HealthReport {
    /// `ok`, `degraded` (a non-required instance fails) or `failing` (a required one does).
    pub status: &'static str,
    /// Agent version.
    pub version: &'static str,
    /// Seconds since start.
    pub uptime_seconds: u64,
    /// By instance name.
    pub instances: BTreeMap<String, InstanceStatus>,
}

impl HealthReport {
    /// Whether `/health` answers 503.
    pub fn is_failing(&self) -> bool {
        self.status == "failing"
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// No instances yet.
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            instances: Mutex::new(BTreeMap::new()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, InstanceStatus>) -> T) -> T {
        let mut guard = self.instances.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Adds an instance in state `Starting` (or `Disabled` with a reason).
    pub fn register(
        &self,
        name: &str,
        kind: &'static str,
        plugin: &str,
        required: bool,
        disabled: Option<String>,
    ) {
        let status = InstanceStatus {
            kind,
            plugin: plugin.to_string(),
            required,
            state: if disabled.is_some() {
                State::Disabled
            } else {
                State::Starting
            },
            last_success_ms: None,
            last_error: disabled,
            consecutive_failures: 0,
            degraded: None,
        };
        self.with(|m| m.insert(name.to_string(), status));
    }

    /// Records a successful call.
    pub fn success(&self, name: &str) {
        self.with(|m| {
            if let Some(s) = m.get_mut(name) {
                s.state = if s.degraded.is_some() {
                    State::Degraded
                } else {
                    State::Ok
                };
                s.last_success_ms = Some(now_ms());
                s.last_error = None;
                s.consecutive_failures = 0;
            }
        });
    }

    /// Records a failure; returns the failure streak.
    pub fn failure(&self, name: &str, state: State, error: String) -> u32 {
        self.with(|m| match m.get_mut(name) {
            Some(s) => {
                s.state = state;
                s.last_error = Some(error);
                s.consecutive_failures = s.consecutive_failures.saturating_add(1);
                s.consecutive_failures
            }
            None => 1,
        })
    }

    /// Records what an instance reports it lacks (`Some`), or that it recovered (`None`);
    /// returns whether that changed anything.
    pub fn set_degraded(&self, name: &str, why: Option<&str>) -> bool {
        self.with(|m| {
            let Some(s) = m.get_mut(name) else {
                return false;
            };
            if s.degraded.as_deref() == why {
                return false;
            }
            let was = s.degraded.is_some();
            s.degraded = why.map(str::to_string);
            match (s.state, why) {
                (State::Ok, Some(_)) => s.state = State::Degraded,
                (State::Degraded, None) => s.state = State::Ok,
                _ => {}
            }
            was != why.is_some()
        })
    }

    /// Marks a call overdue.
    pub fn stale(&self, name: &str, error: String) {
        self.with(|m| {
            if let Some(s) = m.get_mut(name) {
                s.state = State::Stale;
                s.last_error = Some(error);
            }
        });
    }

    /// The current report.
    pub fn report(&self) -> HealthReport {
        let instances = self.with(|m| m.clone());
        let required_failing = instances.values().any(|s| s.required && s.is_failing());
        let any_failing = instances
            .values()
            .any(|s| s.is_failing() || s.state == State::Degraded);
        HealthReport {
            status: if required_failing {
                "failing"
            } else if any_failing {
                "degraded"
            } else {
                "ok"
            },
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started.elapsed().as_secs(),
            instances,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_failure_fails_the_agent() {
        let h = Health::new();
        h.register("gpu", "collector", "nvml", true, None);
        h.register("sys", "collector", "system", false, None);
        assert_eq!(h.report().status, "ok");
        h.failure("sys", State::Failing, "boom".into());
        assert_eq!(h.report().status, "degraded");
        h.stale("gpu", "overdue".into());
        assert!(h.report().is_failing());
        h.success("gpu");
        h.success("sys");
        let r = h.report();
        assert_eq!(r.status, "ok");
        assert_eq!(r.instances["gpu"].consecutive_failures, 0);
        assert!(r.instances["gpu"].last_error.is_none());
    }

    #[test]
    fn a_degraded_instance_degrades_the_agent_without_failing_it() {
        let h = Health::new();
        h.register("disc", "collector", "discovery", true, None);
        h.success("disc");
        assert!(h.set_degraded("disc", Some("server down")));
        assert!(!h.set_degraded("disc", Some("server down")), "no change");
        let r = h.report();
        assert_eq!(r.status, "degraded");
        assert!(!r.is_failing());
        assert_eq!(r.instances["disc"].state, State::Degraded);
        h.success("disc");
        assert_eq!(h.report().instances["disc"].state, State::Degraded);
        assert!(h.set_degraded("disc", None));
        assert_eq!(h.report().status, "ok");
        assert_eq!(h.report().instances["disc"].state, State::Ok);
    }
}
