//! What a connected socket is ([`Session`]), why a CONNECT is refused ([`ConnectError`]),
//! and what the hub keeps per Engine.IO session ([`EngineSession`]).

use std::sync::Arc;

use crate::auth::{self, Principal};
use crate::replay;
use crate::upstream;

use super::connect::{MAX_AUTH_BYTES, MAX_FILTER_EVENTS};

/// What a connected socket is: stored in its extensions by the connect middleware, as an
/// `Arc<Session>`. One allocation per socket: the extension is a pointer (socketioxide boxes
/// it), a `get` is a reference count instead of a copy of the key and offset, and the
/// budget, the disconnect signal and an empty filter live inline instead of in allocations
/// of their own.
pub struct Session {
    pub principal: Principal,
    /// What `upstream` needs to forward its emits: its instance (`None` on `/`), the key
    /// it connected with (forwarded on its emits, never the global key) and its
    /// in-flight budget.
    pub caller: upstream::Caller,
    /// UPPER_SNAKE events it wants; empty means all (and allocates nothing).
    pub filter: Box<[String]>,
    /// Whether the client opted in to recovery. Opted-in sockets get trailing offsets and
    /// are served by `delivery`, not rooms.
    pub resume: Resume,
    /// Send the instance's state (last `connection.update`, fresh `qrcode.updated`) on join.
    pub snapshot: bool,
    /// The namespace log's head when the CONNECT was admitted: a socket that does not opt
    /// in gets every event appended after it, live or, if it came before the room join,
    /// on join.
    pub admitted_at: u64,
    /// Signalled on disconnect, to stop this socket's delivery task.
    pub gone: tokio::sync::Notify,
}

/// What a client asked of recovery with `auth.offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// No `offset`: Evolution's one-argument events through rooms.
    No,
    /// `offset: null` or `""`: offsets from now on.
    FromNow,
    /// The last offset the client saw (`<epoch>-<seq>`, as it sent it).
    After(String),
}

impl Resume {
    /// Whether the socket opted in (is served from the log).
    pub fn opted_in(&self) -> bool {
        !matches!(self, Resume::No)
    }
}

impl Session {
    /// Whether this socket wants an event (UPPER_SNAKE).
    pub fn wants(&self, upper_snake: &str) -> bool {
        self.filter.is_empty() || self.filter.iter().any(|e| e == upper_snake)
    }

    /// The state events this socket gets on join: none without `snapshot`, else the
    /// namespace's retained state that its filter wants. Call it under the log's gate.
    pub(super) fn join_state(&self, log: &replay::NamespaceLog) -> Vec<Arc<replay::Entry>> {
        if !self.snapshot {
            return Vec::new();
        }
        let mut state = log.state();
        state.retain(|entry| self.wants(entry.event.upper_snake()));
        state
    }
}

/// Why a namespace CONNECT is refused: sent to the client as its CONNECT_ERROR message.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid namespace")]
    BadNamespace,
    #[error("{0}")]
    Auth(#[from] auth::Error),
    #[error("this api key may not join namespace {0}")]
    Forbidden(String),
    #[error("auth payload is larger than {MAX_AUTH_BYTES} bytes")]
    AuthTooLarge,
    #[error("auth payload must be a JSON object")]
    BadAuth,
    #[error("invalid event filter {0:?}")]
    BadFilter(String),
    #[error("no event in the filter is one Evolution sends: {names} (did you mean {closest}?)")]
    UnknownEvents { names: String, closest: String },
    #[error("an event filter lists at most {MAX_FILTER_EVENTS} events")]
    FilterTooLong,
    #[error("offset must be a string")]
    BadOffset,
}

impl ConnectError {
    pub(super) fn reason(&self) -> &'static str {
        match self {
            ConnectError::BadNamespace => "bad_namespace",
            ConnectError::Auth(err) => err.reason(),
            ConnectError::Forbidden(_) => "forbidden_namespace",
            ConnectError::AuthTooLarge => "auth_too_large",
            ConnectError::BadAuth => "bad_auth",
            ConnectError::BadFilter(_)
            | ConnectError::FilterTooLong
            | ConnectError::UnknownEvents { .. } => "bad_filter",
            ConnectError::BadOffset => "bad_offset",
        }
    }
}

/// Per Engine.IO session, in its handshake request's extensions as an `Arc` (engineioxide
/// keeps them for the session): refused CONNECTs so far, and how to close the session's
/// transport.
pub struct EngineSession {
    pub(super) refused: std::sync::atomic::AtomicU32,
    pub(super) close: Option<Box<dyn Fn() + Send + Sync>>,
}

impl EngineSession {
    /// `close` ends the session's transport (its TCP connection); `None` where the request
    /// came from no listener of ours (in-process tests).
    pub fn new(close: Option<Box<dyn Fn() + Send + Sync>>) -> Self {
        Self {
            refused: std::sync::atomic::AtomicU32::new(0),
            close,
        }
    }

    pub(super) fn close(&self) {
        if let Some(close) = &self.close {
            close();
        }
    }
}
