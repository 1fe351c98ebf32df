//! Posting webhooks, the fixtures and minimal bodies.

use std::path::PathBuf;

use serde_json::{Value, json};

use super::app::http;

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
