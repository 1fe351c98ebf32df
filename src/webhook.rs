//! Webhook ingest: Evolution API POSTs an event, we hand it to the hub.
//!
//! The hot path is [`ingest`], top to bottom: draining check → path (token, suffix) →
//! size and type → credentials → read body (bounded) → [`Envelope`] → suffix check →
//! dedupe → `hub.publish` (retains, then broadcasts) → 200. This module knows nothing of sockets.
//!
//! Evolution never retries 400/401/403/404/422 and retries everything else, so each
//! failure maps to exactly one status ([`Error::status`]):
//!
//! | error                   | status |
//! |-------------------------|--------|
//! | `Draining`              | 503    |
//! | `NotFound`              | 404    |
//! | `TooLarge`              | 413    |
//! | `UnsupportedMediaType`  | 415    |
//! | `Unauthorized`          | 401    |
//! | `Forbidden`             | 403    |
//! | `ReadTimeout`           | 408    |
//! | `Envelope(Syntax)`      | 400    |
//! | `Envelope(Semantic)`    | 422    |
//! | `SuffixMismatch`        | 422    |
//!
//! A refusal decided before the body is read (503, 404, 413, 415, 401, 403) first reads
//! and discards the body, up to twice `max_body_bytes` and within `read_timeout_secs`,
//! and every refusal that did not read the whole body says `Connection: close`. Closing a
//! socket with unread bytes makes the kernel send a reset, and Node's `http` client (what
//! Evolution's axios uses) then reports `EPIPE` instead of the status: a non-retryable
//! 413 would become a retried network error. A client that sent `Expect: 100-continue`
//! has not sent its body: nothing is drained, and it is answered at once.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::config::{self, Secret, comma_list};
use crate::dedupe;
use crate::envelope::{self, Envelope};
use crate::hub::{Hub, Published};
use crate::telemetry::{self, names};

/// Settings of the ingest endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where Evolution POSTs: `{path}[/{path_token}][/{event-suffix}]`.
    pub path: String,
    /// The `jwt_key` put in Evolution's per-instance webhook headers (HS256).
    pub jwt_secret: Option<Secret>,
    /// Evolution signs once per event and reuses the token over ~20 minutes of retries.
    pub jwt_leeway_secs: u64,
    /// A static secret expected in `secret_header`.
    pub secret: Option<Secret>,
    pub secret_header: String,
    /// A secret path segment: the only credential Evolution's global webhook can carry.
    pub path_token: Option<Secret>,
    /// Peers accepted when no credential is configured at all.
    #[serde(with = "comma_list")]
    pub allowed_cidrs: Vec<String>,
    /// The largest body accepted; history batches and media reach tens of MB.
    pub max_body_bytes: u64,
    /// A body that stops arriving is cut off after this long.
    pub read_timeout_secs: u64,
    /// An identical body within this window (refreshed on each repeat) is a retry of an
    /// accepted event: answered 200 and not emitted again. 0 turns deduplication off.
    pub dedupe_window_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            path: "/_sidecar/webhook".to_owned(),
            jwt_secret: None,
            jwt_leeway_secs: 1200,
            secret: None,
            secret_header: "x-webhook-secret".to_owned(),
            path_token: None,
            allowed_cidrs: vec!["127.0.0.0/8".to_owned(), "::1/128".to_owned()],
            max_body_bytes: 64 * 1024 * 1024,
            read_timeout_secs: 30,
            dedupe_window_secs: 1200,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), config::Error> {
        let path = &self.path;
        if !path.starts_with("/") || path.len() < 2 || path.ends_with('/') || path.contains("//") {
            return Err(config::invalid(
                "webhook.path",
                path,
                "must start with '/', not end with '/' and not be '/'",
            ));
        }
        if path.contains(['{', '}', '*', '?', '#']) {
            return Err(config::invalid(
                "webhook.path",
                path,
                "may not contain '{', '}', '*', '?' or '#'",
            ));
        }
        if path == "/socket.io" || path.starts_with("/socket.io/") {
            return Err(config::invalid(
                "webhook.path",
                path,
                "collides with /socket.io/",
            ));
        }
        self.cidrs()?;
        if http::HeaderName::from_bytes(self.secret_header.as_bytes()).is_err() {
            return Err(config::invalid(
                "webhook.secret_header",
                &self.secret_header,
                "not a valid header name",
            ));
        }
        // An empty credential would match an empty header and switch off the peer allow-list.
        for (key, secret) in [
            ("webhook.jwt_secret", &self.jwt_secret),
            ("webhook.secret", &self.secret),
        ] {
            if secret.as_ref().is_some_and(|s| s.expose().is_empty()) {
                return Err(config::invalid(
                    key,
                    &"",
                    "must not be empty; unset it instead",
                ));
            }
        }
        if let Some(token) = &self.path_token
            && (token.expose().is_empty() || token.expose().contains(['/', '?', '#', '%']))
        {
            return Err(config::invalid(
                "webhook.path_token",
                &"***",
                "must be non-empty and contain no '/', '?', '#' or '%'",
            ));
        }
        if self.max_body_bytes == 0 {
            return Err(config::invalid(
                "webhook.max_body_bytes",
                &0,
                "must be positive",
            ));
        }
        Ok(())
    }

    fn cidrs(&self) -> Result<Vec<IpNet>, config::Error> {
        self.allowed_cidrs
            .iter()
            .map(|text| {
                text.parse::<IpNet>()
                    .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|err| {
                        config::invalid("webhook.allowed_cidrs", &self.allowed_cidrs.join(","), err)
                    })
            })
            .collect()
    }

    /// Whether any credential (JWT, header secret, path token) is configured.
    pub fn has_credentials(&self) -> bool {
        self.jwt_secret.is_some() || self.secret.is_some() || self.path_token.is_some()
    }
}

/// Why a webhook was refused. Messages are lower-case and say what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("shutting down, retry later")]
    Draining,
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
    #[error("body did not arrive within {0} seconds")]
    ReadTimeout(u64),
    #[error("could not read body: {0}")]
    BodyCut(String),
    #[error(transparent)]
    Envelope(#[from] envelope::Error),
    #[error("url suffix {suffix:?} does not match event {event:?} (expected {expected:?})")]
    SuffixMismatch {
        suffix: String,
        event: String,
        expected: String,
    },
}

impl Error {
    /// Whether the refusal may leave part of the body unread, so the connection must close.
    fn body_unread(&self) -> bool {
        !matches!(self, Error::Envelope(_) | Error::SuffixMismatch { .. })
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::Draining => StatusCode::SERVICE_UNAVAILABLE,
            Error::NotFound => StatusCode::NOT_FOUND,
            Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::ReadTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Error::BodyCut(_) | Error::Envelope(envelope::Error::Syntax(_)) => {
                StatusCode::BAD_REQUEST
            }
            Error::Envelope(envelope::Error::Semantic(_)) | Error::SuffixMismatch { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
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

/// The ingest endpoint's state.
pub struct Webhook {
    config: Config,
    cidrs: Vec<IpNet>,
    jwt: Option<(jsonwebtoken::DecodingKey, jsonwebtoken::Validation)>,
    hub: Hub,
    draining: Arc<AtomicBool>,
}

impl Webhook {
    pub fn new(
        config: &Config,
        hub: Hub,
        draining: Arc<AtomicBool>,
    ) -> Result<Self, config::Error> {
        config.validate()?;
        let jwt = config.jwt_secret.as_ref().map(|secret| {
            let key = jsonwebtoken::DecodingKey::from_secret(secret.expose().as_bytes());
            let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
            validation.leeway = config.jwt_leeway_secs;
            validation.validate_exp = true;
            validation.set_required_spec_claims(&["exp"]);
            (key, validation)
        });
        if !config.has_credentials() {
            tracing::warn!(
                allowed_cidrs = %config.allowed_cidrs.join(","),
                "no webhook credential configured: accepting webhooks from these peers only"
            );
        }
        Ok(Self {
            cidrs: config.cidrs()?,
            config: config.clone(),
            jwt,
            hub,
            draining,
        })
    }

    pub fn path(&self) -> &str {
        &self.config.path
    }
}

/// `POST {path}[/{token}][/{suffix}]`: accept one event, and count the outcome.
pub async fn ingest(State(webhook): State<Arc<Webhook>>, request: Request) -> Response {
    let started = std::time::Instant::now();
    let mut event_label = "unknown";
    let response = match accept(&webhook, request, &mut event_label).await {
        Ok(response) => response,
        Err(err) => {
            let close = err.body_unread();
            let mut response = err.into_response();
            if close {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
            }
            response
        }
    };
    let status = response.status().as_u16().to_string();
    metrics::counter!(names::WEBHOOKS, "event" => event_label, "status" => status).increment(1);
    metrics::histogram!(names::WEBHOOK_SECONDS).record(started.elapsed().as_secs_f64());
    response
}

async fn accept(
    webhook: &Webhook,
    request: Request,
    event_label: &mut &'static str,
) -> Result<Response, Error> {
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(webhook.config.read_timeout_secs);
    let drain_limit = webhook.config.max_body_bytes.saturating_mul(DRAIN_FACTOR);
    let route = match check_before_body(webhook, &request) {
        Ok(route) => route,
        Err(err) => {
            drain(request, drain_limit, deadline).await;
            return Err(err);
        }
    };

    // Stage 5: the body, bounded in size and time.
    let body = read_body(request, &webhook.config, deadline).await?;

    // Stage 6: routing fields only; every value stays raw.
    let envelope = Envelope::from_webhook(&body)?;
    *event_label = telemetry::event_label(envelope.event.as_str());
    if let Some(suffix) = &route.suffix {
        let expected = envelope.event.kebab();
        if *suffix != expected {
            return Err(Error::SuffixMismatch {
                suffix: suffix.clone(),
                event: envelope.event.to_string(),
                expected,
            });
        }
    }

    // Stage 7: retain and hand over, unless it is a retry of an accepted event. The 200
    // comes after the event is retained; publishing never waits for a socket. It runs as
    // its own task so a client hanging up cannot cut it between "seen" and "retained".
    let fingerprint = (webhook.config.dedupe_window_secs > 0).then(|| dedupe::fingerprint(&body));
    let (hub, event) = (webhook.hub.clone(), envelope.clone());
    let published = tokio::spawn(async move { hub.publish(&event, fingerprint).await })
        .await
        .unwrap_or(Published::Fresh);
    if published == Published::Duplicate {
        metrics::counter!(names::DUPLICATE_WEBHOOKS).increment(1);
        tracing::debug!(instance = %envelope.instance, event = %envelope.event, "duplicate webhook");
        return Ok(Json(serde_json::json!({ "ok": true, "duplicate": true })).into_response());
    }
    tracing::debug!(
        instance = %envelope.instance,
        event = %envelope.event,
        bytes = body.len(),
        "webhook accepted"
    );
    Ok(Json(serde_json::json!({ "ok": true })).into_response())
}

/// Stages 1 to 4, decided from the request head alone.
fn check_before_body(webhook: &Webhook, request: &Request) -> Result<WebhookPath, Error> {
    // Stage 1: while draining, Evolution must retry elsewhere.
    if webhook.draining.load(Ordering::Relaxed) {
        return Err(Error::Draining);
    }
    // Stage 2: split the path into an optional token and an optional by-events suffix.
    let route = WebhookPath::parse(&webhook.config, request.uri().path())?;

    // Stage 3: refuse what is too large or not JSON before reading a byte of it.
    check_head(request.headers(), webhook.config.max_body_bytes)?;

    // Stage 4: credentials (or the peer allow-list when none is configured).
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    authenticate(webhook, &route, request.headers(), peer)?;
    Ok(route)
}

/// A refused body is read and discarded up to this many times `max_body_bytes`: enough
/// for Evolution's over-limit batches to read their 413, and bounded for anyone else.
const DRAIN_FACTOR: u64 = 2;

/// Reads and discards a refused request's body, up to `limit` bytes and `deadline`, so
/// the answer is not lost to a reset. One frame is held at a time.
async fn drain(request: Request, limit: u64, deadline: tokio::time::Instant) {
    let headers = request.headers();
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Reading would send `100 Continue` and invite the body we are refusing.
    let expects_continue = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue || declared.is_some_and(|length| length > limit) {
        return;
    }
    discard(request.into_body(), limit, deadline).await;
}

async fn discard(mut body: axum::body::Body, limit: u64, deadline: tokio::time::Instant) {
    let mut seen = 0u64;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, body.frame()).await {
        if let Some(data) = frame.data_ref() {
            seen = seen.saturating_add(data.len() as u64);
            if seen > limit {
                return;
            }
        }
    }
}

/// The parts of a webhook URL after the configured path.
#[derive(Debug, PartialEq, Eq)]
struct WebhookPath {
    /// The path token matched (in constant time).
    token_matched: bool,
    /// A non-token segment that was present where a token belongs.
    token_wrong: bool,
    /// The by-events suffix, e.g. `messages-upsert`.
    suffix: Option<String>,
}

impl WebhookPath {
    fn parse(config: &Config, path: &str) -> Result<Self, Error> {
        let rest = path
            .strip_prefix(config.path.as_str())
            .ok_or(Error::NotFound)?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return Err(Error::NotFound);
        }
        // A URL configured with a trailing '/' gives `//suffix`: empty segments are ignored.
        let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let token = config.path_token.as_ref().map(|t| t.expose().as_bytes());
        let is_token =
            |segment: &str| token.is_some_and(|t| bool::from(t.ct_eq(segment.as_bytes())));
        match segments.as_slice() {
            [] => Ok(Self {
                token_matched: false,
                token_wrong: false,
                suffix: None,
            }),
            [one] if is_token(one) => Ok(Self {
                token_matched: true,
                token_wrong: false,
                suffix: None,
            }),
            [one] => Ok(Self {
                token_matched: false,
                token_wrong: false,
                suffix: Some((*one).to_owned()),
            }),
            [first, second] => Ok(Self {
                token_matched: is_token(first),
                token_wrong: !is_token(first),
                suffix: Some((*second).to_owned()),
            }),
            _ => Err(Error::NotFound),
        }
    }
}

fn check_head(headers: &HeaderMap, limit: u64) -> Result<(), Error> {
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if length.is_some_and(|length| length > limit) {
        return Err(Error::TooLarge { limit });
    }
    if let Some(content_type) = headers.get(header::CONTENT_TYPE) {
        let essence = content_type
            .to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if !(essence == "application/json" || essence.ends_with("+json")) {
            return Err(Error::UnsupportedMediaType);
        }
    }
    Ok(())
}

fn authenticate(
    webhook: &Webhook,
    route: &WebhookPath,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
) -> Result<(), Error> {
    let config = &webhook.config;
    if route.token_wrong {
        return Err(Error::Unauthorized("invalid path token"));
    }
    if !config.has_credentials() {
        return match peer {
            Some(ip) if webhook.cidrs.iter().any(|net| net.contains(&ip)) => Ok(()),
            Some(ip) => Err(Error::Forbidden(ip)),
            // In-process callers (tests through `oneshot`) have no peer address.
            None => Ok(()),
        };
    }
    if route.token_matched {
        return Ok(());
    }
    if let Some(expected) = &config.secret
        && let Some(given) = headers.get(config.secret_header.as_str())
        && bool::from(expected.expose().as_bytes().ct_eq(given.as_bytes()))
    {
        return Ok(());
    }
    if let Some((key, validation)) = &webhook.jwt
        && let Some(token) = bearer(headers)
    {
        return verify_jwt(token, key, validation);
    }
    Err(Error::Unauthorized(
        "missing or invalid webhook credentials",
    ))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Evolution's webhook JWT: HS256, `{iat, exp, app: "evolution", action: "webhook"}`.
fn verify_jwt(
    token: &str,
    key: &jsonwebtoken::DecodingKey,
    validation: &jsonwebtoken::Validation,
) -> Result<(), Error> {
    #[derive(Deserialize)]
    struct Claims {
        app: Option<String>,
        action: Option<String>,
    }
    let data = jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|err| {
        use jsonwebtoken::errors::ErrorKind;
        match err.kind() {
            ErrorKind::ExpiredSignature => Error::Unauthorized("jwt expired"),
            ErrorKind::InvalidSignature => Error::Unauthorized("jwt signature is invalid"),
            ErrorKind::MissingRequiredClaim(_) => Error::Unauthorized("jwt has no exp claim"),
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                Error::Unauthorized("jwt algorithm must be HS256")
            }
            _ => Error::Unauthorized("jwt is invalid"),
        }
    })?;
    let claims = data.claims;
    if claims.app.as_deref() != Some("evolution") || claims.action.as_deref() != Some("webhook") {
        return Err(Error::Unauthorized("jwt claims are not evolution/webhook"));
    }
    Ok(())
}

/// The body, at most `max_body_bytes`, complete by `deadline`. Past the limit, the rest
/// is drained (up to `DRAIN_FACTOR` times the limit in all) before the 413.
async fn read_body(
    request: Request,
    config: &Config,
    deadline: tokio::time::Instant,
) -> Result<bytes::Bytes, Error> {
    let limit = config.max_body_bytes;
    let mut body = request.into_body();
    let mut buffer = bytes::BytesMut::new();
    loop {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .map_err(|_| Error::ReadTimeout(config.read_timeout_secs))?;
        let Some(frame) = frame else {
            return Ok(buffer.freeze());
        };
        let frame = frame.map_err(|err| Error::BodyCut(err.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buffer.len() as u64 + data.len() as u64 > limit {
            let read = buffer.len() as u64 + data.len() as u64;
            drop(buffer);
            let drain_limit = limit.saturating_mul(DRAIN_FACTOR);
            discard(body, drain_limit.saturating_sub(read), deadline).await;
            return Err(Error::TooLarge { limit });
        }
        buffer.extend_from_slice(&data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(token: Option<&str>) -> Config {
        Config {
            path_token: token.map(Secret::new),
            ..Config::default()
        }
    }

    #[test]
    fn paths() {
        let parse = |token, path: &str| WebhookPath::parse(&config(token), path);
        let plain = parse(None, "/_sidecar/webhook").unwrap();
        assert_eq!(plain.suffix, None);
        let suffixed = parse(None, "/_sidecar/webhook//messages-upsert").unwrap();
        assert_eq!(suffixed.suffix.as_deref(), Some("messages-upsert"));
        let token = parse(Some("s3cret"), "/_sidecar/webhook/s3cret").unwrap();
        assert!(token.token_matched && token.suffix.is_none());
        let both = parse(Some("s3cret"), "/_sidecar/webhook/s3cret/call").unwrap();
        assert!(both.token_matched && both.suffix.as_deref() == Some("call"));
        let wrong = parse(Some("s3cret"), "/_sidecar/webhook/nope/call").unwrap();
        assert!(wrong.token_wrong);
        assert!(parse(None, "/_sidecar/webhooks").is_err());
        assert!(parse(None, "/_sidecar/webhook/a/b/c").is_err());
    }

    #[test]
    fn config_rules() {
        let mut config = Config::default();
        assert!(config.validate().is_ok());
        config.path = "/".into();
        assert!(config.validate().is_err());
        config.path = "/hooks/".into();
        assert!(config.validate().is_err());
        config.path = "/hooks".into();
        config.allowed_cidrs = vec!["10.0.0.0/8".into(), "192.168.1.7".into()];
        assert!(config.validate().is_ok());
        config.allowed_cidrs = vec!["nope".into()];
        assert!(config.validate().is_err());
    }
}
