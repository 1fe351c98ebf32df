//! Logs and health: tracing setup, `/_sidecar/healthz` and `/_sidecar/readyz`.
//!
//! Readiness means "the upstream Evolution API answers": checked at most once per
//! [`READY_CACHE`] so probes never load it, and false at once while draining.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber: `RUST_LOG` (default `info`), text or JSON.
pub fn init_tracing(format: LogFormat, rust_log: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = rust_log
        .and_then(|value| EnvFilter::try_new(value).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // Already installed (tests start many apps in one process): keep the first.
    let _ = result;
}

/// How long a readiness answer about the upstream is reused.
const READY_CACHE: Duration = Duration::from_secs(2);
/// How long the readiness probe waits for the upstream.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// State of the health endpoints.
pub struct Health {
    http: reqwest::Client,
    upstream_url: String,
    draining: Arc<AtomicBool>,
    last: Mutex<Option<(Instant, bool)>>,
}

impl Health {
    pub fn new(
        upstream_url: &str,
        draining: Arc<AtomicBool>,
    ) -> Result<Self, crate::config::Error> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(READY_TIMEOUT)
            .build()
            .map_err(|err| crate::config::Error::new(format!("http client: {err}")))?;
        Ok(Self {
            http,
            upstream_url: upstream_url.trim_end_matches('/').to_owned() + "/",
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
    if health.upstream_up().await {
        Json(serde_json::json!({ "status": "ready", "upstream": "up" })).into_response()
    } else {
        let body = serde_json::json!({ "status": "unavailable", "upstream": "down" });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}
