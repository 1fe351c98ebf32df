//! Admission control for socket.io handshakes: a per-IP rate limit and a connection cap.
//!
//! A flood of handshakes with distinct bad keys would otherwise turn into upstream
//! lookups (the negative cache only covers repeated keys). Each client IP gets a token
//! bucket (`SIDECAR_HANDSHAKE_RATE_PER_IP` per second, `SIDECAR_HANDSHAKE_BURST_PER_IP`
//! burst); past it the handshake is answered 429. The client IP is the peer's, or the
//! rightmost untrusted address of `X-Forwarded-For` when the peer is one of
//! `SIDECAR_TRUSTED_PROXIES`. IPv6 clients are limited per /64, so one host cannot mint
//! fresh keys from its own prefix. The limiter forgets idle clients, so its memory is
//! bounded by the clients seen within one refill period.
//!
//! Past `SIDECAR_MAX_CONNECTIONS` connected sockets, a new handshake is answered 503.
//!
//! A handshake is any request that does not carry a valid `sid=` (`sio_request`), exactly
//! as engineioxide decides it. An admitted handshake gets one prepaid key lookup; every
//! further lookup its session makes (CONNECT packets with `auth.apikey`) takes a token
//! from the same bucket, so the bucket bounds upstream lookups per client, not just
//! handshakes.
//!
//! | refusal      | status |
//! |--------------|--------|
//! | rate limited | 429    |
//! | at capacity  | 503    |

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use axum::extract::{ConnectInfo, Request};
use axum::response::{IntoResponse, Response};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::StatusCode;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::auth::{Budget, LookupBudget};
use crate::peer::{self, bucket};
use crate::setting::{self, comma_list};
use crate::sio_request;
use crate::telemetry::names;

/// Handshake admission settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Handshakes per second per client IP; 0 turns the limit off.
    pub handshake_rate_per_ip: u32,
    /// Handshakes a client IP may make at once before the rate applies.
    pub handshake_burst_per_ip: u32,
    /// Peers whose `X-Forwarded-For` is believed (a load balancer, an ingress).
    #[serde(with = "comma_list")]
    pub trusted_proxies: Vec<String>,
    /// Connected sockets at most; 0 means no cap.
    pub max_connections: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            handshake_rate_per_ip: 50,
            handshake_burst_per_ip: 500,
            trusted_proxies: Vec::new(),
            max_connections: 0,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), setting::Error> {
        self.proxies()?;
        Ok(())
    }

    fn proxies(&self) -> Result<Vec<IpNet>, setting::Error> {
        setting::cidr_list("guard.trusted_proxies", &self.trusted_proxies)
    }
}

/// How many handshakes between two sweeps of idle limiter entries.
const SWEEP_EVERY: u64 = 1024;

pub struct Guard {
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    trusted: Vec<IpNet>,
    max_connections: usize,
    /// Connected sockets, kept by the hub.
    connected: Arc<AtomicUsize>,
    /// Sessions the hub ended (their requests are refused) or watches.
    closed: Arc<sio_request::Sessions>,
    checks: AtomicU64,
}

impl Guard {
    pub fn new(
        config: &Config,
        connected: Arc<AtomicUsize>,
        closed: Arc<sio_request::Sessions>,
    ) -> Result<Self, setting::Error> {
        let limiter = NonZeroU32::new(config.handshake_rate_per_ip).map(|rate| {
            let burst = NonZeroU32::new(
                config
                    .handshake_burst_per_ip
                    .max(config.handshake_rate_per_ip),
            )
            .unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Ok(Self {
            limiter,
            trusted: config.proxies()?,
            max_connections: config.max_connections,
            connected,
            closed,
            checks: AtomicU64::new(0),
        })
    }

    /// The client's IP: the peer, or the rightmost untrusted hop of `X-Forwarded-For`
    /// when the peer is a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        if !self.is_trusted(peer) {
            return peer;
        }
        let hops = forwarded_for.unwrap_or("").split(',').map(str::trim).rev();
        for hop in hops {
            match hop.parse::<IpAddr>() {
                Ok(ip) if self.is_trusted(ip) => continue,
                Ok(ip) => return ip,
                Err(_) => break,
            }
        }
        peer
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// Whether a handshake from `client` may proceed now.
    pub fn admit(&self, client: IpAddr) -> Result<(), Refusal> {
        if self.max_connections > 0
            && self.connected.load(Ordering::Relaxed) >= self.max_connections
        {
            return Err(Refusal::AtCapacity);
        }
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        limiter
            .check_key(&bucket(client))
            .map_err(|_| Refusal::RateLimited)
    }

    /// Takes one token from `client`'s bucket (an upstream key lookup); `true` with no limit.
    pub fn charge(&self, client: IpAddr) -> bool {
        self.limiter
            .as_ref()
            .is_none_or(|limiter| limiter.check_key(&bucket(client)).is_ok())
    }

    /// Client IPs the limiter currently remembers.
    pub fn tracked_clients(&self) -> usize {
        self.limiter.as_ref().map_or(0, |limiter| limiter.len())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("too many handshakes from this address, retry later")]
    RateLimited,
    #[error("server at its connection limit, retry later")]
    AtCapacity,
}

impl Refusal {
    fn status(self) -> StatusCode {
        match self {
            Refusal::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Refusal::AtCapacity => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Refusal::RateLimited => "rate_limited",
            Refusal::AtCapacity => "at_capacity",
        }
    }
}

/// A handshake the guard let in: its client and one prepaid key lookup. Put in the
/// request's extensions as the session's [`Budget`]: the handshake's own key check spends
/// the prepaid lookup, and every later lookup (a CONNECT packet's `auth.apikey`) takes a
/// token from the same client's bucket.
struct Admission {
    guard: Arc<Guard>,
    client: IpAddr,
    prepaid: AtomicBool,
}

impl LookupBudget for Admission {
    fn take(&self) -> bool {
        self.prepaid.swap(false, Ordering::Relaxed) || self.guard.charge(self.client)
    }
}

/// Admission on the socket.io endpoint, outside the key check: handshakes (requests that
/// open a session, as engineioxide decides it) must get past the connection cap and the
/// client's rate limit; a request for a session this sidecar closed is answered as
/// engine.io answers an unknown one. `Err` is the answer to send instead.
///
/// Synchronous, so the socket.io stack (`app::socketio`) can run it before the inner
/// service without boxing a future around every request, parked long-polls included.
pub fn check_handshake(guard: &Arc<Guard>, request: &mut Request) -> Result<(), Box<Response>> {
    if let Some(sid) = sio_request::session_id(request.uri().query().unwrap_or("")) {
        guard.closed.seen(sid);
        if guard.closed.is_closed(sid) {
            // Engine.IO's own answer to a session it does not know.
            let body = serde_json::json!({ "code": 1, "message": "Session ID unknown" });
            return Err(Box::new(
                (StatusCode::BAD_REQUEST, axum::Json(body)).into_response(),
            ));
        }
        return Ok(());
    }
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    let Some(peer) = peer else {
        // In-process callers (tests through `oneshot`) have no peer address.
        return Ok(());
    };
    let forwarded_for = request
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    let client = guard.client_ip(peer, forwarded_for);
    match guard.admit(client) {
        Ok(()) => {
            let admission = Admission {
                guard: guard.clone(),
                client,
                prepaid: AtomicBool::new(true),
            };
            request.extensions_mut().insert(Budget(Arc::new(admission)));
            request.extensions_mut().insert(peer::ClientAddr(client));
            Ok(())
        }
        Err(refusal) => {
            metrics::counter!(names::HANDSHAKE_REJECTIONS, "reason" => refusal.reason())
                .increment(1);
            tracing::debug!(client = %client, reason = refusal.reason(), "handshake refused");
            let body = serde_json::json!({ "code": 4, "message": refusal.to_string() });
            Err(Box::new(
                (refusal.status(), axum::Json(body)).into_response(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed() -> Arc<sio_request::Sessions> {
        Arc::new(sio_request::Sessions::new(std::time::Duration::from_secs(
            60,
        )))
    }

    fn guard(config: Config) -> Guard {
        Guard::new(&config, Arc::new(AtomicUsize::new(0)), closed()).unwrap()
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let guard = guard(Config {
            trusted_proxies: vec!["10.0.0.0/8".into()],
            ..Config::default()
        });
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let stranger: IpAddr = "203.0.113.5".parse().unwrap();
        assert_eq!(
            guard.client_ip(stranger, Some("198.51.100.1")),
            stranger,
            "untrusted peer"
        );
        assert_eq!(
            guard.client_ip(proxy, Some("198.51.100.1, 10.9.9.9")),
            "198.51.100.1".parse::<IpAddr>().unwrap(),
            "rightmost untrusted hop"
        );
        assert_eq!(guard.client_ip(proxy, Some("garbage")), proxy);
        assert_eq!(guard.client_ip(proxy, None), proxy);
    }

    #[test]
    fn rate_and_burst_per_client() {
        let guard = guard(Config {
            handshake_rate_per_ip: 1,
            handshake_burst_per_ip: 3,
            ..Config::default()
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(guard.admit(a), Ok(()));
        }
        assert_eq!(guard.admit(a), Err(Refusal::RateLimited));
        assert_eq!(guard.admit(b), Ok(()), "another client has its own bucket");
        let v6a: IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8::2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(guard.admit(v6a), Ok(()));
        }
        assert_eq!(
            guard.admit(v6b),
            Err(Refusal::RateLimited),
            "one bucket per /64"
        );
    }

    #[test]
    fn connection_cap() {
        let connected = Arc::new(AtomicUsize::new(0));
        let guard = Guard::new(
            &Config {
                max_connections: 2,
                ..Config::default()
            },
            connected.clone(),
            closed(),
        )
        .unwrap();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(guard.admit(ip), Ok(()));
        connected.store(2, Ordering::Relaxed);
        assert_eq!(guard.admit(ip), Err(Refusal::AtCapacity));
    }
}
