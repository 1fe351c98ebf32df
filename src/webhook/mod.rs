//! Webhook ingest: Evolution API POSTs an event, we hand it to the bus.
//!
//! The hot path is [`ingest`], top to bottom: draining check → path (token, suffix) →
//! size and type → credentials (what needs no instance) → read body (bounded) →
//! [`Envelope`] → per-instance credential against the body's `instance` → suffix and
//! Evolution 2.4 delivery headers ([`headers`]) against the body → `bus.publish` (dedupes, retains, then fans out) → 200. This module knows nothing of sockets.
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
//! | `HeaderMismatch`        | 422    |
//!
//! A refusal decided before the body is read (503, 404, 413, 415, 401, 403) first reads
//! and discards the body, up to twice `max_body_bytes` and within `read_timeout_secs`,
//! and every refusal that did not read the whole body says `Connection: close`. Closing a
//! socket with unread bytes makes the kernel send a reset, and Node's `http` client (what
//! Evolution's axios uses) then reports `EPIPE` instead of the status: a non-retryable
//! 413 would become a retried network error. A client that sent `Expect: 100-continue`
//! has not sent its body: nothing is drained, and it is answered at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, header};
use ipnet::IpNet;

use crate::bus::{self, Bus, Published};
use crate::dedupe;
use crate::envelope::{self, Envelope};
use crate::setting;
use crate::telemetry::{self, names};

mod body;
mod config;
mod credentials;
mod error;
mod headers;
mod path;

pub use config::{Config, CredentialMode};
pub use credentials::{instance_credential, instance_headers};
pub use error::Error;

use body::{DRAIN_FACTOR, drain, read_body};
use credentials::{Admission, authenticate};
use path::WebhookPath;

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
    /// When each (instance, reason) refusal was last logged at warn.
    warned: std::sync::Mutex<HashMap<(String, &'static str), std::time::Instant>>,
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
            warned: std::sync::Mutex::new(HashMap::new()),
            draining,
        })
    }

    pub fn path(&self) -> &str {
        &self.config.path
    }
}

/// How often one (instance, reason) refusal is logged at warn; every one is counted.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);
/// The most (instance, reason) pairs remembered for that; past it, expired ones go first.
const REFUSAL_LOG_KEYS: usize = 1024;

impl Webhook {
    /// Counts a refused webhook and, at most once per [`REFUSAL_LOG_EVERY`] for its
    /// instance and reason, logs it at warn: a misconfigured Evolution must not look like
    /// silence, and a flood must not flood the log.
    fn refused(&self, err: &Error, instance: Option<&envelope::InstanceName>) {
        metrics::counter!(names::WEBHOOK_REFUSALS, "reason" => err.reason()).increment(1);
        if !err.is_refusal() {
            return;
        }
        let instance = instance.map_or("-", envelope::InstanceName::as_str);
        let now = std::time::Instant::now();
        let due = {
            let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
            if warned.len() >= REFUSAL_LOG_KEYS {
                warned.retain(|_, at| now.duration_since(*at) < REFUSAL_LOG_EVERY);
            }
            let key = (instance.to_owned(), err.reason());
            match warned.get(&key) {
                Some(at) if now.duration_since(*at) < REFUSAL_LOG_EVERY => false,
                _ if warned.len() >= REFUSAL_LOG_KEYS => false,
                _ => {
                    warned.insert(key, now);
                    true
                }
            }
        };
        if due {
            tracing::warn!(
                instance,
                reason = err.reason(),
                status = err.status().as_u16(),
                error = %err,
                "webhook refused (logged once a minute per instance and reason; counted in evo_webhook_refusals_total)"
            );
        }
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
    let mut instance = None;
    let response = match accept(&webhook, request, &mut event_label, &mut instance).await {
        Ok(response) => response,
        Err(err) => {
            webhook.refused(&err, instance.as_ref());
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
    let meters = telemetry::meters();
    meters
        .webhook(event_label, response.status().as_u16())
        .increment(1);
    meters
        .webhook_seconds
        .record(started.elapsed().as_secs_f64());
    response
}

async fn accept(
    webhook: &Webhook,
    request: Request,
    event_label: &mut &'static str,
    instance: &mut Option<envelope::InstanceName>,
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

    // What Evolution 2.4 says about this delivery, kept before the body consumes the request.
    let sent = headers::DeliveryHeaders::read(request.headers());

    // Stage 5: the body, bounded in size and time. A per-instance credential is judged as
    // soon as the body's first bytes name the instance (Evolution writes it second), so a
    // forged header costs at most `INSTANCE_PREFIX` bytes read, never a whole body.
    let early = |prefix: &[u8], complete: bool| admission.check_prefix(webhook, prefix, complete);
    let body = read_body(request, &webhook.config, deadline, early).await?;

    // Stage 6: routing fields only; every value stays raw.
    let envelope = Envelope::from_webhook(&body)?;
    *event_label = envelope::evolution_event(envelope.event.as_str()).unwrap_or("other");
    *instance = Some(envelope.instance.clone());
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
    sent.check(&envelope)?;

    // Stage 7: retain and hand over, unless it is a retry of an accepted event. The 200
    // comes after the event is retained; publishing never waits for a socket.
    let fingerprint = (webhook.config.dedupe_window_secs > 0).then(|| dedupe::fingerprint(&body));
    let (bus, event) = (webhook.bus.clone(), envelope.clone());
    let published = retained(async move { bus.publish(&event, fingerprint).await })
        .await
        .inspect_err(|err| {
            tracing::error!(instance = %envelope.instance, event = %envelope.event, error = ?err, "webhook not retained");
        })?;
    if let Some(age) = sent.age(std::time::SystemTime::now()) {
        let retry = age >= headers::RETRY_MIN_AGE;
        if retry {
            telemetry::meters().webhook_retries.increment(1);
        }
        tracing::debug!(
            instance = %envelope.instance,
            instance_id = sent.instance_id().as_deref().unwrap_or("-"),
            evolution = sent.agent_version().as_deref().unwrap_or("-"),
            event = %envelope.event,
            age_ms = age.as_millis() as u64,
            retry,
            "webhook delivery age"
        );
    }
    match published {
        Published::Fresh => {}
        Published::Duplicate => {
            telemetry::meters().duplicate_webhooks.increment(1);
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

/// [`bus::retained`]: publishing runs as its own task, so a client hanging up cannot cut it
/// between "seen" and "retained"; a task that panics or is cancelled becomes
/// [`Error::NotRetained`] (503, which Evolution retries), never a 200.
async fn retained(
    publish: impl Future<Output = Published> + Send + 'static,
) -> Result<Published, Error> {
    bus::retained(publish)
        .await
        .map_err(|err| Error::NotRetained(err.0))
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

#[cfg(test)]
mod tests;
