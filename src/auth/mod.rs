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

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::envelope::InstanceName;
use crate::license;
use crate::setting::{Secret, comma_list};

mod cache;
mod handshake;
mod hosts;

pub use hosts::AllowedHosts;

pub use handshake::{check_handshake, require_global_key};

use cache::{Cache, CacheEntry};

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
    /// Addresses (IPs or CIDRs) whose clients join every namespace without a key, like
    /// Evolution's `WEBSOCKET_ALLOWED_HOSTS`; `*` needs `allow_any_host`. Empty: off.
    #[serde(with = "comma_list")]
    pub allowed_hosts: Vec<String>,
    /// Accept `*` in `allowed_hosts`: any client joins without a key.
    pub allow_any_host: bool,
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
        AllowedHosts::parse(&self.allowed_hosts, self.allow_any_host)?;
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            api_key: None,
            token_cache_ttl_secs: 60,
            lookup_timeout_secs: 5,
            allowed_hosts: Vec::new(),
            allow_any_host: false,
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
    /// No key, from an address in `WEBSOCKET_ALLOWED_HOSTS`: every namespace, like
    /// Evolution; nothing to forward emits with.
    AllowedHost,
}

impl Principal {
    /// Whether this principal may join namespace `ns` (`/` or `/<instance>`).
    pub fn may_join(&self, ns: &str) -> bool {
        match self {
            Principal::Global | Principal::AllowedHost => true,
            Principal::Instances(names) => {
                InstanceName::from_namespace(ns).is_some_and(|name| names.contains(&name))
            }
        }
    }

    /// Whether this is an instance token, which Evolution may revoke or delete.
    pub fn is_token(&self) -> bool {
        matches!(self, Principal::Instances(_))
    }

    /// The name logged for this principal: never the key itself.
    pub fn label(&self) -> String {
        match self {
            Principal::Global => "global".to_owned(),
            Principal::AllowedHost => "allowed-host".to_owned(),
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
    #[error("an api key is required (apikey in the query, header or auth payload)")]
    KeyRequired,
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
            Error::KeyRequired => "no_key",
            Error::Unavailable(_) => "auth_unavailable",
            Error::RateLimited => "lookup_rate_limited",
        }
    }
}

/// How long an `Unavailable` answer is reused, so a flood during an outage makes
/// one upstream call per key per interval instead of one per handshake.
pub(super) const UNAVAILABLE_TTL: Duration = Duration::from_secs(2);

/// Keys longer than this are refused without a lookup (and never cached or sent
/// upstream): Evolution's instance tokens are UUIDs, 36 bytes.
pub const MAX_KEY_BYTES: usize = 256;

/// What the key cache may hold, keys and answers counted; past it the oldest entries go.
pub const MAX_CACHE_BYTES: usize = 8 * 1024 * 1024;

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

/// Resolves keys to principals.
pub struct Authenticator {
    global: Option<Secret>,
    http: reqwest::Client,
    lookup_url: String,
    ttl: Duration,
    cache: Mutex<Cache>,
    allowed_hosts: AllowedHosts,
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
            allowed_hosts: {
                let hosts = AllowedHosts::parse(&config.allowed_hosts, config.allow_any_host)?;
                hosts.announce();
                hosts
            },
        })
    }

    /// Who a client without any key is: [`Principal::AllowedHost`] when its address is
    /// in `WEBSOCKET_ALLOWED_HOSTS`, else refused (`KeyRequired`).
    pub fn keyless(&self, client: Option<std::net::IpAddr>) -> Result<Principal, Error> {
        if self.allowed_hosts.admits(client) {
            Ok(Principal::AllowedHost)
        } else {
            Err(Error::KeyRequired)
        }
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
            let (status, head) = license::head(response).await;
            if license::is_gate_answer(status, &head) {
                tracing::warn!(
                    "api key lookup refused: Evolution API's license is not activated (503 LICENSE_REQUIRED)"
                );
                return Err(Error::Unavailable(
                    "Evolution API is not activated (503 LICENSE_REQUIRED): instance tokens cannot be checked until its license is activated; the global key still works".to_owned(),
                ));
            }
            tracing::warn!(upstream_status = status, "api key lookup failed");
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

#[cfg(test)]
mod tests {
    use super::cache::ENTRY_OVERHEAD;
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
