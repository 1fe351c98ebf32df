//! One namespace's retained events ([`NamespaceLog`]), its entries and offsets.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::Store;
use crate::envelope::{Envelope, EventName, Payload};

/// How long a `qrcode.updated` stays part of the state shown to late joiners.
const QRCODE_FRESHNESS: Duration = Duration::from_secs(60);

/// One retained event.
#[derive(Debug)]
pub struct Entry {
    pub seq: u64,
    /// Its UPPER_SNAKE form, for filters, is `event.upper_snake()`.
    pub event: EventName,
    pub payload: Payload,
    pub offset: String,
    pub(super) at: Instant,
}

impl Entry {
    pub(super) fn bytes(&self) -> u64 {
        (self.payload.get().len() + self.offset.len() + std::mem::size_of::<Entry>()) as u64
    }
}

/// Where a resuming client starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// False when events after the offset may be missing: the offset is unknown, from another
    /// epoch, or older than retention.
    pub recovered: bool,
    /// Deliver the retained events whose sequence is greater than this.
    pub after: u64,
}

/// A position in a namespace's log, as clients see it: `<epoch>-<seq>`. The epoch tells
/// logs apart (a restart in memory mode, a Redis that lost its data), the sequence orders
/// events within one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offset {
    pub epoch: String,
    pub seq: u64,
}

impl Offset {
    pub fn new(epoch: &str, seq: u64) -> Self {
        Self {
            epoch: epoch.to_owned(),
            seq,
        }
    }

    /// Reads `<epoch>-<seq>`; the epoch may itself contain `-`, the sequence may not.
    pub fn parse(text: &str) -> Option<Self> {
        let (epoch, seq) = text.rsplit_once('-')?;
        Some(Self {
            epoch: epoch.to_owned(),
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for Offset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.epoch, self.seq)
    }
}

/// The retained events of one namespace.
pub struct NamespaceLog {
    pub(super) inner: Mutex<LogInner>,
    /// The newest sequence number, for the delivery tasks of opted-in sockets.
    pub(super) head: watch::Sender<u64>,
    /// Held while an event is appended and broadcast, and while a socket is brought up to
    /// date (state, then rooms), so neither sees half of the other.
    pub gate: tokio::sync::Mutex<()>,
    pub(super) store: Weak<Store>,
}

#[derive(Default)]
pub(super) struct LogInner {
    pub(super) entries: VecDeque<Arc<Entry>>,
    /// The newest sequence number given out (0: none yet).
    pub(super) head: u64,
    pub(super) bytes: u64,
    /// The highest sequence number evicted: resuming from below it is a gap.
    pub(super) evicted_through: u64,
    pub(super) last_connection_update: Option<Arc<Entry>>,
    pub(super) last_qrcode: Option<Arc<Entry>>,
    /// Bytes of the two state slots, counted in the store's total.
    pub(super) state_bytes: u64,
}

impl NamespaceLog {
    /// No delivery task follows it and it holds nothing.
    pub(super) fn is_idle_and_empty(&self) -> bool {
        let inner = self.lock();
        self.head.receiver_count() == 0
            && inner.entries.is_empty()
            && inner.last_connection_update.is_none()
            && inner.last_qrcode.is_none()
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Retains `envelope` with the next sequence number and returns its entry. Callers hold
    /// [`NamespaceLog::gate`].
    pub fn append(self: &Arc<Self>, envelope: &Envelope) -> Arc<Entry> {
        self.append_at(envelope, 0)
    }

    /// Retains `envelope` as sequence number `seq` (a Redis stream position), or the next
    /// one if `seq` would not be newer than the head: numbers only ever grow.
    pub fn append_at(self: &Arc<Self>, envelope: &Envelope, seq: u64) -> Arc<Entry> {
        let Some(store) = self.store.upgrade() else {
            return Arc::new(self.entry(envelope, 0, ""));
        };
        let epoch = store.epoch();
        let now = Instant::now();
        let state = matches!(
            envelope.event.as_str(),
            "connection.update" | "qrcode.updated"
        );
        let (entry, incoming) = {
            let mut inner = self.lock();
            // Per namespace, so every replica numbers a stream entry alike.
            let seq = seq.max(inner.head + 1);
            store.last_seq.fetch_max(seq, Ordering::AcqRel);
            inner.head = seq;
            let entry = Arc::new(self.entry(envelope, seq, &epoch));
            let incoming = entry.bytes();
            store.evict(&mut inner, now, incoming);
            (entry, incoming)
        };
        // State counts towards the total too (twice while it is also a retained event).
        let total_incoming = if state { 2 * incoming } else { incoming };
        // The total bound may evict from any namespace, this one included: not under our lock.
        store.enforce_total(total_incoming);
        {
            let mut inner = self.lock();
            inner.bytes += incoming;
            inner.entries.push_back(entry.clone());
            if state {
                let slot = if entry.event.as_str() == "connection.update" {
                    &mut inner.last_connection_update
                } else {
                    &mut inner.last_qrcode
                };
                let replaced = slot.replace(entry.clone()).map_or(0, |old| old.bytes());
                inner.state_bytes = inner.state_bytes + incoming - replaced;
                store.total_bytes.fetch_sub(replaced, Ordering::Relaxed);
            }
        }
        store
            .total_bytes
            .fetch_add(total_incoming, Ordering::Relaxed);
        store.arrived(self, entry.seq, state);
        self.head.send_replace(entry.seq);
        entry
    }

    fn entry(&self, envelope: &Envelope, seq: u64, epoch: &str) -> Entry {
        Entry {
            seq,
            event: envelope.event.clone(),
            payload: envelope.payload.clone(),
            offset: Offset::new(epoch, seq).to_string(),
            at: Instant::now(),
        }
    }

    /// Drops every retained event and the state (a deleted instance), keeping the head:
    /// offsets from before read as a gap (`recovered: false`) with nothing to replay, and
    /// numbers keep growing. Callers hold [`NamespaceLog::gate`].
    pub fn forget(&self) {
        let Some(store) = self.store.upgrade() else {
            return;
        };
        let mut inner = self.lock();
        while !inner.entries.is_empty() {
            store.pop_front(&mut inner);
        }
        inner.evicted_through = inner.head;
        inner.last_connection_update = None;
        inner.last_qrcode = None;
        store
            .total_bytes
            .fetch_sub(inner.state_bytes, Ordering::Relaxed);
        inner.state_bytes = 0;
    }

    /// The newest sequence number (0 when nothing was ever appended).
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// Wakes when a newer event is appended.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// Up to `max` retained events with a sequence greater than `after`, oldest first, and
    /// whether some were evicted before they could be read (a gap).
    pub fn read_after(&self, after: u64, max: usize) -> (Vec<Arc<Entry>>, bool) {
        let inner = self.lock();
        let gap = inner.evicted_through > after;
        let start = inner.entries.partition_point(|entry| entry.seq <= after);
        let batch = inner.entries.range(start..).take(max).cloned().collect();
        (batch, gap)
    }

    /// Where a client that last saw `offset` resumes.
    pub fn resume(&self, epoch: &str, offset: &str) -> Resume {
        let inner = self.lock();
        let head = inner.head;
        let everything = Resume {
            recovered: false,
            after: inner.evicted_through,
        };
        let Some(offset) = Offset::parse(offset) else {
            return everything;
        };
        if offset.epoch != epoch || offset.seq > head {
            return everything;
        }
        Resume {
            recovered: offset.seq >= inner.evicted_through,
            after: offset.seq,
        }
    }

    /// The state a late joiner should see: the last `connection.update`, and the last
    /// `qrcode.updated` if it is younger than a minute.
    pub fn state(&self) -> Vec<Arc<Entry>> {
        let inner = self.lock();
        let mut state: Vec<Arc<Entry>> = inner.last_connection_update.iter().cloned().collect();
        if let Some(qrcode) = &inner.last_qrcode
            && qrcode.at.elapsed() < QRCODE_FRESHNESS
        {
            state.push(qrcode.clone());
        }
        state.sort_by_key(|entry| entry.seq);
        state
    }
}
