//! Who is in which room of a namespace, so a publish knows its audience without listing
//! sockets; and the strays, sockets that lost socketioxide's namespace-creation race and
//! that broadcasts do not reach.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use socketioxide::SocketIo;
use socketioxide::extract::SocketRef;

use super::session::Session;

/// The room of sockets that receive every event.
pub const ALL_ROOM: &str = "*";

/// The room of sockets that asked for one event (`E:MESSAGES_UPSERT`).
pub(super) fn event_room(upper_snake: &str) -> String {
    format!("E:{upper_snake}")
}

/// Room membership counts and strays, per namespace.
#[derive(Default)]
pub(super) struct Rooms {
    /// Sockets per namespace and room.
    members: Mutex<HashMap<String, RoomCounts>>,
    /// Sockets whose namespace lost a creation race inside socketioxide (two first
    /// CONNECTs to a new namespace at once): broadcasts miss them, so they get events
    /// one by one. Normally empty.
    strays: Mutex<HashMap<String, Vec<SocketRef>>>,
}

struct RoomCounts {
    /// Sockets in [`ALL_ROOM`].
    all: usize,
    /// Sockets per filtered event (UPPER_SNAKE).
    by_event: HashMap<String, usize>,
    /// When the namespace got its first socket (again).
    born: Instant,
    /// Its sockets while it is young ([`YOUTH`]): socketioxide may still replace the
    /// namespace object they joined (its creation race), so each broadcast checks them.
    young: Vec<SocketRef>,
}

impl Default for RoomCounts {
    fn default() -> Self {
        Self {
            all: 0,
            by_event: HashMap::new(),
            born: Instant::now(),
            young: Vec::new(),
        }
    }
}

/// The sockets an event reaches through rooms, and the young ones to check for orphans.
#[derive(Default)]
pub(super) struct Audience {
    /// Sockets in [`ALL_ROOM`].
    pub all: usize,
    /// Sockets in the event's own room (they asked for it by name).
    pub filtered: usize,
    pub young: Vec<SocketRef>,
}

/// How long after its first socket a namespace may still be replaced inside socketioxide:
/// only by a creation already in flight then, which ends within milliseconds.
const YOUTH: Duration = Duration::from_secs(5);

/// A namespace's young sockets, or none once it is older than [`YOUTH`].
fn young(counts: &RoomCounts) -> Vec<SocketRef> {
    if counts.born.elapsed() < YOUTH {
        counts.young.clone()
    } else {
        Vec::new()
    }
}

/// The first sockets of a young namespace that each broadcast checks. Only CONNECTs that
/// arrived while the namespace was being created can be orphaned, so they are among the
/// first few; the cap bounds the check in a connect storm (at most this many lookups per
/// broadcast, for [`YOUTH`]).
const YOUNG_SOCKETS: usize = 64;

impl Rooms {
    /// Counts a socket in (`delta` 1) or out (-1) of the rooms its filter puts it in.
    pub(super) fn count(&self, socket: &SocketRef, session: &Session, delta: isize) {
        let namespace = socket.ns();
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        let counts = members.entry(namespace.to_owned()).or_default();
        if counts.born.elapsed() < YOUTH {
            if delta > 0 {
                if counts.young.len() < YOUNG_SOCKETS {
                    counts.young.push(socket.clone());
                }
            } else {
                counts.young.retain(|s| s.id != socket.id);
            }
        } else if !counts.young.is_empty() {
            counts.young = Vec::new();
        }
        let apply = |n: &mut usize| *n = n.saturating_add_signed(delta);
        if session.filter.is_empty() {
            apply(&mut counts.all);
        } else {
            for event in session.filter.iter() {
                apply(counts.by_event.entry(event.clone()).or_default());
            }
            counts.by_event.retain(|_, n| *n > 0);
        }
        if counts.all == 0 && counts.by_event.is_empty() {
            members.remove(namespace);
        }
    }

    /// Who in `namespace` gets an event (UPPER_SNAKE) through rooms.
    ///
    /// With it, in the same lock (the per-event path takes it once), the sockets of the
    /// namespace while it is young, for [`Rooms::orphans_among`]; empty, and allocated for
    /// nothing, once it is older than [`YOUTH`].
    pub(super) fn audience(&self, namespace: &str, upper_snake: &str) -> Audience {
        let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        members
            .get(namespace)
            .map_or_else(Audience::default, |counts| Audience {
                all: counts.all,
                filtered: counts.by_event.get(upper_snake).copied().unwrap_or(0),
                young: young(counts),
            })
    }

    /// The sockets of a young namespace that socketioxide no longer reaches through the
    /// namespace it has registered (it replaced the one they joined) and that are not
    /// strays yet. Empty, and free, once the namespace is older than [`YOUTH`].
    pub(super) fn orphans(&self, namespace: &str, io: &SocketIo) -> Vec<SocketRef> {
        let young = {
            let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
            members.get(namespace).map(young).unwrap_or_default()
        };
        self.orphans_among(namespace, young, io)
    }

    /// Those of `young` (sockets of `namespace`) that are orphans, as [`Rooms::orphans`].
    pub(super) fn orphans_among(
        &self,
        namespace: &str,
        young: Vec<SocketRef>,
        io: &SocketIo,
    ) -> Vec<SocketRef> {
        if young.is_empty() {
            return young;
        }
        let registered = io.of(namespace);
        let strays = self.strays(namespace);
        young
            .into_iter()
            .filter(|socket| {
                socket.connected()
                    && registered
                        .as_ref()
                        .is_none_or(|ns| ns.get_socket(socket.id).is_none())
                    && !strays.iter().any(|s| s.id == socket.id)
            })
            .collect()
    }

    /// Keeps a stray of `namespace`, unless it already left.
    pub(super) fn add_stray(&self, socket: &SocketRef) {
        let mut strays = self.strays.lock().unwrap_or_else(|e| e.into_inner());
        // `connected` turns false before the disconnect handler runs: a socket that left
        // before this point is not kept (its handler may already have cleaned up).
        if socket.connected() {
            strays
                .entry(socket.ns().to_owned())
                .or_default()
                .push(socket.clone());
        }
    }

    pub(super) fn remove_stray(&self, socket: &SocketRef) {
        let mut strays = self.strays.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = strays.get_mut(socket.ns()) {
            list.retain(|s| s.id != socket.id);
            if list.is_empty() {
                strays.remove(socket.ns());
            }
        }
    }

    /// The strays of one namespace.
    pub(super) fn strays(&self, namespace: &str) -> Vec<SocketRef> {
        let strays = self.strays.lock().unwrap_or_else(|e| e.into_inner());
        strays.get(namespace).cloned().unwrap_or_default()
    }

    pub(super) fn stray_count(&self) -> usize {
        let strays = self.strays.lock().unwrap_or_else(|e| e.into_inner());
        strays.values().map(Vec::len).sum()
    }

    /// Every stray.
    pub(super) fn all_strays(&self) -> Vec<SocketRef> {
        let strays = self.strays.lock().unwrap_or_else(|e| e.into_inner());
        strays.values().flatten().cloned().collect()
    }
}
