//! The app in this process: on an ephemeral port, and its router for in-process requests.

use std::net::SocketAddr;

use axum::Router;
use evo_realtime::config::Secret;
use evo_realtime::{App, Config};
use tokio::sync::oneshot;

use super::evolution::GLOBAL_KEY;
use super::wait::PATIENCE;

pub struct TestApp {
    pub addr: SocketAddr,
    /// The app's hub, to look inside (namespaces, sockets).
    pub hub: evo_realtime::hub::Hub,
    /// The router being served, for requests that need no TCP (`tower::ServiceExt::oneshot`).
    pub router: Router,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn webhook_url(&self) -> String {
        self.url("/_sidecar/webhook")
    }

    /// Triggers graceful shutdown and waits for `serve` to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            let _ = tokio::time::timeout(PATIENCE, handle).await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

/// A configuration for tests: loopback, the given upstream, a global key.
pub fn test_config(upstream_url: &str) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        shutdown_grace_secs: 2,
        ..Config::default()
    };
    config.upstream.url = upstream_url.to_owned();
    config.auth.api_key = Some(Secret::new(GLOBAL_KEY));
    // Tests open hundreds of sockets from one address; the limit has its own tests.
    config.guard.handshake_rate_per_ip = 0;
    config
}

pub async fn spawn_app(config: Config) -> TestApp {
    let app = App::build(&config).expect("valid test config");
    let hub = app.hub().clone();
    let router = app.router();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.serve(listener, async move {
        let _ = rx.await;
    }));
    TestApp {
        addr,
        hub,
        router,
        shutdown: Some(tx),
        handle: Some(handle),
    }
}

/// One client for the whole test binary: building one per call costs milliseconds.
pub fn http() -> reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT
        // No pooling: a pooled connection belongs to the runtime of the test that opened it.
        .get_or_init(|| {
            reqwest::Client::builder()
                .no_proxy()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap()
        })
        .clone()
}

/// A metric's value in `/_sidecar/metrics` (summed over its label sets).
pub async fn metric(app: &TestApp, name: &str) -> f64 {
    metric_at(&app.url(""), name).await
}

/// A metric's value (summed over the series that start with `name`, so a name with its
/// labels picks one series) in the metrics of the server at `base` (`http://host:port`).
pub async fn metric_at(base: &str, name: &str) -> f64 {
    let body = http()
        .get(format!("{base}/_sidecar/metrics"))
        .bearer_auth(GLOBAL_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    body.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
