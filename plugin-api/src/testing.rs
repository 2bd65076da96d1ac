//! Test helpers for plugin authors: run a collector or sink in-process, through the same
//! ABI-level wrappers (panic catching, config parsing, log forwarding) the host uses.
//!
//! Give the plugin crate `crate-type = ["cdylib", "rlib"]` so its tests can name its types:
//!
//! ```
//! use metricsd_plugin_api::{BatchBuilder, Collector, Context, Result};
//! use metricsd_plugin_api::testing::CollectorHarness;
//!
//! struct Answer;
//! impl Collector for Answer {
//!     type Config = serde_json::Value;
//!     fn new(_: Self::Config, _: &Context) -> Result<Self> { Ok(Answer) }
//!     fn collect(&mut self, out: &mut BatchBuilder) -> Result<()> {
//!         let f = out.gauge("answer", "The answer.", "");
//!         out.sample(f, &[], 42.0);
//!         Ok(())
//!     }
//! }
//!
//! let mut harness = CollectorHarness::new::<Answer>("answer", "{}").unwrap();
//! let batch = harness.collect().unwrap();
//! harness.expect_families(&batch, &["answer"]);
//! assert_eq!(batch.samples[0].value, 42.0);
//! ```

use std::sync::Mutex;

use abi_stable::std_types::{RResult, RStr};

use crate::abi::{
    Batch, CollectorBox, HostLogger, HttpRequest, HttpResponse, InstanceArgs, LogLevel,
    PluginError, SinkBox,
};
use crate::sdk::{new_collector, new_sink, Collector, Sink};

/// A log event a plugin sent during a test: instance, level, target, message.
pub type LogRecord = (String, LogLevel, String, String);

static LOGS: Mutex<Vec<LogRecord>> = Mutex::new(Vec::new());

extern "C" fn record_log(instance: RStr<'_>, level: LogLevel, target: RStr<'_>, msg: RStr<'_>) {
    if let Ok(mut logs) = LOGS.lock() {
        logs.push((
            instance.to_string(),
            level,
            target.to_string(),
            msg.to_string(),
        ));
    }
}

fn args(instance: &str, config_json: &str) -> InstanceArgs {
    InstanceArgs {
        instance: instance.into(),
        config_json: config_json.into(),
        logger: HostLogger {
            log: record_log,
            max_level: LogLevel::TRACE,
        },
    }
}

/// Log events forwarded so far by instances named `instance`.
pub fn logs_of(instance: &str) -> Vec<LogRecord> {
    LOGS.lock()
        .map(|logs| logs.iter().filter(|r| r.0 == instance).cloned().collect())
        .unwrap_or_default()
}

fn into_result<T>(r: RResult<T, PluginError>) -> Result<T, PluginError> {
    r.into_result()
}

/// Runs a collector through the ABI-level wrapper.
pub struct CollectorHarness {
    instance: CollectorBox,
}

impl CollectorHarness {
    /// Creates an instance named `instance` from a JSON config.
    pub fn new<C: Collector>(instance: &str, config_json: &str) -> Result<Self, PluginError> {
        let instance = into_result(new_collector::<C>(args(instance, config_json), "harness"))?;
        Ok(Self { instance })
    }

    /// Checks a config as `metricsd check` does (parsing, then [`Collector::validate`]),
    /// without creating an instance.
    pub fn validate<C: Collector>(config_json: &str) -> Result<(), PluginError> {
        into_result(crate::sdk::validate_collector::<C>(config_json))
    }

    /// Collects once.
    pub fn collect(&mut self) -> Result<Batch, PluginError> {
        into_result(self.instance.collect())
    }

    /// Asserts that `batch` declares every family in `names` and that every sample refers to a
    /// declared family.
    pub fn expect_families(&self, batch: &Batch, names: &[&str]) {
        for name in names {
            assert!(
                batch.families.iter().any(|f| f.name.as_str() == *name),
                "family `{name}` missing; batch has {:?}",
                batch
                    .families
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>()
            );
        }
        for s in batch.samples.iter() {
            assert!(
                batch.family_of(s).is_some(),
                "sample refers to family {} of {}",
                s.family,
                batch.families.len()
            );
        }
    }
}

impl Drop for CollectorHarness {
    fn drop(&mut self) {
        self.instance.close();
    }
}

/// Runs a sink through the ABI-level wrapper.
pub struct SinkHarness {
    instance: SinkBox,
}

impl SinkHarness {
    /// Creates an instance named `instance` from a JSON config.
    pub fn new<S: Sink>(instance: &str, config_json: &str) -> Result<Self, PluginError> {
        let instance = into_result(new_sink::<S>(args(instance, config_json), "harness"))?;
        Ok(Self { instance })
    }

    /// Checks a config as `metricsd check` does (parsing, then [`Sink::validate`]), without
    /// creating an instance.
    pub fn validate<S: Sink>(config_json: &str) -> Result<(), PluginError> {
        into_result(crate::sdk::validate_sink::<S>(config_json))
    }

    /// Writes one batch.
    pub fn write(&self, batch: &Batch) -> Result<(), PluginError> {
        into_result(self.instance.write(batch))
    }

    /// Renders a GET request for `path`.
    pub fn get(&self, path: &str) -> Result<HttpResponse, PluginError> {
        let request = HttpRequest {
            method: "GET".into(),
            path: path.into(),
            ..HttpRequest::default()
        };
        self.render(&request)
    }

    /// Renders a request.
    pub fn render(&self, request: &HttpRequest) -> Result<HttpResponse, PluginError> {
        into_result(self.instance.render(request))
    }

    /// The paths the sink registers.
    pub fn http_paths(&self) -> Vec<String> {
        self.instance
            .http_paths()
            .into_iter()
            .map(|p| p.to_string())
            .collect()
    }

    /// Flushes.
    pub fn flush(&self) -> Result<(), PluginError> {
        into_result(self.instance.flush())
    }
}

impl Drop for SinkHarness {
    fn drop(&mut self) {
        self.instance.close();
    }
}
