//! The host's listeners: the health listener (`/health`, `/metrics/stats`, `/plugins`) and the
//! metrics listener, which answers the paths pull sinks register by asking the sink to render
//! (on a blocking thread, with the sink's timeout). Routing is warp's; connections and their
//! limits are [`server`]'s.

pub mod server;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use metricsd_plugin_api::{Header, HttpRequest};
use serde::Serialize;
use tokio::net::TcpListener;
use warp::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use warp::Filter;

use crate::delivery::SinkRuntime;
use crate::events::Telemetry;
use crate::health::Health;
use crate::loader::{PluginSet, Verdict};
use crate::webconfig::WebSecurity;
pub use server::{bind, raise_fd_limit, Limits, Reply};

#[derive(Debug)]
struct Unauthorized;

impl warp::reject::Reject for Unauthorized {}

/// Passes when no users are configured or the request's basic auth matches one. A header
/// that is not text is a failed login (401), like a wrong password.
fn authorized(
    security: Arc<WebSecurity>,
) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    warp::header::headers_cloned()
        .and_then(move |headers: HeaderMap| {
            let security = Arc::clone(&security);
            async move {
                let Some(auth) = security.current().auth.clone() else {
                    return Ok(());
                };
                let header = headers
                    .get(warp::http::header::AUTHORIZATION)
                    .map(|v| v.to_str().map(str::to_owned));
                let ok = match header {
                    Some(Err(_)) => false,
                    header => {
                        let header = header.and_then(Result::ok);
                        // bcrypt is slow on purpose: keep it off the async workers.
                        tokio::task::spawn_blocking(move || auth.check(header.as_deref()))
                            .await
                            .unwrap_or(false)
                    }
                };
                if ok {
                    Ok(())
                } else {
                    Err(warp::reject::custom(Unauthorized))
                }
            }
        })
        .untuple_one()
}

const ALLOWED: &str = "GET, HEAD";

fn method_not_allowed() -> Reply {
    let mut reply = text(
        StatusCode::METHOD_NOT_ALLOWED,
        "text/plain",
        "only GET and HEAD\n",
    );
    reply
        .headers_mut()
        .insert(warp::http::header::ALLOW, HeaderValue::from_static(ALLOWED));
    reply
}

async fn rejection_reply(rejection: warp::Rejection) -> Result<Reply, Infallible> {
    if rejection.find::<Unauthorized>().is_some() {
        let mut reply = text(StatusCode::UNAUTHORIZED, "text/plain", "unauthorized\n");
        reply.headers_mut().insert(
            warp::http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"metricsd\""),
        );
        return Ok(reply);
    }
    if rejection.is_not_found() {
        return Ok(text(StatusCode::NOT_FOUND, "text/plain", "not found\n"));
    }
    if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        return Ok(method_not_allowed());
    }
    Ok(text(
        StatusCode::BAD_REQUEST,
        "text/plain",
        format!("bad request: {rejection:?}\n"),
    ))
}

/// One listener: its socket, TLS and users, limits and the agent's telemetry.
pub struct ListenerSetup {
    /// The bound socket.
    pub listener: Arc<TcpListener>,
    /// TLS and basic auth.
    pub security: Arc<WebSecurity>,
    /// Timeouts and caps.
    pub limits: Limits,
    /// Where connection counters go.
    pub telemetry: Arc<Telemetry>,
}

fn serve<F>(
    name: &'static str,
    filter: F,
    setup: ListenerSetup,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> impl Future<Output = ()> + Send + 'static
where
    F: Filter<Error = warp::Rejection> + Clone + Send + Sync + 'static,
    F::Extract: warp::Reply,
{
    let filter = authorized(Arc::clone(&setup.security))
        .and(filter)
        .recover(rejection_reply);
    server::serve(
        name,
        setup.listener,
        warp::service(filter),
        setup.security,
        setup.limits,
        setup.telemetry,
        shutdown,
    )
}

fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut reply = Reply::new(body.into().into());
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    reply
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
    /// What the plugin says it does, when loaded.
    pub description: Option<String>,
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
                description: loaded.map(|p| p.description.clone()),
                reason,
                sha256: f.sha256.clone(),
            }
        })
        .collect()
}

/// Serves the health listener until `shutdown` resolves.
pub fn serve_health(
    setup: ListenerSetup,
    health: Arc<Health>,
    plugins: Arc<PluginSet>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    let telemetry = Arc::clone(&setup.telemetry);
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
    // HEAD is answered like GET; hyper leaves the body out.
    let routes = warp::get().or(warp::head()).unify().and(
        health_route
            .or(stats_route)
            .unify()
            .or(plugins_route)
            .unify(),
    );
    serve("health", routes, setup, shutdown)
}

/// What a pull sink's answer depends on besides its data: the path, the query and the
/// content negotiation headers.
#[derive(Clone, PartialEq, Eq)]
struct RenderKey {
    path: String,
    query: String,
    accept: Option<HeaderValue>,
    accept_encoding: Option<HeaderValue>,
}

struct Rendered {
    key: RenderKey,
    generation: u64,
    at: Instant,
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

/// How long a rendered answer is served without a new write to the sink (a sink may change
/// its answer with time alone, as the Prometheus sink does when series go stale).
const RENDER_REUSE: Duration = Duration::from_secs(1);

/// Variants kept per sink (text, OpenMetrics, each gzipped or not).
const RENDER_VARIANTS: usize = 4;

/// The answers a pull sink rendered last, shared by every scrape until the sink is written to
/// again or [`RENDER_REUSE`] has passed: concurrent scrapes send one body (reference-counted),
/// not a copy each, and one render serves them all.
#[derive(Default)]
pub struct RenderCache {
    generation: std::sync::atomic::AtomicU64,
    last: tokio::sync::Mutex<Vec<Rendered>>,
}

impl RenderCache {
    /// The sink's data changed: answers rendered before are not served again.
    pub fn invalidate(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }
}

fn rendered_reply(r: &Rendered) -> Reply {
    let mut reply = Reply::new(r.body.clone().into());
    *reply.status_mut() = r.status;
    for (name, value) in &r.headers {
        reply.headers_mut().append(name.clone(), value.clone());
    }
    reply
}

fn to_request(method: &Method, key: &RenderKey, headers: &HeaderMap) -> HttpRequest {
    HttpRequest {
        method: method.as_str().into(),
        path: key.path.as_str().into(),
        query: key.query.as_str().into(),
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
        return Ok(method_not_allowed());
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
    let key = RenderKey {
        path: path.as_str().to_string(),
        query,
        accept: headers.get(warp::http::header::ACCEPT).cloned(),
        accept_encoding: headers.get(warp::http::header::ACCEPT_ENCODING).cloned(),
    };
    // One render at a time per sink; the scrapes that wait get its answer.
    let Ok(mut cache) = tokio::time::timeout(sink.timeout, sink.rendered.last.lock()).await else {
        return Ok(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("sink `{}` did not answer in time\n", sink.name),
        ));
    };
    let generation = sink.rendered.generation();
    cache.retain(|r| r.generation == generation && r.at.elapsed() < RENDER_REUSE);
    if let Some(hit) = cache.iter().find(|r| r.key == key) {
        return Ok(rendered_reply(hit));
    }
    let request = to_request(&method, &key, &headers);
    let call = tokio::task::spawn_blocking(move || instance.render(&request).into_result());
    let reply = match tokio::time::timeout(sink.timeout, call).await {
        Ok(Ok(Ok(resp))) => {
            let status = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::OK);
            let mut parsed = Vec::with_capacity(resp.headers.len() + 1);
            let mut problem = None;
            let all = std::iter::once(("content-type", resp.content_type.as_str())).chain(
                resp.headers
                    .iter()
                    .map(|h| (h.name.as_str(), h.value.as_str())),
            );
            for (name, value) in all {
                match (HeaderName::try_from(name), HeaderValue::try_from(value)) {
                    (Ok(n), Ok(v)) => parsed.push((n, v)),
                    _ => problem = Some(format!("header `{name}` is not a valid HTTP header")),
                }
            }
            if let Some(problem) = problem {
                return Ok(text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!(
                        "sink `{}` returned an invalid response: {problem}\n",
                        sink.name
                    ),
                ));
            }
            let rendered = Rendered {
                key,
                generation,
                at: Instant::now(),
                status,
                headers: parsed,
                // The body keeps its plugin-side allocation: no copy on the way out.
                body: Bytes::from_owner(resp.body),
            };
            let reply = rendered_reply(&rendered);
            if status.is_success() {
                if cache.len() >= RENDER_VARIANTS {
                    cache.remove(0);
                }
                cache.push(rendered);
            }
            reply
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

/// Serves the metrics listener until `shutdown` resolves.
pub fn serve_metrics(
    setup: ListenerSetup,
    routes: BTreeMap<String, Arc<SinkRuntime>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    let routes = Arc::new(routes);
    let filter = warp::any()
        .map(move || Arc::clone(&routes))
        .and(warp::method())
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and_then(render);
    serve("metrics", filter, setup, shutdown)
}
