//! The `requestId` memory: a repeated emit shares the first call's answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use super::error::{AckReply, Error};
use crate::envelope::InstanceName;
use crate::expiring;

/// How long a `requestId` is remembered.
const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(300);
/// What the `requestId` memory may hold (keys and replies); the oldest go beyond it.
pub const MAX_REMEMBERED_BYTES: usize = 16 * 1024 * 1024;
/// A reply larger than this is not kept: a repeat gets its status and a note instead.
pub const MAX_REMEMBERED_REPLY_BYTES: usize = 64 * 1024;
/// Bytes counted per remembered entry besides its key and reply.
const REMEMBERED_OVERHEAD: usize = 192;

pub(super) type MemoKey = (InstanceName, String, String);

/// A remembered answer: being called (empty) or known.
pub(super) type Remembered = expiring::Slot<OnceCell<Result<AckReply, Error>>>;

/// Answers by requestId, expired after [`IDEMPOTENCY_WINDOW`] and bounded by
/// [`MAX_REMEMBERED_BYTES`] ([`expiring::ExpiringMap`], as the key cache in `auth`).
pub(super) struct Memo(
    pub(super) expiring::ExpiringMap<MemoKey, OnceCell<Result<AckReply, Error>>>,
);

impl Memo {
    pub(super) fn new() -> Self {
        Self(expiring::ExpiringMap::new(MAX_REMEMBERED_BYTES))
    }

    /// The entry for `key`, made (its answer to come) if there is none.
    pub(super) fn entry(&mut self, key: &MemoKey, now: Instant) -> Arc<Remembered> {
        self.0.expire(IDEMPOTENCY_WINDOW, now);
        if let Some(entry) = self.0.get(key) {
            return entry.clone();
        }
        let bytes = REMEMBERED_OVERHEAD + key.0.as_str().len() + key.1.len() + key.2.len();
        let entry = self.0.insert(key.clone(), OnceCell::new(), bytes, now);
        self.0.expire(IDEMPOTENCY_WINDOW, now);
        entry
    }

    pub(super) fn forget(&mut self, key: &MemoKey, entry: &Arc<Remembered>) {
        self.0.remove_slot(key, entry);
    }

    /// Counts a reply's bytes, unless its entry was evicted meanwhile.
    pub(super) fn account(&mut self, entry: &Remembered, extra: usize) {
        self.0.account(entry, extra);
    }
}
