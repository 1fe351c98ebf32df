//! The lifecycle of dynamic namespaces: socketioxide creates one when a CONNECT for it
//! arrives, before the middleware runs, and never removes it. A refused CONNECT removes
//! its namespace again, and a sweeper removes namespaces without sockets.

use std::collections::HashMap;
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
}

impl Admissions {
    pub(super) fn new() -> Self {
        Self {
            io: OnceLock::new(),
            running: Mutex::new(HashMap::new()),
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
    pub(super) fn sweep(&self) -> usize {
        let Some(io) = self.io.get() else { return 0 };
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = 0;
        for ns in io.nsps() {
            let path = ns.ns_path().to_owned();
            if path != "/" && !running.contains_key(&path) && ns.sockets().is_empty() {
                io.delete_ns(&path);
                removed += 1;
            }
        }
        removed
    }
}

impl Hub {
    /// Removes namespaces that have no socket, every [`NAMESPACE_SWEEP`], until aborted.
    pub fn sweep_namespaces(&self) -> impl Future<Output = ()> + Send + 'static {
        let shared = self.shared.clone();
        async move {
            let mut tick = tokio::time::interval(NAMESPACE_SWEEP);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let removed = shared.admissions.sweep();
                if removed > 0 {
                    tracing::debug!(removed, "removed namespaces without sockets");
                }
            }
        }
    }
}
