//! The types that cross the boundary between the host and a plugin `.so`.
//!
//! Everything here is `#[repr(C)]` and derives [`StableAbi`], so abi_stable can check at load
//! time that the host and the plugin agree on every layout. Plugin authors rarely touch these
//! types directly: implement [`Collector`](crate::Collector) or [`Sink`](crate::Sink) and let
//! [`export_plugin!`](crate::export_plugin) generate the glue.
//!
//! Compatibility rules (see the crate README):
//! - the root module [`PluginModule`] is a prefix type: fields may be appended in a minor version;
//! - the trait objects ([`CollectorFfi`], [`SinkFfi`]) are prefix vtables: methods may be appended
//!   in a minor version;
//! - plain structs are frozen; sets that may grow are `#[repr(transparent)]` integers with
//!   associated constants, never exhaustive enums.

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RBox, ROption, RResult, RStr, RString, RVec},
    StableAbi,
};

/// Name under which the root module is exported; shared by every metricsd plugin.
pub const ROOT_MODULE_NAME: &str = "metricsd_plugin";

/// The kind of a metric family, a `u8` so that kinds can be added without breaking the ABI.
#[repr(transparent)]
#[derive(
    StableAbi, Copy, Clone, PartialEq, Eq, Hash, Debug, serde::Serialize, serde::Deserialize,
)]
pub struct MetricKind(pub u8);

impl MetricKind {
    /// A value that can go up and down.
    pub const GAUGE: Self = Self(0);
    /// A monotonically increasing value (name ends in `_total`); resets only on restart.
    pub const COUNTER: Self = Self(1);
    /// A value whose kind is not known.
    pub const UNTYPED: Self = Self(2);
    /// An identity series: value 1, the information is in the labels (name ends in `_info`).
    pub const INFO: Self = Self(3);

    /// The lower-case name used in exposition formats (`gauge`, `counter`, `untyped`, `info`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GAUGE => "gauge",
            Self::COUNTER => "counter",
            Self::INFO => "info",
            _ => "untyped",
        }
    }
}

/// One label pair of a sample.
#[repr(C)]
#[derive(
    StableAbi,
    Clone,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Label {
    /// Label name, `[a-zA-Z_][a-zA-Z0-9_]*`.
    pub name: RString,
    /// Label value, any UTF-8.
    pub value: RString,
}

impl Label {
    /// A label pair.
    pub fn new(name: impl Into<RString>, value: impl Into<RString>) -> Self {
        Self {
            name: name.into(),
            value: value.into(),
        }
    }
}

/// Describes a metric family once per batch; samples refer to it by index.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MetricFamily {
    /// Metric name, `[a-zA-Z_:][a-zA-Z0-9_:]*`, in Prometheus conventions (base units,
    /// `_total` for counters).
    pub name: RString,
    /// One line of help text.
    pub help: RString,
    /// Base unit (`bytes`, `seconds`, `celsius`, `watts`, `joules`, `hertz`, `ratio`), or empty.
    pub unit: RString,
    /// Gauge, counter, untyped or info.
    pub kind: MetricKind,
}

/// One sample: a value of one family with one label set.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    /// Index into [`Batch::families`].
    pub family: u32,
    /// Index into [`Batch::label_sets`] (the batch's `common_labels` apply as well).
    pub labels: u32,
    /// The value.
    pub value: f64,
    /// Milliseconds since the Unix epoch; `None` means "the batch's timestamp".
    pub timestamp_ms: ROption<i64>,
}

/// The unit of exchange: the result of one collection, or what one sink write receives.
///
/// Families are listed once, and so are label sets; samples refer to both by index. A GPU's
/// identity labels (`gpu`, `uuid`, `name`, `pci_bus_id`) are one label set shared by all of
/// that GPU's samples, so a sample costs no allocation. `common_labels` apply to every sample
/// (the host adds the node's static labels there); a sample's own label of the same name wins.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Batch {
    /// The metric families that samples refer to.
    pub families: RVec<MetricFamily>,
    /// The label sets that samples refer to.
    pub label_sets: RVec<RVec<Label>>,
    /// The samples.
    pub samples: RVec<Sample>,
    /// Labels that apply to every sample of the batch.
    pub common_labels: RVec<Label>,
    /// When the batch was collected (ms since the Unix epoch); the host sets it if a collector
    /// leaves it `None`.
    pub timestamp_ms: ROption<i64>,
}

/// What went wrong, a `u8` so that kinds can be added without breaking the ABI.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, PartialEq, Eq, Hash)]
pub struct ErrorKind(pub u8);

/// `ErrorKind::FATAL`, not `ErrorKind(4)`: the constant's name, or the number for a kind this
/// version does not know.
impl std::fmt::Debug for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.as_str() {
            "unknown" => write!(f, "ErrorKind({})", self.0),
            name => write!(f, "ErrorKind::{}", name.to_ascii_uppercase()),
        }
    }
}

impl ErrorKind {
    /// The instance's configuration is wrong; it cannot run until the config is fixed.
    pub const CONFIG: Self = Self(1);
    /// A failure that may go away by itself (server down, device busy): try again later.
    pub const TRANSIENT: Self = Self(2);
    /// A sink's server refused this data for good: drop it and count it, do not retry.
    pub const REJECTED: Self = Self(3);
    /// The instance cannot continue (for example credentials refused): disable it and report.
    pub const FATAL: Self = Self(4);
    /// The plugin panicked; set by the SDK wrapper, never by plugin code.
    pub const PANIC: Self = Self(5);

    /// A short lower-case name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CONFIG => "config",
            Self::TRANSIENT => "transient",
            Self::REJECTED => "rejected",
            Self::FATAL => "fatal",
            Self::PANIC => "panic",
            _ => "unknown",
        }
    }
}

/// An error returned across the boundary.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct PluginError {
    /// What kind of failure this is; decides what the host does next.
    pub kind: ErrorKind,
    /// A message for the operator.
    pub message: RString,
    /// For transient failures: the server asked to wait this long before retrying.
    pub retry_after_ms: ROption<u64>,
}

/// A log level, a `u8` for ABI stability; lower is more severe.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct LogLevel(pub u8);

impl LogLevel {
    /// Logging disabled.
    pub const OFF: Self = Self(0);
    /// Errors.
    pub const ERROR: Self = Self(1);
    /// Warnings.
    pub const WARN: Self = Self(2);
    /// Information.
    pub const INFO: Self = Self(3);
    /// Debugging.
    pub const DEBUG: Self = Self(4);
    /// Tracing.
    pub const TRACE: Self = Self(5);
}

/// The callback through which a plugin's log events reach the host's `tracing` output.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug)]
pub struct HostLogger {
    /// Called for every event at or below `max_level`: instance name, level, target, message.
    pub log: extern "C" fn(RStr<'_>, LogLevel, RStr<'_>, RStr<'_>),
    /// The most verbose level the host wants; the plugin filters before calling.
    pub max_level: LogLevel,
}

/// What the host hands to a plugin to create an instance.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct InstanceArgs {
    /// The instance name from the config (unique within the agent).
    pub instance: RString,
    /// The instance's `config` table serialised as JSON (an empty object when absent).
    pub config_json: RString,
    /// Where the instance's logs go.
    pub logger: HostLogger,
}

/// Whether a plugin provides a collector or a sink.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, PartialEq, Eq, Hash, Debug)]
pub struct PluginKind(pub u8);

impl PluginKind {
    /// Produces samples.
    pub const COLLECTOR: Self = Self(1);
    /// Consumes samples.
    pub const SINK: Self = Self(2);

    /// `collector` or `sink`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::COLLECTOR => "collector",
            Self::SINK => "sink",
            _ => "unknown",
        }
    }
}

/// Static description of a plugin.
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug)]
pub struct PluginInfo {
    /// The name operators use in the config (`plugin = "…"`).
    pub name: RStr<'static>,
    /// The plugin's own version.
    pub version: RStr<'static>,
    /// One line describing what it does.
    pub description: RStr<'static>,
    /// Collector or sink.
    pub kind: PluginKind,
    /// The plugin-api version the plugin was built against.
    pub api_version: RStr<'static>,
}

/// An HTTP header.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Header name, lower case.
    pub name: RString,
    /// Header value.
    pub value: RString,
}

/// A request the host received on a path a pull sink registered.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default)]
pub struct HttpRequest {
    /// `GET`, `HEAD`, …
    pub method: RString,
    /// The path, e.g. `/metrics`.
    pub path: RString,
    /// The raw query string without `?`, possibly empty.
    pub query: RString,
    /// Request headers, names lower case.
    pub headers: RVec<Header>,
}

impl HttpRequest {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name.as_str().eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }
}

/// A pull sink's answer to an [`HttpRequest`].
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default)]
pub struct HttpResponse {
    /// HTTP status code.
    pub status: u16,
    /// `Content-Type` of the body.
    pub content_type: RString,
    /// Further headers (e.g. `content-encoding`).
    pub headers: RVec<Header>,
    /// The body.
    pub body: RVec<u8>,
}

/// The ABI-level collector interface. Implement [`Collector`](crate::Collector) instead.
#[sabi_trait]
pub trait CollectorFfi: Send {
    /// Collect once and return the batch.
    fn collect(&mut self) -> RResult<Batch, PluginError>;

    /// Release resources; the instance is dropped afterwards.
    #[sabi(last_prefix_field)]
    fn close(&mut self);
}

/// An owned collector instance.
pub type CollectorBox = CollectorFfi_TO<'static, RBox<()>>;

/// The ABI-level sink interface. Implement [`Sink`](crate::Sink) instead.
#[sabi_trait]
pub trait SinkFfi: Send + Sync {
    /// Paths this sink answers on the host's metrics listener (pull sinks), e.g. `/metrics`.
    fn http_paths(&self) -> RVec<RString>;

    /// Consume one batch. The host never calls `write` twice at once on one instance.
    fn write(&self, batch: &Batch) -> RResult<(), PluginError>;

    /// Answer a request on one of the registered paths; may run alongside `write`.
    fn render(&self, request: &HttpRequest) -> RResult<HttpResponse, PluginError>;

    /// Push out anything buffered (called on shutdown).
    fn flush(&self) -> RResult<(), PluginError>;

    /// Release resources; the instance is dropped afterwards.
    #[sabi(last_prefix_field)]
    fn close(&self);
}

/// An owned sink instance.
pub type SinkBox = SinkFfi_TO<'static, RBox<()>>;

/// The root module every plugin exports (generated by [`export_plugin!`](crate::export_plugin)).
///
/// A prefix type: fields can be appended in later minor versions of plugin-api.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    /// Describes the plugin.
    pub info: extern "C" fn() -> PluginInfo,
    /// Creates a collector instance (a sink plugin answers with a `CONFIG` error).
    pub new_collector: extern "C" fn(InstanceArgs) -> RResult<CollectorBox, PluginError>,
    /// Creates a sink instance (a collector plugin answers with a `CONFIG` error).
    pub new_sink: extern "C" fn(InstanceArgs) -> RResult<SinkBox, PluginError>,
    /// Checks an instance's JSON config without creating anything (used by `metricsd check`).
    #[sabi(last_prefix_field)]
    pub validate_config: extern "C" fn(RStr<'_>) -> RResult<(), PluginError>,
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = ROOT_MODULE_NAME;
    const NAME: &'static str = ROOT_MODULE_NAME;
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
