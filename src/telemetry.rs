//! Logs and metrics: tracing setup, the Prometheus recorder and `/_sidecar/metrics`, metric
//! names and bounded label values, and the per-request span.
//!
//! A leaf: it imports nothing from the crate, so every module can name its metrics.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};

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
    let filter = EnvFilter::try_new(log_filter(rust_log))
        .unwrap_or_else(|_| EnvFilter::new(log_filter(None)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a terminal: log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // Already installed (tests start many apps in one process): keep the first.
    let _ = result;
}

/// Crates that log whole frames (CONNECT packets with `auth.apikey`, event payloads) at
/// debug and trace. They stay at `info` unless `RUST_LOG` names them itself.
const FRAME_LOGGERS: &[&str] = &[
    "tungstenite",
    "tokio_tungstenite",
    "engineioxide",
    "socketioxide",
];

/// The filter directives for `RUST_LOG`: the given ones (or `info` if they do not parse),
/// with [`FRAME_LOGGERS`] capped at `info` unless a directive names them.
pub fn log_filter(rust_log: Option<&str>) -> String {
    let given = rust_log
        .map(str::trim)
        .filter(|value| !value.is_empty() && tracing_subscriber::EnvFilter::try_new(value).is_ok())
        .unwrap_or("info");
    let named = |target: &str| {
        given.split(',').any(|directive| {
            let name = directive.split(['=', '[']).next().unwrap_or("").trim();
            name == target || name.starts_with(&format!("{target}::"))
        })
    };
    let mut filter = given.to_owned();
    for target in FRAME_LOGGERS.iter().filter(|target| !named(target)) {
        filter.push_str(&format!(",{target}=info"));
    }
    filter
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn frame_loggers_are_capped_unless_named() {
        assert_eq!(
            log_filter(None),
            "info,tungstenite=info,tokio_tungstenite=info,engineioxide=info,socketioxide=info"
        );
        let trace = log_filter(Some("trace"));
        assert!(trace.starts_with("trace,") && trace.contains("engineioxide=info"));
        let named = log_filter(Some("trace,engineioxide=trace"));
        assert!(!named.contains("engineioxide=info") && named.contains("socketioxide=info"));
        assert_eq!(log_filter(Some("not a [filter")), log_filter(None));
    }
}

// === Metrics ===

/// Prometheus metric names: one place, so the README and the tests name the same series.
pub mod names {
    pub const WEBHOOKS: &str = "evo_webhooks_total";
    pub const WEBHOOK_SECONDS: &str = "evo_webhook_ingest_seconds";
    pub const WEBHOOK_REFUSALS: &str = "evo_webhook_refusals_total";
    pub const EVENTS_EMITTED: &str = "evo_events_emitted_total";
    pub const DELIVERIES: &str = "evo_deliveries_total";
    pub const DELIVERY_DROPS: &str = "evo_delivery_drops_total";
    pub const SOCKETS: &str = "evo_sockets_connected";
    pub const SOCKETS_BY_NAMESPACE: &str = "evo_sockets_connected_by_namespace";
    pub const SOCKET_DISCONNECTS: &str = "evo_socket_disconnects_total";
    pub const HANDSHAKE_REJECTIONS: &str = "evo_handshake_rejections_total";
    pub const UPSTREAM_CALLS: &str = "evo_upstream_calls_total";
    pub const UPSTREAM_SECONDS: &str = "evo_upstream_call_seconds";
    pub const PROXY_REQUESTS: &str = "evo_proxy_requests_total";
    pub const RECOVERIES: &str = "evo_recoveries_total";
    pub const REPLAYED: &str = "evo_replayed_events_total";
    pub const SLOW_CONSUMER_DISCONNECTS: &str = "evo_slow_consumer_disconnects_total";
    pub const DUPLICATE_WEBHOOKS: &str = "evo_duplicate_webhooks_total";
    pub const WEBHOOK_RETRIES: &str = "evo_webhook_retries_total";
    pub const INSTANCE_SILENT: &str = "evo_instance_silent";
    pub const INSTANCES_SILENT: &str = "evo_instances_silent";
    pub const RETAINED_BYTES: &str = "evo_retained_bytes";
    pub const REDIS_UP: &str = "evo_redis_up";
    pub const REDIS_MALFORMED_ENTRIES: &str = "evo_redis_malformed_entries_total";
    pub const REDIS_READER_STALLED: &str = "evo_redis_reader_stalled";
    pub const REVOCATIONS: &str = "evo_socket_revocations_total";
    pub const EMIT_BYTES_REFUSED: &str = "evo_emit_bytes_refused_total";
    pub const TCP_CONNECTIONS: &str = "evo_tcp_connections";
    pub const TCP_REFUSED: &str = "evo_tcp_connections_refused_total";
    pub const ACCEPT_ERRORS: &str = "evo_accept_errors_total";
    pub const REVALIDATION_FAILURES: &str = "evo_token_revalidation_failures_total";
    pub const UNVERIFIED_SOCKETS: &str = "evo_token_sockets_unverified";
    pub const AMQP_UP: &str = "evo_amqp_up";
    pub const AMQP_MESSAGES: &str = "evo_amqp_messages_total";
}

/// Handles of the metrics on the per-webhook and per-delivery paths, registered once, so
/// those paths do no registry lookup and build no label set.
pub struct Meters {
    pub deliveries: Counter,
    pub delivery_drops: Counter,
    pub emitted_instance: Counter,
    pub emitted_global: Counter,
    pub retained_bytes: Gauge,
    pub webhook_seconds: Histogram,
    pub duplicate_webhooks: Counter,
    /// Webhooks whose Evolution 2.4 `X-Timestamp` says they are a retry.
    pub webhook_retries: Counter,
    pub redis_up: Gauge,
    pub redis_malformed_entries: Counter,
    pub redis_reader_stalled: Gauge,
    pub amqp_up: Gauge,
    /// `evo_amqp_messages_total` per outcome (`amqp::Outcome::label`, seven values).
    amqp_messages: std::sync::Mutex<HashMap<&'static str, Counter>>,
    /// `evo_webhooks_total` per (event label, status): bounded by the event names
    /// Evolution sends (`envelope::EVOLUTION_EVENTS`, else `other`) times the statuses
    /// ingest answers; each registered on first use.
    webhooks: std::sync::Mutex<HashMap<(&'static str, u16), Counter>>,
}

impl Meters {
    /// The `evo_amqp_messages_total{outcome}` counter.
    pub fn amqp_message(&self, outcome: &'static str) -> Counter {
        let mut messages = self.amqp_messages.lock().unwrap_or_else(|e| e.into_inner());
        messages
            .entry(outcome)
            .or_insert_with(|| metrics::counter!(names::AMQP_MESSAGES, "outcome" => outcome))
            .clone()
    }

    /// The `evo_webhooks_total{event, status}` counter.
    pub fn webhook(&self, event: &'static str, status: u16) -> Counter {
        let mut webhooks = self.webhooks.lock().unwrap_or_else(|e| e.into_inner());
        webhooks
            .entry((event, status))
            .or_insert_with(|| {
                metrics::counter!(names::WEBHOOKS, "event" => event, "status" => status.to_string())
            })
            .clone()
    }
}

/// The hot-path metric handles, after the recorder is installed (handles taken before it
/// would record nothing).
pub fn meters() -> &'static Meters {
    static METERS: OnceLock<Meters> = OnceLock::new();
    METERS.get_or_init(|| {
        let _ = metrics_handle();
        Meters {
            deliveries: metrics::counter!(names::DELIVERIES),
            delivery_drops: metrics::counter!(names::DELIVERY_DROPS),
            emitted_instance: metrics::counter!(names::EVENTS_EMITTED, "scope" => "instance"),
            emitted_global: metrics::counter!(names::EVENTS_EMITTED, "scope" => "global"),
            retained_bytes: metrics::gauge!(names::RETAINED_BYTES),
            webhook_seconds: metrics::histogram!(names::WEBHOOK_SECONDS),
            duplicate_webhooks: metrics::counter!(names::DUPLICATE_WEBHOOKS),
            webhook_retries: metrics::counter!(names::WEBHOOK_RETRIES),
            redis_up: metrics::gauge!(names::REDIS_UP),
            redis_malformed_entries: metrics::counter!(names::REDIS_MALFORMED_ENTRIES),
            redis_reader_stalled: metrics::gauge!(names::REDIS_READER_STALLED),
            amqp_up: metrics::gauge!(names::AMQP_UP),
            amqp_messages: std::sync::Mutex::new(HashMap::new()),
            webhooks: std::sync::Mutex::new(HashMap::new()),
        }
    })
}

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            const LATENCY: &[f64] = &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets(LATENCY)
                .map_err(|err| tracing::warn!(error = %err, "metrics buckets"))
                .ok()?;
            match builder.install_recorder() {
                Ok(handle) => Some(handle),
                Err(err) => {
                    tracing::warn!(error = %err, "metrics recorder not installed");
                    None
                }
            }
        })
        .clone()
}

/// `GET /_sidecar/metrics`: Prometheus text.
pub async fn metrics(State(handle): State<Option<PrometheusHandle>>) -> Response {
    match handle {
        Some(handle) => (
            [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Namespaces that get their own label value; later ones share `other`.
const MAX_NAMESPACE_LABELS: usize = 100;

/// Bounded `namespace` label values for the per-namespace socket gauge.
#[derive(Default)]
pub struct NamespaceLabels(std::sync::Mutex<HashSet<String>>);

impl NamespaceLabels {
    pub fn label(&self, namespace: &str) -> String {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(namespace) {
            return namespace.to_owned();
        }
        if seen.len() < MAX_NAMESPACE_LABELS {
            seen.insert(namespace.to_owned());
            return namespace.to_owned();
        }
        "other".to_owned()
    }
}

/// A span per request carrying `request_id` (from `x-request-id`, else a counter),
/// `method` and `path`. The path is the matched route where there is one (the webhook's
/// path token must not be logged); the query is never logged (`apikey=`).
///
/// A tower layer rather than `axum::middleware::from_fn`, which would box a future and a
/// clone of the router's service per request, for as long as the request is open (a
/// parked long-poll holds it for up to the ping interval).
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestSpanLayer;

impl<S> tower::Layer<S> for RequestSpanLayer {
    type Service = RequestSpan<S>;

    fn layer(&self, inner: S) -> RequestSpan<S> {
        RequestSpan { inner }
    }
}

/// The service of [`RequestSpanLayer`].
#[derive(Debug, Clone)]
pub struct RequestSpan<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for RequestSpan<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tracing::instrument::Instrumented<S::Future>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        use std::sync::atomic::AtomicU64;
        use tracing::Instrument;
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let span = {
            let given = request
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .filter(|v| v.len() <= 64);
            let path = request
                .extensions()
                .get::<axum::extract::MatchedPath>()
                .map_or_else(|| request.uri().path(), |matched| matched.as_str());
            match given {
                Some(id) => {
                    tracing::info_span!("request", request_id = %id, method = %request.method(), path = %path)
                }
                None => {
                    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
                    tracing::info_span!("request", request_id = %format_args!("{id:x}"), method = %request.method(), path = %path)
                }
            }
        };
        let future = span.in_scope(|| self.inner.call(request));
        future.instrument(span)
    }
}
