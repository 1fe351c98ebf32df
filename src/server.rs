//! The accept loop of the public listener: what `axum::serve` does, plus the bounds it
//! does not offer.
//!
//! - A cap on accepted TCP connections, in total (`SIDECAR_MAX_TCP_CONNECTIONS`) and per
//!   client (`SIDECAR_MAX_TCP_CONNECTIONS_PER_IP`, IPv6 per /64, trusted proxies exempt).
//!   Over a cap the connection is closed at once, before a byte is read, and counted in
//!   `evo_tcp_connections_refused_total`. A connection is counted until its socket is
//!   closed: the count travels inside the I/O object, so a websocket that hyper hands over
//!   on upgrade stays counted for as long as it lives.
//! - The total cap is lowered at start to fit the descriptor limit (`RLIMIT_NOFILE`), so a
//!   flood meets the cap, not `EMFILE` (which would also starve webhooks and upstream calls).
//! - A header-read timeout (`SIDECAR_HTTP_HEADER_TIMEOUT_SECS`). In hyper 1.12 the timer
//!   starts whenever the connection waits for a request head: on a new connection and
//!   after each response on a kept-alive one (`proto::h1::conn`, `State::idle` sets
//!   `notify_read`, then `poll_read_head` arms the timer). It is not reset by bytes, so it
//!   bounds a silent connection, a slowly sent head and an idle keep-alive connection
//!   alike. Upgraded connections (websockets) are no longer HTTP: engine.io's ping/pong
//!   bounds them.
//! - Accept errors (`EMFILE`, `ENFILE`, `ENOMEM`) back off, 10 ms doubling to 1 s,
//!   instead of spinning.
//!
//! HTTP/2 is not built (axum and hyper have only `http1` here), so there is no h2 setting
//! to bound; a client's h2 preface is answered as a bad HTTP/1 request.
//!
//! Every accepted socket gets `TCP_NODELAY` and every request `ConnectInfo<SocketAddr>`.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt as _;

use crate::peer::{self, TrustedProxies};
use crate::setting;
use crate::telemetry::names;

/// Settings of the public (and metrics) listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Open TCP connections at most, websockets included; 0 means no cap (the descriptor
    /// limit still applies).
    pub max_tcp_connections: usize,
    /// Open TCP connections per client address (IPv6 per /64); 0 means no cap. Peers in
    /// `SIDECAR_TRUSTED_PROXIES` are exempt: they carry many clients.
    pub max_tcp_connections_per_ip: usize,
    /// How long a connection may take to send a request head, counted from when it starts
    /// waiting for one: also the idle timeout of a kept-alive connection.
    pub header_timeout_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_tcp_connections: 10_000,
            max_tcp_connections_per_ip: 256,
            header_timeout_secs: 10,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), setting::Error> {
        if self.header_timeout_secs == 0 {
            return Err(setting::invalid(
                "server.header_timeout_secs",
                &0,
                "must be positive",
            ));
        }
        Ok(())
    }
}

/// Descriptors kept out of the connection cap: upstream calls, Redis, listeners, logs.
const RESERVED_FDS: u64 = 64;

/// Counts open connections, in total and per client.
pub struct Limits {
    max: usize,
    per_ip: usize,
    trusted: TrustedProxies,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

/// Why a connection was closed unserved (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerIp,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::Total => "max_tcp_connections",
            Refusal::PerIp => "max_tcp_connections_per_ip",
        }
    }
}

impl Limits {
    pub fn new(config: &Config, trusted: TrustedProxies) -> Self {
        Self {
            max: config.max_tcp_connections,
            per_ip: config.max_tcp_connections_per_ip,
            trusted,
            open: Mutex::new(Open::default()),
        }
    }

    /// The same limits with the total cap lowered to fit `fd_limit` descriptors: each
    /// connection may hold a second one (its proxied upstream request).
    fn fitted(&self, fd_limit: Option<u64>) -> Self {
        let mut max = self.max;
        if let Some(limit) = fd_limit {
            let fits = usize::try_from(limit.saturating_sub(RESERVED_FDS) / 2)
                .unwrap_or(usize::MAX)
                .max(1);
            if max == 0 || max > fits {
                tracing::warn!(
                    configured = self.max,
                    effective = fits,
                    fd_limit = limit,
                    "SIDECAR_MAX_TCP_CONNECTIONS lowered to fit the descriptor limit (raise `ulimit -n`)"
                );
                max = fits;
            }
        }
        Self {
            max,
            per_ip: self.per_ip,
            trusted: self.trusted.clone(),
            open: Mutex::new(Open::default()),
        }
    }

    /// Counts a new connection from `peer`, or says which cap it is over.
    pub fn acquire(self: &Arc<Self>, peer: IpAddr) -> Result<Permit, Refusal> {
        let client = (self.per_ip > 0 && !self.trusted.contains(peer)).then(|| peer::bucket(peer));
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if self.max > 0 && open.total >= self.max {
            return Err(Refusal::Total);
        }
        if let Some(client) = client {
            let count = open.by_client.entry(client).or_insert(0);
            if *count >= self.per_ip {
                return Err(Refusal::PerIp);
            }
            *count += 1;
        }
        open.total += 1;
        metrics::gauge!(names::TCP_CONNECTIONS).set(open.total as f64);
        Ok(Permit {
            limits: self.clone(),
            client,
        })
    }

    /// Connections counted now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).total
    }

    fn release(&self, client: Option<IpAddr>) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(client) = client
            && let Some(count) = open.by_client.get_mut(&client)
        {
            *count -= 1;
            if *count == 0 {
                open.by_client.remove(&client);
            }
        }
        metrics::gauge!(names::TCP_CONNECTIONS).set(open.total as f64);
    }
}

/// One counted connection; dropping it (with the socket) releases the count.
pub struct Permit {
    limits: Arc<Limits>,
    client: Option<IpAddr>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limits.release(self.client);
    }
}

/// The soft `RLIMIT_NOFILE` of this process, where the OS tells (Linux `/proc`).
fn fd_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Ends one accepted connection from outside hyper: its socket then reads end-of-stream
/// and refuses writes, so whoever holds it (hyper, or engineioxide's websocket task after
/// an upgrade) closes it. In every request's extensions; the hub uses it to close an
/// Engine.IO session's transport after too many refused CONNECTs.
#[derive(Clone, Default)]
pub struct ConnectionCloser(Arc<CloseState>);

#[derive(Default)]
struct CloseState {
    closed: std::sync::atomic::AtomicBool,
    reader: futures_util::task::AtomicWaker,
}

impl ConnectionCloser {
    pub fn close(&self) {
        self.0
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.0.reader.wake();
    }

    fn is_closed(&self) -> bool {
        self.0.closed.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// A socket that carries its [`Permit`]: wherever hyper moves the I/O (an upgrade hands it
/// to the websocket task), the count goes with it and ends when the socket is closed.
struct Counted {
    tcp: TcpStream,
    _permit: Permit,
    closer: ConnectionCloser,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Registered before the check, so a close between the two still wakes this read.
        self.closer.0.reader.register(cx.waker());
        if self.closer.is_closed() {
            return Poll::Ready(Ok(())); // end of stream
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.closer.is_closed() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.closer.is_closed() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Serves `router` on `listener` until `stop` completes; then stops accepting, asks every
/// HTTP connection to finish its request and close, and returns once they all have.
/// Upgraded connections are not waited for (the hub closes sockets before `stop`).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &Limits,
    header_timeout: Duration,
    stop: impl Future<Output = ()>,
) -> io::Result<()> {
    let limits = Arc::new(limits.fitted(fd_limit()));
    // `closing` tells connections to shut down gracefully; each holds a `done` receiver
    // until it ends, so `done_tx.closed()` is "every connection has ended".
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let (done_tx, done_rx) = tokio::sync::watch::channel(());
    let mut stop = pin!(stop);
    let mut backoff = MIN_BACKOFF;
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    backoff = MIN_BACKOFF;
                    accepted
                }
                Err(err) if is_per_connection(&err) => continue,
                Err(err) => {
                    // Out of descriptors or memory: the pending connection stays in the
                    // backlog; retrying at once would spin a core.
                    metrics::counter!(names::ACCEPT_ERRORS).increment(1);
                    tracing::warn!(error = %err, backoff_ms = backoff.as_millis() as u64, "accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = &mut stop => break,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let permit = match limits.acquire(peer.ip()) {
            Ok(permit) => permit,
            Err(refusal) => {
                metrics::counter!(names::TCP_REFUSED, "reason" => refusal.label()).increment(1);
                tracing::debug!(peer = %peer, reason = refusal.label(), "connection refused");
                drop(tcp);
                continue;
            }
        };
        // Without TCP_NODELAY, Nagle holds each event frame written while an earlier one
        // is unacknowledged until the client's delayed ACK (up to 40 ms on Linux): the
        // latency tail of every fan-out. Node's `ws` sets it too.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "cannot set TCP_NODELAY");
        }
        let closer = ConnectionCloser::default();
        let io = TokioIo::new(Counted {
            tcp,
            _permit: permit,
            closer: closer.clone(),
        });
        tokio::spawn(connection(
            io,
            peer,
            closer,
            router.clone(),
            header_timeout,
            closing_rx.clone(),
            done_rx.clone(),
        ));
    }
    drop(listener);
    let _ = closing_tx.send(true);
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
}

async fn connection(
    io: TokioIo<Counted>,
    peer: SocketAddr,
    closer: ConnectionCloser,
    router: Router,
    header_timeout: Duration,
    mut closing: tokio::sync::watch::Receiver<bool>,
    _done: tokio::sync::watch::Receiver<()>,
) {
    let service = hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        request.extensions_mut().insert(closer.clone());
        router.clone().oneshot(request.map(Body::new))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let mut conn = pin!(builder.serve_connection(io, service).with_upgrades());
    let mut closing_seen = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(err) = result {
                    tracing::trace!(error = %err, "connection ended");
                }
                break;
            }
            _ = closing.wait_for(|closing| *closing), if !closing_seen => {
                closing_seen = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Errors about one connection that the next `accept` does not share.
fn is_per_connection(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_ip: usize, trusted: &[&str]) -> Arc<Limits> {
        let trusted: Vec<String> = trusted.iter().map(|s| (*s).to_owned()).collect();
        Arc::new(Limits::new(
            &Config {
                max_tcp_connections: max,
                max_tcp_connections_per_ip: per_ip,
                ..Config::default()
            },
            TrustedProxies::parse(&trusted).unwrap(),
        ))
    }

    #[test]
    fn caps_count_and_release() {
        let limits = limits(3, 2, &["10.0.0.1"]);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let a6: IpAddr = "2001:db8::1".parse().unwrap();
        let a6_other: IpAddr = "2001:db8::2".parse().unwrap();
        let first = limits.acquire(a).unwrap();
        let _second = limits.acquire(a).unwrap();
        assert_eq!(limits.acquire(a).err(), Some(Refusal::PerIp));
        drop(first);
        let _third = limits.acquire(a).unwrap();
        let _v6 = limits.acquire(a6).unwrap();
        assert_eq!(limits.acquire(a6_other).err(), Some(Refusal::Total));
        assert_eq!(limits.open(), 3);
    }

    #[test]
    fn trusted_proxies_skip_the_per_ip_cap() {
        let limits = limits(0, 1, &["10.0.0.1"]);
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<Permit> = (0..5).map(|_| limits.acquire(proxy).unwrap()).collect();
        assert_eq!(limits.open(), 5);
        drop(held);
        assert_eq!(limits.open(), 0);
        assert!(limits.open.lock().unwrap().by_client.is_empty());
    }

    #[test]
    fn the_cap_fits_the_descriptor_limit() {
        let limits = limits(10_000, 0, &[]);
        assert_eq!(
            limits.fitted(Some(512)).max,
            (512 - RESERVED_FDS as usize) / 2
        );
        assert_eq!(limits.fitted(Some(1 << 20)).max, 10_000);
        assert_eq!(limits.fitted(None).max, 10_000);
    }
}
