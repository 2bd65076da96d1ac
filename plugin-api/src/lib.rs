//! # metricsd plugin API
//!
//! Build a collector or sink for [metricsd] against this crate alone. The host loads your
//! `.so` at run time, checks that it was built against a compatible version of this crate, and
//! calls it through a stable ABI (built on [`abi_stable`]). You write ordinary Rust: no
//! `unsafe`, no `extern`, no abi_stable attributes.
//!
//! ## A collector in five steps
//!
//! 1. `cargo new --lib my-collector`, then in `Cargo.toml`:
//!    ```toml
//!    [lib]
//!    name = "metricsd_hello"           # the file is libmetricsd_<plugin name>.so
//!    crate-type = ["cdylib", "rlib"]   # cdylib for the host, rlib for your tests
//!
//!    [dependencies]
//!    metricsd-plugin-api = { git = "https://example.invalid/metricsd", tag = "plugin-api-1.0.0-for-metricsd-0.1" }
//!    serde = { version = "1", features = ["derive"] }
//!    ```
//!    (The tag names this crate's version and the first host release that loads it; a path
//!    dependency on a checkout's `plugin-api` works the same: see the crate's README.)
//! 2. Implement [`Collector`]: a `Config` type (deserialised from the instance's `config`
//!    table), `new`, and `collect`, which fills a [`BatchBuilder`].
//! 3. Export it with [`export_plugin!`].
//! 4. `cargo build --release` and copy `target/release/libmetricsd_hello.so` into a plugin
//!    directory (`/usr/lib/metricsd/plugins`, next to the `metricsd` binary, or one listed in
//!    `METRICSD_PLUGIN_PATH`). The directory and the file must not be writable by other users.
//! 5. Name it in the agent's config and check with `metricsd plugins` and `metricsd once`.
//!
//! ```
//! use metricsd_plugin_api::{export_plugin, BatchBuilder, Collector, Context, Error, Result};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! pub struct Config {
//!     #[serde(default = "default_greeting")]
//!     greeting: String,
//! }
//! fn default_greeting() -> String { "hello".into() }
//!
//! pub struct Hello { greeting: String, calls: u64 }
//!
//! impl Collector for Hello {
//!     type Config = Config;
//!
//!     // Checks of the config alone go here, not in `new`: `metricsd check` runs them.
//!     fn validate(config: &Config) -> Result<()> {
//!         if config.greeting.is_empty() {
//!             return Err(Error::config("`greeting` must not be empty"));
//!         }
//!         Ok(())
//!     }
//!
//!     fn new(config: Config, ctx: &Context) -> Result<Self> {
//!         // `tracing` comes re-exported: no dependency of its own needed.
//!         metricsd_plugin_api::tracing::info!(instance = ctx.instance(), "ready");
//!         Ok(Hello { greeting: config.greeting, calls: 0 })
//!     }
//!
//!     fn collect(&mut self, out: &mut BatchBuilder) -> Result<()> {
//!         self.calls += 1;
//!         let calls = out.counter("hello_calls_total", "Collections so far.", "");
//!         out.sample(calls, &[("greeting", &self.greeting)], self.calls as f64);
//!         Ok(())
//!     }
//! }
//!
//! export_plugin! {
//!     name: "hello",
//!     description: "Counts its own collections",
//!     collector: Hello,
//! }
//! # fn main() {}
//! ```
//!
//! ## What the host guarantees, and what it expects
//!
//! - **Call order.** [`Collector::validate`] (or [`Sink::validate`]) runs on the parsed config
//!   whenever the host reads a config: `metricsd check`, start, and each SIGHUP reload, before
//!   any instance exists. A failing `validate` is a config error: `check` and the start exit
//!   with status 2, a reload is refused and the running config kept. Then, when the pipeline
//!   starts, `new` (after `validate` again), then `collect` / `write` on the interval, and
//!   `close` once before the instance is dropped (shutdown, reload, or after a panic).
//! - **`validate` does no I/O** and returns quickly: it runs on the host's own thread without a
//!   timeout, and in `metricsd check` on a machine that may not be the node. Check what the
//!   config says there (ranges, exclusive keys, parseable URLs); open files, devices and
//!   connections in `new`.
//! - **An error from `new`.** A sink whose `new` fails is disabled (with `required = true` the
//!   agent exits with status 2 instead). A collector whose `new` fails is created again after a
//!   back-off, since what it opens can appear later (a driver loaded, a secret mounted); but a
//!   [`Error::config`] error from the first `new` of a `required = true` collector ends the
//!   start with status 2, like a failing `validate`.
//! - Calls are synchronous and made from the host's blocking threads; never two calls at once
//!   on one collector instance, nor two `write`s at once on one sink instance.
//! - A call that takes longer than the instance's `timeout` is abandoned (it may still finish)
//!   and the instance is reported stale; do not hold a lock that the next call needs forever.
//! - A panic is caught at the boundary, reported, and the instance is dropped and created
//!   again after a back-off. Build plugins with `panic = "unwind"` (the default;
//!   [`export_plugin!`] refuses `panic = "abort"`).
//! - A segfault or `abort()` in a plugin (or in a C library it loads) ends the process it runs
//!   in: the agent's, by default. An instance with `isolation = "process"` in the agent's
//!   config runs in a child process instead, restarted when it dies or when a call passes its
//!   timeout; the plugin is the same `.so` and sees the same calls.
//! - Logs from `tracing` macros reach the host's log output tagged with the instance name.
//! - Nothing async crosses the boundary. A plugin that needs async owns its runtime on a thread
//!   of its own.
//! - Return errors with a kind ([`Error::config`], [`Error::transient`], [`Error::rejected`],
//!   [`Error::fatal`]); the host decides retries, back-off and counting from the kind.
//! - Metric names follow Prometheus conventions: base units (`_bytes`, `_seconds`,
//!   `_celsius`, `_watts`, `_joules`, `_hertz`, `_ratio`), `_total` for counters, `_info` for
//!   identity series.
//!
//! Testing without the host: see [`testing`].
//!
//! [metricsd]: https://example.invalid/metricsd

#![warn(missing_docs)]

// abi_stable's `#[sabi_trait]` expansion places impls inside a generated const.
#[allow(non_local_definitions)]
pub mod abi;
mod batch;
pub mod duration;
mod error;
pub mod exposition;
pub mod log;
pub mod ratelimit;
mod sdk;
pub mod testing;

pub use abi::{
    Batch, ErrorKind, Header, HttpRequest, HttpResponse, Label, LogLevel, MetricFamily, MetricKind,
    PluginError, PluginKind, Sample,
};
pub use batch::{is_stale_marker, BatchBuilder, FamilyId, LabelSetId, STALE_NAN_BITS};
pub use error::{Error, Result};
pub use sdk::{panic_message, parse_config, Collector, Context, Sink};

#[doc(hidden)]
pub use abi_stable;
#[doc(hidden)]
pub use sdk::{
    new_collector, new_sink, not_a_collector, not_a_sink, validate_collector, validate_sink,
};
/// The `tracing` crate the SDK forwards to the host's log: `metricsd_plugin_api::tracing::info!`
/// works without a `tracing` dependency of the plugin's own.
pub use tracing;

/// The version of this interface; the host refuses plugins of another major version.
pub const API_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Exports a collector or sink type as this library's metricsd plugin.
///
/// Invoke it once, at the crate root of a `cdylib`:
///
/// ```ignore
/// export_plugin! { name: "hello", description: "Says hello", collector: Hello }
/// export_plugin! { name: "stdout", description: "JSON lines on stdout", sink: StdoutSink }
/// ```
///
/// `name` is what operators write as `plugin = "…"` in the config.
#[macro_export]
macro_rules! export_plugin {
    (name: $name:expr, description: $desc:expr, collector: $ty:ty $(,)?) => {
        $crate::__export_plugin_impl! {
            $name,
            $desc,
            $crate::abi::PluginKind::COLLECTOR,
            {
                extern "C" fn __metricsd_new_collector(
                    args: $crate::abi::InstanceArgs,
                ) -> $crate::abi_stable::std_types::RResult<
                    $crate::abi::CollectorBox,
                    $crate::abi::PluginError,
                > {
                    $crate::new_collector::<$ty>(args, $name)
                }
                __metricsd_new_collector
            },
            $crate::not_a_sink,
            {
                extern "C" fn __metricsd_validate(
                    config_json: $crate::abi_stable::std_types::RStr<'_>,
                ) -> $crate::abi_stable::std_types::RResult<(), $crate::abi::PluginError> {
                    $crate::validate_collector::<$ty>(config_json.as_str())
                }
                __metricsd_validate
            }
        }
    };
    (name: $name:expr, description: $desc:expr, sink: $ty:ty $(,)?) => {
        $crate::__export_plugin_impl! {
            $name,
            $desc,
            $crate::abi::PluginKind::SINK,
            $crate::not_a_collector,
            {
                extern "C" fn __metricsd_new_sink(
                    args: $crate::abi::InstanceArgs,
                ) -> $crate::abi_stable::std_types::RResult<
                    $crate::abi::SinkBox,
                    $crate::abi::PluginError,
                > {
                    $crate::new_sink::<$ty>(args, $name)
                }
                __metricsd_new_sink
            },
            {
                extern "C" fn __metricsd_validate(
                    config_json: $crate::abi_stable::std_types::RStr<'_>,
                ) -> $crate::abi_stable::std_types::RResult<(), $crate::abi::PluginError> {
                    $crate::validate_sink::<$ty>(config_json.as_str())
                }
                __metricsd_validate
            }
        }
    };
}

/// What abi_stable's `#[export_root_module]` generates, written out so that plugin crates need
/// no direct dependency on abi_stable (the attribute's expansion names `::abi_stable`). The
/// symbol name is abi_stable 0.11's mangled root module loader name; a unit test pins it to
/// `abi_stable::library::ROOT_MODULE_LOADER_NAME`.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_plugin_impl {
    ($name:expr, $desc:expr, $kind:expr, $new_collector:expr, $new_sink:expr, $validate:expr) => {
        // Evaluated in the plugin's crate: a panic must unwind to the SDK's guard, which turns
        // it into an error of one call; with `panic = "abort"` it would end the whole agent.
        #[cfg(panic = "abort")]
        ::core::compile_error!(
            "metricsd plugins must be built with panic = \"unwind\" (Rust's default): with panic = \"abort\" the first panic in the plugin ends the whole agent instead of failing one call. Remove `panic = \"abort\"` from the [profile] sections of this crate's (or its workspace's) Cargo.toml."
        );
        #[doc(hidden)]
        #[no_mangle]
        pub static _1as_0lib_1header_0root_bmodule_bloader: $crate::abi_stable::library::LibHeader = {
            extern "C" fn __metricsd_info() -> $crate::abi::PluginInfo {
                $crate::abi::PluginInfo {
                    name: $crate::abi_stable::std_types::RStr::from_str($name),
                    version: $crate::abi_stable::std_types::RStr::from_str(env!(
                        "CARGO_PKG_VERSION"
                    )),
                    description: $crate::abi_stable::std_types::RStr::from_str($desc),
                    kind: $kind,
                    api_version: $crate::abi_stable::std_types::RStr::from_str(
                        $crate::API_VERSION,
                    ),
                }
            }

            fn __metricsd_root_module() -> $crate::abi::PluginModuleRef {
                use $crate::abi_stable::prefix_type::PrefixTypeTrait as _;
                $crate::abi::PluginModule {
                    info: __metricsd_info,
                    new_collector: $new_collector,
                    new_sink: $new_sink,
                    validate_config: $validate,
                }
                .leak_into_prefix()
            }

            extern "C" fn __metricsd_erased_module(
            ) -> $crate::abi_stable::library::RootModuleResult {
                $crate::abi_stable::library::__call_root_module_loader(__metricsd_root_module)
            }

            // SAFETY: the constructor returns a `PluginModuleRef`, the module type the header
            // is declared with, as `#[export_root_module]` requires.
            unsafe {
                $crate::abi_stable::library::LibHeader::from_constructor::<
                    $crate::abi::PluginModuleRef,
                >(
                    __metricsd_erased_module,
                    $crate::abi_stable::library::CheckTypeLayout::Yes,
                )
            }
        };
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn exported_symbol_is_abi_stables_root_module_loader() {
        assert_eq!(
            abi_stable::library::ROOT_MODULE_LOADER_NAME,
            "_1as_0lib_1header_0root_bmodule_bloader"
        );
    }
}
