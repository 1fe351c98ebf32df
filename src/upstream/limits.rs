//! What emits may have in flight: calls and argument bytes per socket ([`Budget`]) and
//! across sockets, counted by guards that give back on drop.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What a socket may have in flight towards Evolution: calls and argument bytes. The
/// hub's `Session` holds one per socket.
#[derive(Debug, Default)]
pub struct Budget {
    pub(super) calls: AtomicUsize,
    pub(super) bytes: AtomicUsize,
}

/// One call counted as active until dropped; the last one out wakes a drain.
pub(super) struct Active(Arc<AtomicUsize>, Arc<tokio::sync::Notify>);

impl Active {
    pub(super) fn enter(active: &Arc<AtomicUsize>, idle: &Arc<tokio::sync::Notify>) -> Self {
        active.fetch_add(1, Ordering::AcqRel);
        Self(active.clone(), idle.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        if self.0.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.1.notify_waiters();
        }
    }
}

/// `amount` counted against a limit until dropped (calls or bytes in flight).
pub(super) struct Permit<'a>(&'a AtomicUsize, usize);

impl<'a> Permit<'a> {
    pub(super) fn take(counter: &'a AtomicUsize, amount: usize, max: usize) -> Option<Self> {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                n.checked_add(amount).filter(|total| *total <= max)
            })
            .ok()
            .map(|_| Self(counter, amount))
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::AcqRel);
    }
}
