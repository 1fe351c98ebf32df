//! `/_sidecar/healthz` and `/_sidecar/readyz`.
//!
//! Readiness means "the upstream Evolution API answers": checked at most once per
//! [`READY_CACHE`] so probes never load it, and false at once while draining. Redis only
//! degrades readiness's body, never its status: every replica shares it, and a blip must not
//! take them all out.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use tokio::sync::Mutex;

use crate::cluster::Cluster;
use crate::setting;

/// How long a readiness answer about the upstream is reused.
const READY_CACHE: Duration = Duration::from_secs(2);
/// How long the readiness probe waits for the upstream.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// State of the health endpoints.
pub struct Health {
    http: reqwest::Client,
    upstream_url: String,
    cluster: Option<Arc<Cluster>>,
    draining: Arc<AtomicBool>,
    last: Mutex<Option<(Instant, bool)>>,
}

impl Health {
    pub fn new(
        upstream_url: &str,
        cluster: Option<Arc<Cluster>>,
        draining: Arc<AtomicBool>,
    ) -> Result<Self, setting::Error> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(READY_TIMEOUT)
            .build()
            .map_err(|err| setting::Error::startup(format!("http client: {err}")))?;
        Ok(Self {
            http,
            upstream_url: upstream_url.trim_end_matches('/').to_owned() + "/",
            cluster,
            draining,
            last: Mutex::new(None),
        })
    }

    async fn upstream_up(&self) -> bool {
        let mut last = self.last.lock().await;
        if let Some((at, up)) = *last
            && at.elapsed() < READY_CACHE
        {
            return up;
        }
        // Any HTTP answer means Evolution is serving; only no answer is "down".
        let up = self.http.get(&self.upstream_url).send().await.is_ok();
        *last = Some((Instant::now(), up));
        up
    }
}

/// `GET /_sidecar/healthz`: the process serves.
pub async fn healthz() -> Response {
    Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// `GET /_sidecar/readyz`: 200 when the upstream answers, 503 naming what is not ready.
pub async fn readyz(State(health): State<Arc<Health>>) -> Response {
    if health.draining.load(Ordering::Relaxed) {
        let body = serde_json::json!({ "status": "draining" });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    // Redis only degrades: every replica shares it, and a blip must not take them all out.
    let redis =
        health
            .cluster
            .as_ref()
            .map(|cluster| match (cluster.is_up(), cluster.is_caught_up()) {
                (false, _) => "degraded",
                (true, false) => "catching_up",
                (true, true) => "ok",
            });
    let mut body = if health.upstream_up().await {
        serde_json::json!({ "status": "ready", "upstream": "up" })
    } else {
        serde_json::json!({ "status": "unavailable", "upstream": "down" })
    };
    if let Some(redis) = redis {
        body["redis"] = redis.into();
    }
    // A replica still reading the retained stream would serve a partial log.
    let status = if body["upstream"] == "up" && redis != Some("catching_up") {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}
