//! Webhook ingest: Evolution API POSTs an event, we hand it to the bus.
//!
//! The hot path is [`ingest`], top to bottom: draining check → path (token, suffix) →
//! size and type → credentials (what needs no instance) → read body (bounded) →
//! [`Envelope`] → per-instance credential against the body's `instance` → suffix check →
//! `bus.publish` (dedupes, retains, then fans out) → 200. This module knows nothing of sockets.
//!
//! An event reaches `/<instance>` only with a credential valid for that instance: the
//! server-wide path token, that instance's JWT key or header secret ([`instance_credential`]),
//! the master itself in the single-tenant `shared` mode, or, with no credential configured,
//! a direct peer on the allow-list that carries no proxy header.
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
//! | `WrongInstance`         | 401    |
//! | `Forbidden`             | 403    |
//! | `Proxied`               | 403    |
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

use crate::bus::{Bus, Published};
use crate::dedupe;
use crate::envelope::{self, Envelope, InstanceName};
use crate::setting::{self, Secret, comma_list};
use crate::telemetry::{self, names};

/// Settings of the ingest endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where Evolution POSTs: `{path}[/{path_token}][/{event-suffix}]`.
    pub path: String,
    /// The master secret of webhook JWTs (HS256). Per instance (the default), the `jwt_key`
    /// in an instance's webhook headers is [`instance_credential`] of it; shared, it is
    /// this value itself.
    pub jwt_secret: Option<Secret>,
    /// Evolution signs once per event and reuses the token over ~20 minutes of retries.
    pub jwt_leeway_secs: u64,
    /// The master secret of the static header credential expected in `secret_header`,
    /// derived per instance like `jwt_secret`.
    pub secret: Option<Secret>,
    pub secret_header: String,
    /// Whether the JWT and header credentials are bound to one instance each.
    pub credentials: CredentialMode,
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
            credentials: CredentialMode::PerInstance,
            path_token: None,
            // 127.0.0.1 only: Istio's inbound sidecar connects from 127.0.0.6.
            allowed_cidrs: vec!["127.0.0.1/32".to_owned(), "::1/128".to_owned()],
            max_body_bytes: 64 * 1024 * 1024,
            read_timeout_secs: 30,
            dedupe_window_secs: 1200,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), setting::Error> {
        let path = &self.path;
        if !path.starts_with("/") || path.len() < 2 || path.ends_with('/') || path.contains("//") {
            return Err(setting::invalid(
                "webhook.path",
                path,
                "must start with '/', not end with '/' and not be '/'",
            ));
        }
        if path.contains(['{', '}', '*', '?', '#']) {
            return Err(setting::invalid(
                "webhook.path",
                path,
                "may not contain '{', '}', '*', '?' or '#'",
            ));
        }
        if path == "/socket.io" || path.starts_with("/socket.io/") {
            return Err(setting::invalid(
                "webhook.path",
                path,
                "collides with /socket.io/",
            ));
        }
        self.cidrs()?;
        if http::HeaderName::from_bytes(self.secret_header.as_bytes()).is_err() {
            return Err(setting::invalid(
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
                return Err(setting::invalid(
                    key,
                    &"",
                    "must not be empty; unset it instead",
                ));
            }
        }
        if let Some(token) = &self.path_token
            && (token.expose().is_empty() || token.expose().contains(['/', '?', '#', '%']))
        {
            return Err(setting::invalid(
                "webhook.path_token",
                &"***",
                "must be non-empty and contain no '/', '?', '#' or '%'",
            ));
        }
        if self.max_body_bytes == 0 {
            return Err(setting::invalid(
                "webhook.max_body_bytes",
                &0,
                "must be positive",
            ));
        }
        Ok(())
    }

    fn cidrs(&self) -> Result<Vec<IpNet>, setting::Error> {
        setting::cidr_list("webhook.allowed_cidrs", &self.allowed_cidrs)
    }

    /// Whether any credential (JWT, header secret, path token) is configured.
    pub fn has_credentials(&self) -> bool {
        self.jwt_secret.is_some() || self.secret.is_some() || self.path_token.is_some()
    }
}

/// How the JWT and static header credentials relate to instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CredentialMode {
    /// Each instance has its own credential, derived from the master secret: whoever can
    /// read one instance's webhook headers can post events for that instance only.
    PerInstance,
    /// The master secret is every instance's credential (one tenant only: any instance
    /// owner can read it back from Evolution and post as any other instance).
    Shared,
}

/// The webhook credential of `instance`: lowercase hex of HMAC-SHA256(master, instance),
/// so `printf %s NAME | openssl dgst -sha256 -hmac MASTER` gives it too.
pub fn instance_credential(master: &Secret, instance: &InstanceName) -> String {
    use aws_lc_rs::hmac;
    let key = hmac::Key::new(hmac::HMAC_SHA256, master.expose().as_bytes());
    let tag = hmac::sign(&key, instance.as_str().as_bytes());
    tag.as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The headers to put into `instance`'s webhook (`jwt_key`, the header secret), as a JSON
/// object: what `evo-realtime webhook-credential <instance>` prints.
pub fn instance_headers(
    config: &Config,
    instance: &str,
) -> Result<serde_json::Value, setting::Error> {
    let instance = InstanceName::parse(instance)
        .map_err(|err| setting::Error::new(format!("instance {instance:?} is not valid: {err}")))?;
    if config.credentials == CredentialMode::Shared {
        return Err(setting::invalid(
            "webhook.credentials",
            &"shared",
            "every instance uses the master secrets themselves; per-instance credentials need \"per-instance\"",
        ));
    }
    let mut headers = serde_json::Map::new();
    if let Some(master) = &config.jwt_secret {
        headers.insert(
            "jwt_key".into(),
            instance_credential(master, &instance).into(),
        );
    }
    if let Some(master) = &config.secret {
        headers.insert(
            config.secret_header.clone(),
            instance_credential(master, &instance).into(),
        );
    }
    if headers.is_empty() {
        return Err(setting::Error::new(
            "no webhook master secret configured: set SIDECAR_WEBHOOK_JWT_SECRET or SIDECAR_WEBHOOK_SECRET",
        ));
    }
    Ok(serde_json::Value::Object(headers))
}

/// Headers a proxy or a service mesh adds. In the peer mode (no credential), a request
/// carrying one came through something on an allowed address, not from Evolution itself.
const PROXY_HEADERS: &[&str] = &[
    "forwarded",
    "via",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "cf-connecting-ip",
];
const PROXY_HEADER_PREFIXES: &[&str] = &["x-forwarded-", "x-envoy-", "x-b3-", "x-istio-"];

fn proxy_header(headers: &HeaderMap) -> Option<&str> {
    headers.keys().map(http::HeaderName::as_str).find(|name| {
        PROXY_HEADERS.contains(name)
            || PROXY_HEADER_PREFIXES
                .iter()
                .any(|prefix| name.starts_with(prefix))
    })
}

/// Why a webhook was refused. Messages are lower-case and say what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("shutting down, retry later")]
    Draining,
    /// Publishing failed before the event was retained (a panic): Evolution retries.
    #[error("the event was not retained, retry later")]
    NotRetained,
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
        !matches!(
            self,
            Error::Envelope(_) | Error::SuffixMismatch { .. } | Error::NotRetained
        )
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::Draining | Error::NotRetained => StatusCode::SERVICE_UNAVAILABLE,
            Error::NotFound => StatusCode::NOT_FOUND,
            Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::Unauthorized(_) | Error::WrongInstance { .. } => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) | Error::Proxied(_) => StatusCode::FORBIDDEN,
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
    /// The JWT rules; the key is the master secret's, or derived per instance.
    jwt: Option<jsonwebtoken::Validation>,
    /// Set once the master secret itself was presented per instance (logged once).
    upgrade_warned: AtomicBool,
    bus: Arc<Bus>,
    draining: Arc<AtomicBool>,
}

impl Webhook {
    pub fn new(
        config: &Config,
        bus: Arc<Bus>,
        draining: Arc<AtomicBool>,
    ) -> Result<Self, setting::Error> {
        config.validate()?;
        let jwt = config.jwt_secret.as_ref().map(|_| {
            let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
            // One leeway for both: Evolution reuses a token across retries (exp), and
            // clocks differ (nbf).
            validation.leeway = config.jwt_leeway_secs;
            validation.validate_exp = true;
            validation.validate_nbf = true;
            validation.set_required_spec_claims(&["exp"]);
            validation
        });
        announce(config);
        Ok(Self {
            cidrs: config.cidrs()?,
            config: config.clone(),
            jwt,
            upgrade_warned: AtomicBool::new(false),
            bus,
            draining,
        })
    }

    pub fn path(&self) -> &str {
        &self.config.path
    }
}

/// Says at start what the ingest endpoint accepts, and warns about the weak modes.
fn announce(config: &Config) {
    if !config.has_credentials() {
        tracing::warn!(
            allowed_cidrs = %config.allowed_cidrs.join(","),
            "no webhook credential configured: accepting webhooks only from these peers, \
             and only without proxy headers (Forwarded, X-Forwarded-*, Via, X-Real-IP, \
             X-Envoy-*); configure a credential before exposing the port"
        );
        return;
    }
    let mut accepted = Vec::new();
    if config.path_token.is_some() {
        accepted.push("path token (any instance)");
    }
    let shared = config.credentials == CredentialMode::Shared;
    if config.jwt_secret.is_some() {
        accepted.push(if shared {
            "JWT (shared, any instance)"
        } else {
            "JWT (per instance)"
        });
    }
    if config.secret.is_some() {
        accepted.push(if shared {
            "header secret (shared, any instance)"
        } else {
            "header secret (per instance)"
        });
    }
    tracing::info!(credentials = %accepted.join(", "), "webhooks accepted with");
    if shared && (config.jwt_secret.is_some() || config.secret.is_some()) {
        tracing::warn!(
            "SIDECAR_WEBHOOK_CREDENTIALS=shared: one webhook credential for every instance; \
             any instance owner can read it back from Evolution (GET /webhook/find/<instance>) \
             and post events as any other instance. Use it with a single tenant only"
        );
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
    let (route, admission) = match check_before_body(webhook, &request) {
        Ok(checked) => checked,
        Err(err) => {
            drain(request, drain_limit, deadline).await;
            return Err(err);
        }
    };

    // Stage 5: the body, bounded in size and time. A per-instance credential is judged as
    // soon as the body's first bytes name the instance (Evolution writes it second), so a
    // forged header costs at most `INSTANCE_PREFIX` bytes read, never a whole body.
    let early = |prefix: &[u8], complete: bool| admission.check_prefix(webhook, prefix, complete);
    let body = read_body(request, &webhook.config, deadline, early).await?;

    // Stage 6: routing fields only; every value stays raw.
    let envelope = Envelope::from_webhook(&body)?;
    *event_label = telemetry::event_label(envelope.event.as_str());
    // Stage 6b: a per-instance credential must be the body's instance's.
    admission.check(webhook, &envelope.instance)?;
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
    let (bus, event) = (webhook.bus.clone(), envelope.clone());
    let published = match tokio::spawn(async move { bus.publish(&event, fingerprint).await }).await
    {
        Ok(published) => published,
        Err(err) => {
            // Nothing says the event was retained: only a retry can make sure it is.
            tracing::error!(instance = %envelope.instance, event = %envelope.event, error = %err, "publishing failed");
            return Err(Error::NotRetained);
        }
    };
    match published {
        Published::Fresh => {}
        Published::Duplicate => {
            metrics::counter!(names::DUPLICATE_WEBHOOKS).increment(1);
            tracing::debug!(instance = %envelope.instance, event = %envelope.event, "duplicate webhook");
            return Ok(Json(serde_json::json!({ "ok": true, "duplicate": true })).into_response());
        }
        Published::Filtered => {
            tracing::debug!(instance = %envelope.instance, event = %envelope.event, "webhook filtered out by SIDECAR_EVENTS");
            return Ok(Json(serde_json::json!({ "ok": true })).into_response());
        }
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
fn check_before_body(
    webhook: &Webhook,
    request: &Request,
) -> Result<(WebhookPath, Admission), Error> {
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
    let admission = authenticate(webhook, &route, request.headers(), peer)?;
    Ok((route, admission))
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

/// What the credentials seen before the body allow. A per-instance credential can only
/// be judged once the body names its instance ([`Admission::check`]).
enum Admission {
    /// The path token, a shared credential or an allowed peer: any instance.
    AnyInstance,
    /// Header credentials, to be checked against the body's instance.
    PerInstance {
        secret: Option<http::HeaderValue>,
        jwt: Option<String>,
    },
}

fn authenticate(
    webhook: &Webhook,
    route: &WebhookPath,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
) -> Result<Admission, Error> {
    let config = &webhook.config;
    if route.token_wrong {
        return Err(Error::Unauthorized("invalid path token"));
    }
    if !config.has_credentials() {
        // Behind a same-host proxy or a mesh sidecar, the peer is the proxy: everyone.
        if let Some(name) = proxy_header(headers) {
            return Err(Error::Proxied(name.to_owned()));
        }
        return match peer {
            Some(ip) if webhook.cidrs.iter().any(|net| net.contains(&ip)) => {
                Ok(Admission::AnyInstance)
            }
            Some(ip) => Err(Error::Forbidden(ip)),
            // In-process callers (tests through `oneshot`) have no peer address.
            None => Ok(Admission::AnyInstance),
        };
    }
    if route.token_matched {
        return Ok(Admission::AnyInstance);
    }
    let secret = config
        .secret
        .as_ref()
        .and_then(|_| headers.get(config.secret_header.as_str()))
        .cloned();
    let jwt = webhook
        .jwt
        .as_ref()
        .and_then(|_| bearer(headers))
        .map(str::to_owned);
    if secret.is_none() && jwt.is_none() {
        return Err(Error::Unauthorized(
            "missing or invalid webhook credentials",
        ));
    }
    if config.credentials == CredentialMode::PerInstance {
        // The key depends on the body's instance, but the rest of the token does not: an
        // expired, immature or malformed JWT is refused before its body is read.
        if let (None, Some(validation), Some(token)) = (&secret, &webhook.jwt, &jwt) {
            precheck_jwt(token, validation)?;
        }
        return Ok(Admission::PerInstance { secret, jwt });
    }
    if let (Some(expected), Some(given)) = (&config.secret, &secret)
        && bool::from(expected.expose().as_bytes().ct_eq(given.as_bytes()))
    {
        return Ok(Admission::AnyInstance);
    }
    if let (Some(master), Some(validation), Some(token)) = (&config.jwt_secret, &webhook.jwt, &jwt)
    {
        let key = jsonwebtoken::DecodingKey::from_secret(master.expose().as_bytes());
        return verify_jwt(token, &key, validation).map(|()| Admission::AnyInstance);
    }
    Err(Error::Unauthorized(
        "missing or invalid webhook credentials",
    ))
}

/// How to fix a webhook that presents the master secret where an instance's own
/// credential belongs (a deployment from before per-instance credentials).
const UPGRADE_HINT: &str = "is the master secret, not this instance's credential: put the output \
     of `evo-realtime webhook-credential <instance>` into the instance's webhook headers, or set \
     SIDECAR_WEBHOOK_CREDENTIALS=shared for a single tenant";

impl Admission {
    /// [`Admission::check`] on the instance named in a body's first bytes. `complete`:
    /// `prefix` is the whole body (then a body naming no instance is left to the envelope
    /// parser, which refuses it).
    fn check_prefix(&self, webhook: &Webhook, prefix: &[u8], complete: bool) -> Result<(), Error> {
        if matches!(self, Admission::AnyInstance) {
            return Ok(());
        }
        match envelope::instance_in_prefix(prefix) {
            Some(name) => match InstanceName::parse(&name) {
                Ok(instance) => self.check(webhook, &instance),
                Err(why) => Err(Error::Envelope(envelope::Error::Semantic(why))),
            },
            None if complete => Ok(()),
            None => Err(Error::Unauthorized(
                "a per-instance credential needs `instance` within the body's first 64 KiB",
            )),
        }
    }

    /// Whether the credentials are valid for `instance`.
    fn check(&self, webhook: &Webhook, instance: &InstanceName) -> Result<(), Error> {
        let Admission::PerInstance { secret, jwt } = self else {
            return Ok(());
        };
        let config = &webhook.config;
        let wrong = |reason: &'static str| Error::WrongInstance {
            instance: instance.as_str().to_owned(),
            reason,
        };
        if let (Some(master), Some(given)) = (&config.secret, secret) {
            let expected = instance_credential(master, instance);
            if bool::from(expected.as_bytes().ct_eq(given.as_bytes())) {
                return Ok(());
            }
            if jwt.is_none() {
                if bool::from(master.expose().as_bytes().ct_eq(given.as_bytes())) {
                    webhook.warn_upgrade();
                    return Err(wrong(
                        "header secret is the master secret itself, not this instance's credential (see `evo-realtime webhook-credential`)",
                    ));
                }
                return Err(wrong("header secret is not this instance's credential"));
            }
        }
        let (Some(master), Some(validation), Some(token)) = (&config.jwt_secret, &webhook.jwt, jwt)
        else {
            return Err(wrong("header secret is not this instance's credential"));
        };
        let derived = instance_credential(master, instance);
        let key = jsonwebtoken::DecodingKey::from_secret(derived.as_bytes());
        match verify_jwt(token, &key, validation) {
            Err(Error::Unauthorized(SIGNATURE_INVALID)) => {
                let legacy = jsonwebtoken::DecodingKey::from_secret(master.expose().as_bytes());
                if verify_jwt(token, &legacy, validation).is_ok() {
                    webhook.warn_upgrade();
                    return Err(wrong(
                        "jwt is signed with the master secret itself, not this instance's credential (see `evo-realtime webhook-credential`)",
                    ));
                }
                Err(wrong("jwt signature is not this instance's credential"))
            }
            other => other,
        }
    }
}

impl Webhook {
    fn warn_upgrade(&self) {
        if !self.upgrade_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!("a webhook's credential {UPGRADE_HINT}");
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

const SIGNATURE_INVALID: &str = "jwt signature is invalid";

/// What can be judged of a JWT without its key: the algorithm, `exp` and `nbf` (with the
/// leeway). Not a verification: [`verify_jwt`] still runs with the instance's key.
fn precheck_jwt(token: &str, validation: &jsonwebtoken::Validation) -> Result<(), Error> {
    #[derive(Deserialize)]
    struct Times {
        exp: Option<f64>,
        nbf: Option<f64>,
    }
    let header =
        jsonwebtoken::decode_header(token).map_err(|_| Error::Unauthorized("jwt is invalid"))?;
    if !validation.algorithms.contains(&header.alg) {
        return Err(Error::Unauthorized("jwt algorithm must be HS256"));
    }
    let times: Times = jsonwebtoken::dangerous::insecure_decode_claims(token)
        .map_err(|_| Error::Unauthorized("jwt is invalid"))?;
    let now = jsonwebtoken::get_current_timestamp() as f64;
    let leeway = validation.leeway as f64;
    match times.exp {
        None => Err(Error::Unauthorized("jwt has no exp claim")),
        Some(exp) if exp < now - leeway => Err(Error::Unauthorized("jwt expired")),
        _ if times.nbf.is_some_and(|nbf| nbf > now + leeway) => {
            Err(Error::Unauthorized("jwt is not valid yet (nbf)"))
        }
        _ => Ok(()),
    }
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
            ErrorKind::InvalidSignature => Error::Unauthorized(SIGNATURE_INVALID),
            ErrorKind::ImmatureSignature => Error::Unauthorized("jwt is not valid yet (nbf)"),
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
/// The bytes of a body within which a per-instance credential's instance must appear.
const INSTANCE_PREFIX: usize = 64 * 1024;

/// Reads the body within `max_body_bytes` and the deadline. `early` is called once, when
/// [`INSTANCE_PREFIX`] bytes are in (or the body ended sooner); its refusal stops the read
/// (the rest is drained, bounded, so the client reads the status).
async fn read_body(
    request: Request,
    config: &Config,
    deadline: tokio::time::Instant,
    early: impl FnOnce(&[u8], bool) -> Result<(), Error>,
) -> Result<bytes::Bytes, Error> {
    let limit = config.max_body_bytes;
    let drain_limit = limit.saturating_mul(DRAIN_FACTOR);
    let mut body = request.into_body();
    let mut buffer = bytes::BytesMut::new();
    let mut early = Some(early);
    loop {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .map_err(|_| Error::ReadTimeout(config.read_timeout_secs))?;
        let Some(frame) = frame else {
            if let Some(check) = early.take() {
                check(&buffer, true)?;
            }
            return Ok(buffer.freeze());
        };
        let frame = frame.map_err(|err| Error::BodyCut(err.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buffer.len() as u64 + data.len() as u64 > limit {
            let read = buffer.len() as u64 + data.len() as u64;
            drop(buffer);
            discard(body, drain_limit.saturating_sub(read), deadline).await;
            return Err(Error::TooLarge { limit });
        }
        buffer.extend_from_slice(&data);
        // With a limit this small the whole body is the prefix (checked when it ends).
        if limit > INSTANCE_PREFIX as u64
            && buffer.len() >= INSTANCE_PREFIX
            && let Some(check) = early.take()
            && let Err(err) = check(&buffer[..INSTANCE_PREFIX], false)
        {
            let read = buffer.len() as u64;
            drop(buffer);
            discard(body, drain_limit.saturating_sub(read), deadline).await;
            return Err(err);
        }
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
    fn instance_credentials_are_the_documented_hmac() {
        // `printf %s acme | openssl dgst -sha256 -hmac jwt-master`, as the README says.
        let master = Secret::new("jwt-master");
        let acme = InstanceName::parse("acme").unwrap();
        assert_eq!(
            instance_credential(&master, &acme),
            "f2f8739ec12d9a065ad037a67a466a37033645c0767ae27903b7328fd335b11d"
        );
        let other = InstanceName::parse("other").unwrap();
        assert_ne!(
            instance_credential(&master, &other),
            instance_credential(&master, &acme)
        );
    }

    #[test]
    fn proxy_headers_are_recognized() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.insert("x-request-id", "1".parse().unwrap());
        assert_eq!(proxy_header(&headers), None);
        for name in [
            "x-forwarded-for",
            "forwarded",
            "via",
            "x-envoy-attempt-count",
        ] {
            let mut proxied = headers.clone();
            proxied.insert(http::HeaderName::from_static(name), "x".parse().unwrap());
            assert_eq!(proxy_header(&proxied), Some(name));
        }
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
