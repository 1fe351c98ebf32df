//! The socket.io side: namespaces, who may join them, per-client filters, and emitting.
//!
//! Every valid instance has a namespace `/<instance>` (created on the first CONNECT, at
//! any time), and `/` carries every instance's events when global events are on.
//! [`Hub::deliver`], the hub's only entry for events, retains an event in its namespace's
//! log and hands the same packet to every socket of the namespace through one broadcast to
//! two rooms: [`ALL_ROOM`] (clients without a filter) and `E:<UPPER_SNAKE>` (clients that
//! asked for that event); opted-in sockets read the log instead (`delivery`).
//!
//! Read in this order: `handlers` (the connect middleware, then on connect, disconnect and
//! emit), `session` and `connect` (what a socket is and asked for), `rooms` (audience and
//! strays), `delivery` (recovering sockets), `namespaces` (dynamic namespace lifecycle),
//! `revalidate` (revocation). This module knows nothing of HTTP ingest or of the bus.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use socketioxide::handler::ConnectHandler;
use socketioxide::layer::SocketIoLayer;
use socketioxide::{BroadcastError, SendError, SocketError, SocketIo};

use crate::auth::Authenticator;
use crate::envelope::{self, Envelope, InstanceName};
use crate::replay;
use crate::setting;
use crate::sio_request;
use crate::telemetry::{self, NamespaceLabels};
use crate::upstream::Upstream;

mod config;
mod connect;
mod delivery;
mod handlers;
mod namespaces;
mod revalidate;
mod rooms;
mod session;

pub use config::Config;
pub use connect::{ClientOptions, ConnectRequest, MAX_AUTH_BYTES, MAX_FILTER_EVENTS};
pub use handlers::MAX_REFUSED_CONNECTS;
pub use namespaces::NAMESPACE_SWEEP;
pub use rooms::ALL_ROOM;
pub use session::{ConnectError, EngineSession, Resume, Session};

use handlers::{authorize, on_connect, revoke};

use namespaces::Admissions;
use rooms::{Rooms, event_room};

/// State shared by every socket handler.
struct Shared {
    auth: Arc<Authenticator>,
    connected: Arc<AtomicUsize>,
    replay: Arc<replay::Store>,
    upstream: Arc<Upstream>,
    /// Room membership counts and strays.
    rooms: Rooms,
    namespace_labels: NamespaceLabels,
    /// CONNECTs being admitted per namespace, so a refusal removes only a namespace
    /// nobody is joining.
    admissions: Admissions,
    /// Polling sessions ended for too many refused CONNECTs (the guard refuses them).
    sessions: Arc<sio_request::Sessions>,
}

/// A handle to the socket.io server. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    io: SocketIo,
    shared: Arc<Shared>,
    global_events: bool,
    /// Sockets connected now, for the connection cap (`guard`).
    connected: Arc<AtomicUsize>,
    /// Ping interval + timeout: a session silent this long is gone.
    heartbeat: Duration,
    /// How long a token socket is kept while Evolution cannot verify its key.
    unverified_grace: Duration,
}

impl Hub {
    /// Builds the socket.io layer and its hub. Binds nothing.
    pub fn build(
        config: &Config,
        auth: Arc<Authenticator>,
        upstream: Arc<Upstream>,
        replay: Arc<replay::Store>,
    ) -> Result<(SocketIoLayer, Hub), setting::Error> {
        config.validate()?;
        let connected = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(Shared {
            auth,
            connected: connected.clone(),
            replay,
            upstream,
            rooms: Rooms::default(),
            namespace_labels: NamespaceLabels::default(),
            admissions: Admissions::new(),
            // Past the heartbeat, engineioxide has dropped the session anyway.
            sessions: Arc::new(sio_request::Sessions::new(
                Duration::from_secs(config.ping_interval_secs + config.ping_timeout_secs)
                    .max(CONNECT_TIMEOUT),
            )),
        });
        let max_emit = usize::try_from(config.max_emit_bytes).unwrap_or(usize::MAX);
        let (layer, io) = SocketIo::builder()
            .max_buffer_size(config.socket_buffer)
            .max_payload(config.max_emit_bytes)
            .ping_interval(Duration::from_secs(config.ping_interval_secs))
            .ping_timeout(Duration::from_secs(config.ping_timeout_secs))
            .ws_max_message_size(max_emit)
            // engineioxide 0.17 applies `max_payload` to polling only, and tungstenite reads a
            // whole frame (up to its own 16 MiB cap) before it checks the message size: the
            // frame cap is what bounds the bytes one websocket can make us buffer.
            .ws_max_frame_size(max_emit)
            // Client frames are small (pongs, emits); socketioxide's 4 KiB per idle socket
            // adds up.
            .ws_read_buffer_size(config.ws_read_buffer)
            // A session that joins no namespace within this is closed (socketioxide's
            // default is 45 s): it bounds what anonymous handshakes can hold.
            .connect_timeout(CONNECT_TIMEOUT)
            .with_state(shared.clone())
            .build_layer();
        let _ = shared.admissions.io.set(io.clone());

        // `/{instance}` does not match `/`: the global namespace is its own.
        io.ns("/", on_connect.with(authorize));
        io.dyn_ns("/{instance}", on_connect.with(authorize))
            .map_err(|err| setting::Error::startup(format!("socket.io namespace: {err}")))?;

        Ok((
            layer,
            Hub {
                io,
                shared,
                global_events: config.global_events,
                connected,
                heartbeat: Duration::from_secs(
                    config.ping_interval_secs + config.ping_timeout_secs,
                ),
                unverified_grace: Duration::from_secs(config.token_unverified_grace_secs),
            },
        ))
    }

    /// Emits one event to its instance's namespace (and `/` with global events on), as
    /// sequence number `seq` (0: the next one). The hub's only entry for events: `bus`
    /// calls it once the event is retained.
    ///
    /// The payload is encoded once per namespace; a slow socket whose queue is full
    /// misses the event (counted) and never delays the others or the webhook.
    pub async fn deliver(&self, envelope: &Envelope, seq: u64) {
        let upper = envelope.event.upper_snake();
        let rooms = [ALL_ROOM.to_owned(), event_room(upper)];
        let namespace = envelope.instance.namespace();
        self.emit_to(&namespace, &rooms, upper, envelope, seq).await;
        if is_deletion(envelope.event.as_str()) {
            self.forget_instance(&envelope.instance, &namespace).await;
        }
        if self.global_events {
            self.emit_to("/", &rooms, upper, envelope, seq).await;
        }
    }

    /// The instance is gone, and so is what its tokens may see: the event was delivered
    /// first (the disconnect queues behind it). Cached answers listing it go, so its tokens'
    /// next CONNECT asks Evolution; its token sockets are disconnected (global-key sockets
    /// stay); its retained events and state go, so whoever re-creates the name starts
    /// empty (offsets from before read as a gap, `recovered: false`).
    async fn forget_instance(&self, instance: &InstanceName, namespace: &str) {
        let forgotten = self.shared.auth.invalidate_instance(instance);
        let strays = self.shared.rooms.strays(namespace);
        let sockets = self
            .io
            .of(namespace)
            .map(|ns| ns.sockets())
            .unwrap_or_default();
        {
            for socket in sockets.into_iter().chain(strays) {
                let token = socket
                    .extensions
                    .get::<Arc<Session>>()
                    .is_some_and(|session| session.principal.is_token());
                if token {
                    revoke(&socket, "instance deleted");
                }
            }
        }
        let log = self.shared.replay.log(namespace);
        {
            let _gate = log.gate.lock().await;
            log.forget();
        }
        telemetry::meters()
            .retained_bytes
            .set(self.shared.replay.total_bytes() as f64);
        tracing::info!(
            instance = %instance,
            cached_keys = forgotten,
            "instance deleted: retained events and cached keys forgotten"
        );
    }

    /// Retains the event in `namespace`'s log, then broadcasts it to the rooms of sockets
    /// that did not opt in to recovery (opted-in ones read the log: `delivery`).
    async fn emit_to(
        &self,
        namespace: &str,
        rooms: &[String; 2],
        upper: &str,
        envelope: &Envelope,
        seq: u64,
    ) {
        let log = self.shared.replay.log(namespace);
        // Append and broadcast under the gate: a socket being brought up to date sees the
        // event either in its state or live, never both and never neither.
        let _gate = log.gate.lock().await;
        log.append_at(envelope, seq);
        let meters = telemetry::meters();
        meters
            .retained_bytes
            .set(self.shared.replay.total_bytes() as f64);
        if namespace == "/" {
            meters.emitted_global.increment(1);
        } else {
            meters.emitted_instance.increment(1);
        }
        // A young namespace may have been replaced inside socketioxide since its sockets
        // joined: those it no longer reaches become strays before this broadcast.
        let found = self.shared.rooms.audience(namespace, upper);
        for orphan in self
            .shared
            .rooms
            .orphans_among(namespace, found.young, &self.io)
        {
            handlers::adopt_orphan(&self.shared, &orphan);
        }
        let audience = found.all + found.filtered;
        if audience == 0 {
            return;
        }
        // Only the rooms someone is in: with one room (the usual case: no socket filtered
        // for this event) socketioxide walks it without building a set of socket ids to
        // dedupe two rooms, which costs a SipHash and an insert per socket (instructions
        // per delivery in BENCHMARKS.md, issue 17).
        let targets: Vec<&String> = match (found.all > 0, found.filtered > 0) {
            (true, false) => vec![&rooms[0]],
            (false, true) => vec![&rooms[1]],
            _ => rooms.iter().collect(),
        };
        let event = envelope.event.as_str();
        let payload: &serde_json::value::RawValue = &envelope.payload;
        let mut dropped = 0;
        if let Some(operators) = self.io.of(namespace)
            && let Err(err) = operators
                .to(targets.into_iter().cloned().collect::<Vec<String>>())
                .emit(event, payload)
                .await
        {
            dropped = match &err {
                BroadcastError::Socket(failures) => failures.len(),
                _ => audience,
            };
            tracing::warn!(ns = namespace, event, dropped, error = %err, "slow consumers missed an event");
        }
        meters
            .deliveries
            .increment(audience.saturating_sub(dropped) as u64);
        if dropped > 0 {
            meters.delivery_drops.increment(dropped as u64);
        }
        let strays = self.shared.rooms.strays(namespace);
        for socket in strays {
            let member = socket
                .rooms()
                .iter()
                .any(|room| rooms.iter().any(|r| r == room));
            match socket.emit(event, payload) {
                _ if !member => {}
                Ok(()) => meters.deliveries.increment(1),
                // Gone (its disconnect handler may have run before it was kept): never
                // emitted to again, so strays cannot pile up.
                Err(SendError::Socket(SocketError::Closed)) => {
                    self.shared.rooms.remove_stray(&socket);
                }
                Err(err) => {
                    meters.delivery_drops.increment(1);
                    tracing::warn!(ns = namespace, sid = %socket.id, error = %err, "socket missed an event");
                }
            }
        }
    }

    /// Sockets kept as strays of socketioxide's namespace-creation race, now.
    pub fn stray_count(&self) -> usize {
        self.shared.rooms.stray_count()
    }

    /// Namespaces socketioxide holds now (`/` included).
    pub fn namespace_count(&self) -> usize {
        self.io.nsps().len()
    }

    /// Disconnects every socket (shutdown).
    pub async fn close(&self) {
        self.io.close().await;
    }

    /// Sessions the hub ended, for the guard to refuse.
    pub fn sessions(&self) -> Arc<sio_request::Sessions> {
        self.shared.sessions.clone()
    }

    /// The live count of connected sockets, shared with the connection cap.
    pub fn connected(&self) -> Arc<AtomicUsize> {
        self.connected.clone()
    }

    /// Connected sockets on this node, across namespaces.
    /// Sockets connected to `namespace`.
    pub fn clients(&self, namespace: &str) -> usize {
        self.io.of(namespace).map_or(0, |ns| ns.sockets().len())
    }

    pub fn socket_count(&self) -> usize {
        self.io
            .nsps()
            .into_iter()
            .map(|ns| ns.sockets().len())
            .sum()
    }
}

/// Whether an event says the instance is gone (`envelope::DELETION_EVENTS`).
pub fn is_deletion(event: &str) -> bool {
    envelope::is_deletion(event)
}

/// How long an Engine.IO session may stay without a namespace before it is closed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for socket.io to close its sockets.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
