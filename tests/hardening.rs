//! Hostile input and floods: handshake rate limits, the connection cap, slow bodies,
//! malformed socket.io packets, and a client that stops reading.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

async fn handshake(app: &TestApp, key: &str, forwarded_for: Option<&str>) -> u16 {
    let mut request =
        http().get(app.url(&format!("/socket.io/?EIO=4&transport=polling&apikey={key}")));
    if let Some(ip) = forwarded_for {
        request = request.header("x-forwarded-for", ip);
    }
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn a_flood_of_bad_keys_is_rate_limited_per_client_ip() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.guard.handshake_rate_per_ip = 1;
    config.guard.handshake_burst_per_ip = 5;
    let app = spawn_app(config).await;
    let mut statuses = Vec::new();
    for i in 0..30 {
        statuses.push(handshake(&app, &format!("bad-key-{i}"), None).await);
    }
    // The burst of 5, plus at most a token or two refilled (1/s) on a slow machine.
    let refused = statuses.iter().filter(|s| **s == 403).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(
        (5..=7).contains(&refused) && refused + limited == 30,
        "{statuses:?}"
    );
    assert!(
        evolution.lookups() <= refused,
        "the flood did not become upstream lookups: {}",
        evolution.lookups()
    );
    // X-Forwarded-For from an untrusted peer is ignored: still limited.
    assert_eq!(handshake(&app, "k", Some("198.51.100.7")).await, 429);

    // Behind a trusted proxy, each forwarded client has its own bucket.
    let mut config = test_config(&evolution.url());
    config.guard.handshake_rate_per_ip = 1;
    config.guard.handshake_burst_per_ip = 1;
    config.guard.trusted_proxies = vec!["127.0.0.0/8".into()];
    let app = spawn_app(config).await;
    for i in 0..10 {
        let client = format!("198.51.100.{i}");
        assert_eq!(
            handshake(&app, GLOBAL_KEY, Some(&client)).await,
            200,
            "{client}"
        );
    }
    assert_eq!(
        handshake(&app, GLOBAL_KEY, Some("198.51.100.0")).await,
        429,
        "same client again"
    );
}

#[tokio::test]
async fn past_the_connection_cap_handshakes_get_503() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.guard.max_connections = 3;
    let app = spawn_app(config).await;
    let mut js = JsDriver::start().await;
    for id in ["a", "b", "c"] {
        assert_eq!(
            js.connect(id, &app.url("/acme"), with_key("websocket", GLOBAL_KEY))
                .await["type"],
            "connect"
        );
    }
    let response = http()
        .get(app.url(&format!(
            "/socket.io/?EIO=4&transport=polling&apikey={GLOBAL_KEY}"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert!(
        response.json::<Value>().await.unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("connection limit")
    );
    js.close("a").await;
    eventually_value("room freed", PATIENCE, async || {
        let report = js
            .connect("d", &app.url("/acme"), with_key("websocket", GLOBAL_KEY))
            .await;
        if report["type"] == "connect" {
            return Ok(());
        }
        js.close("d").await;
        Err(report)
    })
    .await;
    js.shutdown().await;
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_cut_off_with_408() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.webhook.read_timeout_secs = 1;
    let app = spawn_app(config).await;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = "POST /_sidecar/webhook HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"event\":";
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut reply = vec![0u8; 1024];
    let n = tokio::time::timeout(PATIENCE, stream.read(&mut reply))
        .await
        .expect("answered")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]).into_owned();
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(
        reply.contains(r#"{"error":"body did not arrive within 1 seconds"}"#),
        "{reply}"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
}

/// A raw Engine.IO websocket client joined to `/acme`.
async fn raw_client(
    app: &TestApp,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = format!(
        "ws://{}/socket.io/?EIO=4&transport=websocket&apikey={GLOBAL_KEY}",
        app.addr
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let open = socket.next().await.unwrap().unwrap();
    assert!(open.to_text().unwrap().starts_with("0{"), "{open:?}");
    socket.send(Message::text("40/acme,")).await.unwrap();
    loop {
        let frame = socket.next().await.unwrap().unwrap();
        let text = frame.to_text().unwrap().to_owned();
        if text == "2" {
            socket.send(Message::text("3")).await.unwrap();
            continue;
        }
        assert!(text.starts_with("40/acme,{\"sid\""), "{text}");
        return socket;
    }
}

#[tokio::test]
async fn malformed_packets_hurt_no_one_else() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.hub.max_emit_bytes = 64 * 1024;
    let app = spawn_app(config).await;
    let mut js = JsDriver::start().await;
    js.connect(
        "healthy",
        &app.url("/acme"),
        with_key("websocket", GLOBAL_KEY),
    )
    .await;

    let oversized = format!(
        "42/acme,[\"message/sendText\",{{\"text\":\"{}\"}}]",
        "x".repeat(100 * 1024)
    );
    let garbage: Vec<Message> = vec![
        Message::text("42/acme,["),
        Message::text("42/acme,{\"not\":\"an array\"}"),
        Message::text("4x"),
        Message::text("99999999999"),
        Message::text("42/nowhere,[\"x\"]"),
        Message::text("451-/acme,[\"message/sendText\",{\"_placeholder\":true,\"num\":0}]"),
        Message::binary(vec![0xff, 0x00, 0x13, 0x37]),
        Message::text(oversized),
    ];
    for (i, packet) in garbage.into_iter().enumerate() {
        let mut raw = raw_client(&app).await;
        raw.send(packet).await.unwrap();
        // Whatever becomes of that connection, the process and the other client carry on.
        post_webhook(&app.webhook_url(), event_body("call", "acme", i as u64)).await;
        assert_eq!(
            js.next_event("healthy").await.0,
            "call",
            "after garbage #{i}"
        );
        assert_eq!(
            http()
                .get(app.url("/_sidecar/healthz"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    js.shutdown().await;
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0)
}

/// A client that joins and never reads while 3,000 events of 16 KB flow to 20 healthy
/// clients: they get every event, the slow one is cut off by the heartbeat, and memory
/// stays bounded (its queue is `socket_buffer` packets that share the broadcast's bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_bounded_and_cut_off() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.hub.socket_buffer = 256;
    config.hub.ping_interval_secs = 2;
    config.hub.ping_timeout_secs = 2;
    config.webhook.max_body_bytes = 1024 * 1024;
    let app = spawn_app(config).await;
    let mut js = JsDriver::start().await;
    let ids: Vec<String> = (0..20).map(|i| format!("h{i}")).collect();
    for id in &ids {
        js.open_quiet(id, &app.url("/acme"), with_key("websocket", GLOBAL_KEY))
            .await;
        assert_eq!(js.wait_connected(id).await["type"], "connect");
    }
    let slow = raw_client(&app).await; // joined, and never read again
    let before = rss_kib();
    let mut peak = before;
    let pad = "p".repeat(16 * 1024);
    let total = 3000u64;
    for n in 0..total {
        let body =
            json!({"event": "messages.upsert", "instance": "acme", "data": {"n": n, "pad": pad}})
                .to_string();
        assert_eq!(post_webhook(&app.webhook_url(), body).await.0, 200);
        if n % 100 == 0 {
            peak = peak.max(rss_kib());
        }
    }
    let patience = Duration::from_secs(30);
    let started = Instant::now();
    for id in &ids {
        let left = patience.saturating_sub(started.elapsed());
        eventually_value(&format!("{id} gets all {total}"), left, async || {
            let summary = js.summary(id).await;
            if summary["unique"] == total {
                Ok(())
            } else {
                Err(format!("{id}: {summary}"))
            }
        })
        .await;
    }
    peak = peak.max(rss_kib());
    // The slow client's connection is closed by the server: reading it now ends.
    let (_, mut reader) = slow.split();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(frame) = reader.next().await {
            if frame.is_err() || matches!(frame, Ok(Message::Close(_))) {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the slow client was never disconnected");
    let grown_mib = peak.saturating_sub(before) / 1024;
    println!(
        "slow consumer: RSS before {} MiB, peak {} MiB (+{grown_mib} MiB) for 3000 x 16 KB",
        before / 1024,
        peak / 1024
    );
    // Retention holds the 48 MB of payloads; the slow socket adds at most 256 packets.
    assert!(grown_mib < 160, "memory grew by {grown_mib} MiB");
    js.shutdown().await;
}
