//! `/_sidecar/healthz` and `/_sidecar/readyz`.
//!
//! Readiness means "the upstream Evolution API answers": checked at most once per
//! [`READY_CACHE`] so probes never load it, and false at once while draining. The probe is
//! `GET /license/status`: any answer means Evolution serves (2.3.x answers 404), and 2.4's
//! `{"status":"inactive"}` is reported as `"upstream":"unlicensed"`, still ready: events
//! and global-key clients keep flowing while Evolution's REST routes answer 503
//! `LICENSE_REQUIRED` (see [`crate::license`]). Redis and RabbitMQ only degrade readiness's
//! body, never its status: every replica shares them, a blip must not take them all out, and
//! webhooks still work without either.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use tokio::sync::Mutex;

use crate::amqp;
use crate::cluster::Cluster;
use crate::{license, setting};

/// How long a readiness answer about the upstream is reused.
const READY_CACHE: Duration = Duration::from_secs(2);
/// How long the readiness probe waits for the upstream.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// State of the health endpoints.
pub struct Health {
    http: reqwest::Client,
    probe_url: String,
    cluster: Option<Arc<Cluster>>,
    amqp: Option<Arc<amqp::Consumer>>,
    draining: Arc<AtomicBool>,
    last: Mutex<Option<(Instant, Upstream)>>,
}

/// What the readiness probe learned of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upstream {
    Up,
    /// Evolution 2.4 serves, but its license is not activated.
    Unlicensed,
    Down,
}

impl Upstream {
    fn as_str(self) -> &'static str {
        match self {
            Upstream::Up => "up",
            Upstream::Unlicensed => "unlicensed",
            Upstream::Down => "down",
        }
    }
}

impl Health {
    pub fn new(
        upstream_url: &str,
        cluster: Option<Arc<Cluster>>,
        amqp: Option<Arc<amqp::Consumer>>,
        draining: Arc<AtomicBool>,
    ) -> Result<Self, setting::Error> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(READY_TIMEOUT)
            .build()
            .map_err(|err| setting::Error::startup(format!("http client: {err}")))?;
        Ok(Self {
            http,
            probe_url: format!(
                "{}/{}",
                upstream_url.trim_end_matches('/'),
                license::STATUS_PATH
            ),
            cluster,
            amqp,
            draining,
            last: Mutex::new(None),
        })
    }

    async fn upstream(&self) -> Upstream {
        let mut last = self.last.lock().await;
        if let Some((at, upstream)) = *last
            && at.elapsed() < READY_CACHE
        {
            return upstream;
        }
        let upstream = self.probe().await;
        *last = Some((Instant::now(), upstream));
        upstream
    }

    /// Any HTTP answer means Evolution is serving; only no answer is "down".
    async fn probe(&self) -> Upstream {
        let Ok(response) = self.http.get(&self.probe_url).send().await else {
            return Upstream::Down;
        };
        let (status, body) = license::head(response).await;
        if license::says_inactive(status, &body) {
            Upstream::Unlicensed
        } else {
            Upstream::Up
        }
    }
}

/// `GET /_sidecar/healthz`: the process serves.
pub async fn healthz() -> Response {
    Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// `GET /_sidecar/readyz`: 200 when the upstream answers (licensed or not), 503 naming what
/// is not ready.
pub async fn readyz(State(health): State<Arc<Health>>) -> Response {
    if health.draining.load(Ordering::Relaxed) {
        let body = serde_json::json!({ "status": "draining" });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    // Redis only degrades: every replica shares it, and a blip must not take them all out.
    let redis = health.cluster.as_ref().map(|cluster| {
        redis_status(
            cluster.is_up(),
            cluster.is_caught_up(),
            cluster.is_stalled(),
        )
    });
    let upstream = health.upstream().await;
    let mut body = if upstream == Upstream::Down {
        serde_json::json!({ "status": "unavailable", "upstream": "down" })
    } else {
        serde_json::json!({ "status": "ready", "upstream": upstream.as_str() })
    };
    if let Some(redis) = redis {
        body["redis"] = redis.into();
    }
    // The broker down: the consumer reconnects, webhooks still work, nothing is lost
    // (the queue keeps what Evolution publishes meanwhile).
    if let Some(consumer) = &health.amqp {
        body["amqp"] = if consumer.is_up() { "up" } else { "degraded" }.into();
    }
    // A replica still reading the retained stream (or stalled before it caught up) would
    // serve a partial log.
    let caught_up = health
        .cluster
        .as_ref()
        .is_none_or(|cluster| !cluster.is_up() || cluster.is_caught_up());
    let status = if upstream != Upstream::Down && caught_up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// readyz's `redis` field: `degraded` (unreachable: local delivery), `catching_up` (reading
/// the retained stream; not ready), `stalled` (Redis answers but the stream reader makes no
/// progress; ready, since local webhooks still work, but clients on other replicas miss
/// events), or `ok`.
fn redis_status(up: bool, caught_up: bool, stalled: bool) -> &'static str {
    match (up, caught_up, stalled) {
        (false, _, _) => "degraded",
        (true, _, true) => "stalled",
        (true, false, false) => "catching_up",
        (true, true, false) => "ok",
    }
}

#[cfg(test)]
mod tests {
    use super::redis_status;

    #[test]
    fn redis_statuses() {
        assert_eq!(redis_status(false, true, true), "degraded");
        assert_eq!(redis_status(true, true, true), "stalled");
        assert_eq!(redis_status(true, false, true), "stalled");
        assert_eq!(redis_status(true, false, false), "catching_up");
        assert_eq!(redis_status(true, true, false), "ok");
    }
}
