//! The socket.io clients of a run: connected with a bounded number of handshakes in flight,
//! each then a task that answers pings and counts the events of its namespace (distinct,
//! duplicate, unexpected) and records their latency. Clients that opt in to recovery send
//! `auth: {"apikey", "offset": ""}` and get each event with its offset as a trailing argument.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use evo_bench::now_ns;
use evo_bench::report::{self, Shards};
use evo_bench::sio::{self, Packet, Target, Ws};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::common_args::Common;

/// What one client saw. Atomics, because the drain loop reads them while the task runs.
#[derive(Default)]
pub struct ClientStat {
    /// Distinct events received on its namespace.
    pub received: AtomicU64,
    /// Events received twice (same `seq`).
    pub duplicates: AtomicU64,
    /// Packets that were not expected: another namespace, no `sent_ns`, or (recovering) no
    /// trailing offset.
    pub unexpected: AtomicU64,
    /// `now_ns` of the last event received.
    pub last_ns: AtomicU64,
    /// The connection ended before the run did.
    pub gone: AtomicBool,
}

/// The connected clients of a run.
pub struct Clients {
    /// Per client: its namespace index and what it saw; `None` if it failed to connect.
    pub stats: Vec<Option<(usize, Arc<ClientStat>)>>,
    pub connect_us: Histogram<u64>,
    pub connected: usize,
    pub failed: usize,
    /// The first few connect errors, for the report.
    pub errors: Vec<String>,
    pub elapsed: Duration,
}

pub fn namespace(prefix: &str, index: usize) -> String {
    format!("/{prefix}{index}")
}

/// Connects `count` clients, client i on namespace i mod `instances`, with at most
/// `connect_concurrency` handshakes at once; each connected client then runs `receive`.
/// `recovering`: opt in to recovery (from now on) at CONNECT.
pub async fn connect_clients(
    common: &Common,
    target: &Target,
    count: usize,
    instances: usize,
    recovering: bool,
    latency: Arc<Shards>,
) -> Clients {
    let auth = recovering.then(|| Arc::new(sio::recovery_auth(&common.apikey, "")));
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    let (report_tx, mut report_rx) = mpsc::unbounded_channel();
    for index in 0..count {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("open semaphore");
        let target = target.clone();
        let instance = index % instances;
        let ns = namespace(&common.instance_prefix, instance);
        let report_tx = report_tx.clone();
        let latency = latency.clone();
        let auth = auth.clone();
        tokio::spawn(async move {
            let begun = now_ns();
            let joined = tokio::time::timeout(
                Duration::from_secs(30),
                sio::connect_from(
                    &target,
                    target.source(index),
                    &ns,
                    auth.as_deref().map(String::as_str),
                ),
            )
            .await;
            drop(permit);
            let elapsed_us = (now_ns() - begun) / 1000;
            match joined {
                Ok(Ok(ws)) => {
                    let stat = Arc::new(ClientStat::default());
                    let _ = report_tx.send((index, Ok((elapsed_us, instance, stat.clone()))));
                    drop(report_tx);
                    let recovering = auth.is_some();
                    receive(ws, ns, instances as u64, recovering, stat, latency, index).await;
                }
                Ok(Err(err)) => {
                    let _ = report_tx.send((index, Err(err)));
                }
                Err(_) => {
                    let _ = report_tx.send((index, Err("connect timed out after 30 s".into())));
                }
            }
        });
    }
    drop(report_tx);
    let mut clients = Clients {
        stats: (0..count).map(|_| None).collect(),
        connect_us: report::histogram(),
        connected: 0,
        failed: 0,
        errors: Vec::new(),
        elapsed: Duration::ZERO,
    };
    // Connected clients keep their sender while they live: count the reports instead of
    // waiting for the channel to close.
    for _ in 0..count {
        let Some((index, outcome)) = report_rx.recv().await else {
            break;
        };
        match outcome {
            Ok((micros, instance, stat)) => {
                clients.connect_us.saturating_record(micros);
                clients.stats[index] = Some((instance, stat));
                clients.connected += 1;
            }
            Err(err) => {
                clients.failed += 1;
                if clients.errors.len() < 5 {
                    clients.errors.push(err);
                }
            }
        }
    }
    clients.elapsed = started.elapsed();
    clients
}

/// A connected client's life: count events on `ns`, answer pings, until the connection
/// ends. `seq`s of one namespace are `instance + k * instances`, so `seq / instances`
/// indexes a bitmap that spots duplicates. The payload is the first argument either way, so
/// `seq` and `sent_ns` are found the same with or without a trailing offset.
async fn receive(
    mut ws: Ws,
    ns: String,
    instances: u64,
    recovering: bool,
    stat: Arc<ClientStat>,
    latency: Arc<Shards>,
    index: usize,
) {
    let mut seen: Vec<u64> = Vec::new();
    while let Some(message) = ws.next().await {
        let text = match message {
            Ok(Message::Text(text)) => text,
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        match sio::parse(text.as_str()) {
            Packet::Event { ns: on, json, .. } => {
                let now = now_ns();
                let sent = sio::u64_after(json, "\"sent_ns\":");
                let seq = sio::u64_after(json, "\"seq\":");
                let offset_ok = !recovering || sio::trailing_offset(json).is_some();
                let (Some(sent), Some(seq), true) = (sent, seq, on == ns && offset_ok) else {
                    stat.unexpected.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let slot = (seq / instances) as usize;
                let (word, bit) = (slot / 64, 1u64 << (slot % 64));
                if seen.len() <= word {
                    seen.resize(word + 1, 0);
                }
                if seen[word] & bit != 0 {
                    stat.duplicates.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                seen[word] |= bit;
                latency.record(index, now.saturating_sub(sent) / 1000);
                stat.received.fetch_add(1, Ordering::Relaxed);
                stat.last_ns.fetch_max(now, Ordering::Relaxed);
            }
            // A ping whose pong cannot be sent ends the client; otherwise nothing to do.
            Packet::Ping if ws.send(Message::text("3")).await.is_err() => break,
            Packet::Close | Packet::Disconnect { .. } => break,
            _ => {}
        }
    }
    stat.gone.store(true, Ordering::Relaxed);
}

pub fn connect_summary(clients: &Clients, requested: usize) -> Value {
    json!({
        "requested": requested,
        "connected": clients.connected,
        "failed": clients.failed,
        "errors": clients.errors,
        "connect_seconds": clients.elapsed.as_secs_f64(),
    })
}

pub fn print_connect(clients: &Clients, requested: usize) {
    println!(
        "clients: {}/{} connected in {:.2} s, {} failed; connect {}",
        clients.connected,
        requested,
        clients.elapsed.as_secs_f64(),
        clients.failed,
        report::percentiles_line(&clients.connect_us)
    );
    for err in &clients.errors {
        println!("  connect error: {err}");
    }
}
