//! Waiting without sleeping to synchronise: the one poll loop (`eventually` and its
//! siblings), the one patience, and the one free port.

use std::net::SocketAddr;
use std::time::Duration;

/// How long a test waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(50);

/// A loopback address nobody listens on right now.
pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Polls `check` until it holds, for at most [`PATIENCE`].
pub async fn eventually(what: &str, check: impl AsyncFnMut() -> bool) {
    eventually_within(what, PATIENCE, check).await;
}

/// [`eventually`] with its own patience.
pub async fn eventually_within(
    what: &str,
    patience: Duration,
    mut check: impl AsyncFnMut() -> bool,
) {
    eventually_value(
        what,
        patience,
        async || if check().await { Ok(()) } else { Err("") },
    )
    .await;
}

/// Polls `check` until it returns `Ok`, for at most `patience`, and returns that value.
/// `check` runs at least once; on timeout the panic shows its last `Err`.
pub async fn eventually_value<T, E: std::fmt::Display>(
    what: &str,
    patience: Duration,
    mut check: impl AsyncFnMut() -> Result<T, E>,
) -> T {
    let started = tokio::time::Instant::now();
    loop {
        let last = match check().await {
            Ok(value) => return value,
            Err(last) => last,
        };
        assert!(
            started.elapsed() < patience,
            "never happened within {patience:?}: {what} {last}"
        );
        tokio::time::sleep(POLL).await;
    }
}
