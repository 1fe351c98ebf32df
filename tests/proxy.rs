//! Everything that is not socket.io or `/_sidecar/*` streams to Evolution API.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use http::StatusCode;
use serde_json::{Value, json};

/// The fake, plus what only these tests ask of it: a streaming echo, a download of
/// `?bytes=` bytes, headers that take 30 s and a body that stalls after its first chunk.
async fn streaming_evolution() -> FakeEvolution {
    FakeEvolution::builder()
        .route("/stream/echo", post(stream_echo))
        .route("/stream/download", get(stream_download))
        .route("/slow-headers", any(slow_headers))
        .route("/stall-body", get(stall_body))
        .start()
        .await
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

#[tokio::test]
async fn get_post_and_delete_with_a_body_pass_through() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;

    let response = http()
        .get(app.url("/instance/connectionState/acme?x=1&y=%20"))
        .header("apikey", "k1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response.headers()["x-fake-evolution"],
        "1",
        "response headers come back"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["method"], "GET");
    assert_eq!(body["path"], "/instance/connectionState/acme");
    assert_eq!(body["query"], "x=1&y=%20");
    assert_eq!(body["apikey"], "k1");

    let response = http()
        .post(app.url("/message/sendText/acme"))
        .header("apikey", "k2")
        .json(&json!({"number": "1", "text": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["body"], json!({"number": "1", "text": "hi"}));

    let response = http()
        .delete(app.url("/chat/deleteMessageForEveryone/acme"))
        .json(&json!({"id": "3EB0"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        (body["method"].as_str(), &body["body"]),
        (Some("DELETE"), &json!({"id": "3EB0"}))
    );

    // Upstream statuses come back as they are.
    let response = http()
        .post(app.url("/message/sendText/acme"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    assert_eq!(evolution.requests().len(), 4);
}

#[tokio::test]
async fn headers_hop_by_hop_and_x_forwarded() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    let response = http()
        .get(app.url("/chat/findChats/acme"))
        .header("x-custom", "kept")
        .header("x-forwarded-for", "203.0.113.9")
        .header("connection", "x-drop-me")
        .header("x-drop-me", "1")
        .header("origin", "https://dashboard.example")
        .send()
        .await
        .unwrap();
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none(),
        "the proxy adds no CORS header"
    );
    let recorded = evolution.requests().pop().unwrap();
    assert_eq!(recorded.header("x-custom"), Some("kept"));
    assert_eq!(
        recorded.header("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(recorded.header("x-forwarded-proto"), Some("http"));
    assert_eq!(
        recorded.header("x-forwarded-host"),
        Some(app.addr.to_string().as_str())
    );
    assert_eq!(
        recorded.header("host"),
        Some(evolution.addr.to_string().as_str())
    );
    assert_eq!(
        recorded.header("x-drop-me"),
        None,
        "headers named in Connection are hop-by-hop"
    );
    assert_eq!(recorded.header("origin"), Some("https://dashboard.example"));
}

/// The request and response bodies stream in lockstep: each chunk must come back through
/// the proxy before the next is sent, which a proxy that buffered either body could not do.
#[tokio::test]
async fn large_bodies_stream_both_ways() {
    let evolution = streaming_evolution().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let upload = tokio_stream(rx);
    let url = app.url("/stream/echo");
    let chunk = Bytes::from(vec![b'z'; 1024 * 1024]);
    tx.send(Ok(chunk.clone())).await.unwrap();
    let response = tokio::time::timeout(
        PATIENCE,
        http()
            .post(&url)
            .body(reqwest::Body::wrap_stream(upload))
            .send(),
    )
    .await
    .expect("response headers before the upload ended")
    .unwrap();
    let mut download = response.bytes_stream();
    let chunks = 64; // 64 MiB through the proxy
    let mut received = 0usize;
    for sent in 1..=chunks {
        // Read until everything sent so far has come back.
        while received < sent * chunk.len() {
            let piece = tokio::time::timeout(PATIENCE, download.next())
                .await
                .expect("the echo streams back while the upload continues")
                .unwrap()
                .unwrap();
            received += piece.len();
        }
        if sent < chunks {
            tx.send(Ok(chunk.clone())).await.unwrap();
        }
    }
    drop(tx);
    while let Some(piece) = download.next().await {
        received += piece.unwrap().len();
    }
    assert_eq!(received, chunks * chunk.len());

    // A 100 MiB download arrives whole.
    let response = http()
        .get(app.url("/stream/download?bytes=104857600"))
        .send()
        .await
        .unwrap();
    let mut total = 0usize;
    let mut stream = response.bytes_stream();
    while let Some(piece) = stream.next().await {
        total += piece.unwrap().len();
    }
    assert_eq!(total, 100 * 1024 * 1024);
}

fn tokio_stream(
    mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn unreachable_is_502_and_slow_is_504() {
    let closed = free_port();
    let app = spawn_app(test_config(&format!("http://{closed}"))).await;
    let response = http()
        .get(app.url("/instance/fetchInstances"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "upstream unreachable");

    let evolution = streaming_evolution().await;
    let mut config = test_config(&evolution.url());
    config.upstream.timeout_secs = 1;
    let app = spawn_app(config).await;
    let started = std::time::Instant::now();
    let response = http().get(app.url("/slow-headers")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 504);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("did not answer"));
    assert!(started.elapsed() < Duration::from_secs(5));

    // A body that goes idle is cut after the timeout, not held forever.
    let response = http().get(app.url("/stall-body")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let outcome = tokio::time::timeout(PATIENCE, response.bytes())
        .await
        .expect("cut, not held");
    assert!(outcome.is_err(), "the stalled body ends in an error");
}

#[tokio::test]
async fn sidecar_paths_are_never_proxied() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.webhook.path = "/hooks/evolution".into();
    let app = spawn_app(config).await;
    for (method, path, status) in [
        ("GET", "/hooks/evolution", 405),
        ("PUT", "/hooks/evolution/messages-upsert", 405),
        ("GET", "/_sidecar/unknown", 404),
        ("GET", "/_sidecar", 404),
    ] {
        let response = http()
            .request(method.parse().unwrap(), app.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{method} {path}");
    }
    let response = http()
        .get(app.url("/_sidecar/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        evolution.requests().is_empty(),
        "{:?}",
        evolution.requests()
    );
    // The default webhook path is proxied once the webhook moved elsewhere.
    let response = http()
        .get(app.url("/webhook/find/acme"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(evolution.requests().len(), 1);
}
