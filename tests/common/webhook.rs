//! Posting webhooks: over TCP, or in process through the app's router, and the bodies.

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::app::http;

/// Where [`super::test_config`] has the app take webhooks.
pub const WEBHOOK_PATH: &str = "/_sidecar/webhook";

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

/// One webhook request and the answer it must get: exactly `status`, and a JSON body
/// whose `error` contains `error`.
pub struct WebhookRow {
    pub what: &'static str,
    /// The path and query, e.g. [`WEBHOOK_PATH`].
    pub path: String,
    pub body: Vec<u8>,
    pub content_type: &'static str,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    pub status: u16,
    pub error: &'static str,
}

/// POSTs a webhook in process through `router`, as the server would hand it over: with a
/// `Content-Length` and the peer address (127.0.0.1) in `ConnectInfo`. Returns status and
/// JSON body (`Null` if it is not JSON).
pub async fn post_webhook_in_process(
    router: &Router,
    path: &str,
    body: Vec<u8>,
    content_type: &str,
    authorization: Option<&str>,
) -> (u16, Value) {
    let mut request = http::Request::post(path)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len());
    if let Some(authorization) = authorization {
        request = request.header(http::header::AUTHORIZATION, authorization);
    }
    let mut request = request.body(Body::from(body)).unwrap();
    let peer = SocketAddr::from(([127, 0, 0, 1], 40_000));
    request.extensions_mut().insert(ConnectInfo(peer));
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Sends every row in process through `router` and checks its answer.
pub async fn check_webhook_rows(router: &Router, rows: Vec<WebhookRow>) {
    for row in rows {
        let what = row.what;
        let (status, reply) = post_webhook_in_process(
            router,
            &row.path,
            row.body,
            row.content_type,
            row.authorization.as_deref(),
        )
        .await;
        assert_eq!(status, row.status, "{what}");
        let message = reply["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no JSON error: {reply}"));
        assert!(
            message.contains(row.error),
            "{what}: {message:?} lacks {:?}",
            row.error
        );
    }
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
