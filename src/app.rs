//! The router and its layer order, and serving with graceful shutdown.
//!
//! Routes, outermost first:
//! - `/socket.io/`: CORS → handshake key check (`auth::check_handshake`) → socket.io.
//!   The check must sit outside socket.io: middleware inside it never sees its traffic.
//! - `{webhook.path}[/...]`: `webhook::ingest` (never proxied, whatever the path).
//! - `/_sidecar/healthz`, `/_sidecar/readyz`; any other `/_sidecar/*` is 404.
//! - everything else: `proxy::forward` to Evolution API, with no CORS added.

use std::convert::Infallible;
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
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::auth::{self, Authenticator};
use crate::config::{self, Config};
use crate::hub::{self, Hub};
use crate::proxy::{self, Proxy};
use crate::telemetry::{self, Health};
use crate::upstream::Upstream;
use crate::webhook::{self, Webhook};

/// The whole sidecar, built from a [`Config`] without binding any port.
pub struct App {
    router: Router,
    hub: Hub,
    draining: Arc<AtomicBool>,
    grace: Duration,
}

impl App {
    /// Validates the configuration and builds every part.
    pub fn build(config: &Config) -> Result<Self, config::Error> {
        config.validate()?;
        let draining = Arc::new(AtomicBool::new(false));
        let auth = Arc::new(Authenticator::new(
            &config.auth,
            config.upstream.base_url(),
        )?);
        let upstream = Arc::new(Upstream::new(&config.upstream)?);
        let (socketio_layer, hub) = Hub::build(&config.hub, auth.clone(), upstream)?;
        let webhook = Arc::new(Webhook::new(
            &config.webhook,
            hub.clone(),
            draining.clone(),
        )?);
        let proxy = Arc::new(Proxy::new(&config.upstream)?);
        let health = Arc::new(Health::new(config.upstream.base_url(), draining.clone())?);

        // socket.io: CORS (outer) → handshake check → socket.io (inner); anything the
        // socket.io layer does not claim ends in a 404.
        let socketio = ServiceBuilder::new()
            .layer(cors(&config.hub))
            .layer(axum::middleware::from_fn_with_state(
                auth,
                auth::check_handshake,
            ))
            .layer(socketio_layer)
            .service(tower::service_fn(|_request| async {
                Ok::<_, Infallible>(StatusCode::NOT_FOUND.into_response())
            }));

        let webhook_path = webhook.path().to_owned();
        let ingest = Router::new()
            .route(&webhook_path, post(webhook::ingest))
            .route(&format!("{webhook_path}/"), post(webhook::ingest))
            .route(&format!("{webhook_path}/{{*rest}}"), post(webhook::ingest))
            .with_state(webhook);
        let sidecar = Router::new()
            .route("/_sidecar/healthz", get(telemetry::healthz))
            .route("/_sidecar/readyz", get(telemetry::readyz))
            .with_state(health)
            .route("/_sidecar", any(not_found))
            .route("/_sidecar/{*rest}", any(not_found));

        let router = Router::new()
            .route_service("/socket.io/", socketio.clone())
            .route_service("/socket.io", socketio)
            .merge(ingest)
            .merge(sidecar)
            .fallback(proxy::forward)
            .with_state(proxy);

        Ok(Self {
            router,
            hub,
            draining,
            grace: Duration::from_secs(config.shutdown_grace_secs),
        })
    }

    /// The router, for in-process tests (`tower::ServiceExt::oneshot`).
    pub fn router(&self) -> Router {
        self.router.clone()
    }

    /// The hub, to publish or count sockets.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Serves on `listener` until `shutdown` completes, then drains: webhooks and readiness
    /// answer 503, sockets are closed, and connections get `shutdown_grace_secs` to finish.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let draining = self.draining.clone();
        let hub = self.hub.clone();
        let graceful = async move {
            shutdown.await;
            draining.store(true, Ordering::SeqCst);
            tracing::info!("shutting down: draining");
            let _ = started_tx.send(());
            if tokio::time::timeout(hub::CLOSE_TIMEOUT, hub.close())
                .await
                .is_err()
            {
                tracing::warn!("socket.io did not close all sockets in time");
            }
        };
        let service = self
            .router
            .into_make_service_with_connect_info::<SocketAddr>();
        let server = axum::serve(listener, service).with_graceful_shutdown(graceful);
        let grace = self.grace;
        let deadline = async move {
            match started_rx.await {
                Ok(()) => tokio::time::sleep(grace).await,
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            result = server.into_future() => result,
            () = deadline => {
                tracing::warn!(grace_secs = grace.as_secs(), "grace period ran out: closing remaining connections");
                Ok(())
            }
        }
    }
}

fn cors(config: &hub::Config) -> CorsLayer {
    let origin = if config.cors_origin.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            config
                .cors_origin
                .iter()
                .filter_map(|origin| origin.parse().ok()),
        )
    };
    CorsLayer::new()
        .allow_origin(origin)
        .allow_methods([http::Method::GET, http::Method::POST, http::Method::OPTIONS])
        .allow_headers(tower_http::cors::AllowHeaders::mirror_request())
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({ "error": "not found" })),
    )
}
