//! The HTTP middleware of `auth`: the handshake key check, which must sit outside
//! socket.io so a bad key gets Evolution's 403/400 before any namespace, and the global
//! key in front of `/_sidecar/metrics`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::StatusCode;

use super::{Authenticator, Budget, Error};
use crate::sio_request::{self, key_from_request};
use crate::telemetry::names;

/// The key check on the socket.io endpoint: refuses a handshake whose query or header key
/// is not valid, the way Evolution/engine.io do, so clients retry. `Ok` hands the request
/// on; `Err` is the refusal to answer with. Anything but a handshake passes untouched, and
/// so does a handshake without a key (its namespace CONNECT must carry one).
pub async fn check_handshake(
    auth: &Authenticator,
    request: Request,
) -> Result<Request, Box<Response>> {
    if !sio_request::is_handshake(request.uri()) {
        return Ok(request);
    }
    let query = request.uri().query().unwrap_or("");
    let websocket = sio_request::query_param(query, "transport").as_deref() == Some("websocket");
    let (parts, body) = request.into_parts();
    let Some(key) = key_from_request(&parts) else {
        return Ok(Request::from_parts(parts, body));
    };
    match auth.resolve(&key, &Budget::of(&parts.extensions)).await {
        Ok(principal) => {
            tracing::debug!(principal = %principal.label(), "handshake accepted");
            Ok(Request::from_parts(parts, body))
        }
        Err(err) => {
            tracing::debug!(error = %err, websocket, "handshake refused");
            metrics::counter!(names::HANDSHAKE_REJECTIONS, "reason" => err.reason()).increment(1);
            Err(Box::new(handshake_refusal(&err, websocket)))
        }
    }
}

/// HTTP middleware on the operator's endpoints (`/_sidecar/metrics` on the public listener,
/// `/_sidecar/instances`): instance names and usage are for the operator, so it takes
/// `Authorization: Bearer <global key>` (Prometheus' `authorization` scrape setting) or
/// Evolution's `apikey: <global key>` header. Without a global key configured, always 401.
pub async fn require_global_key(
    State(auth): State<Arc<Authenticator>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .or_else(|| {
            request
                .headers()
                .get("apikey")
                .and_then(|value| value.to_str().ok())
        });
    if presented.is_some_and(|key| auth.is_global(key)) {
        return next.run(request).await;
    }
    let body = serde_json::json!({
        "error": "this endpoint needs the global key: `Authorization: Bearer <AUTHENTICATION_API_KEY>` or `apikey: <AUTHENTICATION_API_KEY>` (metrics: or SIDECAR_METRICS_LISTEN)"
    });
    (
        StatusCode::UNAUTHORIZED,
        [
            (http::header::CONTENT_TYPE, "application/json"),
            (http::header::WWW_AUTHENTICATE, "Bearer"),
        ],
        Body::from(body.to_string()),
    )
        .into_response()
}

/// Evolution's rejection: polling gets 403 `{"code":4,...}`, a websocket upgrade 400; a
/// client over its lookup rate gets 429 either way.
fn handshake_refusal(err: &Error, websocket: bool) -> Response {
    let status = match err {
        Error::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        _ if websocket => StatusCode::BAD_REQUEST,
        _ => StatusCode::FORBIDDEN,
    };
    let body = serde_json::json!({ "code": 4, "message": err.to_string() });
    (
        status,
        [(http::header::CONTENT_TYPE, "application/json")],
        Body::from(body.to_string()),
    )
        .into_response()
}
