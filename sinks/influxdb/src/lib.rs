//! metricsd sink: InfluxDB line protocol over HTTP, to the v1 write API (`/write`, database,
//! retention policy, user and password) or the v2 one (`/api/v2/write`, org, bucket, token).
//!
//! The sink encodes and sends; the host buffers and retries. Each failure is classified for
//! the host: connection errors, 429 and 5xx are retryable (honouring `Retry-After`); 401, 403
//! and 404 are configuration errors, logged loudly and retried slowly (points stay buffered
//! until the operator fixes the server or the config); 413 splits the request; a 400 (bad line,
//! partial write) drops only what the server refused and reports how many samples that was.

pub mod line;

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metricsd_sink_common::{
    basic_auth, body_text_up_to, check_url, http_agent, plain_message, retry_after_of, secret,
    ClientOptions,
};

use metricsd_plugin_api::log::{report_altered, report_dropped, DropReason};
use metricsd_plugin_api::{export_plugin, Batch, Context, Error, Result, Sink};
use serde::Deserialize;

pub use line::{encode, Encoded, Layout, Precision};

/// Which write API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// InfluxDB 1.x: `/write?db=&rp=&precision=`, basic auth.
    #[default]
    V1,
    /// InfluxDB 2.x / 3.x and compatible servers: `/api/v2/write?org=&bucket=&precision=`,
    /// `Authorization: Token`.
    V2,
}

/// The instance's `[sinks.config]` table. Secrets come from the value itself, a file or an
/// environment variable, and never appear in logs.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Base URL of the server.
    #[serde(default = "default_url")]
    pub url: String,
    /// `v1` (default) or `v2`.
    #[serde(default)]
    pub api: Api,
    /// v1: the database (required for v1).
    pub database: Option<String>,
    /// v1: the retention policy written to (the database's default when unset; `metricsd`
    /// when `create_database` creates one).
    pub retention_policy: Option<String>,
    /// v1: user name (basic auth).
    pub username: Option<String>,
    /// v1: password.
    pub password: Option<String>,
    /// v1: a file holding the password.
    pub password_file: Option<PathBuf>,
    /// v1: an environment variable holding the password.
    pub password_env: Option<String>,
    /// v2: organisation.
    pub org: Option<String>,
    /// v2: bucket.
    pub bucket: Option<String>,
    /// v2: API token.
    pub token: Option<String>,
    /// v2: a file holding the token.
    pub token_file: Option<PathBuf>,
    /// v2: an environment variable holding the token.
    pub token_env: Option<String>,
    /// Timestamp precision: `s`, `ms` (default), `us`, `ns`.
    #[serde(default)]
    pub precision: Precision,
    /// `grouped` (default) or `per_metric`.
    #[serde(default)]
    pub layout: Layout,
    /// Compress request bodies with gzip.
    #[serde(default = "yes")]
    pub gzip: bool,
    /// Most lines in one request; a larger batch is sent in several.
    #[serde(default = "default_max_lines")]
    pub max_lines_per_request: usize,
    /// Timeout of one HTTP request.
    #[serde(
        default = "default_request_timeout",
        with = "metricsd_plugin_api::duration"
    )]
    pub request_timeout: Duration,
    /// v1: create the database and the retention policy on start-up (and again after a 404).
    #[serde(default)]
    pub create_database: bool,
    /// v1: how long the created retention policy keeps data (`0s`: forever).
    #[serde(default = "default_retention", with = "metricsd_plugin_api::duration")]
    pub retention_duration: Duration,
    /// How long to wait before retrying after 401, 403 or 404 (a configuration problem).
    #[serde(default = "default_auth_retry", with = "metricsd_plugin_api::duration")]
    pub config_error_retry: Duration,
    /// A PEM file of CA certificates to trust instead of the bundled web roots (https).
    pub tls_ca_file: Option<PathBuf>,
    /// Do not verify the server's certificate (testing only).
    #[serde(default)]
    pub tls_insecure_skip_verify: bool,
}

fn default_url() -> String {
    "http://127.0.0.1:8086".to_string()
}

fn yes() -> bool {
    true
}

fn default_max_lines() -> usize {
    5000
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_retention() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}

fn default_auth_retry() -> Duration {
    Duration::from_secs(60)
}

/// Quotes an InfluxQL identifier.
fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The sink instance.
pub struct InfluxSink {
    config: Config,
    agent: ureq::Agent,
    write_url: String,
    /// v1 basic auth or v2 token: the `Authorization` header value.
    authorization: Option<String>,
    /// The retention policy written to (v1).
    retention_policy: Option<String>,
    /// Whether the database and retention policy still have to be created.
    create_pending: AtomicBool,
}

/// How one request ended.
enum Sent {
    Ok,
    /// The server refused lines of `from..to` for good (400 and other 4xx): drop them and
    /// report. The text for the log, and the server's message (a partial write says which).
    Refused(String, String),
    /// 413: split and try the halves.
    TooLarge,
}

impl InfluxSink {
    /// Checks the config and prepares the HTTP client; touches no network.
    fn build(config: Config) -> Result<Self> {
        let base = check_url("url", &config.url)?;
        if config.max_lines_per_request == 0 {
            return Err(Error::config("`max_lines_per_request` must be at least 1"));
        }
        let (write_url, authorization, retention_policy) = match config.api {
            Api::V1 => {
                let db = config
                    .database
                    .as_deref()
                    .ok_or_else(|| Error::config("`database` is required with api = \"v1\""))?;
                if config.org.is_some() || config.bucket.is_some() || config.token.is_some() {
                    return Err(Error::config(
                        "`org`, `bucket` and `token` belong to api = \"v2\"; v1 uses `database`, `username` and `password`",
                    ));
                }
                let password = secret(
                    "password",
                    &config.password,
                    &config.password_file,
                    &config.password_env,
                )?;
                let auth = match (&config.username, password) {
                    (Some(user), password) => Some(basic_auth(user, &password.unwrap_or_default())),
                    (None, Some(_)) => {
                        return Err(Error::config("a password is given but no `username`"))
                    }
                    (None, None) => None,
                };
                let rp = config
                    .retention_policy
                    .clone()
                    .or_else(|| config.create_database.then(|| "metricsd".to_string()));
                let mut url = format!(
                    "{base}/write?db={}&precision={}",
                    encode_query(db),
                    config.precision.as_str()
                );
                if let Some(rp) = &rp {
                    url.push_str("&rp=");
                    url.push_str(&encode_query(rp));
                }
                (url, auth, rp)
            }
            Api::V2 => {
                let (Some(org), Some(bucket)) = (&config.org, &config.bucket) else {
                    return Err(Error::config(
                        "`org` and `bucket` are required with api = \"v2\"",
                    ));
                };
                if config.database.is_some() || config.create_database {
                    return Err(Error::config(
                        "`database` and `create_database` belong to api = \"v1\"; v2 writes to `bucket`, whose retention is set on the server",
                    ));
                }
                let token = secret(
                    "token",
                    &config.token,
                    &config.token_file,
                    &config.token_env,
                )?
                .ok_or_else(|| {
                    Error::config("api = \"v2\" needs `token`, `token_file` or `token_env`")
                })?;
                let url = format!(
                    "{base}/api/v2/write?org={}&bucket={}&precision={}",
                    encode_query(org),
                    encode_query(bucket),
                    config.precision.as_str()
                );
                (url, Some(format!("Token {token}")), None)
            }
        };
        let agent = http_agent(&ClientOptions {
            timeout: config.request_timeout,
            user_agent: concat!("metricsd-influxdb/", env!("CARGO_PKG_VERSION")),
            tls_ca_file: config.tls_ca_file.as_deref(),
            tls_insecure_skip_verify: config.tls_insecure_skip_verify,
        })?;
        let create_pending = AtomicBool::new(config.create_database);
        Ok(Self {
            config,
            agent,
            write_url,
            authorization,
            retention_policy,
            create_pending,
        })
    }

    /// Runs an InfluxQL statement through `/query` (v1).
    fn query(&self, q: &str) -> std::result::Result<(), String> {
        let url = format!("{}/query", self.config.url.trim_end_matches('/'));
        let mut request = self.agent.post(&url);
        if let Some(auth) = &self.authorization {
            request = request.header("Authorization", auth);
        }
        let mut response = request
            .send_form([("q", q)])
            .map_err(|e| format!("cannot reach {}: {e}", self.config.url))?;
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().unwrap_or_default();
        // InfluxDB 1.x answers 200 with {"results":[{"error":"..."}]} for statement errors.
        if status == 200 && !body.contains("\"error\"") {
            Ok(())
        } else {
            Err(format!("HTTP {status}: {}", server_message(&body)))
        }
    }

    /// Creates the database and its retention policy (v1, `create_database`).
    fn create_database(&self) -> Result<()> {
        let (Some(db), Some(rp)) = (&self.config.database, &self.retention_policy) else {
            return Ok(());
        };
        let duration = if self.config.retention_duration.is_zero() {
            "INF".to_string()
        } else {
            format!("{}s", self.config.retention_duration.as_secs().max(3600))
        };
        let created = self
            .query(&format!("CREATE DATABASE {}", ident(db)))
            .and_then(|()| {
                match self.query(&format!(
                    "CREATE RETENTION POLICY {} ON {} DURATION {duration} REPLICATION 1",
                    ident(rp),
                    ident(db)
                )) {
                    Err(e) if e.contains("already exists") => self.query(&format!(
                        "ALTER RETENTION POLICY {} ON {} DURATION {duration}",
                        ident(rp),
                        ident(db)
                    )),
                    other => other,
                }
            });
        match created {
            Ok(()) => {
                tracing::info!(
                    "database {db:?} and retention policy {rp:?} ({}) are in place",
                    if duration == "INF" {
                        "kept forever".to_string()
                    } else {
                        format!(
                            "{}",
                            humantime::format_duration(self.config.retention_duration)
                        )
                    }
                );
                self.create_pending.store(false, Ordering::Relaxed);
                Ok(())
            }
            Err(e) if e.starts_with("HTTP 401") || e.starts_with("HTTP 403") => {
                tracing::error!(
                    "cannot create database {db:?}: the server refused the credentials ({e}); retrying in {}",
                    humantime::format_duration(self.config.config_error_retry)
                );
                Err(Error::transient(format!("creating database {db:?}: {e}"))
                    .with_retry_after(self.config.config_error_retry))
            }
            Err(e) => Err(Error::transient(format!("creating database {db:?}: {e}"))),
        }
    }

    /// Sends lines `from..to`, splitting on 413 and by `max_lines_per_request`.
    fn send_lines(&self, enc: &Encoded, from: usize, to: usize) -> Result<()> {
        let mut start = from;
        while start < to {
            let end = (start + self.config.max_lines_per_request).min(to);
            self.send_chunk(enc, start, end)?;
            start = end;
        }
        Ok(())
    }

    fn send_chunk(&self, enc: &Encoded, from: usize, to: usize) -> Result<()> {
        match self.post(enc.slice(from, to))? {
            Sent::Ok => Ok(()),
            Sent::TooLarge if to - from > 1 => {
                let mid = from + (to - from) / 2;
                tracing::debug!(
                    lines = to - from,
                    "413 Request Entity Too Large: sending the halves"
                );
                self.send_chunk(enc, from, mid)?;
                self.send_chunk(enc, mid, to)
            }
            Sent::TooLarge => {
                report_dropped(
                    enc.samples_in(from, to),
                    DropReason::Rejected,
                    "one line is larger than the server accepts (413)",
                );
                Ok(())
            }
            Sent::Refused(text, message) => {
                let lines = to - from;
                // A partial write keeps the good lines; the server says which it refused.
                let (dropped_lines, dropped) = partial_write_refused(enc, from, to, &message)
                    .unwrap_or((lines, enc.samples_in(from, to)));
                report_dropped(
                    dropped,
                    DropReason::Rejected,
                    &format!(
                        "InfluxDB refused {dropped_lines} of {lines} lines: {}",
                        shorten(&text, 500)
                    ),
                );
                Ok(())
            }
        }
    }

    /// One HTTP request with the given lines.
    fn post(&self, lines: &[u8]) -> Result<Sent> {
        let mut request = self
            .agent
            .post(&self.write_url)
            .header("Content-Type", "text/plain; charset=utf-8");
        if let Some(auth) = &self.authorization {
            request = request.header("Authorization", auth);
        }
        let result = if self.config.gzip {
            let mut gz = flate2::write::GzEncoder::new(
                Vec::with_capacity(lines.len() / 4),
                flate2::Compression::fast(),
            );
            gz.write_all(lines)
                .and_then(|()| gz.finish())
                .map_err(|e| Error::fatal(format!("gzip: {e}")))
                .map(|body| request.header("Content-Encoding", "gzip").send(&body[..]))?
        } else {
            request.send(lines)
        };
        let mut response = result.map_err(|e| {
            Error::transient(format!("cannot reach InfluxDB at {}: {e}", self.config.url))
        })?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(Sent::Ok);
        }
        let retry_after = retry_after_of(&response);
        // InfluxDB echoes every refused line: read enough to count them.
        let body = body_text_up_to(&mut response, 16 * 1024 * 1024);
        let message = server_message(&body);
        match status {
            413 => Ok(Sent::TooLarge),
            401 | 403 => {
                tracing::error!(
                    "InfluxDB at {} refused the credentials (HTTP {status}: {message}); points stay buffered, retrying in {}",
                    self.config.url,
                    humantime::format_duration(self.config.config_error_retry)
                );
                Err(
                    Error::transient(format!("HTTP {status}: credentials refused: {message}"))
                        .with_retry_after(self.config.config_error_retry),
                )
            }
            404 => {
                if self.config.create_database {
                    self.create_pending.store(true, Ordering::Relaxed);
                }
                let target = match self.config.api {
                    Api::V1 => format!(
                        "database {:?}",
                        self.config.database.as_deref().unwrap_or_default()
                    ),
                    Api::V2 => format!(
                        "org {:?} / bucket {:?}",
                        self.config.org.as_deref().unwrap_or_default(),
                        self.config.bucket.as_deref().unwrap_or_default()
                    ),
                };
                tracing::error!(
                    "InfluxDB at {} has no {target} (HTTP 404: {message}); points stay buffered, retrying in {}",
                    self.config.url,
                    humantime::format_duration(self.config.config_error_retry)
                );
                Err(
                    Error::transient(format!("HTTP 404: {target} not found: {message}"))
                        .with_retry_after(self.config.config_error_retry),
                )
            }
            429 | 500..=599 => {
                let mut e = Error::transient(format!("HTTP {status}: {message}"));
                if let Some(wait) = retry_after {
                    e = e.with_retry_after(wait);
                }
                Err(e)
            }
            _ => Ok(Sent::Refused(format!("HTTP {status}: {message}"), message)),
        }
    }
}

/// The server's error text: InfluxDB 1.x `{"error":"..."}`, 2.x `{"code":..,"message":".."}`,
/// or the body as it is.
fn server_message(body: &str) -> String {
    #[derive(Deserialize)]
    struct V1 {
        error: String,
    }
    #[derive(Deserialize)]
    struct V2 {
        message: String,
    }
    #[derive(Deserialize)]
    struct Query {
        results: Vec<QueryResult>,
    }
    #[derive(Deserialize)]
    struct QueryResult {
        error: Option<String>,
    }
    if let Ok(v) = serde_json::from_str::<V1>(body) {
        return v.error;
    }
    if let Ok(v) = serde_json::from_str::<V2>(body) {
        return v.message;
    }
    if let Ok(q) = serde_json::from_str::<Query>(body) {
        if let Some(e) = q.results.into_iter().find_map(|r| r.error) {
            return e;
        }
    }
    plain_message(body)
}

/// At most `max` bytes of `text` (at a character boundary), marked when cut.
fn shorten(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len()).into()
}

/// The lines and samples of `from..to` that a partial write refused, from the server's
/// `message`; `None` when it is not a partial write (every line refused).
///
/// InfluxDB 1.x names each line it cannot parse (`unable to parse '…'`), and counts the parsed
/// points it refused (a field type conflict, outside the retention policy) in `dropped=N`,
/// naming the field and measurement of the first conflict only. Samples are exact when the
/// named lines are found, when the conflict's measurement and field match exactly N lines, or
/// when the candidate lines all carry the same number of fields; otherwise they are the
/// lines' average (rounded up).
fn partial_write_refused(
    enc: &Encoded,
    from: usize,
    to: usize,
    message: &str,
) -> Option<(usize, usize)> {
    if !message.contains("partial write") {
        return None;
    }
    let line = |i: usize| {
        let bytes = enc.slice(i, i + 1);
        bytes.strip_suffix(b"\n").unwrap_or(bytes)
    };
    let samples = |i: usize| enc.samples_in(i, i + 1);
    let mut refused = vec![false; to - from];
    let mut lines = 0;
    let mut dropped = 0;
    let mut unnamed = 0;
    const UNPARSABLE: &str = "unable to parse '";
    for (at, _) in message.match_indices(UNPARSABLE) {
        let rest = &message.as_bytes()[at + UNPARSABLE.len()..];
        let found = (from..to).find(|&i| {
            let l = line(i);
            !refused[i - from] && rest.starts_with(l) && rest[l.len()..].starts_with(b"': ")
        });
        match found {
            Some(i) => {
                refused[i - from] = true;
                dropped += samples(i);
            }
            None => unnamed += 1,
        }
        lines += 1;
    }
    let points = message.rfind("dropped=").map_or(0, |at| {
        message[at + 8..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or(0)
    });
    let rest: Vec<usize> = (from..to).filter(|&i| !refused[i - from]).collect();
    let estimate = |n: usize| {
        let total: usize = rest.iter().map(|&i| samples(i)).sum();
        (n * total).div_ceil(rest.len().max(1))
    };
    if points > 0 {
        let conflict = message
            .split_once("input field \"")
            .and_then(|(_, r)| r.split_once("\" on measurement \""))
            .and_then(|(field, r)| Some((field, r.split_once("\" is type")?.0)));
        let candidates: Vec<usize> = conflict
            .map(|(field, measurement)| {
                rest.iter()
                    .copied()
                    .filter(|&i| {
                        let (m, fields) = crate::line::line_shape(line(i));
                        m == measurement && fields.iter().any(|f| f == field)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let same = rest.first().map(|&i| samples(i));
        dropped += if candidates.len() == points {
            candidates.iter().map(|&i| samples(i)).sum()
        } else if rest.iter().all(|&i| Some(samples(i)) == same) {
            points * same.unwrap_or(0)
        } else {
            estimate(points)
        };
        lines += points;
    }
    // Unparsable lines not found among ours (an echo cut short): the average.
    dropped += estimate(unnamed);
    let lines = lines.min(to - from);
    Some((lines, dropped.min(enc.samples_in(from, to))))
}

/// Percent-encodes a query parameter value.
fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Sink for InfluxSink {
    type Config = Config;

    fn new(config: Config, ctx: &Context) -> Result<Self> {
        let _ = ctx;
        let sink = Self::build(config)?;
        if sink.create_pending.load(Ordering::Relaxed) {
            // Not fatal: a server that is down now gets the database at the first write.
            if let Err(e) = sink.create_database() {
                tracing::warn!("{}; trying again before the next write", e.message());
            }
        }
        Ok(sink)
    }

    fn validate(config: &Config) -> Result<()> {
        // Everything `build` checks; it does not touch the network.
        Self::build(config.clone()).map(|_| ())
    }

    fn write(&self, batch: &Batch) -> Result<()> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let enc = encode(batch, self.config.layout, self.config.precision, now_ms);
        if enc.altered > 0 {
            report_altered(
                enc.altered,
                enc.altered_reason.as_deref().unwrap_or("a label changed"),
            );
        }
        if enc.skipped > 0 {
            report_dropped(
                enc.skipped,
                DropReason::Invalid,
                enc.skipped_reason.as_deref().unwrap_or("cannot be encoded"),
            );
        }
        if enc.lines.is_empty() {
            return Ok(());
        }
        if self.create_pending.load(Ordering::Relaxed) {
            self.create_database()?;
        }
        self.send_lines(&enc, 0, enc.lines.len())
    }
}

export_plugin! {
    name: "influxdb",
    description: "Writes InfluxDB line protocol over HTTP (v1 /write or v2 /api/v2/write)",
    sink: InfluxSink,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as the encoder lays them out: (text, samples).
    fn encoded(lines: &[(&str, usize)]) -> Encoded {
        let mut enc = Encoded::default();
        for (text, samples) in lines {
            enc.body.extend_from_slice(text.as_bytes());
            enc.body.push(b'\n');
            enc.lines.push((enc.body.len(), *samples));
        }
        enc
    }

    #[test]
    fn partial_write_counts_come_from_the_message() {
        let enc = encoded(&[
            ("m,a=1 value=1,other=2 1", 2),
            ("m,a=2 value=1 1", 1),
            ("n,a=1 x=1,y=2,z=3 1", 3),
            ("m\\ x,a=3 value=1,w=1 1", 2),
        ]);
        let n = enc.lines.len();
        // A conflict on field `value` of `m`: exactly the three lines with it, 5 samples.
        assert_eq!(
            partial_write_refused(&enc, 0, n, "partial write: field type conflict: input field \"value\" on measurement \"m\" is type integer, already exists as type float dropped=2"),
            Some((2, 3))
        );
        assert_eq!(
            partial_write_refused(&enc, 0, n, "partial write: field type conflict: input field \"value\" on measurement \"m x\" is type integer, already exists as type float dropped=1"),
            Some((1, 2)),
            "an escaped measurement name"
        );
        // Two unparsable lines, named (what InfluxDB 1.8 answers), one of them odd.
        assert_eq!(
            partial_write_refused(&enc, 0, n, "partial write: unable to parse 'n,a=1 x=1,y=2,z=3 1': bad\nunable to parse 'm,a=2 value=1 1': bad dropped=0"),
            Some((2, 4))
        );
        // Refused points the message does not name, lines of different sizes: the average.
        assert_eq!(
            partial_write_refused(
                &enc,
                0,
                n,
                "partial write: points beyond retention policy dropped=2"
            ),
            Some((2, 4))
        );
        // ... and of one size: exact.
        let even = encoded(&[("a x=1 1", 1), ("b x=1 1", 1), ("c x=1 1", 1)]);
        assert_eq!(
            partial_write_refused(
                &even,
                0,
                3,
                "partial write: points beyond retention policy dropped=2"
            ),
            Some((2, 2))
        );
        assert_eq!(
            partial_write_refused(&enc, 0, n, "unable to parse 'x': bad"),
            None
        );
        // A message longer than any log line: the count is at its end.
        let long = format!(
            "partial write: unable to parse '{}': bad dropped=4",
            "x".repeat(200_000)
        );
        assert_eq!(partial_write_refused(&even, 0, 3, &long), Some((3, 3)));
        assert!(shorten(&long, 500).len() < 600);
    }

    #[test]
    fn server_messages_of_both_versions() {
        assert_eq!(
            server_message(r#"{"error":"database not found: \"x\""}"#),
            "database not found: \"x\""
        );
        assert_eq!(
            server_message(r#"{"code":"invalid","message":"bad line"}"#),
            "bad line"
        );
        assert_eq!(server_message(""), "(no message)");
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(encode_query("my db/ü"), "my%20db%2F%C3%BC");
        assert_eq!(ident("a\"b"), "\"a\\\"b\"");
    }

    fn config(toml: &str) -> Result<Config> {
        metricsd_plugin_api::parse_config(toml)
    }

    #[test]
    fn config_errors_name_the_problem() {
        let c = config(r#"{"api":"v1"}"#).expect("parses");
        let e = InfluxSink::validate(&c).expect_err("needs a database");
        assert!(e.message().contains("`database`"), "{}", e.message());
        let c = config(r#"{"api":"v2","org":"o","bucket":"b"}"#).expect("parses");
        let e = InfluxSink::validate(&c).expect_err("needs a token");
        assert!(e.message().contains("token"), "{}", e.message());
        let c = config(r#"{"database":"d","password":"p","password_env":"X"}"#).expect("parses");
        let e = InfluxSink::validate(&c).expect_err("two secrets");
        assert!(e.message().contains("alternatives"), "{}", e.message());
        let c = config(r#"{"database":"d","url":"localhost:8086"}"#).expect("parses");
        assert!(InfluxSink::validate(&c).is_err());
        let e = config(r#"{"database":"d","layout":"wide"}"#)
            .err()
            .expect("bad layout");
        assert!(e.message().contains("layout"), "{}", e.message());
        let c = config(r#"{"database":"d"}"#).expect("parses");
        assert!(InfluxSink::validate(&c).is_ok());
        let not_pem = std::env::temp_dir().join(format!("metricsd-not-pem-{}", std::process::id()));
        std::fs::write(&not_pem, "hello").expect("write");
        let c = config(&format!(
            r#"{{"database":"d","url":"https://db:8086","tls_ca_file":"{}"}}"#,
            not_pem.display()
        ))
        .expect("parses");
        let e = InfluxSink::validate(&c).expect_err("no certificate");
        assert!(
            e.message().contains("holds no PEM certificate"),
            "{}",
            e.message()
        );
        let _ = std::fs::remove_file(&not_pem);
        let c = config(r#"{"database":"d","tls_ca_file":"/nonexistent/ca.pem"}"#).expect("parses");
        let e = InfluxSink::validate(&c).expect_err("missing file");
        assert!(
            e.message().contains("`tls_ca_file`: cannot read"),
            "{}",
            e.message()
        );
    }
}
