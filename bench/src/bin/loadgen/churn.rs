//! A `soak` client: opted in to recovery, it drops its connection at random intervals and
//! reconnects with `auth.offset` = the last offset it saw, so the server replays what it
//! missed (`sidecar.recovery` first, then the missed events, then live ones). It records
//! every `seq` it got, so the run can count per client what is missing and what came twice.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evo_bench::now_ns;
use evo_bench::report::Shards;
use evo_bench::sio::{self, Packet, Target, Ws};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::webhooks::set_bit;

/// What the clients are told to do; the run moves forward through these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Drop the connection at random intervals and reconnect.
    Churn,
    /// Stay connected (reconnect if dropped): the drain before the final count.
    Hold,
    /// Close and end.
    Stop,
}

/// Shared by every client of a run.
pub struct ChurnConfig {
    pub target: Target,
    pub apikey: String,
    pub instances: u64,
    /// A connection lives a uniformly random time in this range (seconds).
    pub life_s: (f64, f64),
    /// Longest pause before reconnecting (uniform from 0).
    pub reconnect_pause: Duration,
    pub seed: u64,
}

/// What one client saw. Atomics and a mutex, because the drain reads them while it runs.
#[derive(Default)]
pub struct ChurnStat {
    /// Bit `seq / instances`: the events of its namespace it received.
    pub seen: Mutex<Vec<u64>>,
    pub received: AtomicU64,
    pub duplicates: AtomicU64,
    /// Another namespace, no `seq`, or no trailing offset.
    pub unexpected: AtomicU64,
    /// Successful CONNECTs, the first included.
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Connections the server (or the network) ended, not the client.
    pub dropped_by_server: AtomicU64,
    /// `sidecar.recovery` events, and those with `recovered: false` (a gap was possible:
    /// the server then replays everything it still retains).
    pub recoveries: AtomicU64,
    pub not_recovered: AtomicU64,
    pub replayed: AtomicU64,
    pub connected: AtomicBool,
    /// The first connect succeeded.
    pub joined: AtomicBool,
}

/// splitmix64: enough randomness for churn timings without another dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[low, high)`.
    fn between(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Why a connection ended.
enum End {
    /// The client dropped it (churn).
    Churned,
    /// The server or the network did.
    Dropped,
    /// The run is over.
    Stop,
}

/// One client's whole life on `ns`, until [`Phase::Stop`]. Its first connect waits for a
/// permit of `first_connects` (bounded handshakes at the start); reconnects do not.
pub async fn run(
    config: Arc<ChurnConfig>,
    index: usize,
    ns: String,
    stat: Arc<ChurnStat>,
    latency: Arc<Shards>,
    first_connects: Arc<Semaphore>,
    mut phase: watch::Receiver<Phase>,
) {
    let mut rng = Rng(config.seed ^ (index as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut offset = String::new();
    let mut permit = Some(
        first_connects
            .acquire_owned()
            .await
            .expect("open semaphore"),
    );
    loop {
        if *phase.borrow() == Phase::Stop {
            return;
        }
        let auth = sio::recovery_auth(&config.apikey, &offset);
        let joined = tokio::time::timeout(
            Duration::from_secs(30),
            sio::connect_with_auth(&config.target, &ns, Some(&auth)),
        )
        .await;
        let Ok(Ok(ws)) = joined else {
            stat.connect_failures.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs_f64(rng.between(0.2, 1.0))).await;
            continue;
        };
        permit.take();
        stat.connects.fetch_add(1, Ordering::Relaxed);
        stat.joined.store(true, Ordering::Relaxed);
        stat.connected.store(true, Ordering::Relaxed);
        let life = Duration::from_secs_f64(rng.between(config.life_s.0, config.life_s.1));
        let end = session(
            ws,
            &config,
            &ns,
            &mut offset,
            Instant::now() + life,
            &stat,
            &latency,
            index,
            &mut phase,
        )
        .await;
        stat.connected.store(false, Ordering::Relaxed);
        match end {
            End::Stop => return,
            End::Dropped => {
                stat.dropped_by_server.fetch_add(1, Ordering::Relaxed);
            }
            End::Churned => {}
        }
        let pause = rng.between(0.0, config.reconnect_pause.as_secs_f64());
        tokio::time::sleep(Duration::from_secs_f64(pause)).await;
    }
}

/// One connection: events counted, pings answered, until `deadline` (while churning), a
/// drop, or the end of the run. `offset` follows the last event received.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename these
async fn session(
    mut ws: Ws,
    config: &ChurnConfig,
    ns: &str,
    offset: &mut String,
    deadline: Instant,
    stat: &ChurnStat,
    latency: &Shards,
    index: usize,
    phase: &mut watch::Receiver<Phase>,
) -> End {
    // Events still to come from the last `sidecar.recovery`: replays, kept out of latency.
    let mut replay_left = 0u64;
    loop {
        let current = *phase.borrow_and_update();
        let churning = current == Phase::Churn;
        if current == Phase::Stop {
            let _ = ws.close(None).await;
            return End::Stop;
        }
        tokio::select! {
            message = ws.next() => {
                let text = match message {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_)) | Err(_)) | None => return End::Dropped,
                    Some(Ok(_)) => continue,
                };
                match sio::parse(text.as_str()) {
                    Packet::Event { ns: on, json, .. } if on == ns => {
                        let instances = config.instances;
                        on_event(json, instances, offset, &mut replay_left, stat, latency, index);
                    }
                    Packet::Ping if ws.send(Message::text("3")).await.is_err() => {
                        return End::Dropped;
                    }
                    Packet::Close | Packet::Disconnect { .. } => return End::Dropped,
                    Packet::Event { .. } => {
                        stat.unexpected.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
            // Dropped without a close frame: the server sees the transport end, as with a
            // phone that loses its network.
            () = tokio::time::sleep_until(deadline), if churning => return End::Churned,
            changed = phase.changed() => if changed.is_err() { return End::Stop },
        }
    }
}

fn on_event(
    json: &str,
    instances: u64,
    offset: &mut String,
    replay_left: &mut u64,
    stat: &ChurnStat,
    latency: &Shards,
    index: usize,
) {
    if json.starts_with(r#"["sidecar.recovery""#) {
        stat.recoveries.fetch_add(1, Ordering::Relaxed);
        let announced: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
        let body = &announced[1];
        if body["recovered"] != serde_json::Value::Bool(true) {
            stat.not_recovered.fetch_add(1, Ordering::Relaxed);
        }
        *replay_left = body["replayed"].as_u64().unwrap_or(0);
        stat.replayed.fetch_add(*replay_left, Ordering::Relaxed);
        return;
    }
    let now = now_ns();
    let (Some(seq), Some(sent), Some(at)) = (
        sio::u64_after(json, "\"seq\":"),
        sio::u64_after(json, "\"sent_ns\":"),
        sio::trailing_offset(json),
    ) else {
        stat.unexpected.fetch_add(1, Ordering::Relaxed);
        return;
    };
    offset.clear();
    offset.push_str(at);
    let replayed = *replay_left > 0;
    *replay_left = replay_left.saturating_sub(1);
    let again = set_bit(
        &mut stat.seen.lock().unwrap_or_else(|e| e.into_inner()),
        seq / instances,
    );
    if again {
        stat.duplicates.fetch_add(1, Ordering::Relaxed);
        return;
    }
    stat.received.fetch_add(1, Ordering::Relaxed);
    // A replayed event's age is mostly the time the client was away: live events only.
    if !replayed {
        latency.record(index, now.saturating_sub(sent) / 1000);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_stays_in_range() {
        let mut rng = Rng(7);
        for _ in 0..10_000 {
            let x = rng.between(5.0, 30.0);
            assert!((5.0..30.0).contains(&x));
        }
    }

    #[test]
    fn events_move_the_offset_and_count_duplicates() {
        let stat = ChurnStat::default();
        let latency = Shards::new(1);
        let (mut offset, mut replay_left) = (String::new(), 0);
        let event = r#"["messages.upsert",{"data":{"seq":12,"sent_ns":1}},"e-5"]"#;
        on_event(event, 4, &mut offset, &mut replay_left, &stat, &latency, 0);
        on_event(event, 4, &mut offset, &mut replay_left, &stat, &latency, 0);
        assert_eq!(offset, "e-5");
        assert_eq!(stat.received.load(Ordering::Relaxed), 1);
        assert_eq!(stat.duplicates.load(Ordering::Relaxed), 1);
        let recovery =
            r#"["sidecar.recovery",{"recovered":false,"replayed":3,"from":"a","to":"b"}]"#;
        on_event(
            recovery,
            4,
            &mut offset,
            &mut replay_left,
            &stat,
            &latency,
            0,
        );
        assert_eq!(stat.not_recovered.load(Ordering::Relaxed), 1);
        assert_eq!(stat.replayed.load(Ordering::Relaxed), 3);
        assert_eq!((offset.as_str(), replay_left), ("e-5", 3));
        // A replayed event counts, but not in latency.
        let replay = r#"["messages.upsert",{"data":{"seq":16,"sent_ns":1}},"e-6"]"#;
        on_event(replay, 4, &mut offset, &mut replay_left, &stat, &latency, 0);
        assert_eq!((stat.received.load(Ordering::Relaxed), replay_left), (2, 2));
        assert_eq!(latency.merged().len(), 1);
        let bare = r#"["messages.upsert",{"data":{"seq":1}}]"#;
        on_event(bare, 4, &mut offset, &mut replay_left, &stat, &latency, 0);
        assert_eq!(stat.unexpected.load(Ordering::Relaxed), 1);
    }
}
