//! The router and its layer order, and serving with graceful shutdown.
//!
//! Routes, outermost first:
//! - `/socket.io/`: the socket.io HTTP stack ([`socketio`]): CORS → admission → handshake
//!   key check → the request head copied out of hyper's read buffer → socket.io.
//! - `{webhook.path}[/...]`: `webhook::ingest` (never proxied, whatever the path).
//! - `/_sidecar/healthz`, `/_sidecar/readyz`, `/_sidecar/inspector` (unless turned off);
//!   `/_sidecar/metrics` with the global key as a bearer token (`auth::require_global_key`),
//!   or open on its own listener with `metrics_listen`; any other `/_sidecar/*` is 404.
//! - everything else: `proxy::forward` to Evolution API, with no CORS added.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::response::IntoResponse;
use axum::routing::{any, get, post};
use http::StatusCode;
use tokio::net::TcpListener;

use crate::activity::{self, Activity};
use crate::amqp;
use crate::auth::{self, Authenticator};
use crate::bus::Bus;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::envelope::InstanceName;
use crate::guard::Guard;
use crate::health::{self, Health};
use crate::hub::{self, Hub};
use crate::inspector;
use crate::peer::TrustedProxies;
use crate::proxy::{self, Proxy};
use crate::replay;
use crate::server;
use crate::setting;
use crate::telemetry;
use crate::upstream::Upstream;
use crate::webhook::{self, Webhook};

mod socketio;

/// The whole sidecar, built from a [`Config`] without binding any port.
pub struct App {
    router: Router,
    /// Serves `/_sidecar/metrics` on its own listener when `metrics_listen` is set.
    metrics_router: Option<(SocketAddr, Router)>,
    hub: Hub,
    bus: Arc<Bus>,
    activity: Arc<Activity>,
    /// The RabbitMQ consumer, when `SIDECAR_AMQP_URL` is set.
    amqp: Option<Arc<amqp::Consumer>>,
    upstream: Arc<Upstream>,
    replay: Arc<replay::Store>,
    draining: Arc<AtomicBool>,
    grace: Duration,
    /// How often token-authenticated sockets are re-checked.
    token_ttl: Duration,
    /// TCP connection caps, and the header/idle timeout, of both listeners.
    limits: server::Limits,
    header_timeout: Duration,
}

impl App {
    /// Validates the configuration and builds every part.
    pub fn build(config: &Config) -> Result<Self, setting::Error> {
        config.validate()?;
        let draining = Arc::new(AtomicBool::new(false));
        let auth = Arc::new(Authenticator::new(
            &config.auth,
            config.upstream.base_url(),
        )?);
        let upstream = Arc::new(Upstream::new(&config.upstream)?);
        let replay = replay::Store::new(&config.replay)?;
        let cluster = Cluster::new(&config.redis, replay.max_age())?;
        let (socketio_layer, hub) =
            Hub::build(&config.hub, auth.clone(), upstream.clone(), replay.clone())?;
        let activity = Arc::new(Activity::new(
            &config.activity,
            config.upstream.base_url(),
            config.auth.api_key.as_ref(),
        )?);
        let bus = Arc::new(Bus::new(
            hub.clone(),
            activity.clone(),
            replay.clone(),
            cluster.clone(),
            &config.hub.events,
            Duration::from_secs(config.webhook.dedupe_window_secs),
        ));
        let webhook = Arc::new(Webhook::new(
            &config.webhook,
            bus.clone(),
            draining.clone(),
        )?);
        let amqp = amqp::Consumer::new(
            &config.amqp,
            bus.clone(),
            config.webhook.max_body_bytes,
            config.webhook.dedupe_window_secs,
            &config.hub.events,
            draining.clone(),
        );
        let trusted = TrustedProxies::parse(&config.guard.trusted_proxies)?;
        let proxy = Arc::new(Proxy::new(&config.upstream, trusted.clone())?);
        let guard = Arc::new(Guard::new(&config.guard, hub.connected(), hub.sessions())?);
        let health = Arc::new(Health::new(
            config.upstream.base_url(),
            cluster,
            amqp.clone(),
            draining.clone(),
        )?);

        let socketio = socketio::service(&config.hub, guard, auth.clone(), socketio_layer);

        let webhook_path = webhook.path().to_owned();
        let ingest = Router::new()
            .route(&webhook_path, post(webhook::ingest))
            .route(&format!("{webhook_path}/"), post(webhook::ingest))
            .route(&format!("{webhook_path}/{{*rest}}"), post(webhook::ingest))
            .with_state(webhook);
        let mut sidecar = Router::new()
            .route("/_sidecar/healthz", get(health::healthz))
            .route("/_sidecar/readyz", get(health::readyz))
            .with_state(health)
            .route("/_sidecar", any(not_found))
            .route("/_sidecar/{*rest}", any(not_found));
        let metrics_router = match config.metrics_listen {
            Some(addr) => Some((addr, metrics_routes())),
            None => {
                // The public listener: instance names and usage are the operator's.
                sidecar = sidecar.merge(metrics_routes().layer(
                    axum::middleware::from_fn_with_state(auth.clone(), auth::require_global_key),
                ));
                None
            }
        };
        if config.inspector {
            sidecar = sidecar.merge(inspector::routes().with_state(()));
        }
        // Instance names and activity are the operator's: the global key only.
        let view = activity::InstancesView {
            activity: activity.clone(),
            clients: {
                let hub = hub.clone();
                Arc::new(move |instance: &InstanceName| hub.clients(&instance.namespace()))
            },
        };
        sidecar = sidecar.merge(
            Router::new()
                .route("/_sidecar/instances", get(activity::instances))
                .with_state(view)
                .layer(axum::middleware::from_fn_with_state(
                    auth.clone(),
                    auth::require_global_key,
                )),
        );

        let router = Router::new()
            .route_service("/socket.io/", socketio.clone())
            .route_service("/socket.io", socketio)
            .merge(ingest)
            .merge(sidecar)
            .fallback(proxy::forward)
            .with_state(proxy)
            // Outermost: one span per request, with an id and the path (never the query,
            // which may hold `apikey=`).
            .layer(telemetry::RequestSpanLayer);

        Ok(Self {
            router,
            metrics_router,
            hub,
            bus,
            activity,
            amqp,
            upstream,
            replay,
            draining,
            grace: Duration::from_secs(config.shutdown_grace_secs),
            token_ttl: Duration::from_secs(config.auth.token_cache_ttl_secs),
            limits: server::Limits::new(&config.server, trusted),
            header_timeout: Duration::from_secs(config.server.header_timeout_secs),
        })
    }

    /// The router, for in-process tests (`tower::ServiceExt::oneshot`).
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// The hub, to count sockets.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The bus, to publish events as an accepted webhook does.
    pub fn bus(&self) -> &Arc<Bus> {
        &self.bus
    }

    /// The retained events, to look at their bounds.
    pub fn replay(&self) -> &Arc<replay::Store> {
        &self.replay
    }

    /// Binds the separate metrics listener, if one is configured.
    pub async fn bind_metrics(&self) -> std::io::Result<Option<TcpListener>> {
        match &self.metrics_router {
            Some((addr, _)) => Ok(Some(TcpListener::bind(addr).await?)),
            None => Ok(None),
        }
    }

    /// Serves on `listener` until `shutdown` completes, then drains within
    /// `shutdown_grace_secs`:
    /// 1. webhooks, new emits and readiness answer 503, while the listener still accepts
    ///    (so Evolution and probes see 503, not a refused connection);
    /// 2. emits already forwarded upstream finish and are acked;
    /// 3. sockets are closed, then HTTP connections get the rest of the grace time.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        self.serve_with_metrics(listener, None, shutdown).await
    }

    /// [`App::serve`], plus the metrics listener from [`App::bind_metrics`].
    pub async fn serve_with_metrics(
        self,
        listener: TcpListener,
        metrics_listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        // Every background task belongs to this call: if it is dropped (the app is not
        // served to completion), `tasks` aborts them and the reader guard stops the stream
        // reader, so nothing outlives the app (Redis and AMQP connections close with it).
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(replay::sweep(Arc::downgrade(&self.replay)));
        tasks.spawn(self.hub.revalidate(self.token_ttl));
        tasks.spawn(self.hub.sweep_namespaces());
        tasks.spawn(self.activity.clone().watch());
        let _reader = self.bus.spawn_reader();
        if let Some(consumer) = &self.amqp {
            tasks.spawn(consumer.clone().run());
        }
        // 0: serving; 1: drained, stop accepting; 2: grace over, cut what is left.
        let (phase_tx, phase_rx) = tokio::sync::watch::channel(0u8);
        tasks.spawn(drain(
            shutdown,
            self.grace,
            self.draining.clone(),
            self.upstream.clone(),
            self.hub.clone(),
            phase_tx,
        ));

        let reached = |mut rx: tokio::sync::watch::Receiver<u8>, phase: u8| async move {
            let _ = rx.wait_for(|now| *now >= phase).await;
        };
        if let (Some(listener), Some((_, router))) = (metrics_listener, self.metrics_router) {
            let stop = reached(phase_rx.clone(), 1);
            let limits = server::Limits::new(&server::Config::default(), TrustedProxies::default());
            let header_timeout = self.header_timeout;
            tasks.spawn(async move {
                let served = server::serve(listener, router, &limits, header_timeout, stop);
                if let Err(err) = served.await {
                    tracing::error!(error = %err, "metrics listener failed");
                }
            });
        }
        let server = server::serve(
            listener,
            self.router,
            &self.limits,
            self.header_timeout,
            reached(phase_rx.clone(), 1),
        );
        let result = tokio::select! {
            result = server => result,
            () = reached(phase_rx, 2) => {
                tracing::warn!("grace period ran out: closing remaining connections");
                Ok(())
            }
        };
        result
    }
}

/// `/_sidecar/metrics`, for the public router or its own listener.
fn metrics_routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/_sidecar/metrics", get(telemetry::metrics))
        .with_state(telemetry::metrics_handle())
}

/// The least time between the shutdown signal and closing sockets.
const DRAIN_LINGER: Duration = Duration::from_secs(1);

/// The shutdown sequence, driven by `phase`.
async fn drain(
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    draining: Arc<AtomicBool>,
    upstream: Arc<Upstream>,
    hub: Hub,
    phase: tokio::sync::watch::Sender<u8>,
) {
    shutdown.await;
    let deadline = tokio::time::Instant::now() + grace;
    draining.store(true, Ordering::SeqCst);
    tracing::info!(grace_secs = grace.as_secs(), "shutting down: draining");
    // Probes and Evolution's retries need a moment to see the 503s.
    let linger = tokio::time::sleep(grace.min(DRAIN_LINGER));
    let (calls_done, ()) = tokio::join!(upstream.drain(deadline), linger);
    if !calls_done {
        tracing::warn!("grace period ran out with upstream calls in flight");
    }
    let close_within =
        hub::CLOSE_TIMEOUT.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
    if tokio::time::timeout(close_within, hub.close())
        .await
        .is_err()
    {
        tracing::warn!("socket.io did not close all sockets in time");
    }
    let _ = phase.send(1);
    tokio::time::sleep_until(deadline).await;
    let _ = phase.send(2);
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({ "error": "not found" })),
    )
}
