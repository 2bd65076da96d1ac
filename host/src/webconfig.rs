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
//!
//! Everything is checked when the file is loaded: the certificate and key are parsed and must
//! match, the CA bundle must hold certificates, every user's hash must be a well-formed bcrypt
//! hash. The listeners look at the files again (at most once a second, on a new connection or
//! request) and switch to a changed configuration once it loads, so certificates rotate
//! without a restart; a changed file that does not load is reported once and the last good
//! configuration stays in use.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio_rustls::rustls;

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
            if let Err(problem) = bcrypt_cost(hash) {
                return Err(format!(
                    "web config {}: the password of user `{user}` is not a usable bcrypt hash: {problem} (generate one with `htpasswd -nBC 10 {user}`)",
                    path.display()
                ));
            }
        }
        Ok(config)
    }

    /// The rustls configuration of `tls_server_config`, checking the material: PEM that
    /// parses, a key that matches the certificate, a CA bundle with certificates.
    pub fn tls_acceptor(&self) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
        self.tls_server_config
            .as_ref()
            .map(|tls| {
                tls.acceptor()
                    .map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)))
            })
            .transpose()
    }
}

/// The bcrypt cost of a well-formed hash (`$2y$10$` and 53 characters of bcrypt's base64).
fn bcrypt_cost(hash: &str) -> Result<u32, &'static str> {
    let rest = ["$2a$", "$2b$", "$2y$", "$2x$"]
        .iter()
        .find_map(|p| hash.strip_prefix(p))
        .ok_or("it does not start with $2a$, $2b$ or $2y$")?;
    let (cost, digest) = rest
        .split_once('$')
        .ok_or("the cost is not followed by `$`")?;
    let cost: u32 = match cost.as_bytes() {
        [a, b] if a.is_ascii_digit() && b.is_ascii_digit() => {
            cost.parse().map_err(|_| "bad cost")?
        }
        _ => return Err("the cost is not two digits"),
    };
    if !(4..=31).contains(&cost) {
        return Err("the cost is outside 4..=31");
    }
    if digest.len() != 53
        || !digest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/')
    {
        return Err("the salt and digest are not 53 characters of bcrypt's base64");
    }
    Ok(cost)
}

impl TlsConfig {
    fn files(&self) -> impl Iterator<Item = &PathBuf> {
        [&self.cert_file, &self.key_file]
            .into_iter()
            .chain(self.client_ca_file.as_ref())
    }

    fn acceptor(&self) -> Result<rustls::ServerConfig, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(&self.cert_file)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("cert_file {}: {e}", self.cert_file.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "cert_file {}: no PEM certificate in it",
                self.cert_file.display()
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key_file).map_err(|e| {
            format!(
                "key_file {}: no usable PEM private key in it ({e})",
                self.key_file.display()
            )
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?;
        let builder = match (&self.client_ca_file, self.client_auth_type) {
            (
                Some(ca),
                ClientAuth::VerifyClientCertIfGiven | ClientAuth::RequireAndVerifyClientCert,
            ) => {
                let mut roots = rustls::RootCertStore::empty();
                let cas = CertificateDer::pem_file_iter(ca)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| format!("client_ca_file {}: {e}", ca.display()))?;
                let (added, _) = roots.add_parsable_certificates(cas);
                if added == 0 {
                    return Err(format!(
                        "client_ca_file {}: no usable CA certificate in it",
                        ca.display()
                    ));
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::clone(&provider),
                );
                let verifier = if self.client_auth_type == ClientAuth::VerifyClientCertIfGiven {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                builder.with_client_cert_verifier(
                    verifier
                        .build()
                        .map_err(|e| format!("client_ca_file {}: {e}", ca.display()))?,
                )
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            let problem = match e {
                rustls::Error::InconsistentKeys(_) => {
                    "the private key does not belong to the certificate".to_string()
                }
                other => other.to_string(),
            };
            format!(
                "key_file {} with cert_file {}: {problem}",
                self.key_file.display(),
                self.cert_file.display()
            )
        })?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// What the listeners use now: TLS, users, loaded from the web config.
#[derive(Default)]
pub struct Active {
    /// The TLS acceptor, `None` for plain HTTP.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// The users, `None` for no authentication.
    pub auth: Option<Arc<BasicAuth>>,
}

impl Active {
    fn load(path: &Path) -> Result<(Self, Vec<PathBuf>), String> {
        let web = WebConfig::load(path)?;
        let tls = web
            .tls_acceptor()
            .map_err(|e| format!("web config {}: {e}", path.display()))?;
        let mut files = vec![path.to_path_buf()];
        if let Some(t) = &web.tls_server_config {
            files.extend(t.files().cloned());
        }
        Ok((
            Self {
                tls,
                auth: BasicAuth::new(&web.basic_auth_users).map(Arc::new),
            },
            files,
        ))
    }
}

/// A file's identity and version: a rotation (a new file renamed over, or rewritten) changes it.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

struct Watch {
    files: Vec<PathBuf>,
    stamps: Vec<Stamp>,
    checked: Instant,
    /// The stamps of a changed set that failed to load: not tried (or reported) again.
    failed: Option<Vec<Stamp>>,
}

/// The listeners' security: the web config in force, looked at again when its files change.
pub struct WebSecurity {
    path: Option<PathBuf>,
    current: RwLock<Arc<Active>>,
    watch: Mutex<Watch>,
}

/// How often the files are looked at.
const RECHECK: Duration = Duration::from_secs(1);

impl WebSecurity {
    /// Plain HTTP, no users.
    pub fn none() -> Self {
        Self {
            path: None,
            current: RwLock::new(Arc::new(Active::default())),
            watch: Mutex::new(Watch {
                files: Vec::new(),
                stamps: Vec::new(),
                checked: Instant::now(),
                failed: None,
            }),
        }
    }

    /// Loads and checks the web config (every problem is an error naming the file).
    pub fn load(path: &Path) -> Result<Self, String> {
        let (active, files) = Active::load(path)?;
        let stamps = files.iter().map(|f| stamp(f)).collect();
        Ok(Self {
            path: Some(path.to_path_buf()),
            current: RwLock::new(Arc::new(active)),
            watch: Mutex::new(Watch {
                files,
                stamps,
                checked: Instant::now(),
                failed: None,
            }),
        })
    }

    /// Whether TLS is on and how many users there are, for the start-up line.
    pub fn summary(&self) -> (bool, usize) {
        let a = self.active();
        (
            a.tls.is_some(),
            a.auth.as_ref().map_or(0, |auth| auth.users.len()),
        )
    }

    fn active(&self) -> Arc<Active> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The configuration in force, after switching to the files' new version if they changed
    /// and it loads.
    pub fn current(&self) -> Arc<Active> {
        if let Some(path) = &self.path {
            self.recheck(path);
        }
        self.active()
    }

    fn recheck(&self, path: &Path) {
        let Ok(mut watch) = self.watch.try_lock() else {
            return; // another connection is looking
        };
        if watch.checked.elapsed() < RECHECK {
            return;
        }
        watch.checked = Instant::now();
        let stamps: Vec<Stamp> = watch.files.iter().map(|f| stamp(f)).collect();
        if stamps == watch.stamps || watch.failed.as_ref() == Some(&stamps) {
            return;
        }
        match Active::load(path) {
            Ok((active, files)) => {
                watch.stamps = files.iter().map(|f| stamp(f)).collect();
                watch.files = files;
                watch.failed = None;
                tracing::info!(
                    tls = active.tls.is_some(),
                    basic_auth_users = active.auth.as_ref().map_or(0, |a| a.users.len()),
                    "web config {} changed: the listeners use the new version",
                    path.display()
                );
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(active);
            }
            Err(e) => {
                tracing::error!("{e}; the listeners keep the last good web config");
                watch.failed = Some(stamps);
            }
        }
    }
}

/// Checks `Authorization: Basic …` headers against the configured users. bcrypt is slow by
/// design, so successful checks are remembered (by a SHA-256 of user, hash and password, never
/// the password itself), as exporter-toolkit does.
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    verified: Mutex<HashSet<[u8; 32]>>,
    /// A hash of a random password at the users' highest cost: unknown users are checked
    /// against it, so that they take as long as a wrong password (no user enumeration).
    dummy: OnceLock<String>,
    cost: u32,
}

const VERIFIED_CACHE_LIMIT: usize = 1024;

impl BasicAuth {
    /// `None` when no users are configured.
    pub fn new(users: &BTreeMap<String, String>) -> Option<Self> {
        (!users.is_empty()).then(|| Self {
            users: users.clone(),
            verified: Mutex::new(HashSet::new()),
            dummy: OnceLock::new(),
            cost: users
                .values()
                .filter_map(|h| bcrypt_cost(h).ok())
                .max()
                .unwrap_or(bcrypt::DEFAULT_COST),
        })
    }

    /// Whether the header value grants access.
    pub fn check(&self, authorization: Option<&str>) -> bool {
        let Some((user, password)) = authorization.and_then(parse_basic) else {
            return false;
        };
        let Some(hash) = self.users.get(&user) else {
            // As long as a wrong password: hashing the dummy costs what verifying does.
            let mut fresh = false;
            let dummy = self.dummy.get_or_init(|| {
                fresh = true;
                let password: [u8; 16] = std::array::from_fn(|_| fastrand::u8(..));
                bcrypt::hash(password, self.cost).unwrap_or_default()
            });
            if !fresh {
                let _ = bcrypt::verify(&password, dummy);
            }
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
    fn unknown_users_cost_a_bcrypt_verification() {
        let hash = bcrypt::hash("s3cret", 8).expect("hash");
        let users = BTreeMap::from([("prom".to_string(), hash)]);
        let auth = BasicAuth::new(&users).expect("users");
        assert_eq!(auth.cost, 8);
        assert!(!auth.check(Some(&header("nobody", "x"))));
        let dummy = auth
            .dummy
            .get()
            .expect("the dummy hash is made on the first unknown user");
        assert_eq!(bcrypt_cost(dummy), Ok(8));
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
            e.contains("not a usable bcrypt hash") && !e.contains("plaintext"),
            "{e}"
        );
        // Looks like bcrypt, is not: refused at load, not at the first login.
        std::fs::write(&path, "basic_auth_users:\n  prom: $2y$10$short\n").expect("write");
        let e = WebConfig::load(&path).expect_err("refused");
        assert!(e.contains("53 characters") && !e.contains("short"), "{e}");
        let good = bcrypt::hash("pw", 4).expect("hash");
        std::fs::write(&path, format!("basic_auth_users:\n  prom: '{good}'\n")).expect("write");
        WebConfig::load(&path).expect("a real hash loads");
        let bad_cost = good.replacen("$04$", "$99$", 1);
        std::fs::write(&path, format!("basic_auth_users:\n  prom: '{bad_cost}'\n")).expect("write");
        let e = WebConfig::load(&path).expect_err("refused");
        assert!(e.contains("4..=31"), "{e}");
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
