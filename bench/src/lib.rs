//! Run with: the `loadgen` and `floor` binaries (`cargo build --release -p evo-bench`); this
//! library only holds what they share.
//!
//! # Layout
//! - [`sio`]: the client side of Engine.IO v4 / Socket.IO v5 over a raw WebSocket, just enough
//!   to join a namespace, answer pings and read events or acks cheaply.
//! - [`procfs`]: CPU time and resident memory of a process, read from `/proc/<pid>`.
//! - [`report`]: latency percentiles from HDR histograms and the comparison table of `run.sh`.

pub mod procfs;
pub mod report;
pub mod sio;

use std::sync::OnceLock;
use std::time::Instant;

/// Nanoseconds since the first call in this process: the clock of `sent_ns` timestamps.
/// Sender and receivers live in the same process, so a monotonic clock is enough.
pub fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}
