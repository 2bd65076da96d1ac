//! The host's listeners (warp): the health listener (`/health`, `/metrics/stats`, `/plugins`)
//! and the metrics listener, which answers the paths pull sinks register by asking the sink to
//! render (on a blocking thread, with the sink's timeout).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use metricsd_plugin_api::{Header, HttpRequest};
use serde::Serialize;
use warp::http::{HeaderMap, Method, Response, StatusCode};
use warp::hyper::body::Bytes;
use warp::Filter;

use crate::delivery::SinkRuntime;
use crate::events::Telemetry;
use crate::health::Health;
use crate::loader::{PluginSet, Verdict};
use crate::webconfig::{BasicAuth, ClientAuth, TlsConfig, WebConfig};

type Reply = Response<warp::hyper::Body>;

/// A running listener: its address and the future that serves it.
pub type Listener = (
    SocketAddr,
    std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
);

/// TLS and basic auth shared by both listeners.
#[derive(Clone, Default)]
pub struct Security {
    tls: Option<TlsConfig>,
    auth: Option<Arc<BasicAuth>>,
}

impl Security {
    /// From a loaded web-config file.
    pub fn new(web: &WebConfig) -> Self {
        Self {
            tls: web.tls_server_config.clone(),
            auth: BasicAuth::new(&web.basic_auth_users).map(Arc::new),
        }
    }
}

#[derive(Debug)]
struct Unauthorized;

impl warp::reject::Reject for Unauthorized {}

/// Passes when no users are configured or the request's basic auth matches one.
fn authorized(
    auth: Option<Arc<BasicAuth>>,
) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and_then(move |header: Option<String>| {
            let auth = auth.clone();
            async move {
                let Some(auth) = auth else { return Ok(()) };
                // bcrypt is slow on purpose: keep it off the async workers.
                let ok = tokio::task::spawn_blocking(move || auth.check(header.as_deref()))
                    .await
                    .unwrap_or(false);
                if ok {
                    Ok(())
                } else {
                    Err(warp::reject::custom(Unauthorized))
                }
            }
        })
        .untuple_one()
}

async fn rejection_reply(rejection: warp::Rejection) -> Result<Reply, Infallible> {
    if rejection.find::<Unauthorized>().is_some() {
        let mut reply = text(StatusCode::UNAUTHORIZED, "text/plain", "unauthorized\n");
        reply.headers_mut().insert(
            "www-authenticate",
            warp::http::HeaderValue::from_static("Basic realm=\"metricsd\""),
        );
        return Ok(reply);
    }
    if rejection.is_not_found() {
        return Ok(text(StatusCode::NOT_FOUND, "text/plain", "not found\n"));
    }
    Ok(text(
        StatusCode::METHOD_NOT_ALLOWED,
        "text/plain",
        "only GET and HEAD\n",
    ))
}

fn bind<F>(
    filter: F,
    addr: SocketAddr,
    security: &Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Listener, warp::Error>
where
    F: Filter<Error = warp::Rejection> + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let filter = authorized(security.auth.clone())
        .and(filter)
        .recover(rejection_reply);
    match &security.tls {
        None => {
            let (bound, server) =
                warp::serve(filter).try_bind_with_graceful_shutdown(addr, shutdown)?;
            Ok((bound, Box::pin(server)))
        }
        Some(tls) => {
            let mut server = warp::serve(filter)
                .tls()
                .cert_path(&tls.cert_file)
                .key_path(&tls.key_file);
            if let Some(ca) = &tls.client_ca_file {
                server = match tls.client_auth_type {
                    ClientAuth::RequireAndVerifyClientCert => server.client_auth_required_path(ca),
                    ClientAuth::VerifyClientCertIfGiven => server.client_auth_optional_path(ca),
                    ClientAuth::NoClientCert => server,
                };
            }
            let (bound, server) = server.try_bind_with_graceful_shutdown(addr, shutdown)?;
            Ok((bound, Box::pin(server)))
        }
    }
}

fn text(status: StatusCode, content_type: &str, body: impl Into<warp::hyper::Body>) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(body.into())
        .unwrap_or_else(|_| Response::new(warp::hyper::Body::empty()))
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Reply {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => text(status, "application/json", body),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("cannot encode: {e}"),
        ),
    }
}

/// One row of `/plugins`.
#[derive(Debug, Serialize)]
pub struct PluginFileReport {
    /// File path.
    pub path: String,
    /// `loaded`, `shadowed` or `refused`.
    pub verdict: &'static str,
    /// The plugin name, when loaded.
    pub name: Option<String>,
    /// `collector` or `sink`, when loaded.
    pub kind: Option<&'static str>,
    /// Plugin version, when loaded.
    pub version: Option<String>,
    /// plugin-api version it was built against, when loaded.
    pub api_version: Option<String>,
    /// Why it was refused or shadowed.
    pub reason: Option<String>,
    /// SHA-256 of the file.
    pub sha256: Option<String>,
}

/// The rows of `/plugins` and `metricsd plugins --json`.
pub fn plugin_report(set: &PluginSet) -> Vec<PluginFileReport> {
    set.files
        .iter()
        .map(|f| {
            let loaded = match &f.verdict {
                Verdict::Loaded(name) => set.get(name),
                _ => None,
            };
            let reason = match &f.verdict {
                Verdict::Loaded(_) => None,
                Verdict::Shadowed { name, by } => Some(format!(
                    "plugin `{name}` is already provided by {}",
                    by.display()
                )),
                Verdict::Refused(why) => Some(why.clone()),
                Verdict::Unused => Some(format!(
                    "{}: not opened; by its name it holds plugin `{}`, which the config does not use or an earlier file provides",
                    f.path.display(),
                    crate::loader::conventional_name(&f.path).unwrap_or_default()
                )),
            };
            PluginFileReport {
                path: f.path.display().to_string(),
                verdict: f.verdict.as_str(),
                name: loaded.map(|p| p.name.clone()),
                kind: loaded.map(|p| p.kind.as_str()),
                version: loaded.map(|p| p.version.clone()),
                api_version: loaded.map(|p| p.api_version.clone()),
                reason,
                sha256: f.sha256.clone(),
            }
        })
        .collect()
}

/// Serves the health listener until `shutdown` resolves; returns the bound address.
pub fn serve_health(
    addr: SocketAddr,
    security: &Security,
    health: Arc<Health>,
    telemetry: Arc<Telemetry>,
    plugins: Arc<PluginSet>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Listener, warp::Error> {
    let health_route = warp::path("health").and(warp::path::end()).map(move || {
        let report = health.report();
        let status = if report.is_failing() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        json(status, &report)
    });
    let stats_route = warp::path!("metrics" / "stats").map(move || {
        text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            telemetry.render_text(),
        )
    });
    let plugins_route = warp::path("plugins")
        .and(warp::path::end())
        .map(move || json(StatusCode::OK, &plugin_report(&plugins)));
    let routes = warp::get().and(
        health_route
            .or(stats_route)
            .unify()
            .or(plugins_route)
            .unify(),
    );
    bind(routes, addr, security, shutdown)
}

fn to_request(method: &Method, path: &str, query: String, headers: &HeaderMap) -> HttpRequest {
    HttpRequest {
        method: method.as_str().into(),
        path: path.into(),
        query: query.into(),
        headers: headers
            .iter()
            .filter_map(|(name, value)| {
                value.to_str().ok().map(|v| Header {
                    name: name.as_str().into(),
                    value: v.into(),
                })
            })
            .collect(),
    }
}

async fn render(
    routes: Arc<BTreeMap<String, Arc<SinkRuntime>>>,
    method: Method,
    path: warp::path::FullPath,
    query: String,
    headers: HeaderMap,
) -> Result<Reply, warp::Rejection> {
    if method != Method::GET && method != Method::HEAD {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET and HEAD\n",
        ));
    }
    let Some(sink) = routes.get(path.as_str()).cloned() else {
        let known: Vec<&str> = routes.keys().map(String::as_str).collect();
        return Ok(text(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("not found; this listener serves: {}\n", known.join(", ")),
        ));
    };
    let Some(instance) = sink.current() else {
        return Ok(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("sink `{}` is disabled; see /health\n", sink.name),
        ));
    };
    let request = to_request(&method, path.as_str(), query, &headers);
    let call = tokio::task::spawn_blocking(move || instance.render(&request).into_result());
    let reply = match tokio::time::timeout(sink.timeout, call).await {
        Ok(Ok(Ok(resp))) => {
            let mut builder = Response::builder()
                .status(StatusCode::from_u16(resp.status).unwrap_or(StatusCode::OK))
                .header("content-type", resp.content_type.as_str());
            for h in resp.headers.iter() {
                builder = builder.header(h.name.as_str(), h.value.as_str());
            }
            let body = if method == Method::HEAD {
                Bytes::new()
            } else {
                // The body keeps its plugin-side allocation: no copy on the way out.
                Bytes::from_owner(resp.body)
            };
            builder
                .body(warp::hyper::Body::from(body))
                .unwrap_or_else(|e| {
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        format!("sink `{}` returned an invalid response: {e}\n", sink.name),
                    )
                })
        }
        Ok(Ok(Err(e))) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("sink `{}` failed to render: {}\n", sink.name, e.message),
        ),
        Ok(Err(e)) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("sink `{}` render task failed: {e}\n", sink.name),
        ),
        Err(_) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("sink `{}` did not answer in time\n", sink.name),
        ),
    };
    Ok(reply)
}

/// Serves the metrics listener until `shutdown` resolves; returns the bound address.
pub fn serve_metrics(
    addr: SocketAddr,
    security: &Security,
    routes: BTreeMap<String, Arc<SinkRuntime>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Listener, warp::Error> {
    let routes = Arc::new(routes);
    let filter = warp::any()
        .map(move || Arc::clone(&routes))
        .and(warp::method())
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and_then(render);
    bind(filter, addr, security, shutdown)
}
