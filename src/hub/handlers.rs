//! The socket handlers: the connect middleware ([`authorize`]), then on connect,
//! disconnect and emit.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Deserialize;
use serde_json::value::RawValue;
use socketioxide::extract::{AckSender, Event, SocketRef, State, TryData};
use socketioxide::socket::DisconnectReason;
use socketioxide::{SocketIo, TransportType};

use super::connect::ConnectRequest;
use super::rooms::{ALL_ROOM, event_room};
use super::session::{ConnectError, EngineSession, Session};
use super::{Shared, delivery};
use crate::auth;
use crate::envelope::InstanceName;
use crate::peer;
use crate::setting::Secret;
use crate::telemetry::names;
use crate::upstream;

/// Refused CONNECTs one Engine.IO session may make before its transport is closed.
pub const MAX_REFUSED_CONNECTS: u32 = 4;

/// Connect middleware: who is this socket, and may it join this namespace?
///
/// A refused CONNECT leaves nothing behind: socketioxide creates a dynamic namespace
/// before its middleware runs, so a refusal removes the namespace again when nobody is in
/// it and no other CONNECT to it is being admitted.
pub(super) async fn authorize(
    socket: SocketRef,
    auth_payload: TryData<Box<RawValue>>,
    state: State<Arc<Shared>>,
) -> Result<(), ConnectError> {
    let shared = state.0.clone();
    let namespace = socket.ns().to_owned();
    shared.admissions.begin(&namespace);
    let result = admit(&socket, auth_payload, state).await;
    let refused = result.is_err();
    shared.admissions.end(&namespace, refused, &socket);
    if let Err(err) = &result {
        metrics::counter!(names::HANDSHAKE_REJECTIONS, "reason" => err.reason()).increment(1);
        if let Some(session) = socket.req_parts().extensions.get::<Arc<EngineSession>>()
            && session.refused.fetch_add(1, Ordering::Relaxed) + 1 >= MAX_REFUSED_CONNECTS
        {
            tracing::debug!(sid = %socket.id, "too many refused CONNECTs: closing the transport");
            metrics::counter!(names::HANDSHAKE_REJECTIONS, "reason" => "too_many_refusals")
                .increment(1);
            session.close();
            if socket.transport_type() == TransportType::Polling {
                // A polling transport is many requests: refuse the session's next ones.
                shared.sessions.close(&socket.id.to_string());
            }
        }
    }
    result
}

/// Authenticates first, then reads what the client asked for: nothing proportional to
/// the payload runs for an anonymous peer beyond one bounded scan.
async fn admit(
    socket: &SocketRef,
    TryData(auth_payload): TryData<Box<RawValue>>,
    State(shared): State<Arc<Shared>>,
) -> Result<(), ConnectError> {
    let namespace = socket.ns().to_owned();
    let instance = if namespace == "/" {
        None
    } else {
        Some(InstanceName::from_namespace(&namespace).ok_or(ConnectError::BadNamespace)?)
    };
    let auth_payload = auth_payload.ok();
    let request = ConnectRequest::parse(socket.req_parts(), auth_payload.as_deref())?;
    let (principal, key) = match request.key() {
        Some(key) => {
            let budget = auth::Budget::of(&socket.req_parts().extensions);
            (
                shared.auth.resolve(&key, &budget).await?,
                Some(Secret::new(key)),
            )
        }
        // Evolution's Manager: no key, from an address in WEBSOCKET_ALLOWED_HOSTS.
        None => {
            let client = socket.req_parts().extensions.get::<peer::ClientAddr>();
            (shared.auth.keyless(client.map(|addr| addr.0))?, None)
        }
    };
    if !principal.may_join(&namespace) {
        tracing::debug!(ns = %namespace, principal = %principal.label(), "namespace refused");
        return Err(ConnectError::Forbidden(namespace));
    }
    let options = request.options()?;
    let admitted_at = shared.replay.log(&namespace).head();
    socket.extensions.insert(Arc::new(Session {
        principal,
        caller: upstream::Caller::new(instance, key),
        filter: options.filter.into_boxed_slice(),
        resume: options.resume,
        snapshot: options.snapshot,
        admitted_at,
        gone: tokio::sync::Notify::new(),
    }));
    Ok(())
}

/// A socket joined: route its emits upstream, then bring it up to date and subscribe it.
pub(super) async fn on_connect(socket: SocketRef, io: SocketIo, State(shared): State<Arc<Shared>>) {
    let Some(session) = socket.extensions.get::<Arc<Session>>() else {
        // Unreachable: `authorize` runs first. Refuse rather than serve unauthenticated.
        let _ = socket.disconnect();
        return;
    };
    socket.on_fallback(on_emit);
    socket.on_disconnect(on_disconnect);
    shared.connected.fetch_add(1, Ordering::Relaxed);
    metrics::gauge!(names::SOCKETS).increment(1.0);
    let label = shared.namespace_labels.label(socket.ns());
    metrics::gauge!(names::SOCKETS_BY_NAMESPACE, "namespace" => label).increment(1.0);
    tracing::debug!(
        sid = %socket.id,
        ns = socket.ns(),
        principal = %session.principal.label(),
        websocket = socket.transport_type() == TransportType::Websocket,
        opted_in = session.resume.opted_in(),
        "socket connected"
    );

    let log = shared.replay.log(socket.ns());
    if session.resume.opted_in() {
        let epoch = shared.replay.epoch();
        tokio::spawn(delivery::run(socket.clone(), session, log, epoch));
        return;
    }

    // Counted before joining, so a concurrent publish never undercounts its audience.
    shared.rooms.count(&socket, &session, 1);
    {
        let _gate = log.gate.lock().await;
        let state = session.join_state(&log);
        for entry in &state {
            let _ = socket.emit(entry.event.as_str(), &*entry.payload);
        }
        // socketioxide sends the CONNECT answer before this handler runs, so the client may
        // already have been told it is connected while events were broadcast to rooms it
        // was not in yet. Those appended since it was admitted are sent here, once (not
        // twice with the state), so none is lost between "connected" and the room join.
        let (missed, _) = log.read_after(session.admitted_at, usize::MAX);
        for entry in missed.iter().filter(|entry| {
            session.wants(entry.event.upper_snake()) && !state.iter().any(|s| s.seq == entry.seq)
        }) {
            let _ = socket.emit(entry.event.as_str(), &*entry.payload);
        }
        if session.filter.is_empty() {
            socket.join(ALL_ROOM);
        } else {
            socket.join(
                session
                    .filter
                    .iter()
                    .map(|e| event_room(e))
                    .collect::<Vec<_>>(),
            );
        }
        // Still under the gate: a socket that lost socketioxide's namespace-creation race
        // (two first CONNECTs at once; broadcasts to the registered namespace miss it),
        // this one or one that joined before the namespace was replaced, is a stray before
        // the next event can be broadcast, so it misses none.
        for orphan in shared.rooms.orphans(socket.ns(), &io) {
            adopt_orphan(&shared, &orphan);
        }
    }
}

/// A socket that socketioxide's broadcasts no longer reach (see `Rooms::orphans`). Call it
/// under the namespace gate. A polling socket becomes a stray, served one by one; a
/// websocket's transport is closed, and the client reconnects into the live namespace
/// (revocation would not see it either).
pub(super) fn adopt_orphan(shared: &Shared, socket: &SocketRef) {
    let engine = socket.req_parts().extensions.get::<Arc<EngineSession>>();
    let closable = socket.transport_type() == TransportType::Websocket
        && engine
            .as_ref()
            .is_some_and(|session| session.close.is_some());
    if closable {
        tracing::warn!(sid = %socket.id, ns = socket.ns(), "namespace creation race: closing the transport so the client reconnects");
        if let Some(session) = engine {
            session.close();
        }
        return;
    }
    // socketioxide never reports the end of a stray's session: the guard notes its
    // requests, and `Hub::prune_strays` drops it once they stop.
    if shared.sessions.watch(&socket.id.to_string()) {
        tracing::warn!(sid = %socket.id, ns = socket.ns(), "namespace creation race: delivering to this socket directly");
        shared.rooms.add_stray(socket);
    } else {
        // Too many strays watched already: end the polling session instead.
        shared.sessions.close(&socket.id.to_string());
    }
}

async fn on_disconnect(
    socket: SocketRef,
    reason: DisconnectReason,
    State(shared): State<Arc<Shared>>,
) {
    if matches!(reason, DisconnectReason::HeartbeatTimeout) {
        // A dead peer, or one that stopped reading (its queue is bounded by socket_buffer).
        tracing::info!(sid = %socket.id, ns = socket.ns(), "socket answered no ping: disconnected");
    } else {
        tracing::debug!(sid = %socket.id, ns = socket.ns(), ?reason, "socket disconnected");
    }
    if let Some(session) = socket.extensions.get::<Arc<Session>>() {
        session.gone.notify_one();
        shared.connected.fetch_sub(1, Ordering::Relaxed);
        if !session.resume.opted_in() {
            shared.rooms.count(&socket, &session, -1);
        }
        metrics::gauge!(names::SOCKETS).decrement(1.0);
        let label = shared.namespace_labels.label(socket.ns());
        metrics::gauge!(names::SOCKETS_BY_NAMESPACE, "namespace" => label).decrement(1.0);
        metrics::counter!(names::SOCKET_DISCONNECTS, "reason" => format!("{reason:?}"))
            .increment(1);
    }
    shared.rooms.remove_stray(&socket);
    shared.sessions.unwatch(&socket.id.to_string());
}

/// A client emit: forwarded to the upstream REST API, always answered through the ack.
/// The argument stays raw JSON: Evolution gets the fields as the client wrote them.
async fn on_emit(
    socket: SocketRef,
    Event(event): Event,
    TryData(argument): TryData<FirstArgument>,
    ack: AckSender,
    State(shared): State<Arc<Shared>>,
) {
    let Some(session) = socket.extensions.get::<Arc<Session>>() else {
        return;
    };
    // No argument at all is allowed for GET routes.
    let reply = shared
        .upstream
        .forward(
            &session.caller,
            &event,
            argument.ok().and_then(|a| a.0).as_deref(),
        )
        .await;
    if let Err(err) = ack.send(&reply) {
        tracing::debug!(sid = %socket.id, error = %err, "ack not delivered");
    }
}

/// An emit's first argument, raw. Read as a tuple so socketioxide hands over the
/// arguments after the event name (a bare `Box<RawValue>` would capture the whole packet
/// array); further arguments are skipped unparsed.
struct FirstArgument(Option<Box<RawValue>>);

impl<'de> Deserialize<'de> for FirstArgument {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Arguments;
        impl<'de> serde::de::Visitor<'de> for Arguments {
            type Value = FirstArgument;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("emit arguments")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let first = seq.next_element::<Box<RawValue>>()?;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(FirstArgument(first))
            }
        }
        deserializer.deserialize_tuple(usize::MAX, Arguments)
    }
}

/// Disconnects a socket whose access ended, with a logged reason and a metric.
pub(super) fn revoke(socket: &SocketRef, reason: &'static str) {
    tracing::info!(sid = %socket.id, ns = socket.ns(), reason, "revoking socket");
    metrics::counter!(names::REVOCATIONS, "reason" => reason).increment(1);
    let _ = socket.clone().disconnect();
}
