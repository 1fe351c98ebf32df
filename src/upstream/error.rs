//! Why an emit got no answer from Evolution ([`Error`]), and the ack every emit gets
//! ([`AckReply`]): Evolution's own answer, or the one mapping of an [`Error`].

use serde::Serialize;
use serde_json::value::RawValue;

use super::plan::{MAX_ARGUMENT_FIELDS, MAX_REQUEST_ID_BYTES};

/// Why an emit was not answered by Evolution. Each variant has one status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("emits on / have no instance: connect to /<instance>")]
    NoInstance,
    /// A client admitted without a key (`WEBSOCKET_ALLOWED_HOSTS`): the sidecar forwards an
    /// emit with the client's own key, and it has none.
    #[error("emits need an api key: this socket joined without one (WEBSOCKET_ALLOWED_HOSTS)")]
    NoKey,
    #[error("shutting down, retry later")]
    Draining,
    #[error("more than {0} calls in flight on this socket")]
    TooManyCalls(usize),
    #[error("more than {0} bytes of emits in flight on this socket")]
    TooManySocketBytes(usize),
    #[error("server has too many emit bytes in flight, retry later")]
    TooManyBytes,
    #[error("unknown event {0:?}")]
    UnknownEvent(String),
    #[error("argument must be a JSON object")]
    NoArgument,
    #[error("argument must be a JSON object of at most {MAX_ARGUMENT_FIELDS} fields")]
    NotAnObject,
    #[error("requestId must be a string")]
    RequestIdNotString,
    #[error("requestId is longer than {MAX_REQUEST_ID_BYTES} bytes")]
    RequestIdTooLong,
    /// The request never reached Evolution: a retry may really try again.
    #[error("upstream unreachable")]
    Unreachable,
    #[error("upstream timed out")]
    Timeout,
    /// A repeat of a `requestId` whose answer was too large to keep.
    #[error("repeat of an answered requestId: its answer ({bytes} bytes) is not kept")]
    AnswerNotKept { status: u16, bytes: usize },
}

impl Error {
    pub fn status(&self) -> u16 {
        match self {
            Error::NoInstance
            | Error::NoArgument
            | Error::NotAnObject
            | Error::RequestIdNotString
            | Error::RequestIdTooLong => 400,
            Error::NoKey => 401,
            Error::UnknownEvent(_) => 404,
            Error::TooManyCalls(_) | Error::TooManySocketBytes(_) | Error::TooManyBytes => 429,
            Error::Unreachable => 502,
            Error::Draining => 503,
            Error::Timeout => 504,
            Error::AnswerNotKept { status, .. } => *status,
        }
    }
}

impl From<Error> for AckReply {
    fn from(err: Error) -> Self {
        AckReply::Error {
            status: err.status(),
            error: err.to_string(),
        }
    }
}

/// The answer to every emit: the upstream's answer, or why there was none.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum AckReply {
    /// Evolution's status and body, the body as Evolution wrote it (a string when it was
    /// not JSON).
    Upstream {
        status: u16,
        body: Box<RawValue>,
    },
    Error {
        status: u16,
        error: String,
    },
}

impl AckReply {
    pub fn status(&self) -> u16 {
        match self {
            AckReply::Upstream { status, .. } | AckReply::Error { status, .. } => *status,
        }
    }

    /// The bytes this reply holds, for the requestId memory's bound.
    pub(super) fn size(&self) -> usize {
        match self {
            AckReply::Upstream { body, .. } => body.get().len(),
            AckReply::Error { error, .. } => error.len(),
        }
    }
}
