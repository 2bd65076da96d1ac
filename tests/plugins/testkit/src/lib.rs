//! A test-only collector whose misbehaviour is chosen by config: it panics, hangs, fails, or
//! emits label values full of quotes, backslashes, newlines and UTF-8. The end-to-end tests
//! load it through the real loader.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use metricsd_plugin_api::{export_plugin, BatchBuilder, Collector, Context, Error, Result};
use serde::Deserialize;

/// The instance's `[collectors.config]` table. Counts are 1-based collect calls of one
/// instance (a re-created instance starts again at 1).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Panic in `new`.
    #[serde(default)]
    pub panic_in_new: bool,
    /// Sleep this long in `new`.
    #[serde(default, with = "ms")]
    pub hang_in_new: Duration,
    /// Return a config error from `new` (a check that needs more than the config, such as a
    /// device that the config names and that is not there).
    #[serde(default)]
    pub config_error_in_new: bool,
    /// Panic on this collect call.
    pub panic_on: Option<u64>,
    /// Die of SIGSEGV on this collect call, as a plugin that dereferences a bad pointer does.
    pub segfault_on: Option<u64>,
    /// Call `abort()` on this collect call (SIGABRT), as a failed C assertion or a library
    /// that kills its process does.
    pub abort_on: Option<u64>,
    /// Print a line to standard output on every call (as a careless plugin might).
    #[serde(default)]
    pub print: bool,
    /// Return a transient error on every call from this one on.
    pub fail_from: Option<u64>,
    /// Sleep this long on every call from `hang_from` on.
    #[serde(default, with = "ms")]
    pub hang: Duration,
    /// First call that sleeps (default 1).
    pub hang_from: Option<u64>,
    /// Number of `testkit_value` samples per call.
    #[serde(default = "one")]
    pub series: u32,
    /// Emit `testkit_value` only up to this call (then the series vanish).
    pub series_until: Option<u64>,
    /// Extra labels on every `testkit_value` sample.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Emit a sample that refers to a family that does not exist (an invalid batch).
    #[serde(default)]
    pub invalid_sample: bool,
    /// Emit the invalid sample only up to this call.
    pub invalid_until: Option<u64>,
    /// Also emit a sample with the reserved label name `__name__`.
    #[serde(default)]
    pub reserved_label: bool,
    /// Also emit a gauge `testkit_calls`, which clashes with the counter `testkit_calls_total`
    /// in the OpenMetrics exposition.
    #[serde(default)]
    pub clashing_family: bool,
    /// Also emit `testkit_nan` (NaN) and `testkit_inf` (+Inf), for sinks whose protocol has
    /// no such values.
    #[serde(default)]
    pub non_finite: bool,
}

fn one() -> u32 {
    1
}

mod ms {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// Per instance name: (instances created, calls now running, most calls ever running at once).
type Entry = (u64, u64, u64);
static BOOK: Mutex<Option<HashMap<String, Entry>>> = Mutex::new(None);

fn book<T>(instance: &str, f: impl FnOnce(&mut Entry) -> T) -> T {
    let mut guard = BOOK.lock().unwrap_or_else(|p| p.into_inner());
    let map = guard.get_or_insert_with(HashMap::new);
    f(map.entry(instance.to_string()).or_default())
}

/// The collector instance.
pub struct Testkit {
    name: String,
    config: Config,
    calls: u64,
    generation: u64,
}

impl Collector for Testkit {
    type Config = Config;

    fn validate(config: &Config) -> Result<()> {
        if config.series > 1_000_000 {
            return Err(Error::config("`series` must be at most 1000000"));
        }
        Ok(())
    }

    fn new(config: Config, ctx: &Context) -> Result<Self> {
        if config.panic_in_new {
            panic!("testkit: panic_in_new is set");
        }
        if !config.hang_in_new.is_zero() {
            std::thread::sleep(config.hang_in_new);
        }
        if config.config_error_in_new {
            return Err(Error::config("testkit: config_error_in_new is set"));
        }
        let generation = book(ctx.instance(), |b| {
            b.0 += 1;
            b.0
        });
        tracing::debug!(generation, "testkit instance created");
        Ok(Testkit {
            name: ctx.instance().to_string(),
            config,
            calls: 0,
            generation,
        })
    }

    fn collect(&mut self, out: &mut BatchBuilder) -> Result<()> {
        self.calls += 1;
        let running = book(&self.name, |b| {
            b.1 += 1;
            b.2 = b.2.max(b.1);
            b.1
        });
        // Decrements on return and on panic alike.
        let _running = Running(self.name.clone());
        self.collect_inner(out, running)
    }
}

struct Running(String);

impl Drop for Running {
    fn drop(&mut self) {
        book(&self.0, |b| b.1 = b.1.saturating_sub(1));
    }
}

impl Testkit {
    fn collect_inner(&mut self, out: &mut BatchBuilder, running: u64) -> Result<()> {
        let call = self.calls;
        if self.config.panic_on == Some(call) {
            panic!("testkit: panic_on = {call}");
        }
        if self.config.print {
            println!("testkit: call {call} says hello on stdout");
        }
        if self.config.segfault_on == Some(call) {
            tracing::warn!(call, "testkit: raising SIGSEGV");
            // Rust's runtime handles SIGSEGV to detect stack overflows: for any other fault its
            // handler restores the default action and returns, and a real fault then recurs
            // and kills the process. A raised signal does not recur, so it is raised twice:
            // the second meets the default action, which ends the process as a bad pointer does.
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSEGV);
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSEGV);
        }
        if self.config.abort_on == Some(call) {
            tracing::warn!(call, "testkit: aborting");
            std::process::abort();
        }
        if !self.config.hang.is_zero() && call >= self.config.hang_from.unwrap_or(1) {
            tracing::info!(call, "testkit: sleeping {:?}", self.config.hang);
            std::thread::sleep(self.config.hang);
        }
        if self.config.fail_from.is_some_and(|from| call >= from) {
            return Err(Error::transient(format!("testkit: failing on call {call}")));
        }

        let calls = out.counter("testkit_calls_total", "Collect calls of this instance.", "");
        out.sample(calls, &[], call as f64);
        let generation = out.gauge(
            "testkit_generation",
            "How many instances of this name the plugin has created.",
            "",
        );
        out.sample(generation, &[], self.generation as f64);
        let concurrent = out.gauge(
            "testkit_concurrent_calls",
            "Collect calls of this instance running at once, now and at most.",
            "",
        );
        let max = book(&self.name, |b| b.2);
        out.sample(concurrent, &[("of", "now")], running as f64);
        out.sample(concurrent, &[("of", "max")], max as f64);

        let value = out.gauge("testkit_value", "Synthetic series.", "");
        let series = match self.config.series_until {
            Some(last) if call > last => 0,
            _ => self.config.series,
        };
        for n in 0..series {
            let n_text = n.to_string();
            let labels: Vec<(&str, &str)> = self
                .config
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .chain([("series", n_text.as_str())])
                .collect();
            out.sample(value, &labels, f64::from(n) + call as f64);
        }
        if self.config.invalid_sample && self.config.invalid_until.is_none_or(|last| call <= last) {
            out.sample(value, &[("bad label", "x")], 1.0);
        }
        if self.config.reserved_label {
            out.sample(value, &[("__name__", "testkit_other")], 1.0);
        }
        if self.config.clashing_family {
            let clash = out.gauge("testkit_calls", "Clashes with testkit_calls_total.", "");
            out.sample(clash, &[], call as f64);
        }
        if self.config.non_finite {
            let nan = out.gauge("testkit_nan", "Always NaN.", "");
            out.sample(nan, &[], f64::NAN);
            let inf = out.gauge("testkit_inf", "Always +Inf.", "");
            out.sample(inf, &[], f64::INFINITY);
        }
        Ok(())
    }
}

export_plugin! {
    name: "testkit",
    description: "Test collector: panics, hangs and fails on demand",
    collector: Testkit,
}

#[cfg(test)]
mod tests {
    use super::*;
    use metricsd_plugin_api::testing::CollectorHarness;
    use metricsd_plugin_api::ErrorKind;

    #[test]
    fn panic_is_caught_and_instance_disabled() {
        let mut h = CollectorHarness::new::<Testkit>("p", r#"{"panic_on":2}"#).expect("new");
        assert!(h.collect().is_ok());
        let err = h.collect().expect_err("second call panics");
        assert_eq!(err.kind, ErrorKind::PANIC);
        assert!(err.message.contains("panic_on = 2"), "{}", err.message);
        let err = h.collect().expect_err("disabled after the panic");
        assert!(err.message.contains("disabled"), "{}", err.message);
    }

    #[test]
    fn panic_in_new_is_an_error() {
        let err = CollectorHarness::new::<Testkit>("pn", r#"{"panic_in_new":true}"#)
            .err()
            .expect("must fail");
        assert_eq!(err.kind, ErrorKind::PANIC);
    }
}
