//! The listeners' connection handling, on hyper's HTTP/1 connection directly so that every
//! connection has limits: a deadline for the request head (from the connection's start, or
//! from the first byte of the next request on a kept-alive connection), an idle keep-alive
//! timeout, a cap on open connections (the oldest idle one is closed to admit a new one, so a
//! flood of half-sent requests cannot lock a scraper out), and a cap on requests in flight
//! (503 beyond, as promhttp's `--web.max-requests`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;

use crate::events::{Event, Telemetry};
use crate::webconfig::WebSecurity;

/// The limits of one listener (`[http]` keys).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time a client has to send a complete request head.
    pub header_read_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Open connections; the oldest idle one is closed to admit a new one.
    pub max_connections: usize,
    /// Requests answered at once; more get 503.
    pub max_requests: usize,
}

/// What a connection is doing, read by the accept loop (which one to close) and by the
/// connection's own deadline.
struct ConnState {
    /// Requests being answered.
    in_flight: AtomicU32,
    /// Whether a request was answered (a fresh connection waits for its head, not idle).
    served: AtomicBool,
    /// When it last became idle (accepted, or a response produced), ms on the server clock.
    idle_since: AtomicU64,
    /// When the first byte of the next request head arrived; 0: none yet.
    head_since: AtomicU64,
    /// Set by the accept loop to close it.
    close: Notify,
    /// A request began or ended, or a head started: the deadline moved.
    changed: Notify,
}

/// Milliseconds since the server started, never 0.
fn now_ms(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

impl ConnState {
    fn new(now: u64) -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            served: AtomicBool::new(false),
            idle_since: AtomicU64::new(now),
            head_since: AtomicU64::new(0),
            close: Notify::new(),
            changed: Notify::new(),
        }
    }

    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// When an idle connection is closed, and why; `None` while a request is in flight.
    fn deadline(&self, limits: &Limits) -> Option<(u64, &'static str)> {
        if !self.idle() {
            return None;
        }
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let head = self.head_since.load(Ordering::Acquire);
        Some(if head != 0 {
            (
                head.saturating_add(ms(limits.header_read_timeout)),
                "header_timeout",
            )
        } else if !self.served.load(Ordering::Acquire) {
            let since = self.idle_since.load(Ordering::Acquire);
            (
                since.saturating_add(ms(limits.header_read_timeout)),
                "header_timeout",
            )
        } else {
            let since = self.idle_since.load(Ordering::Acquire);
            (
                since.saturating_add(ms(limits.idle_timeout)),
                "idle_timeout",
            )
        })
    }
}

/// Marks a request in flight until dropped.
struct InFlight {
    state: Arc<ConnState>,
    epoch: Instant,
}

impl InFlight {
    fn begin(state: Arc<ConnState>, epoch: Instant) -> Self {
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        state.head_since.store(0, Ordering::Release);
        Self { state, epoch }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.served.store(true, Ordering::Release);
        self.state
            .idle_since
            .store(now_ms(self.epoch), Ordering::Release);
        self.state.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.state.changed.notify_one();
    }
}

/// The connection's stream, noting when the bytes of a new request head start to arrive.
struct Tracked<T> {
    io: T,
    state: Arc<ConnState>,
    epoch: Instant,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let poll = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(())))
            && buf.filled().len() > before
            && this.state.idle()
            && this.state.head_since.load(Ordering::Acquire) == 0
        {
            this.state
                .head_since
                .store(now_ms(this.epoch), Ordering::Release);
            this.state.changed.notify_one();
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The response every handler gives (warp's).
pub type Reply = warp::reply::Response;

/// A plain-text response.
pub fn text(status: hyper::StatusCode, body: impl Into<bytes::Bytes>) -> Reply {
    let mut reply = Reply::new(body.into().into());
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    reply
}

/// Binds a listening socket (kept across reloads while its address stays the same).
pub fn bind(addr: std::net::SocketAddr) -> io::Result<Arc<TcpListener>> {
    let std = std::net::TcpListener::bind(addr)?;
    std.set_nonblocking(true)?;
    TcpListener::from_std(std).map(Arc::new)
}

/// Whether an accept error means the process or system is out of file descriptors.
fn out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == nix::libc::EMFILE || code == nix::libc::ENFILE)
}

/// Serves `listener` with `service` until `shutdown` resolves, then lets the requests in
/// flight finish (idle connections close at once).
#[allow(clippy::too_many_arguments)]
pub async fn serve<S>(
    name: &'static str,
    listener: Arc<TcpListener>,
    service: S,
    security: Arc<WebSecurity>,
    limits: Limits,
    telemetry: Arc<Telemetry>,
    shutdown: impl Future<Output = ()>,
) where
    S: tower_service::Service<Request<Incoming>, Response = Reply, Error = Infallible>,
    S: Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    let epoch = Instant::now();
    let conns: Arc<Mutex<BTreeMap<u64, Arc<ConnState>>>> = Arc::default();
    let requests = Arc::new(Semaphore::new(limits.max_requests.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut next_id: u64 = 0;
    let mut fd_errors = crate::ratelimit::Repeating::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => {
                if let Some(n) = fd_errors.ended() {
                    tracing::warn!(
                        listener = name,
                        "accepting connections again ({n} accept errors in all)"
                    );
                }
                stream
            }
            Err(e) => {
                Event::AcceptFailed {
                    listener: name,
                    message: &e.to_string(),
                    log: fd_errors.event(),
                }
                .emit(&telemetry);
                if out_of_fds(&e) {
                    // Retrying at once would spin: give connections time to close.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::new(ConnState::new(now_ms(epoch)));
        {
            let mut map = conns.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() >= limits.max_connections.max(1) {
                let victim = map
                    .iter()
                    .find(|(_, c)| c.idle())
                    .map(|(id, c)| (*id, Arc::clone(c)));
                match victim {
                    Some((id, c)) => {
                        map.remove(&id);
                        c.close.notify_one();
                        Event::ConnectionClosed {
                            listener: name,
                            reason: "evicted",
                        }
                        .emit(&telemetry);
                    }
                    None => {
                        drop(map);
                        drop(stream);
                        Event::ConnectionClosed {
                            listener: name,
                            reason: "refused",
                        }
                        .emit(&telemetry);
                        continue;
                    }
                }
            }
            next_id += 1;
            map.insert(next_id, Arc::clone(&state));
            telemetry.set_http_connections(name, map.len());
        }
        let id = next_id;
        let conns = Arc::clone(&conns);
        let requests = Arc::clone(&requests);
        let service = service.clone();
        let telemetry = Arc::clone(&telemetry);
        let stop = stop_rx.clone();
        let tls = security.current().tls.clone();
        tasks.spawn(async move {
            let reason = match tls {
                None => {
                    connection(
                        stream, &state, epoch, service, requests, limits, &telemetry, name, stop,
                    )
                    .await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(tls)) => {
                            connection(
                                tls, &state, epoch, service, requests, limits, &telemetry, name,
                                stop,
                            )
                            .await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(listener = name, "TLS handshake failed: {e}");
                            Some("tls_handshake")
                        }
                        Err(_) => Some("header_timeout"),
                    }
                }
            };
            if let Some(reason) = reason {
                Event::ConnectionClosed {
                    listener: name,
                    reason,
                }
                .emit(&telemetry);
            }
            let mut map = conns.lock().unwrap_or_else(|p| p.into_inner());
            map.remove(&id);
            telemetry.set_http_connections(name, map.len());
        });
    }
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
}

/// Serves one connection; returns why the agent closed it (`None`: the client did, or the
/// listener is stopping).
#[allow(clippy::too_many_arguments)]
async fn connection<IO, S>(
    io: IO,
    state: &Arc<ConnState>,
    epoch: Instant,
    service: S,
    requests: Arc<Semaphore>,
    limits: Limits,
    telemetry: &Arc<Telemetry>,
    name: &'static str,
    mut stop: watch::Receiver<bool>,
) -> Option<&'static str>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower_service::Service<Request<Incoming>, Response = Reply, Error = Infallible>,
    S: Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let io = Tracked {
        io,
        state: Arc::clone(state),
        epoch,
    };
    let handler = {
        let state = Arc::clone(state);
        let telemetry = Arc::clone(telemetry);
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let guard = InFlight::begin(Arc::clone(&state), epoch);
            let permit = Arc::clone(&requests).try_acquire_owned();
            let telemetry = Arc::clone(&telemetry);
            let mut service = service.clone();
            async move {
                let _guard = guard;
                let Ok(_permit) = permit else {
                    telemetry.http_request_rejected(name);
                    let mut reply = text(
                        hyper::StatusCode::SERVICE_UNAVAILABLE,
                        "too many requests at once; retry later\n",
                    );
                    reply.headers_mut().insert(
                        hyper::header::RETRY_AFTER,
                        hyper::header::HeaderValue::from_static("1"),
                    );
                    return Ok::<_, Infallible>(reply);
                };
                // warp's service is always ready: no `poll_ready` to wait for.
                service.call(request).await
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(io), handler);
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        let deadline = state.deadline(&limits);
        let sleep_ms = match deadline {
            Some((at, _)) => at.saturating_sub(now_ms(epoch)),
            // A request is in flight: its end notifies `changed`; look again later anyway.
            None => u64::try_from(limits.header_read_timeout.as_millis()).unwrap_or(u64::MAX),
        };
        tokio::select! {
            _ = &mut conn => return None,
            _ = state.close.notified() => return None,
            _ = state.changed.notified() => {}
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {
                if let Some((at, reason)) = state.deadline(&limits) {
                    if now_ms(epoch) >= at {
                        return Some(reason);
                    }
                }
            }
        }
    }
}

/// Raises the soft limit on open files to the hard limit, as Go's runtime does for
/// exporters: the listeners and the collectors' `/proc` reads share the process's budget.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!("open-file limit raised from {soft} to {hard}"),
            Err(e) => tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read the open-file limit: {e}"),
    }
}
