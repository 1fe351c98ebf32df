//! Retained events, so a client that blinks can recover what it missed.
//!
//! Every namespace (`/<instance>` and `/`) has a [`NamespaceLog`]: its recent events, each
//! with a sequence number, bounded by count, age and bytes (per namespace and in total).
//! An offset, as clients see it, is `<epoch>-<seq>`: the epoch changes at every start in
//! memory mode, so offsets from before a restart are recognized as unknown.
//!
//! The log also keeps the instance's state for late joiners: its last `connection.update`
//! and its last `qrcode.updated`.
//!
//! Eviction is amortized: each append pops what fell out of the bounds from the front of
//! that namespace's queue; the total bound evicts the globally oldest entries, events and
//! state alike, from one arrival-order queue (O(1) each, whatever the number of
//! namespaces). State is kept for [`STATE_MAX_AGE`] and counts towards the total bytes.
//! At most [`MAX_LOGS`] logs are held. A sweeper (owned by the app, stopped when it drops)
//! applies the age bounds to idle namespaces.
//! This module knows nothing of sockets or HTTP.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::setting;

mod log;

pub use log::{Entry, NamespaceLog, Offset, Resume};

use log::LogInner;

/// Retention bounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Events retained per namespace.
    pub max_events: usize,
    /// How long an event is retained.
    pub max_age_secs: u64,
    /// Payload bytes retained per namespace.
    pub max_bytes: u64,
    /// Payload bytes retained across all namespaces.
    pub max_total_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_events: 10_000,
            max_age_secs: 600,
            max_bytes: 64 * 1024 * 1024,
            max_total_bytes: 512 * 1024 * 1024,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), setting::Error> {
        if self.max_events == 0 {
            return Err(setting::invalid(
                "replay.max_events",
                &0,
                "must be positive",
            ));
        }
        if self.max_bytes > self.max_total_bytes {
            return Err(setting::invalid(
                "replay.max_bytes",
                &self.max_bytes,
                "must not exceed replay.max_total_bytes",
            ));
        }
        Ok(())
    }
}

/// How long an instance's last `connection.update` (and `qrcode.updated`) is kept for late
/// joiners when nothing newer comes; it also counts towards `max_total_bytes`.
pub const STATE_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// The most namespace logs held at once. One exists per instance (and `/`) with retained
/// events, state or a socket; past this an idle one is dropped to make room.
pub const MAX_LOGS: usize = 100_000;

/// All namespaces' logs.
pub struct Store {
    config: Config,
    /// Random per start in memory mode; with Redis, the cluster's (adopted once reachable).
    epoch: std::sync::RwLock<String>,
    logs: Mutex<HashMap<String, Arc<NamespaceLog>>>,
    /// Every retained event and state entry in arrival order, across namespaces: the
    /// globally oldest is at the front, so the total bound evicts in O(1) per entry.
    /// Entries that left their log otherwise (per-namespace bounds, a newer state, a
    /// deleted instance) stay here, stale, until they reach the front or a compaction.
    arrivals: Mutex<VecDeque<Arrival>>,
    /// [`MAX_LOGS`], smaller in tests.
    max_logs: usize,
    /// Event and state bytes retained across all namespaces.
    total_bytes: AtomicU64,
    /// The newest sequence number given out in any namespace: a log created again after
    /// a sweep starts above it, so it never reuses an offset.
    last_seq: AtomicU64,
}

impl Store {
    pub fn new(config: &Config) -> Result<Arc<Self>, setting::Error> {
        Self::with_max_logs(config, MAX_LOGS)
    }

    fn with_max_logs(config: &Config, max_logs: usize) -> Result<Arc<Self>, setting::Error> {
        config.validate()?;
        Ok(Arc::new(Self {
            max_logs,
            config: config.clone(),
            epoch: std::sync::RwLock::new(new_epoch()),
            logs: Mutex::new(HashMap::new()),
            arrivals: Mutex::new(VecDeque::new()),
            total_bytes: AtomicU64::new(0),
            last_seq: AtomicU64::new(0),
        }))
    }

    /// The current epoch, the first part of every offset.
    pub fn epoch(&self) -> String {
        self.epoch.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Adopts the cluster's epoch: offsets given out from now on carry it.
    pub fn set_epoch(&self, epoch: String) {
        *self.epoch.write().unwrap_or_else(|e| e.into_inner()) = epoch;
    }

    /// The retention age, which the Redis stream is trimmed to as well.
    pub fn max_age(&self) -> Duration {
        Duration::from_secs(self.config.max_age_secs)
    }

    /// The log of `namespace`, created on first use. Past [`MAX_LOGS`], an idle log (no
    /// socket, no delivery in progress) is dropped first, the emptiest and oldest first.
    pub fn log(self: &Arc<Self>, namespace: &str) -> Arc<NamespaceLog> {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        // Every webhook asks: no key allocation when the log exists.
        if let Some(log) = logs.get(namespace) {
            return log.clone();
        }
        if logs.len() >= self.max_logs {
            self.drop_idle_log(&mut logs);
        }
        logs.entry(namespace.to_owned())
            .or_insert_with(|| {
                // Whatever this namespace had before (a swept log) is unknown now: an
                // offset from then resumes with recovered: false.
                let floor = self.last_seq.load(Ordering::Acquire);
                Arc::new(NamespaceLog {
                    inner: Mutex::new(LogInner {
                        head: floor,
                        evicted_through: floor,
                        ..LogInner::default()
                    }),
                    head: watch::channel(floor).0,
                    gate: tokio::sync::Mutex::new(()),
                    store: Arc::downgrade(self),
                })
            })
            .clone()
    }

    /// Bytes retained across all namespaces.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes.load(Ordering::Relaxed)
    }

    /// Applies the age bounds everywhere (events, and state after [`STATE_MAX_AGE`]),
    /// forgets empty logs nobody holds, and drops stale arrivals.
    pub fn sweep(&self) {
        let logs: Vec<(String, Arc<NamespaceLog>)> = {
            let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
            logs.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let now = Instant::now();
        for (_, log) in &logs {
            let mut inner = log.lock();
            self.evict(&mut inner, now, 0);
            self.expire_state(&mut inner, now);
        }
        let mut map = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        // Ours, plus the clone in `logs` above: nobody else holds it.
        map.retain(|_, log| !(Arc::strong_count(log) <= 2 && log.is_idle_and_empty()));
        drop(map);
        self.compact_arrivals();
    }

    /// Drops state older than [`STATE_MAX_AGE`] (a `qrcode.updated` stops being shown
    /// after a minute, but is only dropped here).
    fn expire_state(&self, inner: &mut LogInner, now: Instant) {
        for slot in [&mut inner.last_connection_update, &mut inner.last_qrcode] {
            if slot
                .as_ref()
                .is_some_and(|entry| now.duration_since(entry.at) > STATE_MAX_AGE)
            {
                let bytes = slot.take().map_or(0, |entry| entry.bytes());
                inner.state_bytes -= bytes;
                self.total_bytes.fetch_sub(bytes, Ordering::Relaxed);
            }
        }
    }

    /// Drops one idle log to make room for a new one: an empty one if any, else the one
    /// whose newest event is oldest. Its retained events and state go with it. A log with
    /// a socket or a delivery in progress (another holder of its `Arc`) is never dropped.
    fn drop_idle_log(&self, logs: &mut HashMap<String, Arc<NamespaceLog>>) {
        let idle = logs
            .iter()
            .filter(|(_, log)| Arc::strong_count(log) == 1 && log.head.receiver_count() == 0)
            .min_by_key(|(_, log)| {
                let inner = log.lock();
                let newest = inner.entries.back().map(|entry| entry.at);
                (newest.is_some(), newest)
            })
            .map(|(name, _)| name.clone());
        if let Some(name) = idle
            && let Some(log) = logs.remove(&name)
        {
            let mut inner = log.lock();
            while !inner.entries.is_empty() {
                self.pop_front(&mut inner);
            }
            self.total_bytes
                .fetch_sub(inner.state_bytes, Ordering::Relaxed);
            inner.state_bytes = 0;
            inner.last_connection_update = None;
            inner.last_qrcode = None;
        }
    }

    /// Pops entries that break the per-namespace bounds; `incoming` bytes are about to be added.
    fn evict(&self, inner: &mut LogInner, now: Instant, incoming: u64) {
        let max_age = Duration::from_secs(self.config.max_age_secs);
        while let Some(front) = inner.entries.front() {
            let too_many =
                inner.entries.len() >= self.config.max_events + usize::from(incoming == 0);
            let too_big = inner.bytes + incoming > self.config.max_bytes;
            let too_old = now.duration_since(front.at) > max_age;
            if !(too_many || too_big || too_old) {
                break;
            }
            self.pop_front(inner);
        }
    }

    fn pop_front(&self, inner: &mut LogInner) {
        if let Some(entry) = inner.entries.pop_front() {
            let bytes = entry.bytes();
            inner.bytes -= bytes;
            inner.evicted_through = entry.seq;
            self.total_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// Evicts the globally oldest entries (events and state alike) until the total fits:
    /// the front of `arrivals`, O(1) each, whatever the number of namespaces.
    fn enforce_total(&self, incoming: u64) {
        if self.total_bytes() + incoming <= self.config.max_total_bytes {
            return;
        }
        let mut arrivals = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        while self.total_bytes() + incoming > self.config.max_total_bytes {
            let Some(arrival) = arrivals.pop_front() else {
                break;
            };
            let Some(log) = arrival.log.upgrade() else {
                continue;
            };
            let mut guard = log.lock();
            let inner = &mut *guard;
            if arrival.state {
                for slot in [&mut inner.last_connection_update, &mut inner.last_qrcode] {
                    if slot.as_ref().is_some_and(|entry| entry.seq == arrival.seq) {
                        let bytes = slot.take().map_or(0, |entry| entry.bytes());
                        inner.state_bytes -= bytes;
                        self.total_bytes.fetch_sub(bytes, Ordering::Relaxed);
                    }
                }
            } else if inner
                .entries
                .front()
                .is_some_and(|entry| entry.seq == arrival.seq)
            {
                self.pop_front(inner);
            }
        }
    }

    /// Records an appended entry (and, for state, its state slot) as the newest arrival,
    /// dropping stale arrivals from the front as it goes.
    fn arrived(&self, log: &Arc<NamespaceLog>, seq: u64, state: bool) {
        let mut arrivals = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        let weak = Arc::downgrade(log);
        if state {
            arrivals.push_back(Arrival {
                log: weak.clone(),
                seq,
                state: true,
            });
        }
        arrivals.push_back(Arrival {
            log: weak,
            seq,
            state: false,
        });
        while arrivals.front().is_some_and(|front| !front.is_live()) {
            arrivals.pop_front();
        }
    }

    /// Drops every stale arrival (each sweep), so the queue stays proportional to what is
    /// retained plus one sweep period of appends.
    fn compact_arrivals(&self) {
        let mut arrivals = self.arrivals.lock().unwrap_or_else(|e| e.into_inner());
        arrivals.retain(Arrival::is_live);
    }

    /// Entries (events and state slots) the arrival queue holds, stale ones included.
    pub fn arrivals_len(&self) -> usize {
        self.arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Namespace logs held now.
    pub fn log_count(&self) -> usize {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// One retained entry in arrival order: an event (`state: false`) or a state slot.
struct Arrival {
    log: Weak<NamespaceLog>,
    seq: u64,
    state: bool,
}

impl Arrival {
    /// Whether what it names is still retained.
    fn is_live(&self) -> bool {
        let Some(log) = self.log.upgrade() else {
            return false;
        };
        let inner = log.lock();
        if self.state {
            [&inner.last_connection_update, &inner.last_qrcode]
                .iter()
                .any(|slot| slot.as_ref().is_some_and(|entry| entry.seq == self.seq))
        } else {
            inner
                .entries
                .front()
                .is_some_and(|front| front.seq <= self.seq)
        }
    }
}

/// A new epoch for each start: time and process id, so two replicas or two starts differ.
pub fn new_epoch() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mixed = nanos ^ (u64::from(std::process::id()) << 40) ^ 0x9e37_79b9_7f4a_7c15;
    format!("{:x}", mixed.wrapping_mul(0xff51_afd7_ed55_8ccd) >> 8)
}

/// Runs [`Store::sweep`] until the store is dropped.
pub async fn sweep(store: std::sync::Weak<Store>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match store.upgrade() {
            Some(store) => store.sweep(),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests;
