//! Helpers shared by the integration tests: the app on an ephemeral port, a fake
//! Evolution API that records what it gets, and a driver for the official
//! JavaScript socket.io-client. Every wait has a timeout; nothing sleeps to synchronise.
#![allow(dead_code)] // each test file uses a different subset

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use evo_realtime::config::Secret;
use evo_realtime::{App, Config};
use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot};

pub mod raw_sio;
pub mod sidecar;
#[allow(unused_imports)] // each test file uses a different subset
pub use raw_sio::RawSocket;
#[allow(unused_imports)] // each test file uses a different subset
pub use sidecar::{Sidecar, eventually, free_port};

pub const GLOBAL_KEY: &str = "global-key-0123";
pub const ACME_TOKEN: &str = "acme-token-4567";
pub const OTHER_TOKEN: &str = "other-token-8910";
/// What the fake answers on `/raw/...`, byte for byte.
pub const RAW_ANSWER: &str =
    r#"{"status":201,"error":null,"response":{"zeta":1,"alpha":100000000000000000000,"n":1.50}}"#;

pub const PATIENCE: Duration = Duration::from_secs(10);

// === The app ===

pub struct TestApp {
    pub addr: SocketAddr,
    /// The app's hub, to look inside (namespaces, sockets).
    pub hub: evo_realtime::hub::Hub,
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.serve(listener, async move {
        let _ = rx.await;
    }));
    TestApp {
        addr,
        hub,
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

/// POSTs a webhook body (JSON text) and returns status and body.
pub async fn post_webhook(url: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let response = http()
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/webhooks")
}

pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(fixtures_dir().join(name)).unwrap()
}

/// A minimal webhook body.
pub fn event_body(event: &str, instance: &str, n: u64) -> String {
    json!({"event": event, "instance": instance, "data": {"n": n}, "destination": "x",
           "date_time": "2025-10-21T11:03:11.412Z", "server_url": "https://evo.example.com", "apikey": null})
    .to_string()
}

// === The fake Evolution API ===

#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
pub struct FakeState {
    pub requests: Mutex<Vec<Recorded>>,
    /// api key → instance names it owns.
    pub tokens: Mutex<HashMap<String, Vec<String>>>,
    pub lookups: AtomicUsize,
    /// Delay before answering REST calls (not lookups).
    pub delay_ms: AtomicUsize,
    /// Delay before answering lookups.
    pub lookup_delay_ms: AtomicUsize,
    /// When non-zero, every lookup is answered with this status (an erring Evolution).
    pub lookup_status: AtomicUsize,
}

pub struct FakeEvolution {
    pub addr: SocketAddr,
    pub state: Arc<FakeState>,
    handle: tokio::task::JoinHandle<()>,
}

impl FakeEvolution {
    /// Starts the fake with the global key and two instance tokens (acme, other).
    pub async fn start() -> Self {
        let state = Arc::new(FakeState::default());
        {
            let mut tokens = state.tokens.lock().unwrap();
            tokens.insert(ACME_TOKEN.into(), vec!["acme".into()]);
            tokens.insert(OTHER_TOKEN.into(), vec!["other".into()]);
        }
        Self::start_with(state, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts on a given address (to restart a stopped fake on the same port).
    pub async fn start_with(state: Arc<FakeState>, addr: SocketAddr) -> Self {
        let router = Router::new()
            .route("/instance/fetchInstances", get(fetch_instances))
            .route("/stream/echo", post(stream_echo))
            .route("/stream/download", get(stream_download))
            .route("/slow-headers", any(slow_headers))
            .route("/stall-body", get(stall_body))
            .fallback(record)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self {
            addr,
            state,
            handle,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn lookups(&self) -> usize {
        self.state.lookups.load(Ordering::SeqCst)
    }

    pub fn stop(&self) {
        self.handle.abort();
    }
}

impl Drop for FakeEvolution {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

async fn fetch_instances(State(state): State<Arc<FakeState>>, headers: HeaderMap) -> Response {
    state.lookups.fetch_add(1, Ordering::SeqCst);
    let delay = state.lookup_delay_ms.load(Ordering::SeqCst) as u64;
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let failing = state.lookup_status.load(Ordering::SeqCst) as u16;
    if failing != 0 {
        let status = StatusCode::from_u16(failing).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (
            status,
            axum::Json(json!({"status": failing, "error": "failing"})),
        )
            .into_response();
    }
    let key = headers
        .get("apikey")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let owned = state.tokens.lock().unwrap().get(key).cloned();
    match owned {
        Some(names) => {
            let rows: Vec<Value> = names
                .iter()
                .map(|name| json!({"id": format!("id-{name}"), "name": name, "connectionStatus": "open", "token": key}))
                .collect();
            axum::Json(rows).into_response()
        }
        None => (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"status": 401, "error": "Unauthorized", "response": {"message": "Unauthorized"}})),
        )
            .into_response(),
    }
}

/// Records any other call and answers like Evolution would, echoing what it got.
async fn record(State(state): State<Arc<FakeState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let recorded = Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers.clone(),
        body: body.clone(),
    };
    state.requests.lock().unwrap().push(recorded.clone());
    let delay = state.delay_ms.load(Ordering::SeqCst) as u64;
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let parsed = recorded.json();
    if parts.uri.path().starts_with("/message/sendText/") && parsed.get("number").is_none() {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"status": 400, "error": "Bad Request",
                               "response": {"message": [["instance requires property \"number\""]]}})),
        )
            .into_response();
    }
    if parts.uri.path() == "/text" {
        return (StatusCode::OK, "plain text answer").into_response();
    }
    if parts.uri.path().starts_with("/raw/") {
        // Keys unsorted and a number serde_json's `Value` would respell, as Evolution writes.
        return (
            StatusCode::CREATED,
            [(http::header::CONTENT_TYPE, "application/json")],
            RAW_ANSWER,
        )
            .into_response();
    }
    let status = if parts.method == http::Method::POST {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut response = (
        status,
        axum::Json(json!({
            "method": recorded.method,
            "path": recorded.path,
            "query": recorded.query,
            "body": parsed,
            "apikey": recorded.header("apikey"),
        })),
    )
        .into_response();
    response
        .headers_mut()
        .insert("x-fake-evolution", "1".parse().unwrap());
    response
}

async fn stream_echo(body: Body) -> Response {
    Response::new(body)
}

async fn stream_download(request: Request) -> Response {
    let bytes: usize = request
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("bytes="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1024);
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let chunks = bytes / chunk.len();
    let stream = futures_util::stream::iter(
        (0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    Response::new(Body::from_stream(stream))
}

async fn slow_headers() -> Response {
    tokio::time::sleep(Duration::from_secs(30)).await;
    StatusCode::OK.into_response()
}

async fn stall_body() -> Response {
    let stream = futures_util::stream::unfold(0u8, |n| async move {
        if n == 0 {
            Some((
                Ok::<_, std::io::Error>(Bytes::from_static(b"first chunk")),
                1,
            ))
        } else {
            tokio::time::sleep(Duration::from_secs(60)).await;
            None
        }
    });
    Response::new(Body::from_stream(stream))
}

// === The official socket.io-client ===

/// One `node tests/js/driver.js` process hosting any number of clients.
pub struct JsDriver {
    child: Child,
    stdin: ChildStdin,
    reports: mpsc::UnboundedReceiver<Value>,
    /// Reports read but not yet matched by a wait.
    pending: Vec<Value>,
    next_request: usize,
}

impl JsDriver {
    pub async fn start() -> Self {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js");
        assert!(
            dir.join("node_modules/socket.io-client").is_dir(),
            "socket.io-client is not installed: run `tests/setup.sh`"
        );
        let mut child = Command::new("node")
            .arg(dir.join("driver.js"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node is installed");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, reports) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(report) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(report);
                }
            }
        });
        Self {
            child,
            stdin,
            reports,
            pending: Vec::new(),
            next_request: 0,
        }
    }

    async fn send(&mut self, command: Value) {
        let mut line = command.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// Opens a client; `opts` are socket.io-client options (`transports`, `query`, `auth`, ...).
    pub async fn open(&mut self, id: &str, url: &str, opts: Value) {
        self.send(json!({"op": "connect", "id": id, "url": url, "opts": opts}))
            .await;
    }

    /// Opens a client that opts in to recovery: `auth` gets `offset` (the last one seen,
    /// `""` at first), re-evaluated at every reconnect.
    pub async fn open_recovering(&mut self, id: &str, url: &str, opts: Value) {
        self.send(json!({"op": "connect", "id": id, "url": url, "opts": opts, "recover": true}))
            .await;
    }

    /// Like [`Self::open_recovering`], starting from a given offset.
    pub async fn open_from(&mut self, id: &str, url: &str, opts: Value, offset: &str) {
        self.send(json!({"op": "connect", "id": id, "url": url, "opts": opts, "recover": offset}))
            .await;
    }

    /// A quiet, recovering client: it counts `data.n` of its events instead of reporting them.
    pub async fn open_counting(&mut self, id: &str, url: &str, opts: Value) {
        self.send(json!({"op": "connect", "id": id, "url": url, "opts": opts, "recover": true, "quiet": true}))
            .await;
    }

    /// A quiet client that does not opt in: it counts `data.n` of its one-argument events.
    pub async fn open_quiet(&mut self, id: &str, url: &str, opts: Value) {
        self.send(json!({"op": "connect", "id": id, "url": url, "opts": opts, "quiet": true}))
            .await;
    }

    /// What a quiet client counted: `count`, `unique`, `ordered`, `recoveries`, `connects`.
    pub async fn summary(&mut self, id: &str) -> Value {
        self.send(json!({"op": "summary", "id": id})).await;
        let id = id.to_owned();
        self.wait(move |r| r["id"] == id && r["type"] == "summary")
            .await
    }

    /// Waits (up to 30 s) until every quiet counting client has every one of `total`
    /// events, asserting none missed, none twice and all in order; returns the reconnects.
    pub async fn assert_all_delivered(&mut self, clients: &[String], total: u64) -> u64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut reconnects = 0;
        for id in clients {
            loop {
                let summary = self.summary(id).await;
                if summary["unique"] == total || tokio::time::Instant::now() > deadline {
                    assert_eq!(summary["unique"], total, "{id} missed events: {summary}");
                    assert_eq!(summary["count"], total, "{id} got duplicates: {summary}");
                    assert_eq!(summary["ordered"], true, "{id}: {summary}");
                    reconnects += summary["connects"].as_u64().unwrap() - 1;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        reconnects
    }

    /// Drops a client's transport; with `reconnection: true` it comes back by itself.
    pub async fn blink(&mut self, id: &str) {
        self.send(json!({"op": "blink", "id": id})).await;
        let id = id.to_owned();
        self.wait(move |r| r["id"] == id && r["type"] == "blinked")
            .await;
    }

    pub async fn churn(&mut self, id: &str, min_ms: u64, max_ms: u64) {
        self.send(json!({"op": "churn", "id": id, "min": min_ms, "max": max_ms}))
            .await;
    }

    pub async fn stop_churn(&mut self, id: &str) {
        self.send(json!({"op": "stop_churn", "id": id})).await;
    }

    /// Takes every report received so far for which `matches` holds (none are awaited).
    pub fn drain_matching(&mut self, matches: impl Fn(&Value) -> bool) -> Vec<Value> {
        while let Ok(report) = self.reports.try_recv() {
            self.pending.push(report);
        }
        let (taken, kept): (Vec<Value>, Vec<Value>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|r| matches(r));
        self.pending = kept;
        taken
    }

    /// Opens a client and waits until it is connected or refused; returns the report.
    pub async fn connect(&mut self, id: &str, url: &str, opts: Value) -> Value {
        self.open(id, url, opts).await;
        self.wait_connected(id).await
    }

    pub async fn wait_connected(&mut self, id: &str) -> Value {
        let id = id.to_owned();
        self.wait(move |r| {
            r["id"] == id && (r["type"] == "connect" || r["type"] == "connect_error")
        })
        .await
    }

    pub async fn close(&mut self, id: &str) {
        self.send(json!({"op": "close", "id": id})).await;
        let id = id.to_owned();
        self.wait(move |r| r["id"] == id && r["type"] == "closed")
            .await;
    }

    /// Emits with an ack and returns the ack's arguments (parsed).
    pub async fn emit_ack(&mut self, id: &str, event: &str, args: Vec<Value>) -> Value {
        let req = self.start_emit(id, event, args).await;
        self.wait_ack(req).await
    }

    /// Emits with an ack without waiting for it; [`Self::wait_ack`] collects it.
    pub async fn start_emit(&mut self, id: &str, event: &str, args: Vec<Value>) -> String {
        self.next_request += 1;
        let req = format!("r{}", self.next_request);
        self.send(json!({"op": "emit", "id": id, "req": req, "event": event, "args": args, "ack": true, "timeout": 15000}))
            .await;
        req
    }

    pub async fn wait_ack(&mut self, req: String) -> Value {
        let report = self
            .wait(move |r| r["req"] == req && (r["type"] == "ack" || r["type"] == "ack_timeout"))
            .await;
        assert_eq!(report["type"], "ack", "no ack: {report}");
        serde_json::from_str(report["text"].as_str().unwrap()).unwrap()
    }

    /// Emits without an ack.
    pub async fn emit(&mut self, id: &str, event: &str, args: Vec<Value>) {
        self.next_request += 1;
        let req = format!("r{}", self.next_request);
        self.send(
            json!({"op": "emit", "id": id, "req": req, "event": event, "args": args, "ack": false}),
        )
        .await;
        self.wait(move |r| r["req"] == req && r["type"] == "emitted")
            .await;
    }

    /// Evolution's own emit of a fixture, computed by the reference algorithm in Node.
    pub async fn expected(&mut self, path: &std::path::Path) -> String {
        let file = path.to_string_lossy().into_owned();
        self.send(json!({"op": "expect", "file": file})).await;
        let report = self
            .wait(move |r| r["type"] == "expected" && r["file"] == file)
            .await;
        report["text"].as_str().unwrap().to_owned()
    }

    /// Waits for an event on a client; returns `(event, JSON text of the arguments)`.
    pub async fn next_event(&mut self, id: &str) -> (String, String) {
        let id = id.to_owned();
        let report = self
            .wait(move |r| r["id"] == id && r["type"] == "event")
            .await;
        (
            report["event"].as_str().unwrap().to_owned(),
            report["text"].as_str().unwrap().to_owned(),
        )
    }

    /// Waits for the first report matching `matches`, keeping the others for later waits.
    pub async fn wait(&mut self, matches: impl Fn(&Value) -> bool) -> Value {
        self.wait_for(matches, PATIENCE)
            .await
            .unwrap_or_else(|| panic!("timed out; unmatched reports: {:#?}", self.pending))
    }

    pub async fn wait_for(
        &mut self,
        matches: impl Fn(&Value) -> bool,
        patience: Duration,
    ) -> Option<Value> {
        if let Some(index) = self.pending.iter().position(&matches) {
            return Some(self.pending.remove(index));
        }
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            match tokio::time::timeout_at(deadline, self.reports.recv()).await {
                Ok(Some(report)) if matches(&report) => return Some(report),
                Ok(Some(report)) => self.pending.push(report),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Asserts that no event reaches client `id` within `quiet`.
    pub async fn assert_no_event(&mut self, id: &str, quiet: Duration) {
        let id = id.to_owned();
        let got = self
            .wait_for(move |r| r["id"] == id && r["type"] == "event", quiet)
            .await;
        assert!(got.is_none(), "unexpected event: {got:?}");
    }

    pub async fn shutdown(mut self) {
        drop(self.stdin);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// socket.io-client options for one transport with a key in the query.
pub fn with_key(transport: &str, key: &str) -> Value {
    json!({"transports": [transport], "query": {"apikey": key}})
}

// === JWTs as Evolution signs them ===

/// The webhook credential of `instance` under `master`, computed independently of the
/// sidecar: lowercase hex of HMAC-SHA256(master, instance), as the README documents it.
pub fn webhook_credential(master: &str, instance: &str) -> String {
    use aws_lc_rs::hmac;
    let key = hmac::Key::new(hmac::HMAC_SHA256, master.as_bytes());
    let tag = hmac::sign(&key, instance.as_bytes());
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

pub fn evolution_jwt(secret: &str, issued_ago_secs: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let iat = now - issued_ago_secs;
    let claims = json!({"iat": iat, "exp": iat + 600, "app": "evolution", "action": "webhook"});
    sign_jwt(secret, &claims)
}

pub fn sign_jwt(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// An unsigned token (`alg: none`), which must never be accepted.
pub fn unsigned_jwt(claims: &Value) -> String {
    let header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = base64url(claims.to_string().as_bytes());
    format!("{header}.{payload}.")
}

pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

// === A real Redis, on a free port, for this test only ===

pub struct RedisServer {
    child: Option<std::process::Child>,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port)
    }

    /// Starts `redis-server` on `port`, with nothing persisted, and waits for PONG.
    pub fn start_on(port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs it)");
        let server = Self {
            child: Some(child),
            port,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + PATIENCE;
        while !server.answers() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (no shutdown, no save), as a crash or a network cut would look.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A test config in Redis mode.
pub fn redis_config(upstream_url: &str, redis: &RedisServer) -> Config {
    let mut config = test_config(upstream_url);
    config.redis.url = Some(Secret::new(redis.url()));
    config
}
