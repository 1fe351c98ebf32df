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
//! | `RateLimited` | 429 `{"code":4}`  | 429                 | CONNECT_ERROR     |
//!
//! Every lookup that misses the cache is paid for by the client's [`Budget`] (the guard's
//! per-IP bucket); keys over [`MAX_KEY_BYTES`] are refused without one. The cache is
//! bounded by [`MAX_CACHE_BYTES`] and expires entries by age, oldest first.

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

use crate::envelope::InstanceName;
use crate::expiring;
use crate::setting::Secret;
use crate::sio_request::{self, key_from_request};
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

impl Config {
    pub fn validate(&self) -> Result<(), crate::setting::Error> {
        if self.lookup_timeout_secs == 0 {
            return Err(crate::setting::invalid(
                "auth.lookup_timeout_secs",
                &0,
                "must be positive: a lookup that may take no time always fails",
            ));
        }
        Ok(())
    }
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
    #[error("too many key lookups from this address, retry later")]
    RateLimited,
}

impl Error {
    /// The `reason` label of a rejection.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Invalid => "invalid_key",
            Error::Unavailable(_) => "auth_unavailable",
            Error::RateLimited => "lookup_rate_limited",
        }
    }
}

/// How long an `Unavailable` answer is reused, so a flood during an outage makes
/// one upstream call per key per interval instead of one per handshake.
const UNAVAILABLE_TTL: Duration = Duration::from_secs(2);

/// Keys longer than this are refused without a lookup (and never cached or sent
/// upstream): Evolution's instance tokens are UUIDs, 36 bytes.
pub const MAX_KEY_BYTES: usize = 256;

/// What the key cache may hold, keys and answers counted; past it the oldest entries go.
pub const MAX_CACHE_BYTES: usize = 8 * 1024 * 1024;

/// Bytes counted per cache entry besides its key and answer (map slot, queue slot, entry).
const ENTRY_OVERHEAD: usize = 160;

/// Pays for one upstream lookup. The guard's per-client token bucket implements it, so
/// a flood of distinct bad keys costs at most `burst + rate × t` lookups per client IP,
/// whether the keys come in handshakes or in CONNECT packets.
pub trait LookupBudget: Send + Sync {
    /// Takes one lookup's worth; `false` when the client is over its rate.
    fn take(&self) -> bool;
}

/// No limit: lookups the server makes on its own (revalidation), and in-process callers.
pub struct Unmetered;

impl LookupBudget for Unmetered {
    fn take(&self) -> bool {
        true
    }
}

/// A cached answer: being looked up (empty) or known.
type Answer = OnceCell<Result<Principal, Error>>;

type CacheEntry = expiring::Slot<Answer>;

fn is_fresh(entry: &CacheEntry, ttl: Duration, now: Instant) -> bool {
    match entry.value.get() {
        // Still being looked up: join it.
        None => true,
        Some(Err(Error::Unavailable(_))) => now.duration_since(entry.created) < UNAVAILABLE_TTL,
        Some(_) => now.duration_since(entry.created) < ttl,
    }
}

/// Answers by key, bounded by bytes and expired by age ([`expiring::ExpiringMap`]).
struct Cache(expiring::ExpiringMap<Arc<str>, Answer>);

impl Default for Cache {
    fn default() -> Self {
        Self(expiring::ExpiringMap::new(MAX_CACHE_BYTES))
    }
}

impl std::ops::Deref for Cache {
    type Target = expiring::ExpiringMap<Arc<str>, Answer>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Cache {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Cache {
    fn get_fresh(&self, key: &str, ttl: Duration, now: Instant) -> Option<Arc<CacheEntry>> {
        self.0
            .get(key)
            .filter(|entry| is_fresh(entry, ttl, now))
            .cloned()
    }

    /// A new entry for `key`, its answer to come; counts the key's bytes.
    fn insert(&mut self, key: &str, now: Instant) -> Arc<CacheEntry> {
        let bytes = ENTRY_OVERHEAD + key.len();
        self.0.insert(Arc::from(key), OnceCell::new(), bytes, now)
    }
}

/// Resolves keys to principals.
pub struct Authenticator {
    global: Option<Secret>,
    http: reqwest::Client,
    lookup_url: String,
    ttl: Duration,
    cache: Mutex<Cache>,
}

impl Authenticator {
    pub fn new(config: &Config, upstream_url: &str) -> Result<Self, crate::setting::Error> {
        config.validate()?;
        let timeout = Duration::from_secs(config.lookup_timeout_secs);
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(timeout)
            .timeout(timeout)
            .build()
            .map_err(|err| crate::setting::Error::startup(format!("http client: {err}")))?;
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
            cache: Mutex::new(Cache::default()),
        })
    }

    /// Whether `key` is the global key (constant time).
    pub fn is_global(&self, key: &str) -> bool {
        self.global
            .as_ref()
            .is_some_and(|global| bool::from(global.expose().as_bytes().ct_eq(key.as_bytes())))
    }

    /// Who `key` is. Cached; concurrent calls for one key make one upstream request, and a
    /// request that misses the cache is paid for by `budget` first.
    pub async fn resolve(&self, key: &str, budget: &dyn LookupBudget) -> Result<Principal, Error> {
        if key.is_empty() || key.len() > MAX_KEY_BYTES && !self.is_global(key) {
            return Err(Error::Invalid);
        }
        if self.is_global(key) {
            return Ok(Principal::Global);
        }
        let (entry, ours) = self.entry(key, budget)?;
        let answer = entry.value.get_or_init(|| self.lookup(key)).await.clone();
        if ours {
            let extra = match &answer {
                Ok(Principal::Instances(names)) => {
                    names.iter().map(|name| name.as_str().len() + 24).sum()
                }
                _ => 0,
            };
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.account(&entry, extra);
        }
        answer
    }

    /// Who `key` is according to Evolution now, bypassing the cache (the revalidator: a
    /// cached answer could keep a revoked token for a second TTL). A key that is no longer
    /// valid, or whose instances changed, also leaves the cache, so its next CONNECT asks
    /// Evolution again.
    pub async fn resolve_fresh(&self, key: &str) -> Result<Principal, Error> {
        if key.is_empty() || key.len() > MAX_KEY_BYTES && !self.is_global(key) {
            return Err(Error::Invalid);
        }
        if self.is_global(key) {
            return Ok(Principal::Global);
        }
        let answer = self.lookup(key).await;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let cached = cache.get(key).and_then(|entry| entry.value.get());
        let stale = match (&answer, cached) {
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
        cache.remove_where(|answer| match answer.get() {
            None => true,
            Some(Ok(Principal::Instances(names))) => names.contains(instance),
            Some(_) => false,
        })
    }

    /// The cached entry for `key`, or a new one (`true`) once the budget paid for it.
    fn entry(
        &self,
        key: &str,
        budget: &dyn LookupBudget,
    ) -> Result<(Arc<CacheEntry>, bool), Error> {
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.expire(self.ttl.max(UNAVAILABLE_TTL), now);
        if let Some(entry) = cache.get_fresh(key, self.ttl, now) {
            return Ok((entry, false));
        }
        if !budget.take() {
            return Err(Error::RateLimited);
        }
        let entry = cache.insert(key, now);
        cache.expire(self.ttl.max(UNAVAILABLE_TTL), now);
        Ok((entry, true))
    }

    /// Keys cached now and the bytes they count (for tests and metrics).
    pub fn cache_size(&self) -> (usize, usize) {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        (cache.len(), cache.bytes())
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

/// The [`LookupBudget`] of a socket.io session, put in its handshake request's extensions
/// by the admission guard (engineioxide keeps those for the session, so CONNECT packets
/// pay from the same client's bucket).
#[derive(Clone)]
pub struct Budget(pub Arc<dyn LookupBudget>);

impl Budget {
    /// The request's budget; unmetered when no guard admitted it (in-process callers).
    pub fn of(extensions: &http::Extensions) -> Budget {
        extensions
            .get::<Budget>()
            .cloned()
            .unwrap_or_else(|| Budget(Arc::new(Unmetered)))
    }
}

impl LookupBudget for Budget {
    fn take(&self) -> bool {
        self.0.take()
    }
}

/// HTTP middleware on the socket.io endpoint: refuses a handshake whose query or header
/// key is not valid, the way Evolution/engine.io do, so clients retry.
pub async fn check_handshake(
    State(auth): State<Arc<Authenticator>>,
    request: Request,
    next: Next,
) -> Response {
    if !sio_request::is_handshake(request.uri()) {
        return next.run(request).await;
    }
    let query = request.uri().query().unwrap_or("");
    let websocket = sio_request::query_param(query, "transport").as_deref() == Some("websocket");
    let (parts, body) = request.into_parts();
    let Some(key) = key_from_request(&parts) else {
        return next.run(Request::from_parts(parts, body)).await;
    };
    match auth.resolve(&key, &Budget::of(&parts.extensions)).await {
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
    fn the_cache_expires_by_age_and_is_bounded_by_bytes() {
        let start = Instant::now();
        let mut cache = Cache::default();
        let ttl = Duration::from_secs(60);
        cache.insert("a", start);
        cache.insert("b", start + Duration::from_secs(30));
        cache.expire(ttl, start + Duration::from_secs(59));
        assert_eq!(cache.len(), 2);
        cache.expire(ttl, start + Duration::from_secs(61));
        assert!(cache.get("a").is_none() && cache.get("b").is_some());
        // A refreshed key keeps one entry; its stale queue slot frees nothing twice.
        cache.insert("b", start + Duration::from_secs(62));
        assert_eq!(cache.bytes(), ENTRY_OVERHEAD + 1);
        cache.expire(ttl, start + Duration::from_secs(95));
        assert_eq!(cache.len(), 1, "the fresh b stays");
        assert_eq!(cache.bytes(), ENTRY_OVERHEAD + 1);

        // Past the byte bound the oldest entries go, whatever their age.
        let now = start + Duration::from_secs(100);
        let key = "k".repeat(MAX_KEY_BYTES);
        let fits = MAX_CACHE_BYTES / (ENTRY_OVERHEAD + MAX_KEY_BYTES + 8);
        for i in 0..fits * 2 {
            cache.insert(&format!("{key}{i:08}"), now);
            cache.expire(ttl, now);
        }
        assert!(cache.bytes() <= MAX_CACHE_BYTES, "{}", cache.bytes());
        assert!(cache.len() >= fits - 1 && cache.len() <= fits + 1);
        assert!(
            cache
                .get(format!("{key}{:08}", fits * 2 - 1).as_str())
                .is_some()
        );
    }
}
