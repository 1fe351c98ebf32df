//! A fake Evolution API that records what it gets: key lookups
//! (`/instance/fetchInstances`) and every other call, answered as Evolution would. A test
//! that needs more adds its own routes through [`FakeEvolution::builder`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};

pub const GLOBAL_KEY: &str = "global-key-0123";
pub const ACME_TOKEN: &str = "acme-token-4567";
pub const OTHER_TOKEN: &str = "other-token-8910";
/// Evolution 2.4's answer on every business route until its license is activated
/// (`src/licensing/runtime.ts`, `gateMiddleware`), byte for byte.
pub const LICENSE_REQUIRED_ANSWER: &str = r#"{"error":"service not activated","code":"LICENSE_REQUIRED","register_url":"http://evo.example.com/manager/login","instance_id":"hw-1f2e3d","docs_url":"https://doc.evolution-api.com","message":"This Evolution API instance is not activated. Open http://evo.example.com/manager/login to activate, or set AUTHENTICATION_API_KEY in your .env with a valid licensing key. Docs: https://doc.evolution-api.com"}"#;
/// What the fake answers on `/raw/...`, byte for byte.
pub const RAW_ANSWER: &str =
    r#"{"status":201,"error":null,"response":{"zeta":1,"alpha":100000000000000000000,"n":1.50}}"#;

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
    /// An Evolution 2.4 whose license is not activated: business routes answer 503
    /// `LICENSE_REQUIRED`, `/license/status` says `inactive`.
    pub unlicensed: std::sync::atomic::AtomicBool,
}

/// Evolution 2.4's license gate: what it answers instead of `path`, if anything.
fn license_gate(state: &FakeState, path: &str) -> Option<Response> {
    if path == "/license/status" {
        let status = if state.unlicensed.load(Ordering::SeqCst) {
            "inactive"
        } else {
            "active"
        };
        return Some(
            axum::Json(json!({"status": status, "instance_id": "hw-1f2e3d"})).into_response(),
        );
    }
    let open = path == "/" || path.starts_with("/manager") || path.starts_with("/license/");
    (state.unlicensed.load(Ordering::SeqCst) && !open).then(|| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(
                http::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            )],
            LICENSE_REQUIRED_ANSWER,
        )
            .into_response()
    })
}

pub struct FakeEvolution {
    pub addr: SocketAddr,
    pub state: Arc<FakeState>,
    handle: tokio::task::JoinHandle<()>,
}

/// How [`FakeEvolution`] starts: its state, its address and any routes of the test's own.
pub struct FakeEvolutionBuilder {
    state: Arc<FakeState>,
    addr: SocketAddr,
    routes: Router<Arc<FakeState>>,
}

impl FakeEvolutionBuilder {
    /// Answers `path` with `handler` (it is not recorded), ahead of the recording fallback.
    pub fn route(mut self, path: &str, handler: MethodRouter<Arc<FakeState>>) -> Self {
        self.routes = self.routes.route(path, handler);
        self
    }

    /// Shares an existing state (to restart a stopped fake with what it knew).
    pub fn state(mut self, state: Arc<FakeState>) -> Self {
        self.state = state;
        self
    }

    /// Listens on `addr` (to restart a stopped fake on the same port).
    pub fn at(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    pub async fn start(self) -> FakeEvolution {
        let router = self
            .routes
            .route("/instance/fetchInstances", get(fetch_instances))
            .fallback(record)
            .with_state(self.state.clone());
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        FakeEvolution {
            addr,
            state: self.state,
            handle,
        }
    }
}

impl FakeEvolution {
    /// A fake on a free port that knows the global key and two instance tokens (acme,
    /// other); add routes, then [`FakeEvolutionBuilder::start`].
    pub fn builder() -> FakeEvolutionBuilder {
        let state = Arc::new(FakeState::default());
        {
            let mut tokens = state.tokens.lock().unwrap();
            tokens.insert(ACME_TOKEN.into(), vec!["acme".into()]);
            tokens.insert(OTHER_TOKEN.into(), vec!["other".into()]);
        }
        FakeEvolutionBuilder {
            state,
            addr: "127.0.0.1:0".parse().unwrap(),
            routes: Router::new(),
        }
    }

    /// Starts the fake with the global key and two instance tokens (acme, other).
    pub async fn start() -> Self {
        Self::builder().start().await
    }

    /// Starts on a given address (to restart a stopped fake on the same port).
    pub async fn start_with(state: Arc<FakeState>, addr: SocketAddr) -> Self {
        Self::builder().state(state).at(addr).start().await
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
    if let Some(gate) = license_gate(&state, "/instance/fetchInstances") {
        return gate;
    }
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
    if let Some(gate) = license_gate(&state, parts.uri.path()) {
        return gate;
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
