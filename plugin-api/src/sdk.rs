//! The traits plugin authors implement, and the wrappers that make them safe to call across the
//! boundary: every call runs inside `catch_unwind` (an escaped panic would make abi_stable end
//! the host process) and with the instance's log forwarding installed.

use std::any::Any;
use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RString, RVec};
use serde::de::DeserializeOwned;
use tracing::Dispatch;

use crate::abi::{
    Batch, CollectorBox, CollectorFfi, CollectorFfi_TO, ErrorKind, HttpRequest, HttpResponse,
    InstanceArgs, PluginError, SinkBox, SinkFfi, SinkFfi_TO,
};
use crate::batch::BatchBuilder;
use crate::error::{Error, Result};
use crate::log::ForwardingSubscriber;

/// What an instance learns about itself when it is created.
pub struct Context {
    instance: String,
    dispatch: Dispatch,
}

impl Context {
    /// The instance name from the host's config (e.g. `gpu`).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The log forwarding of this instance. Calls into the instance already use it; a thread
    /// the plugin spawns should run its body in
    /// `tracing::dispatcher::with_default(&dispatch, || …)` with a clone of it.
    pub fn log_dispatch(&self) -> &Dispatch {
        &self.dispatch
    }
}

/// A collector: produces one batch of samples per call.
///
/// The host calls [`collect`](Collector::collect) on its own blocking thread, on the configured
/// interval, never twice at once for one instance, and gives up waiting after the configured
/// timeout (the call is then still allowed to finish). A panic is caught by the SDK: the host
/// disables the instance and creates a new one after a back-off.
pub trait Collector: Sized + Send + 'static {
    /// The instance's `config` table. Use `#[serde(deny_unknown_fields)]` and defaults, so that
    /// an operator's typo is an error that names the key.
    type Config: DeserializeOwned;

    /// Creates an instance. A [`Error::config`] error is reported to the operator as is.
    fn new(config: Self::Config, ctx: &Context) -> Result<Self>;

    /// Checks a parsed config beyond what its type expresses (`metricsd check` calls this
    /// without creating an instance). The default accepts every config that parses.
    fn validate(config: &Self::Config) -> Result<()> {
        let _ = config;
        Ok(())
    }

    /// Collects once into `out`.
    fn collect(&mut self, out: &mut BatchBuilder) -> Result<()>;

    /// Called once before the instance is dropped on shutdown or reload.
    fn close(&mut self) {}
}

/// A sink: consumes batches, and (pull sinks) answers HTTP requests through the host.
///
/// The host never calls [`write`](Sink::write) twice at once on one instance, but
/// [`render`](Sink::render) can run at the same time as `write`: keep shared state behind a lock.
/// Push sinks only encode and send, and classify failures: [`Error::transient`] (the host retries,
/// honouring [`Error::with_retry_after`]), [`Error::rejected`] (the host drops and counts),
/// [`Error::fatal`] (the host disables the instance).
pub trait Sink: Sized + Send + Sync + 'static {
    /// The instance's `config` table.
    type Config: DeserializeOwned;

    /// Creates an instance.
    fn new(config: Self::Config, ctx: &Context) -> Result<Self>;

    /// Checks a parsed config beyond what its type expresses; see [`Collector::validate`].
    fn validate(config: &Self::Config) -> Result<()> {
        let _ = config;
        Ok(())
    }

    /// Consumes one batch (borrowed: copy what must be kept).
    fn write(&self, batch: &Batch) -> Result<()>;

    /// The HTTP paths this sink answers on the host's metrics listener (pull sinks).
    fn http_paths(&self) -> Vec<String> {
        Vec::new()
    }

    /// Answers a request on one of [`http_paths`](Sink::http_paths).
    fn render(&self, request: &HttpRequest) -> Result<HttpResponse> {
        let _ = request;
        Err(Error::config("this sink serves no HTTP paths"))
    }

    /// Pushes out anything buffered; called on shutdown.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Called once before the instance is dropped.
    fn close(&self) {}
}

/// Parses an instance's JSON config; the error names the offending key.
pub fn parse_config<T: DeserializeOwned>(config_json: &str) -> Result<T> {
    let json = if config_json.trim().is_empty() {
        "{}"
    } else {
        config_json
    };
    let de = &mut serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = strip_position(&err.inner().to_string());
        if path == "." || path.is_empty() {
            Error::config(format!("invalid config: {inner}"))
        } else {
            Error::config(format!("invalid config key `{path}`: {inner}"))
        }
    })
}

/// serde_json appends " at line 1 column 17", meaningless for a table the host serialised.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

thread_local! {
    /// Set while the SDK runs plugin code on this thread: the panic hook then records the
    /// panic here instead of printing it.
    static PANIC_SLOT: RefCell<Option<Option<String>>> = const { RefCell::new(None) };
}

fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let recorded = PANIC_SLOT.with(|slot| {
                let mut slot = slot.borrow_mut();
                match slot.as_mut() {
                    Some(record) => {
                        let location = info
                            .location()
                            .map(|l| format!(" at {}:{}", l.file(), l.line()))
                            .unwrap_or_default();
                        *record = Some(format!("{}{location}", panic_message(info.payload())));
                        true
                    }
                    None => false,
                }
            });
            if !recorded {
                previous(info);
            }
        }));
    });
}

/// The text of a panic payload (`panic!` with a message gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Runs plugin code with the instance's logging, turning a panic into a `PANIC` error.
fn guarded<T>(dispatch: &Dispatch, f: impl FnOnce() -> T) -> Result<T, PluginError> {
    install_panic_hook();
    let outer = PANIC_SLOT.with(|slot| slot.borrow_mut().replace(None));
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        tracing::dispatcher::with_default(dispatch, f)
    }));
    let recorded = PANIC_SLOT.with(|slot| std::mem::replace(&mut *slot.borrow_mut(), outer));
    result.map_err(|payload| {
        let message = recorded
            .flatten()
            .unwrap_or_else(|| panic_message(payload.as_ref()));
        PluginError {
            kind: ErrorKind::PANIC,
            message: format!("plugin panicked: {message}").into(),
            retry_after_ms: abi_stable::std_types::ROption::RNone,
        }
    })
}

fn flatten<T>(result: Result<Result<T>, PluginError>) -> RResult<T, PluginError> {
    match result {
        Ok(Ok(v)) => RResult::ROk(v),
        Ok(Err(e)) => RResult::RErr(e.into_ffi()),
        Err(panic) => RResult::RErr(panic),
    }
}

fn disabled_error() -> PluginError {
    PluginError {
        kind: ErrorKind::PANIC,
        message: "instance is disabled after a panic".into(),
        retry_after_ms: abi_stable::std_types::ROption::RNone,
    }
}

fn make_dispatch(args: &InstanceArgs, plugin: &'static str) -> Dispatch {
    static GLOBAL: Once = Once::new();
    GLOBAL.call_once(|| {
        // Events from threads the plugin spawned without an instance's dispatch go here,
        // tagged with the plugin name. Fails harmlessly when a default is already set.
        let fallback = Dispatch::new(ForwardingSubscriber::new(plugin, args.logger));
        let _ = tracing::dispatcher::set_global_default(fallback);
    });
    Dispatch::new(ForwardingSubscriber::new(&args.instance, args.logger))
}

struct CollectorAdapter<C: Collector> {
    inner: Option<C>,
    dispatch: Dispatch,
    /// Families, label sets and samples of the last batch: the next builder is made that big
    /// up front, so that a collector whose output keeps its size allocates each of the three
    /// arrays once per collection, at its final size, instead of growing it by doubling
    /// (fewer copies, and the same chunk sizes every cycle keep the malloc arena from
    /// fragmenting; docs/benchmarks-history.md, "Flat memory").
    last_sizes: (usize, usize, usize),
}

impl<C: Collector> CollectorAdapter<C> {
    fn discard(&mut self) {
        let inner = self.inner.take();
        // A panicking destructor must not escape either.
        let _ = guarded(&self.dispatch, move || drop(inner));
    }
}

impl<C: Collector> CollectorFfi for CollectorAdapter<C> {
    fn collect(&mut self) -> RResult<Batch, PluginError> {
        let Some(inner) = self.inner.as_mut() else {
            return RResult::RErr(disabled_error());
        };
        let (families, label_sets, samples) = self.last_sizes;
        let result = guarded(&self.dispatch, || {
            let mut out = BatchBuilder::with_capacities(families, label_sets, samples);
            inner.collect(&mut out)?;
            match out.conflict() {
                Some(conflict) => Err(Error::fatal(conflict.to_string())),
                None => Ok(out.finish()),
            }
        });
        if let Ok(Ok(batch)) = &result {
            self.last_sizes = (
                batch.families.len(),
                batch.label_sets.len(),
                batch.samples.len(),
            );
        }
        if result.is_err() {
            // State after a panic is unknown: never call into it again.
            self.discard();
        }
        flatten(result)
    }

    fn close(&mut self) {
        if let Some(inner) = self.inner.as_mut() {
            if guarded(&self.dispatch, || inner.close()).is_err() {
                self.discard();
            }
        }
    }
}

impl<C: Collector> Drop for CollectorAdapter<C> {
    fn drop(&mut self) {
        self.discard();
    }
}

/// Creates a collector instance; called by the code [`export_plugin!`](crate::export_plugin)
/// generates.
#[doc(hidden)]
pub fn new_collector<C: Collector>(
    args: InstanceArgs,
    plugin: &'static str,
) -> RResult<CollectorBox, PluginError> {
    let dispatch = make_dispatch(&args, plugin);
    let ctx = Context {
        instance: args.instance.to_string(),
        dispatch: dispatch.clone(),
    };
    let created = guarded(&dispatch, || {
        let config = parse_config::<C::Config>(&args.config_json)?;
        C::validate(&config)?;
        C::new(config, &ctx)
    });
    match created {
        Ok(Ok(inner)) => RResult::ROk(CollectorFfi_TO::from_value(
            CollectorAdapter {
                inner: Some(inner),
                dispatch,
                last_sizes: (0, 0, 0),
            },
            TD_Opaque,
        )),
        Ok(Err(e)) => RResult::RErr(e.into_ffi()),
        Err(panic) => RResult::RErr(panic),
    }
}

struct SinkAdapter<S: Sink> {
    inner: Option<S>,
    poisoned: AtomicBool,
    dispatch: Dispatch,
}

impl<S: Sink> SinkAdapter<S> {
    fn call<T>(&self, f: impl FnOnce(&S) -> Result<T>) -> RResult<T, PluginError> {
        let inner = match self.inner.as_ref() {
            Some(inner) if !self.poisoned.load(Ordering::Acquire) => inner,
            _ => return RResult::RErr(disabled_error()),
        };
        let result = guarded(&self.dispatch, || f(inner));
        if result.is_err() {
            self.poisoned.store(true, Ordering::Release);
        }
        flatten(result)
    }
}

impl<S: Sink> SinkFfi for SinkAdapter<S> {
    fn http_paths(&self) -> RVec<RString> {
        match self.call(|s| Ok(s.http_paths())) {
            RResult::ROk(paths) => paths.into_iter().map(RString::from).collect(),
            RResult::RErr(_) => RVec::new(),
        }
    }

    fn write(&self, batch: &Batch) -> RResult<(), PluginError> {
        self.call(|s| s.write(batch))
    }

    fn render(&self, request: &HttpRequest) -> RResult<HttpResponse, PluginError> {
        self.call(|s| s.render(request))
    }

    fn flush(&self) -> RResult<(), PluginError> {
        self.call(|s| s.flush())
    }

    fn close(&self) {
        let _ = self.call(|s| {
            s.close();
            Ok(())
        });
    }
}

impl<S: Sink> Drop for SinkAdapter<S> {
    fn drop(&mut self) {
        let inner = self.inner.take();
        let _ = guarded(&self.dispatch, move || drop(inner));
    }
}

/// Creates a sink instance; called by the code [`export_plugin!`](crate::export_plugin)
/// generates.
#[doc(hidden)]
pub fn new_sink<S: Sink>(
    args: InstanceArgs,
    plugin: &'static str,
) -> RResult<SinkBox, PluginError> {
    let dispatch = make_dispatch(&args, plugin);
    let ctx = Context {
        instance: args.instance.to_string(),
        dispatch: dispatch.clone(),
    };
    let created = guarded(&dispatch, || {
        let config = parse_config::<S::Config>(&args.config_json)?;
        S::validate(&config)?;
        S::new(config, &ctx)
    });
    match created {
        Ok(Ok(inner)) => RResult::ROk(SinkFfi_TO::from_value(
            SinkAdapter {
                inner: Some(inner),
                poisoned: AtomicBool::new(false),
                dispatch,
            },
            TD_Opaque,
        )),
        Ok(Err(e)) => RResult::RErr(e.into_ffi()),
        Err(panic) => RResult::RErr(panic),
    }
}

/// Validates a collector config; called by the code [`export_plugin!`](crate::export_plugin)
/// generates.
#[doc(hidden)]
pub fn validate_collector<C: Collector>(config_json: &str) -> RResult<(), PluginError> {
    flatten(guarded(&Dispatch::none(), || {
        C::validate(&parse_config::<C::Config>(config_json)?)
    }))
}

/// Validates a sink config; called by the code [`export_plugin!`](crate::export_plugin)
/// generates.
#[doc(hidden)]
pub fn validate_sink<S: Sink>(config_json: &str) -> RResult<(), PluginError> {
    flatten(guarded(&Dispatch::none(), || {
        S::validate(&parse_config::<S::Config>(config_json)?)
    }))
}

/// The `new_collector` entry of a sink plugin.
#[doc(hidden)]
pub extern "C" fn not_a_collector(args: InstanceArgs) -> RResult<CollectorBox, PluginError> {
    RResult::RErr(
        Error::config(format!(
            "`{}`: this plugin is a sink, not a collector",
            args.instance
        ))
        .into_ffi(),
    )
}

/// The `new_sink` entry of a collector plugin.
#[doc(hidden)]
pub extern "C" fn not_a_sink(args: InstanceArgs) -> RResult<SinkBox, PluginError> {
    RResult::RErr(
        Error::config(format!(
            "`{}`: this plugin is a collector, not a sink",
            args.instance
        ))
        .into_ffi(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Conf {
        #[serde(default)]
        count: u32,
        #[serde(default)]
        nested: Nested,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Nested {
        #[serde(default)]
        depth: u8,
    }

    #[test]
    fn config_errors_name_the_key() {
        let err = parse_config::<Conf>(r#"{"count":"many"}"#).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::CONFIG);
        assert!(err.message().contains("`count`"), "{}", err.message());
        assert!(!err.message().contains("line 1"), "{}", err.message());

        let err = parse_config::<Conf>(r#"{"nested":{"depth":1000}}"#).unwrap_err();
        assert!(
            err.message().contains("`nested.depth`"),
            "{}",
            err.message()
        );

        let err = parse_config::<Conf>(r#"{"cuont":1}"#).unwrap_err();
        assert!(
            err.message().contains("unknown field `cuont`"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn empty_config_is_an_empty_table() {
        let conf = parse_config::<Conf>("").unwrap();
        assert_eq!(conf.count, 0);
    }

    struct Fixed(usize);

    impl Collector for Fixed {
        type Config = serde_json::Value;
        fn new(_: Self::Config, _: &Context) -> Result<Self> {
            Ok(Self(0))
        }
        fn collect(&mut self, out: &mut BatchBuilder) -> Result<()> {
            self.0 += 1;
            let f = out.gauge("x", "", "");
            // Two sets, five samples (the first cycle one more of each).
            for i in 0..5 + usize::from(self.0 == 1) {
                out.sample(f, &[("i", if i % 2 == 0 { "a" } else { "b" })], 1.0);
            }
            Ok(())
        }
    }

    #[test]
    fn each_collection_starts_with_arrays_the_size_of_the_last_batch() {
        let mut adapter = CollectorAdapter {
            inner: Some(Fixed(0)),
            dispatch: Dispatch::none(),
            last_sizes: (0, 0, 0),
        };
        let first = adapter.collect().unwrap();
        assert_eq!(first.samples.len(), 6);
        let second = adapter.collect().unwrap();
        assert_eq!(second.samples.len(), 5);
        // Sized from the first batch (6), not grown by doubling (8).
        assert_eq!(second.samples.capacity(), 6);
        assert_eq!(second.label_sets.capacity(), 6);
        assert_eq!(second.families.capacity(), 1);
        let third = adapter.collect().unwrap();
        assert_eq!(third.samples.capacity(), 5);
    }

    struct Redeclares;

    impl Collector for Redeclares {
        type Config = serde_json::Value;
        fn new(_: Self::Config, _: &Context) -> Result<Self> {
            Ok(Self)
        }
        fn collect(&mut self, out: &mut BatchBuilder) -> Result<()> {
            let g = out.gauge("x_bytes", "Bytes.", "bytes");
            out.sample(g, &[], 1.0);
            // The same declaration again is fine; another kind is not.
            let again = out.gauge("x_bytes", "Bytes.", "bytes");
            assert_eq!(again, g);
            let c = out.counter("x_bytes", "Bytes.", "bytes");
            out.sample(c, &[], 2.0);
            Ok(())
        }
    }

    #[test]
    fn a_family_declared_again_with_another_kind_fails_the_collection() {
        let mut adapter = CollectorAdapter {
            inner: Some(Redeclares),
            dispatch: Dispatch::none(),
            last_sizes: (0, 0, 0),
        };
        let err = adapter.collect().unwrap_err();
        assert_eq!(err.kind, ErrorKind::FATAL);
        assert!(
            err.message
                .contains("`x_bytes` declared twice: first as gauge")
                && err.message.contains("then as counter"),
            "{}",
            err.message
        );
        // Not a panic: the instance stays and the next collection reports it again.
        assert!(adapter.inner.is_some());
    }

    #[test]
    fn error_kinds_debug_as_their_names() {
        let err = Error::fatal("gone").into_ffi();
        let text = format!("{err:?}");
        assert!(text.contains("kind: ErrorKind::FATAL"), "{text}");
        assert_eq!(format!("{:?}", ErrorKind(42)), "ErrorKind(42)");
    }

    #[test]
    fn panics_become_errors_with_message_and_location() {
        let dispatch = Dispatch::none();
        let err = guarded(&dispatch, || -> u32 { panic!("boom {}", 7) }).unwrap_err();
        assert_eq!(err.kind, ErrorKind::PANIC);
        assert!(err.message.contains("boom 7"), "{}", err.message);
        assert!(err.message.contains("sdk.rs"), "{}", err.message);
        assert_eq!(guarded(&dispatch, || 5).unwrap(), 5);
    }
}
