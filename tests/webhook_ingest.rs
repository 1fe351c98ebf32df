//! Webhooks in, socket.io events out, as seen by the official socket.io-client.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const FIXTURES: [&str; 8] = [
    "messages-upsert.json",
    "connection-update.json",
    "qrcode-updated.json",
    "presence-update.json",
    "send-message.json",
    "messages-update.json",
    // Evolution 2.3.7: `extra` (`isLatest`, `progress`) spread first, before `event`.
    "messages-set.json",
    // Evolution 2.4.0's new event.
    "messaging-history-set.json",
];

#[tokio::test]
async fn every_fixture_arrives_as_evolution_emits_it_on_both_transports() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    let mut js = JsDriver::start().await;
    let ns = app.url("/acme-support");
    for (id, transport) in [("ws", "websocket"), ("poll", "polling")] {
        let report = js.connect(id, &ns, with_key(transport, GLOBAL_KEY)).await;
        assert_eq!(report["type"], "connect", "{report}");
    }

    for name in FIXTURES {
        let path = fixtures_dir().join(name);
        let expected = format!("[{}]", js.expected(&path).await);
        let body = std::fs::read(&path).unwrap();
        let event: Value = serde_json::from_slice(&body).unwrap();
        let (status, reply) = post_webhook(&app.webhook_url(), body).await;
        assert_eq!((status, reply), (200, json!({"ok": true})), "{name}");
        for id in ["ws", "poll"] {
            let (got_event, text) = js.next_event(id).await;
            assert_eq!(
                got_event,
                event["event"].as_str().unwrap(),
                "{name} on {id}"
            );
            assert_eq!(
                text, expected,
                "{name} on {id}: key order and values must match"
            );
            if name == "messages-set.json" {
                assert!(
                    text.starts_with(r#"[{"isLatest":false,"progress":42,"event":"#),
                    "extra keys come first: {text}"
                );
            }
        }
    }
    js.shutdown().await;
    app.stop().await;
}

#[tokio::test]
async fn a_namespace_works_before_its_first_event_and_other_instances_stay_apart() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    let mut js = JsDriver::start().await;
    js.connect(
        "a",
        &app.url("/brand-new"),
        with_key("websocket", GLOBAL_KEY),
    )
    .await;
    js.connect(
        "b",
        &app.url("/elsewhere"),
        with_key("websocket", GLOBAL_KEY),
    )
    .await;

    let (status, _) = post_webhook(&app.webhook_url(), event_body("call", "brand-new", 1)).await;
    assert_eq!(status, 200);
    let (event, text) = js.next_event("a").await;
    assert_eq!(event, "call");
    assert!(text.contains(r#""instance":"brand-new""#));
    js.assert_no_event("b", Duration::from_millis(300)).await;
    js.shutdown().await;
}

#[tokio::test]
async fn global_events_reach_the_root_namespace_only_when_enabled() {
    let evolution = FakeEvolution::start().await;
    for global in [true, false] {
        let mut config = test_config(&evolution.url());
        config.hub.global_events = global;
        let app = spawn_app(config).await;
        let mut js = JsDriver::start().await;
        let report = js
            .connect("root", &app.url("/"), with_key("websocket", GLOBAL_KEY))
            .await;
        assert_eq!(report["type"], "connect");
        let body = fixture("connection-update.json");
        assert_eq!(post_webhook(&app.webhook_url(), body).await.0, 200);
        if global {
            let (event, text) = js.next_event("root").await;
            assert_eq!(event, "connection.update");
            assert!(text.starts_with(r#"[{"event":"connection.update","instance":"acme-support""#));
        } else {
            js.assert_no_event("root", Duration::from_millis(400)).await;
        }
        js.shutdown().await;
        app.stop().await;
    }
}

#[tokio::test]
async fn by_events_urls_with_and_without_path_token() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.webhook.path_token = Some(evolution_realtime_secret("pathtok"));
    let app = spawn_app(config).await;
    let mut js = JsDriver::start().await;
    js.connect("c", &app.url("/acme"), with_key("websocket", GLOBAL_KEY))
        .await;

    // Distinct bodies: an identical one would be recognized as a retry and not emitted.
    let mut n = 0;
    let mut body = || {
        n += 1;
        event_body("messages.upsert", "acme", n)
    };
    let base = app.webhook_url();
    // With the token (Evolution's global webhook), with and without a by-events suffix,
    // and with the doubled slash a trailing '/' in WEBHOOK_GLOBAL_URL produces.
    for url in [
        format!("{base}/pathtok"),
        format!("{base}/pathtok/messages-upsert"),
        format!("{base}/pathtok//messages-upsert"),
        format!("{base}//pathtok/messages-upsert"),
    ] {
        let (status, reply) = post_webhook(&url, body()).await;
        assert_eq!(status, 200, "{url}: {reply}");
        let (event, _) = js.next_event("c").await;
        assert_eq!(event, "messages.upsert");
    }
    // A suffix that disagrees with the body's event.
    let (status, reply) = post_webhook(&format!("{base}/pathtok/messages-update"), body()).await;
    assert_eq!(status, 422);
    assert!(
        reply["error"].as_str().unwrap().contains("messages-upsert"),
        "{reply}"
    );
    // Without the token, no credential: refused.
    let (status, _) = post_webhook(&format!("{base}/messages-upsert"), body()).await;
    assert_eq!(status, 401);
    js.assert_no_event("c", Duration::from_millis(300)).await;
    js.shutdown().await;
}

#[tokio::test]
async fn by_events_urls_without_credentials() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    let mut js = JsDriver::start().await;
    js.connect("c", &app.url("/acme"), with_key("websocket", GLOBAL_KEY))
        .await;
    let base = app.webhook_url();
    for (url, event) in [
        (
            format!("{base}/group-participants-update"),
            "group-participants.update",
        ),
        (format!("{base}//connection-update"), "connection.update"),
        (format!("{base}/"), "call"),
    ] {
        let (status, reply) = post_webhook(&url, event_body(event, "acme", 1)).await;
        assert_eq!(status, 200, "{url}: {reply}");
        assert_eq!(js.next_event("c").await.0, event);
    }
    js.shutdown().await;
}

fn evolution_realtime_secret(value: &str) -> evo_realtime::config::Secret {
    evo_realtime::config::Secret::new(value)
}

#[tokio::test]
async fn sidecar_events_limits_what_is_emitted() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.hub.events = vec!["CONNECTION_UPDATE".into()];
    let app = spawn_app(config).await;
    let mut js = JsDriver::start().await;
    js.connect("c", &app.url("/acme"), with_key("websocket", GLOBAL_KEY))
        .await;
    for event in ["messages.upsert", "connection.update", "call"] {
        let (status, _) = post_webhook(&app.webhook_url(), event_body(event, "acme", 1)).await;
        assert_eq!(status, 200, "a filtered event is still accepted");
    }
    assert_eq!(js.next_event("c").await.0, "connection.update");
    js.assert_no_event("c", Duration::from_millis(300)).await;
    js.shutdown().await;
}

#[tokio::test]
async fn per_client_filters_from_query_or_auth() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    let mut js = JsDriver::start().await;
    let ns = app.url("/acme");
    js.connect(
        "query",
        &ns,
        json!({"transports": ["websocket"], "query": {"apikey": GLOBAL_KEY, "events": "MESSAGES_UPSERT"}}),
    )
    .await;
    js.connect(
        "auth",
        &ns,
        json!({"transports": ["polling"], "auth": {"apikey": GLOBAL_KEY, "events": ["connection.update", "CALL"]}}),
    )
    .await;
    js.connect("all", &ns, with_key("websocket", GLOBAL_KEY))
        .await;
    let bad = js
        .connect(
            "bad",
            &ns,
            json!({"transports": ["websocket"], "auth": {"apikey": GLOBAL_KEY, "events": "E:*,x y"}}),
        )
        .await;
    assert_eq!(
        bad["type"], "connect_error",
        "a crafted filter is refused: {bad}"
    );
    // A filter of only names Evolution never sends would deliver nothing: a typo, named.
    let typo = js
        .connect(
            "typo",
            &ns,
            json!({"transports": ["websocket"], "auth": {"apikey": GLOBAL_KEY, "events": ["MESAGES_UPSERT"]}}),
        )
        .await;
    assert_eq!(typo["type"], "connect_error", "{typo}");
    assert!(
        typo.to_string().contains("did you mean MESSAGES_UPSERT"),
        "{typo}"
    );

    for (n, event) in [
        "messages.upsert",
        "connection.update",
        "call",
        "presence.update",
    ]
    .iter()
    .enumerate()
    {
        post_webhook(&app.webhook_url(), event_body(event, "acme", n as u64)).await;
    }
    assert_eq!(js.next_event("query").await.0, "messages.upsert");
    assert_eq!(js.next_event("auth").await.0, "connection.update");
    assert_eq!(js.next_event("auth").await.0, "call");
    for event in [
        "messages.upsert",
        "connection.update",
        "call",
        "presence.update",
    ] {
        assert_eq!(js.next_event("all").await.0, event, "order is kept");
    }
    js.assert_no_event("query", Duration::from_millis(200))
        .await;
    js.assert_no_event("auth", Duration::from_millis(100)).await;
    js.shutdown().await;
}

#[tokio::test]
async fn many_first_connections_to_a_new_namespace_all_receive() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    let mut js = JsDriver::start().await;
    let ns = app.url("/race");
    let clients: Vec<String> = (0..40).map(|i| format!("c{i}")).collect();
    for id in &clients {
        js.open(id, &ns, with_key("websocket", GLOBAL_KEY)).await;
    }
    for id in &clients {
        assert_eq!(js.wait_connected(id).await["type"], "connect");
    }
    post_webhook(&app.webhook_url(), event_body("call", "race", 1)).await;
    for id in &clients {
        assert_eq!(js.next_event(id).await.0, "call", "{id}");
    }
    js.shutdown().await;
}

const BAD_INPUT_JWT_KEY: &str = "bad-input-jwt-key";

/// The JWT key of instance acme (the rows' bodies are acme's) under `BAD_INPUT_JWT_KEY`.
fn acme_key() -> String {
    webhook_credential(BAD_INPUT_JWT_KEY, "acme")
}

/// The bad request rows: each gets exactly its status and a JSON error. All carry the
/// `valid` credential but the last four, which are about the credential.
fn bad_input_rows(valid: &str) -> Vec<WebhookRow> {
    let deep = format!(
        "{{\"event\":\"call\",\"instance\":\"acme\",\"data\":{}{}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    let big = event_body("call", "acme", 1)
        .replace("\"n\":1", &format!("\"n\":\"{}\"", "x".repeat(70_000)));
    let call = || event_body("call", "acme", 1);
    let x129 = format!(r#"{{"event":"call","instance":"{}"}}"#, "x".repeat(129));
    let json = "application/json";
    #[rustfmt::skip]
    let rows = [
        // (what, path after the webhook path, body, content-type, status, error contains)
        ("invalid utf-8", "", b"{\"event\":\"\xff\"}".to_vec(), json, 400, "UTF-8"),
        ("truncated json", "", br#"{"event":"call","instance":"ac"#.to_vec(), json, 400, "invalid JSON"),
        ("nested 10000 deep", "", deep.into_bytes(), json, 400, "invalid JSON"),
        ("duplicate event", "", br#"{"event":"call","event":"x","instance":"acme"}"#.to_vec(), json, 400, "more than once"),
        ("duplicate instance", "", br#"{"event":"call","instance":"acme","instance":"b"}"#.to_vec(), json, 400, "more than once"),
        ("array body", "", b"[1,2]".to_vec(), json, 400, "invalid JSON"),
        ("string body", "", br#""hello""#.to_vec(), json, 400, "invalid JSON"),
        ("event not a string", "", br#"{"event":1,"instance":"acme"}"#.to_vec(), json, 422, "`event` must be a string"),
        ("instance not a string", "", br#"{"event":"call","instance":{}}"#.to_vec(), json, 422, "`instance` must be a string"),
        ("event missing", "", br#"{"instance":"acme"}"#.to_vec(), json, 422, "`event` is missing"),
        ("instance missing", "", br#"{"event":"call"}"#.to_vec(), json, 422, "`instance` is missing"),
        ("instance with /", "", br#"{"event":"call","instance":"a/b"}"#.to_vec(), json, 422, "instance name"),
        ("instance with \\", "", br#"{"event":"call","instance":"a\\b"}"#.to_vec(), json, 422, "instance name"),
        ("instance with a backslash", "", br#"{"event":"call","instance":"a\\b"}"#.to_vec(), json, 422, "instance name"),
        ("instance with control", "", br#"{"event":"call","instance":"a\u0007"}"#.to_vec(), json, 422, "instance name"),
        ("instance .", "", br#"{"event":"call","instance":"."}"#.to_vec(), json, 422, "instance name"),
        ("instance ..", "", br#"{"event":"call","instance":".."}"#.to_vec(), json, 422, "instance name"),
        ("instance empty", "", br#"{"event":"call","instance":""}"#.to_vec(), json, 422, "instance name"),
        ("instance 129 bytes", "", x129.into_bytes(), json, 422, "instance name"),
        ("suffix disagrees", "/messages-upsert", call().into_bytes(), json, 422, "does not match"),
        ("too large", "", big.into_bytes(), json, 413, "larger than 65536"),
        ("not json content-type", "", call().into_bytes(), "text/plain", 415, "application/json"),
        ("path too deep", "/a/b/c", call().into_bytes(), json, 404, "no such webhook path"),
    ];
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    let claims = json!({"iat": now(), "exp": now() + 600, "app": "evolution", "action": "webhook"});
    let no_exp = json!({"iat": now(), "app": "evolution", "action": "webhook"});
    #[rustfmt::skip]
    let jwt_rows = [
        // (what, Authorization, status, error contains), on a good body
        ("jwt alg none", unsigned_jwt(&claims), 401, "jwt"),
        ("jwt wrong key", evolution_jwt("another-key", 0), 401, "signature"),
        ("jwt expired beyond the leeway", evolution_jwt(&acme_key(), 600 + 1200 + 60), 401, "expired"),
        ("jwt without exp", sign_jwt(&acme_key(), &no_exp), 401, "exp"),
    ];
    let rows =
        rows.into_iter().map(
            |(what, suffix, body, content_type, status, error)| WebhookRow {
                what,
                path: format!("{WEBHOOK_PATH}{suffix}"),
                body,
                content_type,
                authorization: Some(valid.to_owned()),
                status,
                error,
            },
        );
    let jwt_rows = jwt_rows
        .into_iter()
        .map(|(what, token, status, error)| WebhookRow {
            what,
            path: WEBHOOK_PATH.to_owned(),
            body: call().into_bytes(),
            content_type: json,
            authorization: Some(format!("Bearer {token}")),
            status,
            error,
        });
    rows.chain(jwt_rows).collect()
}

/// One table: each bad request gets exactly this status and a JSON error, and nothing is
/// emitted. The rows go in process through the app's router (the hub is the one the
/// watching client is connected to); what needs a connection (a chunked body) goes over TCP.
#[tokio::test]
async fn bad_input_table() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.webhook.max_body_bytes = 65536;
    config.webhook.jwt_secret = Some(evolution_realtime_secret(BAD_INPUT_JWT_KEY));
    let app = spawn_app(config).await;
    // Every row carries a valid credential unless the row is about the credential.
    let valid = format!("Bearer {}", evolution_jwt(&acme_key(), 0));
    let mut js = JsDriver::start().await;
    js.connect(
        "watch",
        &app.url("/acme"),
        with_key("websocket", GLOBAL_KEY),
    )
    .await;

    check_webhook_rows(&app.router, bad_input_rows(&valid)).await;

    let url = app.webhook_url();
    // Too large, chunked (no Content-Length): still 413.
    let chunks =
        futures_util::stream::iter((0..80).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1024])));
    let response = http()
        .post(&url)
        .header("content-type", "application/json")
        .header("authorization", valid.clone())
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413, "chunked too large");

    js.assert_no_event("watch", Duration::from_millis(300))
        .await;
    // Still healthy: a good webhook goes through.
    let response = http()
        .post(&url)
        .header("content-type", "application/json")
        .header("authorization", valid.clone())
        .body(event_body("call", "acme", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(js.next_event("watch").await.0, "call");
    // And in process, the way the rows went: the same hub, so a row wrongly accepted
    // would have reached the watching client.
    let good = event_body("call", "acme", 3).into_bytes();
    let reply = post_webhook_in_process(
        &app.router,
        WEBHOOK_PATH,
        good,
        "application/json",
        Some(&valid),
    )
    .await;
    assert_eq!(reply, (200, json!({"ok": true})));
    assert_eq!(js.next_event("watch").await.0, "call");
    js.shutdown().await;
}

/// POSTs `body` with `headers` (name, raw bytes) and returns status and JSON body.
async fn post_with_headers(
    url: &str,
    body: Vec<u8>,
    headers: &[(String, Vec<u8>)],
) -> (u16, Value) {
    let mut request = http().post(url).header("content-type", "application/json");
    for (name, value) in headers {
        request = request.header(
            name.as_str(),
            reqwest::header::HeaderValue::from_bytes(value).unwrap(),
        );
    }
    let response = request.body(body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Evolution 2.4's per-instance headers: the event arrives byte-exact on both transports,
/// a retry's age is counted, and a header that contradicts the body is a 422 that emits
/// nothing.
#[tokio::test]
async fn per_instance_webhooks_with_evolution_2_4_headers() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    let mut js = JsDriver::start().await;
    for (id, transport) in [("ws", "websocket"), ("poll", "polling")] {
        let report = js
            .connect(
                id,
                &app.url("/acme-support"),
                with_key(transport, GLOBAL_KEY),
            )
            .await;
        assert_eq!(report["type"], "connect", "{report}");
    }
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("../headers/per-instance-2.4.json")).unwrap(),
    )
    .unwrap();
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    // The fixture's headers with `X-Timestamp` this long ago and `changes` applied.
    let headers = |age_ms: u64, changes: &[(&str, &[u8])]| -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = fixture
            .as_object()
            .unwrap()
            .iter()
            .map(|(name, value)| (name.clone(), value.as_str().unwrap().as_bytes().to_vec()))
            .collect();
        for (name, value) in out.iter_mut() {
            if name == "X-Timestamp" {
                *value = (now_ms() - age_ms).to_string().into_bytes();
            }
            if let Some((_, changed)) = changes.iter().find(|(n, _)| n == name) {
                *value = changed.to_vec();
            }
        }
        out
    };
    let url = app.webhook_url();
    let retries = || metric(&app, "evo_webhook_retries_total");

    // A first delivery: byte-exact, and not a retry.
    let path = fixtures_dir().join("messages-upsert.json");
    let expected = format!("[{}]", js.expected(&path).await);
    let body = std::fs::read(&path).unwrap();
    let answer = post_with_headers(&url, body.clone(), &headers(0, &[])).await;
    assert_eq!(answer, (200, json!({"ok": true})));
    for id in ["ws", "poll"] {
        let (event, text) = js.next_event(id).await;
        assert_eq!(
            (event.as_str(), &text),
            ("messages.upsert", &expected),
            "{id}"
        );
    }
    assert_eq!(retries().await, 0.0, "a fresh delivery is no retry");

    // A retry 10 s after Evolution's first try (another body, so dedupe does not drop it).
    let retry = event_body("messages.upsert", "acme-support", 2);
    let answer = post_with_headers(&url, retry.into_bytes(), &headers(10_000, &[])).await;
    assert_eq!(answer, (200, json!({"ok": true})));
    assert_eq!(retries().await, 1.0, "a delivery 10 s old is a retry");
    for id in ["ws", "poll"] {
        assert!(js.next_event(id).await.1.contains(r#""n":2"#), "{id}");
    }

    // Contradictions: 422 naming the header, and nothing emitted.
    for (header, value, says) in [
        ("X-Instance-Name", &b"acme-billing"[..], "X-Instance-Name"),
        ("X-Event-Type", b"messages.update", "X-Event-Type"),
        ("X-Event-Type", b"MESSAGES_UPSERT", "X-Event-Type"),
    ] {
        let body = event_body("messages.upsert", "acme-support", 3);
        let (status, reply) =
            post_with_headers(&url, body.into_bytes(), &headers(0, &[(header, value)])).await;
        assert_eq!(status, 422, "{header}: {reply}");
        assert!(reply["error"].as_str().unwrap().contains(says), "{reply}");
    }
    // Node writes header values as Latin-1: `tê-ünï` arrives as 6 bytes and is the same name.
    let latin1: Vec<u8> = "tê-ünï".chars().map(|c| c as u8).collect();
    js.connect(
        "odd",
        &app.url("/tê-ünï"),
        with_key("websocket", GLOBAL_KEY),
    )
    .await;
    let body = event_body("messages.upsert", "tê-ünï", 4);
    let answer = post_with_headers(
        &url,
        body.into_bytes(),
        &headers(0, &[("X-Instance-Name", &latin1)]),
    )
    .await;
    assert_eq!(answer, (200, json!({"ok": true})));
    assert!(js.next_event("odd").await.1.contains(r#""n":4"#));
    // The refused ones were never emitted: the next event on acme-support is this marker.
    let marker = event_body("call", "acme-support", 5);
    assert_eq!(post_webhook(&url, marker).await.0, 200);
    for id in ["ws", "poll"] {
        let (event, text) = js.next_event(id).await;
        assert_eq!(event, "call", "{id}: {text}");
    }
    js.shutdown().await;
    app.stop().await;
}
