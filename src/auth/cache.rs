//! The key cache: answers by key, positive and negative, bounded by bytes and expired by
//! age, oldest first ([`expiring::ExpiringMap`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use super::{Error, MAX_CACHE_BYTES, Principal, UNAVAILABLE_TTL};
use crate::expiring;

/// Bytes counted per cache entry besides its key and answer (map slot, queue slot, entry).
pub(super) const ENTRY_OVERHEAD: usize = 160;

/// A cached answer: being looked up (empty) or known.
pub(super) type Answer = OnceCell<Result<Principal, Error>>;

pub(super) type CacheEntry = expiring::Slot<Answer>;

fn is_fresh(entry: &CacheEntry, ttl: Duration, now: Instant) -> bool {
    match entry.value.get() {
        // Still being looked up: join it.
        None => true,
        Some(Err(Error::Unavailable(_))) => now.duration_since(entry.created) < UNAVAILABLE_TTL,
        Some(_) => now.duration_since(entry.created) < ttl,
    }
}

/// Answers by key, bounded by bytes and expired by age ([`expiring::ExpiringMap`]).
pub(super) struct Cache(expiring::ExpiringMap<Arc<str>, Answer>);

impl Default for Cache {
    fn default() -> Self {
        Self(expiring::ExpiringMap::new(MAX_CACHE_BYTES))
    }
}

impl std::ops::Deref for Cache {
    type Target = expiring::ExpiringMap<Arc<str>, Answer>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Cache {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Cache {
    pub(super) fn get_fresh(
        &self,
        key: &str,
        ttl: Duration,
        now: Instant,
    ) -> Option<Arc<CacheEntry>> {
        self.0
            .get(key)
            .filter(|entry| is_fresh(entry, ttl, now))
            .cloned()
    }

    /// A new entry for `key`, its answer to come; counts the key's bytes.
    pub(super) fn insert(&mut self, key: &str, now: Instant) -> Arc<CacheEntry> {
        let bytes = ENTRY_OVERHEAD + key.len();
        self.0.insert(Arc::from(key), OnceCell::new(), bytes, now)
    }
}
