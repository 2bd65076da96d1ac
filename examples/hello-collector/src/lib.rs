//! A minimal metricsd collector, and the template for third-party plugins.
//!
//! It reports how long the process that loaded it has been up and how often it was collected,
//! labelled with a configurable greeting. Copy this crate, rename it, and replace `collect`.

use std::time::Instant;

use metricsd_plugin_api::{export_plugin, BatchBuilder, Collector, Context, Error, Result};
use serde::Deserialize;

/// The instance's `[collectors.config]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Value of the `greeting` label (default `"hello"`).
    #[serde(default = "default_greeting")]
    pub greeting: String,
    /// Extra samples of `hello_sequence` to emit per collection, labelled `n="0"`… (default 0).
    #[serde(default)]
    pub series: u32,
}

fn default_greeting() -> String {
    "hello".to_string()
}

/// The collector instance.
pub struct Hello {
    greeting: String,
    series: u32,
    started: Instant,
    collections: u64,
}

impl Collector for Hello {
    type Config = Config;

    /// Checks of the config alone: `metricsd check`, the start and each reload run them, before
    /// any instance exists. No I/O here (see the crate docs of metricsd-plugin-api).
    fn validate(config: &Config) -> Result<()> {
        if config.greeting.is_empty() {
            return Err(Error::config("`greeting` must not be empty"));
        }
        Ok(())
    }

    fn new(config: Config, ctx: &Context) -> Result<Self> {
        // The SDK re-exports `tracing`; its events reach the agent's log.
        metricsd_plugin_api::tracing::info!("hello collector `{}` ready", ctx.instance());
        Ok(Hello {
            greeting: config.greeting,
            series: config.series,
            started: Instant::now(),
            collections: 0,
        })
    }

    fn collect(&mut self, out: &mut BatchBuilder) -> Result<()> {
        self.collections += 1;
        let labels = [("greeting", self.greeting.as_str())];

        let collections = out.counter(
            "hello_collections_total",
            "Collections of this instance since it was created.",
            "",
        );
        out.sample(collections, &labels, self.collections as f64);

        let uptime = out.gauge(
            "hello_uptime_seconds",
            "Seconds since this instance was created.",
            "seconds",
        );
        out.sample(uptime, &labels, self.started.elapsed().as_secs_f64());

        if self.series > 0 {
            let seq = out.gauge("hello_sequence", "One sample per configured series.", "");
            for n in 0..self.series {
                let n_text = n.to_string();
                out.sample(seq, &[("n", n_text.as_str())], f64::from(n));
            }
        }
        Ok(())
    }
}

export_plugin! {
    name: "hello",
    description: "Example collector: counts its own collections",
    collector: Hello,
}

#[cfg(test)]
mod tests {
    use super::*;
    use metricsd_plugin_api::testing::{logs_of, CollectorHarness};
    use metricsd_plugin_api::{ErrorKind, LogLevel, MetricKind};

    #[test]
    fn collects_counter_and_uptime() {
        let mut h = CollectorHarness::new::<Hello>("hi", r#"{"greeting":"hej","series":3}"#)
            .expect("instance");
        let first = h.collect().expect("collect");
        let second = h.collect().expect("collect");
        h.expect_families(
            &second,
            &[
                "hello_collections_total",
                "hello_uptime_seconds",
                "hello_sequence",
            ],
        );
        assert_eq!(second.families[0].kind, MetricKind::COUNTER);
        assert_eq!(first.samples[0].value, 1.0);
        assert_eq!(second.samples[0].value, 2.0);
        assert_eq!(second.samples.len(), 2 + 3);
        assert_eq!(
            second.own_labels_of(&second.samples[0])[0].value.as_str(),
            "hej"
        );
        assert!(logs_of("hi")
            .iter()
            .any(|(_, level, _, msg)| *level == LogLevel::INFO && msg.contains("ready")));
    }

    #[test]
    fn empty_greeting_is_a_config_error_that_check_finds() {
        // `metricsd check` runs validate only: the check must be there, not in `new`.
        let err = CollectorHarness::validate::<Hello>(r#"{"greeting":""}"#)
            .expect_err("validate must refuse it");
        assert_eq!(err.kind, ErrorKind::CONFIG);
        assert!(err.message.contains("greeting"), "{}", err.message);
        assert!(CollectorHarness::validate::<Hello>(r#"{"greeting":"hej"}"#).is_ok());
        let err = CollectorHarness::new::<Hello>("bad", r#"{"greeting":""}"#)
            .err()
            .expect("must fail");
        assert_eq!(err.kind, ErrorKind::CONFIG);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = CollectorHarness::new::<Hello>("bad", r#"{"greting":"x"}"#)
            .err()
            .expect("must fail");
        assert!(err.message.contains("greting"), "{}", err.message);
    }
}
