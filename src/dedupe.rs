//! Evolution retries a webhook up to 10 times over ~20 minutes, so the same body can
//! arrive again: [`Dedupe`] remembers a hash of each accepted body for a window (refreshed
//! on every hit), and a repeat is answered `200 {"ok":true,"duplicate":true}` without being
//! emitted again. Memory is bounded: expiry is amortized through a queue in arrival order,
//! and past [`MAX_REMEMBERED`] bodies the oldest are forgotten first.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bodies remembered at most (about 48 bytes each).
pub const MAX_REMEMBERED: usize = 1_000_000;

/// The fingerprint of a body: xxh3-128, stable across processes and replicas.
pub fn fingerprint(body: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(body)
}

pub struct Dedupe {
    window: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Fingerprint → when it was last seen.
    last_seen: HashMap<u128, Instant>,
    /// (fingerprint, seen at) in arrival order; stale pairs (refreshed since) are skipped.
    order: VecDeque<(u128, Instant)>,
}

impl Dedupe {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Records `fingerprint` and says whether it was seen within the window.
    pub fn seen(&self, fingerprint: u128) -> bool {
        if self.window.is_zero() {
            return false;
        }
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // Forget what expired (amortized: each pair is popped once).
        while let Some(&(print, at)) = inner.order.front() {
            let expired = now.duration_since(at) >= self.window;
            if !(expired || inner.order.len() > MAX_REMEMBERED) {
                break;
            }
            inner.order.pop_front();
            if inner.last_seen.get(&print) == Some(&at) {
                inner.last_seen.remove(&print);
            }
        }
        let duplicate = inner
            .last_seen
            .insert(fingerprint, now)
            .is_some_and(|at| now.duration_since(at) < self.window);
        inner.order.push_back((fingerprint, now));
        duplicate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_within_the_window_are_duplicates() {
        let dedupe = Dedupe::new(Duration::from_secs(60));
        let a = fingerprint(b"{\"event\":\"call\"}");
        let b = fingerprint(b"{\"event\":\"call\" }");
        assert_ne!(a, b);
        assert!(!dedupe.seen(a));
        assert!(dedupe.seen(a));
        assert!(!dedupe.seen(b));
    }

    #[test]
    fn the_window_expires_and_zero_disables() {
        let dedupe = Dedupe::new(Duration::from_millis(20));
        assert!(!dedupe.seen(1));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!dedupe.seen(1), "expired");
        assert_eq!(dedupe.inner.lock().unwrap().last_seen.len(), 1);
        let off = Dedupe::new(Duration::ZERO);
        assert!(!off.seen(1) && !off.seen(1));
    }
}
