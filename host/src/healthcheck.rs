//! `metricsd health`: asks the running agent's health listener for `/health`, for container
//! health checks where no HTTP client is installed. It reads the same config and web config as
//! the agent: over TLS it trusts exactly the certificate in `cert_file` (it talks to its own
//! agent on loopback, whatever names the certificate carries), and it logs in with the user
//! and password file it is given.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls;

use crate::config::Config;
use crate::webconfig::WebConfig;

/// How `metricsd health` logs in.
#[derive(Debug, Default, Clone)]
pub struct Login {
    /// Basic-auth user.
    pub user: Option<String>,
    /// File holding that user's password (first line).
    pub password_file: Option<PathBuf>,
    /// Client certificate (PEM), when the listener asks for one.
    pub cert_file: Option<PathBuf>,
    /// Its key (PEM).
    pub key_file: Option<PathBuf>,
}

/// Accepts exactly one certificate: the one the agent serves.
#[derive(Debug)]
struct Pinned {
    cert: rustls::pki_types::CertificateDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the listener's certificate is not the one in cert_file".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn client_config(web: &WebConfig, login: &Login) -> Result<Option<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let Some(tls) = &web.tls_server_config else {
        return Ok(None);
    };
    let cert = CertificateDer::pem_file_iter(&tls.cert_file)
        .ok()
        .and_then(|mut it| it.next())
        .and_then(Result::ok)
        .ok_or_else(|| format!("no certificate in {}", tls.cert_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            cert,
            provider: Arc::clone(&provider),
        }));
    let config = match (&login.cert_file, &login.key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("--client-cert {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("--client-key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate: {e}"))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err("--client-cert and --client-key go together".into()),
    };
    Ok(Some(config))
}

fn authorization(login: &Login) -> Result<Option<String>, String> {
    use base64::Engine as _;
    let Some(user) = &login.user else {
        return match login.password_file {
            Some(_) => Err("--password-file needs --user".into()),
            None => Ok(None),
        };
    };
    let password = match &login.password_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("--password-file {}: {e}", path.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
        None => return Err("--user needs --password-file".into()),
    };
    Ok(Some(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )))
}

/// GETs `/health`; `Ok` with the body when it answers 200 (ok or degraded).
pub fn check(config: &Config, login: &Login) -> Result<String, String> {
    let addr = config
        .http
        .health_addr()
        .map_err(|e| e.to_string())?
        .ok_or("the health listener is off (http.health_listen = \"\")")?;
    // A wildcard listen address is reached on loopback.
    let target = if addr.ip().is_unspecified() {
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    };
    let web = match &config.http.web_config_file {
        Some(path) => WebConfig::load(path)?,
        None => WebConfig::default(),
    };
    let tls = client_config(&web, login)?;
    let authorization = authorization(login)?;
    let timeout = Duration::from_secs(5);
    let stream = TcpStream::connect_timeout(&target, timeout)
        .map_err(|e| format!("cannot reach the health listener at {target}: {e}"))?;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let mut request = format!("GET /health HTTP/1.0\r\nHost: {target}\r\n");
    if let Some(a) = &authorization {
        request.push_str(&format!("Authorization: {a}\r\n"));
    }
    request.push_str("\r\n");
    let mut answer = Vec::new();
    let io = |e: std::io::Error| format!("{target}: {e}");
    match tls {
        None => {
            let mut stream = stream;
            stream.write_all(request.as_bytes()).map_err(io)?;
            let _ = stream.take(64 * 1024).read_to_end(&mut answer);
        }
        Some(tls) => {
            let name = rustls::pki_types::ServerName::IpAddress(target.ip().into());
            let conn = rustls::ClientConnection::new(Arc::new(tls), name)
                .map_err(|e| format!("TLS: {e}"))?;
            let mut stream = rustls::StreamOwned::new(conn, stream);
            stream.write_all(request.as_bytes()).map_err(io)?;
            let _ = stream.take(64 * 1024).read_to_end(&mut answer);
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok());
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    match status {
        Some(200) => Ok(body),
        Some(401) if authorization.is_none() => Err(format!(
            "/health answered 401: the listener wants a login (--user and --password-file)\n{body}"
        )),
        Some(code) => Err(format!("/health answered {code}\n{body}")),
        None => Err(format!("{target} did not answer HTTP")),
    }
}
