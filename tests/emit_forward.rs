//! Client emits → Evolution REST, answered through the socket.io ack.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use common::*;
use evo_realtime::upstream::RouteSpec;
use serde_json::{Value, json};

const POST_ROUTES: [&str; 19] = [
    "message/sendText",
    "message/sendMedia",
    "message/sendWhatsAppAudio",
    "message/sendSticker",
    "message/sendLocation",
    "message/sendContact",
    "message/sendReaction",
    "message/sendPoll",
    "message/sendList",
    "message/sendButtons",
    "chat/markMessageAsRead",
    "chat/sendPresence",
    "chat/whatsappNumbers",
    "chat/updateMessage",
    "chat/archiveChat",
    "chat/findMessages",
    "chat/findChats",
    "chat/findContacts",
    "chat/fetchProfilePictureUrl",
];

async fn setup() -> (FakeEvolution, TestApp, JsDriver) {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    let mut js = JsDriver::start().await;
    let report = js
        .connect("acme", &app.url("/acme"), with_key("websocket", ACME_TOKEN))
        .await;
    assert_eq!(report["type"], "connect");
    (evolution, app, js)
}

#[tokio::test]
async fn every_default_route_reaches_its_rest_call_with_the_clients_key() {
    let (evolution, _app, mut js) = setup().await;
    for route in POST_ROUTES {
        let argument =
            json!({"number": "5511900000002", "text": "hi", "nested": {"b": [1, 2], "a": null}});
        let ack = js.emit_ack("acme", route, vec![argument.clone()]).await;
        assert_eq!(ack[0]["status"], 201, "{route}: {ack}");
        let echoed = &ack[0]["body"];
        assert_eq!(echoed["method"], "POST", "{route}");
        assert_eq!(echoed["path"], format!("/{route}/acme"), "{route}");
        assert_eq!(echoed["apikey"], ACME_TOKEN, "{route}");
        assert_eq!(echoed["body"], argument, "{route}");
    }

    let ack = js
        .emit_ack(
            "acme",
            "chat/deleteMessageForEveryone",
            vec![json!({"id": "3EB0", "remoteJid": "x@s", "fromMe": true})],
        )
        .await;
    assert_eq!(ack[0]["status"], 200);
    assert_eq!(ack[0]["body"]["method"], "DELETE");
    assert_eq!(
        ack[0]["body"]["path"],
        "/chat/deleteMessageForEveryone/acme"
    );
    assert_eq!(
        ack[0]["body"]["body"]["id"], "3EB0",
        "DELETE carries its body"
    );

    let ack = js
        .emit_ack("acme", "instance/connectionState", vec![])
        .await;
    assert_eq!(ack[0]["status"], 200);
    assert_eq!(ack[0]["body"]["method"], "GET");
    assert_eq!(ack[0]["body"]["path"], "/instance/connectionState/acme");

    let ack = js
        .emit_ack(
            "acme",
            "group/fetchAllGroups",
            vec![json!({"getParticipants": false, "q": "a b&c"})],
        )
        .await;
    assert_eq!(ack[0]["body"]["method"], "GET");
    assert_eq!(ack[0]["body"]["path"], "/group/fetchAllGroups/acme");
    assert_eq!(ack[0]["body"]["query"], "getParticipants=false&q=a%20b%26c");

    let requests = evolution.requests();
    assert_eq!(requests.len(), POST_ROUTES.len() + 3);
    assert!(
        requests
            .iter()
            .all(|r| r.header("apikey") == Some(ACME_TOKEN))
    );
    assert!(
        requests
            .iter()
            .filter(|r| r.method == "POST")
            .all(|r| r.header("content-type") == Some("application/json"))
    );
    js.shutdown().await;
}

#[tokio::test]
async fn the_key_forwarded_is_the_one_the_socket_connected_with() {
    let (evolution, app, mut js) = setup().await;
    js.connect(
        "global",
        &app.url("/acme"),
        json!({"transports": ["polling"], "auth": {"apikey": GLOBAL_KEY}}),
    )
    .await;
    js.emit_ack(
        "global",
        "message/sendText",
        vec![json!({"number": "1", "text": "x"})],
    )
    .await;
    js.emit_ack(
        "acme",
        "message/sendText",
        vec![json!({"number": "1", "text": "y"})],
    )
    .await;
    let keys: Vec<_> = evolution
        .requests()
        .iter()
        .map(|r| r.header("apikey").unwrap().to_owned())
        .collect();
    assert_eq!(keys, vec![GLOBAL_KEY.to_owned(), ACME_TOKEN.to_owned()]);
    js.shutdown().await;
}

#[tokio::test]
async fn another_instance_cannot_be_reached() {
    let (evolution, _app, mut js) = setup().await;
    let ack = js
        .emit_ack(
            "acme",
            "message/sendText",
            vec![json!({"number": "1", "text": "x", "instance": "other", "instanceName": "other"})],
        )
        .await;
    assert_eq!(ack[0]["body"]["path"], "/message/sendText/acme");
    for event in [
        "message/sendText/other",
        "../message/sendText",
        "message/sendText/../../instance/delete",
        "instance/delete",
    ] {
        let ack = js
            .emit_ack("acme", event, vec![json!({"number": "1"})])
            .await;
        assert_eq!(ack[0]["status"], 404, "{event}: {ack}");
        assert!(
            ack[0]["error"]
                .as_str()
                .unwrap()
                .starts_with("unknown event")
        );
    }
    assert!(
        evolution
            .requests()
            .iter()
            .all(|r| r.path.ends_with("/acme"))
    );
    js.shutdown().await;
}

#[tokio::test]
async fn bad_arguments_and_root_namespace_get_400() {
    let (evolution, app, mut js) = setup().await;
    for argument in [json!("text"), json!([1]), json!(3), Value::Null] {
        let ack = js
            .emit_ack("acme", "message/sendText", vec![argument.clone()])
            .await;
        assert_eq!(ack[0]["status"], 400, "{argument}: {ack}");
        assert!(ack[0]["error"].is_string());
    }
    let ack = js
        .emit_ack("acme", "message/sendText", vec![json!({"requestId": 5})])
        .await;
    assert_eq!(ack[0]["status"], 400);
    js.connect("root", &app.url("/"), with_key("websocket", GLOBAL_KEY))
        .await;
    let ack = js
        .emit_ack(
            "root",
            "message/sendText",
            vec![json!({"number": "1", "text": "x"})],
        )
        .await;
    assert_eq!(ack[0]["status"], 400);
    assert!(ack[0]["error"].as_str().unwrap().contains("no instance"));
    assert!(evolution.requests().is_empty());
    js.shutdown().await;
}

#[tokio::test]
async fn send_message_alias_as_in_evolutions_docs() {
    let (_evolution, _app, mut js) = setup().await;
    // Evolution's docs: socket.emit('send_message', { message: 'Hello, World!' }): no number,
    // so the upstream's own 400 comes back.
    let ack = js
        .emit_ack(
            "acme",
            "send_message",
            vec![json!({"message": "Hello, World!"})],
        )
        .await;
    assert_eq!(ack[0]["status"], 400);
    assert_eq!(
        ack[0]["body"]["response"]["message"][0][0],
        "instance requires property \"number\""
    );
    let ack = js
        .emit_ack(
            "acme",
            "send_message",
            vec![json!({"number": "5511900000002", "message": "Hello, World!"})],
        )
        .await;
    assert_eq!(ack[0]["status"], 201);
    assert_eq!(ack[0]["body"]["path"], "/message/sendText/acme");
    assert_eq!(
        ack[0]["body"]["body"],
        json!({"number": "5511900000002", "text": "Hello, World!"})
    );
    js.shutdown().await;
}

#[tokio::test]
async fn routes_from_the_config_file() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    let mut routes = BTreeMap::new();
    routes.insert(
        "custom/ping".to_owned(),
        RouteSpec {
            method: "PUT".into(),
            path: "/custom/{instance}/ping".into(),
        },
    );
    routes.insert(
        "message/sendText".to_owned(),
        RouteSpec {
            method: "POST".into(),
            path: "/v2/send/{instance}".into(),
        },
    );
    config.upstream.routes = routes;
    let app = spawn_app(config).await;
    let mut js = JsDriver::start().await;
    js.connect("a", &app.url("/ac me"), with_key("websocket", GLOBAL_KEY))
        .await;
    let ack = js.emit_ack("a", "custom/ping", vec![json!({"x": 1})]).await;
    assert_eq!(ack[0]["body"]["method"], "PUT");
    assert_eq!(ack[0]["body"]["path"], "/custom/ac%20me/ping");
    let ack = js
        .emit_ack("a", "message/sendText", vec![json!({"number": "1"})])
        .await;
    assert_eq!(ack[0]["body"]["path"], "/v2/send/ac%20me");
    js.shutdown().await;
}

#[tokio::test]
async fn a_repeated_request_id_is_answered_once() {
    let (evolution, _app, mut js) = setup().await;
    evolution.state.delay_ms.store(200, Ordering::SeqCst);
    let argument = json!({"number": "1", "text": "once", "requestId": "req-42"});
    // Two at once (a buffered emit re-sent after a reconnect) and one later.
    let first = js
        .start_emit("acme", "message/sendText", vec![argument.clone()])
        .await;
    let second = js
        .start_emit("acme", "message/sendText", vec![argument.clone()])
        .await;
    let first = js.wait_ack(first).await;
    let second = js.wait_ack(second).await;
    let third = js
        .emit_ack("acme", "message/sendText", vec![argument])
        .await;
    assert_eq!(first, second);
    assert_eq!(first, third);
    let requests = evolution.requests();
    assert_eq!(requests.len(), 1, "one upstream call");
    assert_eq!(
        requests[0].json(),
        json!({"number": "1", "text": "once"}),
        "requestId is stripped"
    );
    let other = js
        .emit_ack(
            "acme",
            "message/sendText",
            vec![json!({"number": "1", "requestId": "req-43"})],
        )
        .await;
    assert_eq!(other[0]["status"], 201);
    assert_eq!(evolution.requests().len(), 2);
    js.shutdown().await;
}

#[tokio::test]
async fn timeout_down_and_too_many_in_flight_are_acked() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.upstream.timeout_secs = 1;
    config.upstream.max_in_flight = 2;
    let app = spawn_app(config).await;
    let mut js = JsDriver::start().await;
    js.connect("a", &app.url("/acme"), with_key("websocket", GLOBAL_KEY))
        .await;

    // Too many in flight: the third concurrent call on one socket gets 429.
    evolution.state.delay_ms.store(600, Ordering::SeqCst);
    let reqs = [
        js.start_emit("a", "message/sendText", vec![json!({"number": "1"})])
            .await,
        js.start_emit("a", "message/sendText", vec![json!({"number": "2"})])
            .await,
        js.start_emit("a", "message/sendText", vec![json!({"number": "3"})])
            .await,
    ];
    let mut statuses = Vec::new();
    for req in reqs {
        statuses.push(js.wait_ack(req).await[0]["status"].as_u64().unwrap());
    }
    statuses.sort();
    assert_eq!(statuses, vec![201, 201, 429]);

    // Timeout: the upstream answers after the 1 s limit.
    evolution.state.delay_ms.store(2500, Ordering::SeqCst);
    let ack = js
        .emit_ack("a", "message/sendText", vec![json!({"number": "1"})])
        .await;
    assert_eq!(
        ack[0],
        json!({"status": 504, "error": "upstream timed out"})
    );
    js.shutdown().await;

    // Down: nothing listens.
    let closed = free_port();
    let app = spawn_app(test_config(&format!("http://{closed}"))).await;
    let mut js = JsDriver::start().await;
    js.connect("b", &app.url("/acme"), with_key("websocket", GLOBAL_KEY))
        .await;
    let ack = js
        .emit_ack("b", "message/sendText", vec![json!({"number": "1"})])
        .await;
    assert_eq!(
        ack[0],
        json!({"status": 502, "error": "upstream unreachable"})
    );
    js.shutdown().await;
}

#[tokio::test]
async fn a_slow_call_does_not_block_the_sockets_events_or_other_calls() {
    let (evolution, app, mut js) = setup().await;
    evolution.state.delay_ms.store(1500, Ordering::SeqCst);
    let slow = js
        .start_emit("acme", "message/sendText", vec![json!({"number": "1"})])
        .await;
    post_webhook(&app.webhook_url(), event_body("call", "acme", 1)).await;
    let event = js
        .wait_for(
            |r| r["id"] == "acme" && r["type"] == "event",
            std::time::Duration::from_millis(1000),
        )
        .await;
    assert!(
        event.is_some(),
        "the event arrived while the call was pending"
    );
    assert_eq!(js.wait_ack(slow).await[0]["status"], 201);
    js.shutdown().await;
}

#[tokio::test]
async fn without_an_ack_the_call_still_happens() {
    let (evolution, _app, mut js) = setup().await;
    js.emit(
        "acme",
        "message/sendText",
        vec![json!({"number": "1", "text": "fire and forget"})],
    )
    .await;
    eventually("an upstream call", async || {
        !evolution.requests().is_empty()
    })
    .await;
    assert_eq!(evolution.requests()[0].json()["text"], "fire and forget");
    js.shutdown().await;
}

/// The ack carries Evolution's body byte for byte (key order, number spelling), and
/// Evolution gets the argument as the client wrote it, minus `requestId`: neither goes
/// through a `serde_json::Value` (which sorts keys and turns 100000000000000000000 into
/// 1e+20).
#[tokio::test]
async fn acks_and_arguments_pass_through_byte_for_byte() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.upstream.routes.insert(
        "custom/raw".into(),
        RouteSpec {
            method: "POST".into(),
            path: "/raw/{instance}".into(),
        },
    );
    let app = spawn_app(config).await;
    let mut socket = RawSocket::open(app.addr, "").await.unwrap();
    let answer = socket
        .connect("/acme", &json!({"apikey": GLOBAL_KEY}).to_string())
        .await
        .unwrap();
    assert!(answer.starts_with("40/acme,"), "{answer}");
    let argument = r#"{"zz":1,"requestId":"r-1","aa":100000000000000000000,"m":{"y":2,"x":1.0}}"#;
    assert!(
        socket
            .send(format!(r#"42/acme,7["custom/raw",{argument}]"#))
            .await
    );
    let ack = loop {
        let frame = socket.next_text().await.expect("an ack");
        if let Some(ack) = frame.strip_prefix("43/acme,7") {
            break ack.to_owned();
        }
    };
    assert_eq!(ack, format!(r#"[{{"status":201,"body":{RAW_ANSWER}}}]"#));
    let sent = evolution.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        std::str::from_utf8(&sent[0].body).unwrap(),
        r#"{"zz":1,"aa":100000000000000000000,"m":{"y":2,"x":1.0}}"#
    );
}

/// Issue 16: Evolution creates instances named `50%off` or `t x`; the sidecar refused their
/// webhooks with 422 (never retried: every event lost). Their events arrive on `/50%off`,
/// and their emits reach Evolution with the name percent-encoded in the path.
#[tokio::test]
async fn odd_but_valid_instance_names_get_their_events_and_their_emits() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    for (name, encoded) in [
        ("50%off", "50%25off"),
        ("t x", "t%20x"),
        ("tê-ünï", "t%C3%AA-%C3%BCn%C3%AF"),
        ("#hash", "%23hash"),
        ("ns?q", "ns%3Fq"),
        ("T.Up-1_2", "T.Up-1_2"),
    ] {
        let ns = format!("/{name}");
        let mut socket = RawSocket::open(app.addr, "").await.unwrap();
        let answer = socket
            .connect(&ns, &json!({"apikey": GLOBAL_KEY}).to_string())
            .await
            .unwrap();
        assert!(answer.starts_with(&format!("40{ns},")), "{name}: {answer}");
        let (status, reply) = post_webhook(&app.webhook_url(), event_body("call", name, 7)).await;
        assert_eq!(status, 200, "{name}: {reply}");
        let event = socket.next_text().await.expect("the event");
        assert!(
            event.starts_with(&format!(r#"42{ns},["call""#)),
            "{name}: {event}"
        );

        assert!(
            socket
                .send(format!(
                    r#"42{ns},1["message/sendText",{{"number":"1","text":"hi"}}]"#
                ))
                .await
        );
        let ack = socket.next_text().await.expect("an ack");
        assert!(ack.starts_with(&format!("43{ns},1")), "{name}: {ack}");
        let path = format!("/message/sendText/{encoded}");
        assert!(
            evolution.requests().iter().any(|r| r.path == path),
            "{name}: no call to {path}: {:?}",
            evolution
                .requests()
                .iter()
                .map(|r| &r.path)
                .collect::<Vec<_>>()
        );
    }
}
