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

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt as _;

use crate::telemetry::names;

mod limits;

pub use limits::{Config, Limits, Permit, Refusal};

use limits::fd_limit;

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
