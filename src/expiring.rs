//! A map whose entries leave in the order they were made: once older than a lifetime,
//! and, past a byte bound, oldest first. An arrival-order queue makes each departure
//! O(1), where sweeping the whole map on every insert would cost O(entries).
//!
//! The key cache (`auth`) and the `requestId` memory (`upstream`) are both this. Entries
//! are `Arc<Slot>`s so a caller can keep using one (a lookup in flight) after it left.
//! This module is a leaf.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// One entry: its value, when it was made, and what it counts towards the byte bound
/// (0 once it left the map).
pub struct Slot<T> {
    pub value: T,
    pub created: Instant,
    bytes: AtomicUsize,
}

pub struct ExpiringMap<K, T> {
    entries: HashMap<K, Arc<Slot<T>>>,
    /// Every slot in the order made; a replaced or removed one stays until it reaches the
    /// front, counting 0 bytes.
    order: VecDeque<(K, Arc<Slot<T>>)>,
    bytes: usize,
    max_bytes: usize,
}

impl<K: Eq + Hash + Clone, T> ExpiringMap<K, T> {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_bytes,
        }
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&Arc<Slot<T>>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.get(key)
    }

    /// Puts `value` under `key` (replacing what was there), counting `bytes`.
    pub fn insert(&mut self, key: K, value: T, bytes: usize, now: Instant) -> Arc<Slot<T>> {
        let slot = Arc::new(Slot {
            value,
            created: now,
            bytes: AtomicUsize::new(bytes),
        });
        self.bytes += bytes;
        if let Some(old) = self.entries.insert(key.clone(), slot.clone()) {
            self.bytes -= old.bytes.swap(0, Ordering::Relaxed);
        }
        self.order.push_back((key, slot.clone()));
        slot
    }

    /// Drops entries older than `lifetime` and, past the byte bound, the oldest ones.
    pub fn expire(&mut self, lifetime: Duration, now: Instant) {
        while let Some((_, oldest)) = self.order.front() {
            let expired = now.duration_since(oldest.created) >= lifetime;
            if !expired && self.bytes <= self.max_bytes {
                break;
            }
            let Some((key, slot)) = self.order.pop_front() else {
                break;
            };
            self.remove_slot(&key, &slot);
        }
    }

    /// Drops `key`'s entry if it is still `slot` (not replaced since).
    pub fn remove_slot(&mut self, key: &K, slot: &Arc<Slot<T>>) {
        if self
            .entries
            .get(key)
            .is_some_and(|current| Arc::ptr_eq(current, slot))
        {
            self.entries.remove(key);
        }
        self.bytes -= slot.bytes.swap(0, Ordering::Relaxed);
    }

    /// Drops `key`'s entry now.
    pub fn remove<Q>(&mut self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(slot) = self.entries.remove(key) {
            self.bytes -= slot.bytes.swap(0, Ordering::Relaxed);
        }
    }

    /// Drops every entry `doomed` picks; returns how many.
    pub fn remove_where(&mut self, doomed: impl Fn(&T) -> bool) -> usize {
        let keys: Vec<K> = self
            .entries
            .iter()
            .filter(|(_, slot)| doomed(&slot.value))
            .map(|(key, _)| key.clone())
            .collect();
        for key in &keys {
            self.remove(key);
        }
        keys.len()
    }

    /// Counts `extra` bytes more for `slot` (its value, once known), unless it left.
    pub fn account(&mut self, slot: &Slot<T>, extra: usize) {
        if slot.bytes.load(Ordering::Relaxed) > 0 {
            slot.bytes.fetch_add(extra, Ordering::Relaxed);
            self.bytes += extra;
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The bytes counted now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}
