//! Who a key belongs to: API key → [`Principal`], with a cached upstream lookup.
//!
//! The global key (`AUTHENTICATION_API_KEY`) is compared in constant time; it is only
//! sent upstream on the emits of a client that connected with it. Any other key is resolved once per TTL with
//! `GET {upstream}/instance/fetchInstances` and header `apikey: <key>`: the instances it
//! lists are the only namespaces the key may join. Answers, positive and negative, are
//! cached; concurrent lookups of one key share one upstream call; an unreachable upstream
//! is an error (`Unavailable`) within the lookup timeout, never a hang.
//!
//! This module also owns the HTTP-level handshake check ([`check_handshake`]), which must
//! sit outside socket.io so a bad key gets Evolution's 403/400 before any namespace.
//!
//! | error         | polling handshake | websocket handshake | namespace CONNECT |
//! |---------------|-------------------|---------------------|-------------------|
//! | `Invalid`     | 403 `{"code":4}`  | 400                 | CONNECT_ERROR     |
//! | `Unavailable` | 403 `{"code":4}`  | 400                 | CONNECT_ERROR     |

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::sync::OnceCell;

use crate::config::Secret;
use crate::envelope::InstanceName;
use crate::telemetry::names;

/// Settings of key resolution.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The global key: joins every namespace, including `/`. `None` means no global key.
    pub api_key: Option<Secret>,
    /// How long an upstream answer about a key is trusted.
    pub token_cache_ttl_secs: u64,
    /// The longest a handshake waits for the upstream to say who a key is.
    pub lookup_timeout_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            api_key: None,
            token_cache_ttl_secs: 60,
            lookup_timeout_secs: 5,
        }
    }
}

/// What a key may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The global key: every instance and the global namespace `/`.
    Global,
    /// An instance token: exactly these instances.
    Instances(Arc<[InstanceName]>),
}

impl Principal {
    /// Whether this principal may join namespace `ns` (`/` or `/<instance>`).
    pub fn may_join(&self, ns: &str) -> bool {
        match self {
            Principal::Global => true,
            Principal::Instances(names) => {
                InstanceName::from_namespace(ns).is_some_and(|name| names.contains(&name))
            }
        }
    }

    /// The name logged for this principal: never the key itself.
    pub fn label(&self) -> String {
        match self {
            Principal::Global => "global".to_owned(),
            Principal::Instances(names) => names
                .iter()
                .map(InstanceName::as_str)
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("invalid api key")]
    Invalid,
    #[error("authentication unavailable: {0}")]
    Unavailable(String),
}

impl Error {
    /// The `reason` label of a rejection.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Invalid => "invalid_key",
            Error::Unavailable(_) => "auth_unavailable",
        }
    }
}

/// How long an `Unavailable` answer is reused, so a flood during an outage makes
/// one upstream call per key per interval instead of one per handshake.
const UNAVAILABLE_TTL: Duration = Duration::from_secs(2);

/// A cached answer bounds memory: past this many keys, expired and negative entries go.
const MAX_CACHED_KEYS: usize = 50_000;

struct CacheEntry {
    answer: OnceCell<Result<Principal, Error>>,
    created: Instant,
}

impl CacheEntry {
    fn is_fresh(&self, ttl: Duration, now: Instant) -> bool {
        match self.answer.get() {
            // Still being looked up: join it.
            None => true,
            Some(Err(Error::Unavailable(_))) => now.duration_since(self.created) < UNAVAILABLE_TTL,
            Some(_) => now.duration_since(self.created) < ttl,
        }
    }
}

/// Resolves keys to principals.
pub struct Authenticator {
    global: Option<Secret>,
    http: reqwest::Client,
    lookup_url: String,
    ttl: Duration,
    cache: Mutex<HashMap<String, Arc<CacheEntry>>>,
}

impl Authenticator {
    pub fn new(config: &Config, upstream_url: &str) -> Result<Self, crate::config::Error> {
        let timeout = Duration::from_secs(config.lookup_timeout_secs.max(1));
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(timeout)
            .timeout(timeout)
            .build()
            .map_err(|err| crate::config::Error::new(format!("http client: {err}")))?;
        Ok(Self {
            // An empty global key never matches.
            global: config
                .api_key
                .clone()
                .filter(|key| !key.expose().is_empty()),
            http,
            lookup_url: format!(
                "{}/instance/fetchInstances",
                upstream_url.trim_end_matches('/')
            ),
            ttl: Duration::from_secs(config.token_cache_ttl_secs),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Whether `key` is the global key (constant time).
    pub fn is_global(&self, key: &str) -> bool {
        self.global
            .as_ref()
            .is_some_and(|global| bool::from(global.expose().as_bytes().ct_eq(key.as_bytes())))
    }

    /// Who `key` is. Cached; concurrent calls for one key make one upstream request.
    pub async fn resolve(&self, key: &str) -> Result<Principal, Error> {
        if key.is_empty() {
            return Err(Error::Invalid);
        }
        if self.is_global(key) {
            return Ok(Principal::Global);
        }
        let entry = self.entry(key);
        entry.answer.get_or_init(|| self.lookup(key)).await.clone()
    }

    /// Who `key` is according to Evolution now, bypassing the cache (the revalidator: a
    /// cached answer could keep a revoked token for a second TTL). A key that is no longer
    /// valid, or whose instances changed, also leaves the cache, so its next CONNECT asks
    /// Evolution again.
    pub async fn resolve_fresh(&self, key: &str) -> Result<Principal, Error> {
        if key.is_empty() {
            return Err(Error::Invalid);
        }
        if self.is_global(key) {
            return Ok(Principal::Global);
        }
        let answer = self.lookup(key).await;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let stale = match (&answer, cache.get(key).and_then(|entry| entry.answer.get())) {
            (Err(Error::Unavailable(_)), _) | (_, None) => false,
            (Ok(fresh), Some(Ok(cached))) => fresh != cached,
            _ => true,
        };
        if stale {
            cache.remove(key);
        }
        answer
    }

    /// Forgets every cached answer that lists `instance`, and lookups still in flight
    /// (their answer may predate the deletion): after an instance is deleted, the next
    /// CONNECT of any of its tokens asks Evolution again. Returns how many went.
    pub fn invalidate_instance(&self, instance: &InstanceName) -> usize {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let before = cache.len();
        cache.retain(|_, entry| match entry.answer.get() {
            None => false,
            Some(Ok(Principal::Instances(names))) => !names.contains(instance),
            Some(_) => true,
        });
        before - cache.len()
    }

    fn entry(&self, key: &str) -> Arc<CacheEntry> {
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = cache.get(key)
            && entry.is_fresh(self.ttl, now)
        {
            return entry.clone();
        }
        if cache.len() >= MAX_CACHED_KEYS {
            let ttl = self.ttl;
            cache.retain(|_, entry| entry.is_fresh(ttl, now));
            if cache.len() >= MAX_CACHED_KEYS {
                cache.retain(|_, entry| matches!(entry.answer.get(), Some(Ok(_)) | None));
            }
        }
        let entry = Arc::new(CacheEntry {
            answer: OnceCell::new(),
            created: now,
        });
        cache.insert(key.to_owned(), entry.clone());
        entry
    }

    async fn lookup(&self, key: &str) -> Result<Principal, Error> {
        #[derive(Deserialize)]
        struct InstanceRow {
            name: Option<String>,
        }

        let response = self
            .http
            .get(&self.lookup_url)
            .header("apikey", key)
            .send()
            .await
            .map_err(|err| {
                let why = if err.is_timeout() {
                    "upstream timed out"
                } else {
                    "upstream unreachable"
                };
                tracing::warn!(error = %err, "api key lookup failed");
                Error::Unavailable(why.to_owned())
            })?;
        let status = response.status();
        if matches!(status.as_u16(), 401 | 403 | 404) {
            return Err(Error::Invalid);
        }
        if !status.is_success() {
            tracing::warn!(upstream_status = status.as_u16(), "api key lookup failed");
            return Err(Error::Unavailable(format!("upstream answered {status}")));
        }
        let body = response
            .bytes()
            .await
            .map_err(|_| Error::Unavailable("upstream body was cut".to_owned()))?;
        let rows: Vec<InstanceRow> = serde_json::from_slice(&body).map_err(|_| {
            Error::Unavailable("upstream did not answer a list of instances".to_owned())
        })?;
        let names: Vec<InstanceName> = rows
            .into_iter()
            .filter_map(|row| row.name)
            .filter_map(|name| InstanceName::parse(&name).ok())
            .collect();
        if names.is_empty() {
            return Err(Error::Invalid);
        }
        Ok(Principal::Instances(names.into()))
    }
}

// === Where a handshake's key comes from ===

/// The key of a handshake request: `?apikey=` first, then the `apikey` header
/// (Evolution's order). `None` when neither is present: the namespace CONNECT's
/// `auth.apikey` is judged later.
pub fn key_from_request(parts: &http::request::Parts) -> Option<String> {
    query_param(parts.uri.query().unwrap_or(""), "apikey").or_else(|| {
        parts
            .headers
            .get("apikey")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    })
}

/// One decoded query parameter.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| {
            percent_encoding::percent_decode_str(&value.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// HTTP middleware on the socket.io endpoint: refuses a handshake (no `sid` yet) whose
/// query or header key is not valid, the way Evolution/engine.io do, so clients retry.
pub async fn check_handshake(
    State(auth): State<Arc<Authenticator>>,
    request: Request,
    next: Next,
) -> Response {
    let query = request.uri().query().unwrap_or("");
    if query_param(query, "sid").is_some() {
        return next.run(request).await;
    }
    let websocket = query_param(query, "transport").as_deref() == Some("websocket");
    let (parts, body) = request.into_parts();
    let Some(key) = key_from_request(&parts) else {
        return next.run(Request::from_parts(parts, body)).await;
    };
    match auth.resolve(&key).await {
        Ok(principal) => {
            tracing::debug!(principal = %principal.label(), "handshake accepted");
            next.run(Request::from_parts(parts, body)).await
        }
        Err(err) => {
            tracing::debug!(error = %err, websocket, "handshake refused");
            metrics::counter!(names::HANDSHAKE_REJECTIONS, "reason" => err.reason()).increment(1);
            handshake_refusal(&err, websocket)
        }
    }
}

/// HTTP middleware on `/_sidecar/metrics` on the public listener: instance names and usage
/// are for the operator, so it takes `Authorization: Bearer <global key>` (Prometheus'
/// `authorization` scrape setting). Without a global key configured, it is always 401.
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
        .map(|(_, token)| token.trim());
    if presented.is_some_and(|key| auth.is_global(key)) {
        return next.run(request).await;
    }
    let body = serde_json::json!({
        "error": "metrics need `Authorization: Bearer <AUTHENTICATION_API_KEY>` on this listener, or SIDECAR_METRICS_LISTEN"
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

/// Evolution's rejection: polling gets 403 `{"code":4,...}`, a websocket upgrade 400.
fn handshake_refusal(err: &Error, websocket: bool) -> Response {
    let status = if websocket {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::FORBIDDEN
    };
    let body = serde_json::json!({ "code": 4, "message": err.to_string() });
    (
        status,
        [(http::header::CONTENT_TYPE, "application/json")],
        Body::from(body.to_string()),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principal_confinement() {
        let acme = Principal::Instances(vec![InstanceName::parse("acme").unwrap()].into());
        assert!(acme.may_join("/acme"));
        assert!(!acme.may_join("/other"));
        assert!(!acme.may_join("/"));
        assert!(!acme.may_join("/acme/x"));
        assert!(Principal::Global.may_join("/"));
    }

    #[test]
    fn query_params_are_decoded() {
        assert_eq!(
            query_param("a=1&apikey=x%2By", "apikey").as_deref(),
            Some("x+y")
        );
        assert_eq!(query_param("apikey", "apikey").as_deref(), Some(""));
        assert_eq!(query_param("EIO=4&transport=polling", "sid"), None);
    }
}
