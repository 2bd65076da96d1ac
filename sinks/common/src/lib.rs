//! What metricsd's HTTP push sinks (InfluxDB, remote write) share: secrets given inline, in a
//! file or in an environment variable; the HTTP client with an optional CA file; basic-auth
//! headers; `Retry-After`.
//!
//! This crate is linked into each sink's `.so`; it is not part of the plugin ABI.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use metricsd_plugin_api::{Error, Result};

/// Resolves the secret `what`, given inline, in a file (`{what}_file`, trailing newline
/// removed) or in an environment variable (`{what}_env`): at most one of them.
pub fn secret(
    what: &str,
    inline: &Option<String>,
    file: &Option<PathBuf>,
    env: &Option<String>,
) -> Result<Option<String>> {
    let given = [inline.is_some(), file.is_some(), env.is_some()]
        .iter()
        .filter(|g| **g)
        .count();
    if given > 1 {
        return Err(Error::config(format!(
            "`{what}`, `{what}_file` and `{what}_env` are alternatives: give one"
        )));
    }
    if let Some(v) = inline {
        return Ok(Some(v.clone()));
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::config(format!(
                "`{what}_file`: cannot read {}: {e}",
                path.display()
            ))
        })?;
        return Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()));
    }
    if let Some(name) = env {
        return std::env::var(name).map(Some).map_err(|_| {
            Error::config(format!(
                "`{what}_env`: the environment variable {name} is not set"
            ))
        });
    }
    Ok(None)
}

/// `Basic …` for a user and password.
pub fn basic_auth(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// How the HTTP client talks to its server.
pub struct ClientOptions<'a> {
    /// Timeout of one request, connection included.
    pub timeout: Duration,
    /// `User-Agent`.
    pub user_agent: &'a str,
    /// A PEM file of CA certificates to trust instead of the bundled web roots.
    pub tls_ca_file: Option<&'a Path>,
    /// Do not verify the server's certificate.
    pub tls_insecure_skip_verify: bool,
}

/// An HTTP client that returns 4xx/5xx answers as responses (not errors), so the sink can
/// classify them. Reads the CA file now: a missing or empty one is a config error.
pub fn http_agent(options: &ClientOptions<'_>) -> Result<ureq::Agent> {
    let mut tls = ureq::tls::TlsConfig::builder();
    if let Some(path) = options.tls_ca_file {
        let pem = std::fs::read(path).map_err(|e| {
            Error::config(format!(
                "`tls_ca_file`: cannot read {}: {e}",
                path.display()
            ))
        })?;
        let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(Error::config(format!(
                "`tls_ca_file`: {} holds no PEM certificate",
                path.display()
            )));
        }
        tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
    }
    tls = tls.disable_verification(options.tls_insecure_skip_verify);
    Ok(ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(options.timeout))
        .user_agent(options.user_agent)
        .tls_config(tls.build())
        .build()
        .into())
}

/// Checks that `url` is an http(s) URL; returns it without a trailing slash.
pub fn check_url(key: &str, url: &str) -> Result<String> {
    let base = url.trim_end_matches('/').to_string();
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(Error::config(format!(
            "`{key}`: {base:?} must start with http:// or https://"
        )));
    }
    Ok(base)
}

/// `Retry-After`: seconds, or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The `Retry-After` of a response, if it has a readable one.
pub fn retry_after_of<B>(response: &ureq::http::Response<B>) -> Option<Duration> {
    response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after)
}

/// A response body as text, at most 64 KiB of it (an error page can be large).
pub fn body_text(response: &mut ureq::http::Response<ureq::Body>) -> String {
    body_text_up_to(response, 64 * 1024)
}

/// The first `limit` bytes of a response body as text (invalid UTF-8 replaced); a longer body
/// is cut, not lost.
pub fn body_text_up_to(response: &mut ureq::http::Response<ureq::Body>, limit: u64) -> String {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    // What was read before an error is kept.
    let _ = response
        .body_mut()
        .as_reader()
        .take(limit)
        .read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A server's error body as a message for the log: trimmed, at most 500 characters,
/// `(no message)` when empty.
pub fn plain_message(body: &str) -> String {
    let trimmed = body.trim();
    if trimmed.is_empty() {
        "(no message)".to_string()
    } else {
        trimmed.chars().take(500).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        let later = SystemTime::now() + Duration::from_secs(120);
        let wait = parse_retry_after(&httpdate::fmt_http_date(later)).expect("date");
        assert!(wait > Duration::from_secs(100) && wait <= Duration::from_secs(120));
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn secrets_come_from_one_place() {
        let none = secret("token", &None, &None, &None).expect("none");
        assert_eq!(none, None);
        let inline = secret("token", &Some("t".into()), &None, &None).expect("inline");
        assert_eq!(inline.as_deref(), Some("t"));
        let e = secret("token", &Some("t".into()), &None, &Some("X".into())).expect_err("two");
        assert!(e.message().contains("alternatives"), "{}", e.message());
        let file = std::env::temp_dir().join(format!("metricsd-secret-{}", std::process::id()));
        std::fs::write(&file, "s3cret\n").expect("write");
        let from_file = secret("token", &None, &Some(file.clone()), &None).expect("file");
        assert_eq!(from_file.as_deref(), Some("s3cret"));
        let _ = std::fs::remove_file(&file);
        let e = secret(
            "token",
            &None,
            &None,
            &Some("METRICSD_SURELY_UNSET_VAR".into()),
        )
        .expect_err("unset");
        assert!(e.message().contains("is not set"), "{}", e.message());
    }

    #[test]
    fn basic_auth_is_base64_of_user_colon_password() {
        assert_eq!(
            basic_auth("Aladdin", "open sesame"),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
    }

    #[test]
    fn messages_are_trimmed_and_bounded() {
        assert_eq!(plain_message("  \n"), "(no message)");
        assert_eq!(plain_message(" out of order \n"), "out of order");
        assert_eq!(plain_message(&"x".repeat(900)).len(), 500);
    }

    #[test]
    fn urls_must_be_http() {
        assert_eq!(
            check_url("url", "http://x:1/").expect("ok"),
            "http://x:1".to_string()
        );
        assert!(check_url("url", "x:1").is_err());
    }
}
