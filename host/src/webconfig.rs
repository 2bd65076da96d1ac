//! TLS and basic auth for the host's listeners, configured with the web-config file that
//! Prometheus exporters use (exporter-toolkit's format):
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt
//!   key_file: server.key
//!   client_auth_type: RequireAndVerifyClientCert   # optional
//!   client_ca_file: ca.crt                         # with client_auth_type
//! basic_auth_users:
//!   prometheus: $2y$10$...                         # bcrypt hash
//! ```
//!
//! Relative paths are relative to the web-config file. Passwords and hashes never appear in
//! logs or error messages.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The parsed web-config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    /// TLS settings; plain HTTP without them.
    pub tls_server_config: Option<TlsConfig>,
    /// User name → bcrypt hash; no authentication when empty.
    #[serde(default)]
    pub basic_auth_users: BTreeMap<String, String>,
}

/// `tls_server_config`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate (chain).
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// `NoClientCert` (default), `VerifyClientCertIfGiven` or `RequireAndVerifyClientCert`.
    #[serde(default)]
    pub client_auth_type: ClientAuth,
    /// PEM CA bundle that client certificates must chain to.
    pub client_ca_file: Option<PathBuf>,
}

/// How client certificates are treated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum ClientAuth {
    /// No client certificate is asked for.
    #[default]
    NoClientCert,
    /// A client certificate is verified when one is presented.
    VerifyClientCertIfGiven,
    /// A valid client certificate is required.
    RequireAndVerifyClientCert,
}

impl WebConfig {
    /// Reads and checks the file; paths are made absolute against its directory.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read web config {}: {e}", path.display()))?;
        let mut config: WebConfig = serde_yaml_ng::from_str(&text)
            .map_err(|e| format!("web config {}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(tls) = config.tls_server_config.as_mut() {
            for p in [&mut tls.cert_file, &mut tls.key_file]
                .into_iter()
                .chain(tls.client_ca_file.as_mut())
            {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
                if !p.is_file() {
                    return Err(format!(
                        "web config {}: file {} does not exist",
                        path.display(),
                        p.display()
                    ));
                }
            }
            if tls.client_auth_type != ClientAuth::NoClientCert && tls.client_ca_file.is_none() {
                return Err(format!(
                    "web config {}: client_auth_type {:?} needs client_ca_file",
                    path.display(),
                    tls.client_auth_type
                ));
            }
        }
        for (user, hash) in &config.basic_auth_users {
            if bcrypt_cost(hash).is_none() {
                return Err(format!(
                    "web config {}: the password of user `{user}` is not a bcrypt hash (generate one with `htpasswd -nBC 10 {user}`)",
                    path.display()
                ));
            }
        }
        Ok(config)
    }
}

fn bcrypt_cost(hash: &str) -> Option<u32> {
    let mut parts = hash.split('$');
    let (_, version, cost) = (parts.next()?, parts.next()?, parts.next()?);
    matches!(version, "2a" | "2b" | "2y" | "2x")
        .then(|| cost.parse().ok())
        .flatten()
}

/// Checks `Authorization: Basic …` headers against the configured users. bcrypt is slow by
/// design, so successful checks are remembered (by a SHA-256 of user, hash and password, never
/// the password itself), as exporter-toolkit does.
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    verified: Mutex<HashSet<[u8; 32]>>,
}

const VERIFIED_CACHE_LIMIT: usize = 1024;

impl BasicAuth {
    /// `None` when no users are configured.
    pub fn new(users: &BTreeMap<String, String>) -> Option<Self> {
        (!users.is_empty()).then(|| Self {
            users: users.clone(),
            verified: Mutex::new(HashSet::new()),
        })
    }

    /// Whether the header value grants access.
    pub fn check(&self, authorization: Option<&str>) -> bool {
        let Some((user, password)) = authorization.and_then(parse_basic) else {
            return false;
        };
        let Some(hash) = self.users.get(&user) else {
            return false;
        };
        let key: [u8; 32] = Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update([0])
            .chain_update(hash.as_bytes())
            .chain_update([0])
            .chain_update(password.as_bytes())
            .finalize()
            .into();
        if self
            .verified
            .lock()
            .map(|v| v.contains(&key))
            .unwrap_or(false)
        {
            return true;
        }
        let ok = bcrypt::verify(&password, hash).unwrap_or(false);
        if ok {
            if let Ok(mut v) = self.verified.lock() {
                if v.len() >= VERIFIED_CACHE_LIMIT {
                    v.clear();
                }
                v.insert(key);
            }
        }
        ok
    }
}

fn parse_basic(header: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let encoded = header
        .strip_prefix("Basic ")
        .or_else(|| header.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn header(user: &str, password: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
    }

    #[test]
    fn basic_auth_checks_bcrypt_hashes() {
        let hash = bcrypt::hash("s3cret", 4).expect("hash");
        let users = BTreeMap::from([("prom".to_string(), hash)]);
        let auth = BasicAuth::new(&users).expect("users");
        assert!(auth.check(Some(&header("prom", "s3cret"))));
        assert!(auth.check(Some(&header("prom", "s3cret"))), "cached");
        assert!(!auth.check(Some(&header("prom", "wrong"))));
        assert!(!auth.check(Some(&header("other", "s3cret"))));
        assert!(!auth.check(Some("Bearer x")));
        assert!(!auth.check(None));
    }

    #[test]
    fn web_config_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("web.yml");
        std::fs::write(&path, "basic_auth_users:\n  prom: plaintext\n").expect("write");
        let e = WebConfig::load(&path).expect_err("refused");
        assert!(
            e.contains("not a bcrypt hash") && !e.contains("plaintext"),
            "{e}"
        );
        std::fs::write(
            &path,
            "tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n",
        )
        .expect("write");
        let e = WebConfig::load(&path).expect_err("refused");
        assert!(e.contains("a.crt") && e.contains("does not exist"), "{e}");
        std::fs::write(&path, "tls_server_config:\n  cert: x\n").expect("write");
        let e = WebConfig::load(&path).expect_err("refused");
        assert!(e.contains("unknown field `cert`"), "{e}");
    }
}
