//! Why a webhook is refused, and its one mapping to a status ([`Error::status`]).

use std::net::IpAddr;

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::StatusCode;

use crate::envelope;

/// Why a webhook was refused. Messages are lower-case and say what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("shutting down, retry later")]
    Draining,
    /// Publishing failed before the event was retained (a panic, a cancellation):
    /// Evolution retries. The cause is logged, not sent.
    #[error("the event was not retained, retry later")]
    NotRetained(String),
    #[error("no such webhook path")]
    NotFound,
    #[error("body is larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("content-type must be application/json")]
    UnsupportedMediaType,
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("peer {0} is not in SIDECAR_WEBHOOK_ALLOWED_CIDRS")]
    Forbidden(IpAddr),
    #[error(
        "request carries proxy header {0:?}: without a webhook credential only direct peers are accepted; configure a credential"
    )]
    Proxied(String),
    #[error("{reason} for instance {instance:?}")]
    WrongInstance {
        instance: String,
        reason: &'static str,
    },
    #[error("body did not arrive within {0} seconds")]
    ReadTimeout(u64),
    #[error("could not read body: {0}")]
    BodyCut(String),
    #[error(transparent)]
    Envelope(#[from] envelope::Error),
    /// An Evolution 2.4 delivery header names another instance or event than the body.
    #[error("header {header} says {sent:?} but the body says {body:?}")]
    HeaderMismatch {
        header: &'static str,
        sent: String,
        body: String,
    },
    #[error("url suffix {suffix:?} does not match event {event:?} (expected {expected:?})")]
    SuffixMismatch {
        suffix: String,
        event: String,
        expected: String,
    },
}

impl Error {
    /// Whether the refusal may leave part of the body unread, so the connection must close.
    pub(super) fn body_unread(&self) -> bool {
        !matches!(
            self,
            Error::Envelope(_)
                | Error::SuffixMismatch { .. }
                | Error::HeaderMismatch { .. }
                | Error::NotRetained(_)
        )
    }

    /// The metric label and log field of this refusal: bounded, one per variant.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Draining => "draining",
            Error::NotRetained(_) => "not_retained",
            Error::NotFound => "not_found",
            Error::TooLarge { .. } => "too_large",
            Error::UnsupportedMediaType => "unsupported_media_type",
            Error::Unauthorized(_) => "unauthorized",
            Error::WrongInstance { .. } => "wrong_instance",
            Error::Forbidden(_) => "forbidden_peer",
            Error::Proxied(_) => "proxied",
            Error::ReadTimeout(_) => "read_timeout",
            Error::BodyCut(_) => "body_cut",
            Error::Envelope(envelope::Error::Syntax(_)) => "bad_json",
            Error::Envelope(envelope::Error::Semantic(_)) => "bad_envelope",
            Error::SuffixMismatch { .. } => "suffix_mismatch",
            Error::HeaderMismatch { .. } => "header_mismatch",
        }
    }

    /// Whether the sender is at fault (a misconfigured Evolution, or someone else), as
    /// opposed to the sidecar being unable (shutting down, a failed publish).
    pub(super) fn is_refusal(&self) -> bool {
        !matches!(self, Error::Draining | Error::NotRetained(_))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::Draining | Error::NotRetained(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::NotFound => StatusCode::NOT_FOUND,
            Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::Unauthorized(_) | Error::WrongInstance { .. } => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) | Error::Proxied(_) => StatusCode::FORBIDDEN,
            Error::ReadTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Error::BodyCut(_) | Error::Envelope(envelope::Error::Syntax(_)) => {
                StatusCode::BAD_REQUEST
            }
            Error::Envelope(envelope::Error::Semantic(_))
            | Error::SuffixMismatch { .. }
            | Error::HeaderMismatch { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        tracing::debug!(status = status.as_u16(), error = %self, "webhook refused");
        (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}
