//! The lifecycle of dynamic namespaces: socketioxide creates one when a CONNECT for it
//! arrives, before the middleware runs, and never removes it. A refused CONNECT removes
//! its namespace again, and a sweeper removes namespaces without sockets.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use socketioxide::SocketIo;
use socketioxide::extract::SocketRef;

use super::Hub;

/// How often namespaces without sockets are removed.
pub const NAMESPACE_SWEEP: Duration = Duration::from_secs(30);

/// CONNECTs in the connect middleware now, per namespace.
pub(super) struct Admissions {
    pub(super) io: OnceLock<SocketIo>,
    running: Mutex<HashMap<String, usize>>,
    /// Namespaces without sockets at the previous sweep.
    empty_before: Mutex<HashSet<String>>,
}

impl Admissions {
    pub(super) fn new() -> Self {
        Self {
            io: OnceLock::new(),
            running: Mutex::new(HashMap::new()),
            empty_before: Mutex::new(HashSet::new()),
        }
    }

    pub(super) fn begin(&self, namespace: &str) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        *running.entry(namespace.to_owned()).or_default() += 1;
    }

    /// Ends one admission. A refused CONNECT removes its namespace again when no socket is
    /// in it and no other CONNECT to it is being admitted: socketioxide creates a dynamic
    /// namespace before the middleware runs, and would keep it forever.
    pub(super) fn end(&self, namespace: &str, refused: bool, socket: &SocketRef) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let others = match running.get_mut(namespace) {
            Some(count) if *count > 1 => {
                *count -= 1;
                true
            }
            _ => {
                running.remove(namespace);
                false
            }
        };
        if !refused || others || namespace == "/" {
            return;
        }
        let Some(io) = self.io.get() else { return };
        let empty = io
            .of(namespace)
            .is_some_and(|ns| ns.sockets().iter().all(|s| s.id == socket.id));
        if empty {
            // Under the lock, so no admission of this namespace starts meanwhile.
            io.delete_ns(namespace);
        }
    }

    /// Removes namespaces with no socket and no CONNECT being admitted (what a race
    /// between a refusal and a socketioxide-internal creation may leave).
    ///
    /// A namespace goes only when it was already empty at the previous sweep: one created
    /// a moment ago, whose first CONNECT has not reached the middleware yet, is empty and
    /// not being admitted, and deleting it would leave that socket in a namespace nobody
    /// broadcasts to.
    pub(super) fn sweep(&self) -> usize {
        let Some(io) = self.io.get() else { return 0 };
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut empty_before = self.empty_before.lock().unwrap_or_else(|e| e.into_inner());
        let mut empty_now = HashSet::new();
        let mut removed = 0;
        for ns in io.nsps() {
            let path = ns.ns_path().to_owned();
            if path != "/" && !running.contains_key(&path) && ns.sockets().is_empty() {
                if empty_before.contains(&path) {
                    io.delete_ns(&path);
                    removed += 1;
                } else {
                    empty_now.insert(path);
                }
            }
        }
        *empty_before = empty_now;
        removed
    }
}

impl Hub {
    /// Removes namespaces that have had no socket for a whole [`NAMESPACE_SWEEP`], and
    /// strays whose session ended, until aborted.
    pub fn sweep_namespaces(&self) -> impl Future<Output = ()> + Send + 'static {
        let hub = self.clone();
        async move {
            // Not at once: the first sweep one period after start.
            let mut namespaces = tokio::time::interval_at(
                tokio::time::Instant::now() + NAMESPACE_SWEEP,
                NAMESPACE_SWEEP,
            );
            namespaces.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // A live polling session makes a request at least every ping interval.
            let mut strays = tokio::time::interval(hub.heartbeat / 2);
            strays.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = namespaces.tick() => {
                        let removed = hub.shared.admissions.sweep();
                        if removed > 0 {
                            tracing::debug!(removed, "removed namespaces without sockets");
                        }
                    }
                    _ = strays.tick() => hub.prune_strays(),
                }
            }
        }
    }

    /// Drops the strays whose Engine.IO session made no request for a heartbeat (ping
    /// interval + timeout): the client is gone, and socketioxide will not say so. The
    /// socket is disconnected too, which frees it and the namespace object it lost with.
    pub fn prune_strays(&self) {
        for socket in self.shared.rooms.all_strays() {
            let sid = socket.id.to_string();
            let alive = self
                .shared
                .sessions
                .last_seen(&sid)
                .is_some_and(|at| at.elapsed() < self.heartbeat);
            if !alive {
                tracing::debug!(sid = %sid, ns = socket.ns(), "stray's session ended: dropped");
                self.shared.rooms.remove_stray(&socket);
                self.shared.sessions.unwatch(&sid);
                let _ = socket.disconnect();
            }
        }
    }
}
