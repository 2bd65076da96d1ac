//! metricsd sink: Prometheus remote write 1.0. Each write is one or more protobuf
//! `WriteRequest`s, snappy block compressed, POSTed with the headers the specification
//! requires, to any receiver: VictoriaMetrics, Grafana Mimir, Thanos Receive, Cortex,
//! Prometheus with `--web.enable-remote-write-receiver`.
//!
//! The sink encodes and sends; the host buffers, spools and retries. Failures are classified
//! as the specification says: 5xx and 429 are retried (after `Retry-After` when the server
//! sends one), other 4xx are not: the refused samples are dropped, counted and the server's
//! message logged once per kind. Refused credentials (401, 403) are the one exception by
//! default: they say nothing about the data, so the points stay queued and are retried slowly
//! (`retry_on_auth_error`).

pub mod encode;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metricsd_plugin_api::log::{report_dropped, DropReason};
use metricsd_plugin_api::{export_plugin, Batch, Context, Error, Result, Sink};
use metricsd_sink_common::{
    basic_auth, body_text, check_url, http_agent, plain_message, retry_after_of, secret,
    ClientOptions,
};
use serde::Deserialize;

pub use encode::{encode, metadata, write_request, Encoded};

/// The instance's `[sinks.config]` table. Secrets come from the value itself, a file or an
/// environment variable, and never appear in logs.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The receiver's remote-write endpoint, e.g.
    /// `http://victoria-metrics:8428/api/v1/write`.
    pub url: String,
    /// Extra request headers, e.g. `X-Scope-OrgID` for a Mimir or Cortex tenant.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Bearer token (`Authorization: Bearer …`).
    pub bearer_token: Option<String>,
    /// A file holding the bearer token.
    pub bearer_token_file: Option<PathBuf>,
    /// An environment variable holding the bearer token.
    pub bearer_token_env: Option<String>,
    /// User name (basic auth).
    pub username: Option<String>,
    /// Password (basic auth).
    pub password: Option<String>,
    /// A file holding the password.
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password.
    pub password_env: Option<String>,
    /// Most samples in one request; a larger write is sent in several.
    #[serde(default = "default_max_samples")]
    pub max_samples_per_request: usize,
    /// Timeout of one HTTP request.
    #[serde(
        default = "default_request_timeout",
        with = "metricsd_plugin_api::duration"
    )]
    pub request_timeout: Duration,
    /// Send metric metadata (type, help, unit) with the series.
    #[serde(default = "yes")]
    pub send_metadata: bool,
    /// How often a family's metadata is sent again.
    #[serde(
        default = "default_metadata_interval",
        with = "metricsd_plugin_api::duration"
    )]
    pub metadata_interval: Duration,
    /// Keep the points and retry after 401 and 403 (refused credentials) instead of dropping
    /// them as the specification says for every 4xx.
    #[serde(default = "yes")]
    pub retry_on_auth_error: bool,
    /// How long to wait before retrying after 401 or 403.
    #[serde(default = "default_auth_retry", with = "metricsd_plugin_api::duration")]
    pub auth_error_retry: Duration,
    /// A PEM file of CA certificates to trust instead of the bundled web roots (https).
    pub tls_ca_file: Option<PathBuf>,
    /// Do not verify the server's certificate (testing only).
    #[serde(default)]
    pub tls_insecure_skip_verify: bool,
}

fn yes() -> bool {
    true
}

fn default_max_samples() -> usize {
    2000
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_metadata_interval() -> Duration {
    Duration::from_secs(60)
}

fn default_auth_retry() -> Duration {
    Duration::from_secs(60)
}

/// Headers the sink sets itself; `headers` cannot replace them.
const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "content-encoding",
    "content-length",
    "content-type",
    "host",
    "user-agent",
    "x-prometheus-remote-write-version",
];

/// The sink instance.
pub struct RemoteWriteSink {
    config: Config,
    agent: ureq::Agent,
    authorization: Option<String>,
    /// When each family's metadata was last accepted by the server.
    metadata_sent: Mutex<HashMap<String, Instant>>,
}

/// How one request ended.
enum Sent {
    Ok,
    /// The server refused these series for good (4xx): drop them and report why.
    Refused(String),
    /// 413: split and try the halves.
    TooLarge,
}

impl RemoteWriteSink {
    /// Checks the config and prepares the HTTP client; touches no network.
    fn build(config: Config) -> Result<Self> {
        check_url("url", &config.url)?;
        if config.max_samples_per_request == 0 {
            return Err(Error::config(
                "`max_samples_per_request` must be at least 1",
            ));
        }
        for name in config.headers.keys() {
            let lower = name.to_ascii_lowercase();
            if RESERVED_HEADERS.contains(&lower.as_str()) {
                return Err(Error::config(format!(
                    "`headers`: {name:?} is set by the sink itself (use `bearer_token` or `username`/`password` for authorization)"
                )));
            }
            if ureq::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(Error::config(format!(
                    "`headers`: {name:?} is not a valid header name"
                )));
            }
        }
        for (name, value) in &config.headers {
            if ureq::http::HeaderValue::from_str(value).is_err() {
                return Err(Error::config(format!(
                    "`headers`: the value of {name:?} is not a valid header value"
                )));
            }
        }
        let token = secret(
            "bearer_token",
            &config.bearer_token,
            &config.bearer_token_file,
            &config.bearer_token_env,
        )?;
        let password = secret(
            "password",
            &config.password,
            &config.password_file,
            &config.password_env,
        )?;
        let authorization = match (token, &config.username, password) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => return Err(Error::config(
                "a bearer token and basic auth (`username`/`password`) are alternatives: give one",
            )),
            (Some(token), None, None) => Some(format!("Bearer {token}")),
            (None, Some(user), password) => Some(basic_auth(user, &password.unwrap_or_default())),
            (None, None, Some(_)) => {
                return Err(Error::config("a password is given but no `username`"))
            }
            (None, None, None) => None,
        };
        let agent = http_agent(&ClientOptions {
            timeout: config.request_timeout,
            user_agent: concat!("metricsd-remote-write/", env!("CARGO_PKG_VERSION")),
            tls_ca_file: config.tls_ca_file.as_deref(),
            tls_insecure_skip_verify: config.tls_insecure_skip_verify,
        })?;
        Ok(Self {
            config,
            agent,
            authorization,
            metadata_sent: Mutex::new(HashMap::new()),
        })
    }

    /// Sends series `from..to` in requests of at most `max_samples_per_request` samples (a
    /// series is never split).
    fn send_series(&self, batch: &Batch, enc: &Encoded, from: usize, to: usize) -> Result<()> {
        let max = self.config.max_samples_per_request;
        let mut start = from;
        while start < to {
            let mut end = start;
            let mut samples = 0;
            while end < to && (end == start || samples + enc.series[end].samples <= max) {
                samples += enc.series[end].samples;
                end += 1;
            }
            self.send_chunk(batch, enc, start, end)?;
            start = end;
        }
        Ok(())
    }

    fn send_chunk(&self, batch: &Batch, enc: &Encoded, from: usize, to: usize) -> Result<()> {
        let families = if self.config.send_metadata {
            self.metadata_due(batch, enc, from, to)
        } else {
            Vec::new()
        };
        let metadata: Vec<metricsd_prompb::MetricMetadata> = families
            .iter()
            .filter_map(|f| metadata(batch, *f))
            .collect();
        // Without metadata the request is the series' bytes as they are: no copy.
        let with_metadata;
        let request = if metadata.is_empty() {
            enc.slice(from, to)
        } else {
            with_metadata = write_request(enc, from, to, &metadata);
            &with_metadata[..]
        };
        match self.post(request)? {
            Sent::Ok => {
                if !metadata.is_empty() {
                    let now = Instant::now();
                    let mut sent = self.metadata_sent.lock().unwrap_or_else(|p| p.into_inner());
                    for m in metadata {
                        sent.insert(m.metric_family_name, now);
                    }
                }
                Ok(())
            }
            Sent::TooLarge if to - from > 1 => {
                let mid = from + (to - from) / 2;
                tracing::debug!(
                    series = to - from,
                    "413 Payload Too Large: sending the halves"
                );
                self.send_chunk(batch, enc, from, mid)?;
                self.send_chunk(batch, enc, mid, to)
            }
            Sent::TooLarge => {
                report_dropped(
                    enc.samples_in(from, to),
                    DropReason::Rejected,
                    "one series is larger than the server accepts (HTTP 413)",
                );
                Ok(())
            }
            Sent::Refused(why) => {
                report_dropped(enc.samples_in(from, to), DropReason::Rejected, &why);
                Ok(())
            }
        }
    }

    /// The families of series `from..to` whose metadata was not accepted within
    /// `metadata_interval`.
    fn metadata_due(&self, batch: &Batch, enc: &Encoded, from: usize, to: usize) -> Vec<u32> {
        let sent = self.metadata_sent.lock().unwrap_or_else(|p| p.into_inner());
        enc.families_in(from, to)
            .into_iter()
            .filter(|f| {
                batch.families.get(*f as usize).is_some_and(|family| {
                    sent.get(family.name.as_str())
                        .is_none_or(|at| at.elapsed() >= self.config.metadata_interval)
                })
            })
            .collect()
    }

    /// One HTTP request with an uncompressed `WriteRequest`.
    fn post(&self, request: &[u8]) -> Result<Sent> {
        let body = snap::raw::Encoder::new()
            .compress_vec(request)
            .map_err(|e| Error::fatal(format!("snappy: {e}")))?;
        let mut call = self
            .agent
            .post(&self.config.url)
            .header("Content-Type", "application/x-protobuf")
            .header("Content-Encoding", "snappy")
            .header("X-Prometheus-Remote-Write-Version", "0.1.0");
        if let Some(auth) = &self.authorization {
            call = call.header("Authorization", auth);
        }
        for (name, value) in &self.config.headers {
            call = call.header(name, value);
        }
        let mut response = call
            .send(&body[..])
            .map_err(|e| Error::transient(format!("cannot reach {}: {e}", self.config.url)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(Sent::Ok);
        }
        let retry_after = retry_after_of(&response);
        let message = plain_message(&body_text(&mut response));
        let code = status.as_u16();
        let phrase = status.canonical_reason().unwrap_or("an error");
        match code {
            413 => Ok(Sent::TooLarge),
            429 | 500..=599 => {
                let mut e = Error::transient(format!("HTTP {code} {phrase}: {message}"));
                if let Some(wait) = retry_after {
                    e = e.with_retry_after(wait);
                }
                Err(e)
            }
            401 | 403 if self.config.retry_on_auth_error => {
                tracing::error!(
                    "{} refused the credentials (HTTP {code}: {message}); points stay queued, retrying in {}",
                    self.config.url,
                    humantime::format_duration(self.config.auth_error_retry)
                );
                Err(
                    Error::transient(format!("HTTP {code}: credentials refused: {message}"))
                        .with_retry_after(self.config.auth_error_retry),
                )
            }
            // The host logs a drop report once per text up to its first digit: once per kind.
            _ => Ok(Sent::Refused(format!(
                "the server refused the samples as {phrase} (HTTP {code}): {message}"
            ))),
        }
    }
}

impl Sink for RemoteWriteSink {
    type Config = Config;

    fn new(config: Config, ctx: &Context) -> Result<Self> {
        let _ = ctx;
        Self::build(config)
    }

    fn validate(config: &Config) -> Result<()> {
        // Everything `build` checks; it does not touch the network.
        Self::build(config.clone()).map(|_| ())
    }

    fn write(&self, batch: &Batch) -> Result<()> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let enc = encode(batch, now_ms);
        if enc.skipped > 0 {
            report_dropped(
                enc.skipped,
                DropReason::Invalid,
                enc.skipped_reason.as_deref().unwrap_or("cannot be encoded"),
            );
        }
        self.send_series(batch, &enc, 0, enc.series.len())
    }
}

export_plugin! {
    name: "remote_write",
    description: "Pushes samples with the Prometheus remote-write protocol (1.0, protobuf + snappy)",
    sink: RemoteWriteSink,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Result<Config> {
        metricsd_plugin_api::parse_config(json)
    }

    #[test]
    fn config_errors_name_the_problem() {
        let e = config(r#"{}"#).err().expect("url is required");
        assert!(e.message().contains("url"), "{}", e.message());
        let ok = r#"{"url":"http://127.0.0.1:8428/api/v1/write"}"#;
        assert!(RemoteWriteSink::validate(&config(ok).expect("parses")).is_ok());
        let c = config(r#"{"url":"127.0.0.1:8428"}"#).expect("parses");
        assert!(RemoteWriteSink::validate(&c).is_err());
        let c =
            config(r#"{"url":"http://x/api/v1/write","headers":{"Content-Type":"text/plain"}}"#)
                .expect("parses");
        let e = RemoteWriteSink::validate(&c).expect_err("reserved header");
        assert!(e.message().contains("set by the sink"), "{}", e.message());
        let c = config(r#"{"url":"http://x/","headers":{"bad header":"v"}}"#).expect("parses");
        assert!(RemoteWriteSink::validate(&c).is_err());
        let c = config(r#"{"url":"http://x/","bearer_token":"t","username":"u"}"#).expect("parses");
        let e = RemoteWriteSink::validate(&c).expect_err("two kinds of auth");
        assert!(e.message().contains("alternatives"), "{}", e.message());
        let c = config(r#"{"url":"http://x/","password":"p"}"#).expect("parses");
        assert!(RemoteWriteSink::validate(&c).is_err());
        let c = config(r#"{"url":"http://x/","max_samples_per_request":0}"#).expect("parses");
        assert!(RemoteWriteSink::validate(&c).is_err());
        let e = config(r#"{"url":"http://x/","max_samples":5}"#)
            .err()
            .expect("unknown key");
        assert!(e.message().contains("max_samples"), "{}", e.message());
    }

    #[test]
    fn auth_headers() {
        let c = config(r#"{"url":"http://x/","bearer_token":"abc"}"#).expect("parses");
        let sink = RemoteWriteSink::build(c).expect("builds");
        assert_eq!(sink.authorization.as_deref(), Some("Bearer abc"));
        let c = config(r#"{"url":"http://x/","username":"u","password":"p"}"#).expect("parses");
        let sink = RemoteWriteSink::build(c).expect("builds");
        assert_eq!(sink.authorization.as_deref(), Some("Basic dTpw"));
    }
}
