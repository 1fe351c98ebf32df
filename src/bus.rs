//! Retain, then fan out: everything between an accepted webhook and the hub.
//!
//! [`Bus::publish`] applies `SIDECAR_EVENTS`, deduplicates, and retains the event:
//! - **memory mode**: the local dedupe window, then [`Hub::deliver`] on this replica (which
//!   appends to the namespace log and broadcasts);
//! - **Redis mode**: one script sets the shared dedupe key and appends to the stream
//!   ([`Cluster::append`]); the [`Reader`] of every replica, this one included, reads the
//!   stream in order and calls [`Hub::deliver`]. While Redis fails, the event is delivered
//!   here at once, and its fingerprint is remembered (`local_only`) so that, if the append
//!   did land after all, the reader skips it instead of delivering it twice.
//!
//! So the hub has one entry for events, `Hub::deliver`, whatever the mode. This module
//! knows nothing of HTTP or of sockets.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::activity::Activity;
use crate::cluster::{self, Cluster, StreamEntry};
use crate::dedupe::Dedupe;
use crate::envelope::{self, Envelope};
use crate::expiring::ExpiringMap;
use crate::hub::{self, Hub};
use crate::replay;
use crate::telemetry;

/// What became of a published event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Retained and handed over for delivery.
    Fresh,
    /// A retry of an event already accepted within the dedupe window: nothing emitted.
    Duplicate,
    /// Dropped by `SIDECAR_EVENTS`: accepted, never retained or emitted.
    Filtered,
}

/// How long a locally delivered fingerprint is remembered against a late stream entry.
const LOCAL_ONLY_MEMORY: Duration = Duration::from_secs(3600);
/// The most bytes of locally delivered fingerprints remembered (16 bytes and overhead
/// each): past it the oldest go first, and a late stream entry for one of those is
/// delivered twice, which opted-in clients' offsets still reveal.
const LOCAL_ONLY_MAX_BYTES: usize = 8 * 1024 * 1024;
/// What one remembered fingerprint costs, for the byte bound.
const LOCAL_ONLY_ENTRY_BYTES: usize = 64;
/// The pause before the stream reader tries Redis again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);

/// The path of every event from ingest to the hub. Cheap to share (`Arc`).
pub struct Bus {
    hub: Hub,
    /// Per-instance activity (last event, rate, state) for silence detection.
    activity: Arc<Activity>,
    replay: Arc<replay::Store>,
    /// With Redis, events go through the shared stream and come back to every replica.
    cluster: Option<Arc<Cluster>>,
    /// `None` means every event is emitted.
    allowed_events: Option<HashSet<String>>,
    /// Fingerprints of accepted webhooks (memory mode, or while Redis is unreachable).
    dedupe: Dedupe,
    dedupe_window: Duration,
    /// Fingerprints delivered here only because Redis failed, oldest first.
    local_only: Mutex<ExpiringMap<u128, ()>>,
}

impl Bus {
    /// `events` is `SIDECAR_EVENTS` (UPPER_SNAKE, empty: all).
    pub fn new(
        hub: Hub,
        activity: Arc<Activity>,
        replay: Arc<replay::Store>,
        cluster: Option<Arc<Cluster>>,
        events: &[String],
        dedupe_window: Duration,
    ) -> Self {
        for name in events {
            if envelope::evolution_event(name).is_none() {
                let closest = envelope::upper_snake(envelope::closest_evolution_event(name));
                tracing::warn!(
                    event = %name,
                    closest = %closest,
                    "SIDECAR_EVENTS names an event Evolution does not send (did you mean {closest}?): it filters nothing in"
                );
            }
        }
        Self {
            hub,
            activity,
            replay,
            cluster,
            allowed_events: (!events.is_empty()).then(|| events.iter().cloned().collect()),
            dedupe: Dedupe::new(dedupe_window),
            dedupe_window,
            local_only: Mutex::new(ExpiringMap::new(LOCAL_ONLY_MAX_BYTES)),
        }
    }

    /// Publishes one event. When this returns `Fresh`, the event is retained: in the
    /// shared Redis stream (every replica, this one included, delivers it as it reads the
    /// stream), or, in memory mode or while Redis is unreachable, in this replica's log,
    /// delivered here.
    ///
    /// With a `fingerprint`, a body already accepted within the dedupe window is a
    /// `Duplicate`; in Redis mode the check and the append are one atomic script, so a
    /// crash between them cannot turn a retry into a loss.
    pub async fn publish(&self, envelope: &Envelope, fingerprint: Option<u128>) -> Published {
        // Deletions always pass `SIDECAR_EVENTS`: the hub must see them to forget the
        // instance (on every replica, so they travel like any event).
        if let Some(allowed) = &self.allowed_events
            && !allowed.contains(envelope.event.upper_snake())
            && !hub::is_deletion(envelope.event.as_str())
        {
            // Not emitted, but proof that Evolution's webhooks flow.
            self.activity.record(envelope);
            return Published::Filtered;
        }
        // While Redis is known to be down the circuit is open: publish here at once rather
        // than wait for a timeout per webhook; the reader's retries close it again.
        if let Some(cluster) = &self.cluster
            && cluster.health() != cluster::Health::Down
        {
            let dedupe = fingerprint.map(|print| (print, self.dedupe_window));
            match cluster.append(envelope, dedupe).await {
                Ok(Some(_)) => return Published::Fresh,
                Ok(None) => return Published::Duplicate,
                Err(err) => tracing::debug!(error = %err, "publishing locally"),
            }
        }
        if let Some(print) = fingerprint {
            if self.dedupe.seen(print) {
                return Published::Duplicate;
            }
            if self.cluster.is_some() {
                let mut local_only = self.local_only.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                local_only.expire(LOCAL_ONLY_MEMORY, now);
                local_only.insert(print, (), LOCAL_ONLY_ENTRY_BYTES, now);
            }
        }
        self.deliver(envelope, 0).await;
        Published::Fresh
    }

    /// Hands an event to the hub (the only way events reach it), noting its instance's
    /// activity first; a deletion forgets the instance instead.
    async fn deliver(&self, envelope: &Envelope, seq: u64) {
        if hub::is_deletion(envelope.event.as_str()) {
            self.activity.forget(&envelope.instance);
        } else {
            self.activity.record(envelope);
        }
        self.hub.deliver(envelope, seq).await;
    }

    /// Starts following the shared Redis stream (Redis mode only). The task ends when the
    /// returned [`Reader`] is dropped.
    pub fn spawn_reader(self: &Arc<Self>) -> Option<Reader> {
        let cluster = self.cluster.clone()?;
        let bus = self.clone();
        Some(Reader(tokio::spawn(
            async move { bus.follow(&cluster).await },
        )))
    }

    /// Reads the stream in order and delivers what it reads. Adopts the cluster's epoch
    /// once Redis answers; retries meanwhile.
    async fn follow(&self, cluster: &Cluster) {
        let mut after = cluster.start_id();
        let mut epoch_adopted = false;
        let mut batch = cluster::READ_BATCH;
        loop {
            if !epoch_adopted {
                match cluster.epoch(&self.replay.epoch()).await {
                    Ok(epoch) => {
                        self.replay.set_epoch(epoch);
                        epoch_adopted = true;
                    }
                    Err(_) => {
                        tokio::time::sleep(RECONNECT_PAUSE).await;
                        continue;
                    }
                }
            }
            telemetry::meters()
                .redis_reader_stalled
                .set(if cluster.is_stalled() { 1.0 } else { 0.0 });
            match cluster.read(&after, batch).await {
                Ok(entries) => {
                    batch = (batch * 2).min(cluster::READ_BATCH);
                    for entry in entries {
                        after = self.deliver_entry(entry).await;
                    }
                }
                Err(err) => {
                    tracing::debug!(error = %err, batch, "redis stream read failed");
                    if matches!(err, cluster::Error::Timeout) {
                        // Too much to arrive in time (or Redis is slow): ask for less.
                        batch = (batch / 2).max(1);
                    }
                    // Redis may come back empty: check the epoch again first.
                    epoch_adopted = false;
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                }
            }
        }
    }

    /// Delivers one stream entry (unless this replica delivered it already, or it does
    /// not parse) and returns its ID, the reader's next position.
    async fn deliver_entry(&self, entry: StreamEntry) -> String {
        match entry {
            StreamEntry::Delivery(delivery) => {
                let delivered_here = delivery.fingerprint.is_some_and(|print| {
                    let mut local_only = self.local_only.lock().unwrap_or_else(|e| e.into_inner());
                    let known = local_only.get(&print).is_some();
                    local_only.remove(&print);
                    known
                });
                if !delivered_here {
                    self.deliver(&delivery.envelope, delivery.seq).await;
                }
                delivery.id
            }
            StreamEntry::Malformed { id, why } => {
                // Version skew in a rolling upgrade, or a hand-written entry: skipped, so
                // one bad entry never stops delivery on every replica.
                tracing::warn!(id = %id, error = %why, "skipping a malformed redis stream entry");
                telemetry::meters().redis_malformed_entries.increment(1);
                id
            }
        }
    }
}

/// A publish that ended without saying whether the event was retained (its task panicked
/// or was cancelled): the sender must deliver it again, never count it as accepted.
#[derive(Debug, thiserror::Error)]
#[error("the event was not retained: {0}")]
pub struct NotRetained(pub String);

/// Runs `publish` as its own task, so a caller that is cancelled (a webhook client hanging
/// up) cannot cut it between "seen" and "retained". A task that panics or is cancelled says
/// nothing about retention: only [`NotRetained`] is safe, never an acknowledgement.
/// Every ingest (`webhook`, `amqp`) publishes through this.
pub async fn retained(
    publish: impl Future<Output = Published> + Send + 'static,
) -> Result<Published, NotRetained> {
    tokio::spawn(publish)
        .await
        .map_err(|err| NotRetained(err.to_string()))
}

/// The stream reader's task: aborted when dropped.
pub struct Reader(tokio::task::JoinHandle<()>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abort();
    }
}
