//! The error type plugin code returns.

use std::fmt;
use std::time::Duration;

use abi_stable::std_types::ROption;

use crate::abi::{ErrorKind, PluginError};

/// An error from plugin code. Its [`kind`](Error::kind) tells the host what to do next.
///
/// Any `std::error::Error` converts into a [`transient`](Error::transient) error with `?`, its
/// source chain joined by `: `.
pub struct Error {
    kind: ErrorKind,
    message: String,
    retry_after: Option<Duration>,
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The configuration is wrong; the instance cannot run until it is fixed.
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::CONFIG, message)
    }

    /// A failure that may go away by itself; the host tries again later.
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::TRANSIENT, message)
    }

    /// (Sinks) the server refused this data for good: the host drops it and counts it.
    pub fn rejected(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::REJECTED, message)
    }

    /// The instance cannot continue; the host disables it and reports why.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FATAL, message)
    }

    /// Asks the host to wait at least this long before retrying (e.g. from `Retry-After`).
    pub fn with_retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message for the operator.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn into_ffi(self) -> PluginError {
        PluginError {
            kind: self.kind,
            message: self.message.into(),
            retry_after_ms: match self.retry_after {
                Some(d) => ROption::RSome(d.as_millis().min(u64::MAX as u128) as u64),
                None => ROption::RNone,
            },
        }
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for Error {
    fn from(err: E) -> Self {
        let mut message = err.to_string();
        let mut source = err.source();
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        Self::transient(message)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error: {}", self.kind.as_str(), self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind.as_str())
            .field("message", &self.message)
            .field("retry_after", &self.retry_after)
            .finish()
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PluginError {}
