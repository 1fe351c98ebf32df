//! A token for one instance never sees another's, by any path; revoked access ends.
//! Instance `acme` is ACME_TOKEN's; instance `other` is OTHER_TOKEN's.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

async fn setup() -> (FakeEvolution, TestApp, JsDriver) {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.hub.global_events = true;
    let app = spawn_app(config).await;
    let js = JsDriver::start().await;
    (evolution, app, js)
}

fn instance_of(text: &str) -> String {
    serde_json::from_str::<Value>(text).unwrap()[0]["instance"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_token_never_receives_another_instances_events() {
    let (_evolution, app, mut js) = setup().await;
    let acme = |extra: Value| {
        let mut auth = json!({"apikey": ACME_TOKEN});
        auth.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({"transports": ["websocket"], "auth": auth})
    };
    // By namespace and by the global namespace: refused outright.
    for ns in ["/other", "/"] {
        let refused = js
            .connect(&format!("ns{ns}"), &app.url(ns), acme(json!({})))
            .await;
        assert_eq!(refused["type"], "connect_error", "{ns}");
    }
    // Crafted filters naming rooms: refused, never joined.
    for (i, events) in [
        json!("*"),
        json!("E:MESSAGES_UPSERT"),
        json!(["../other"]),
        json!({"room": "*"}),
    ]
    .iter()
    .enumerate()
    {
        let refused = js
            .connect(
                &format!("crafted{i}"),
                &app.url("/acme"),
                acme(json!({"events": events})),
            )
            .await;
        assert_eq!(refused["type"], "connect_error", "{events}");
    }
    // B's state exists before A's clients join with a snapshot, and B's events are retained.
    post_webhook(
        &app.webhook_url(),
        fixture("connection-update.json").replace("acme-support", "other"),
    )
    .await;
    post_webhook(
        &app.webhook_url(),
        event_body("messages.upsert", "other", 1),
    )
    .await;
    post_webhook(&app.webhook_url(), event_body("messages.upsert", "acme", 2)).await;

    js.connect(
        "live",
        &app.url("/acme"),
        acme(json!({"events": "MESSAGES_UPSERT"})),
    )
    .await;
    js.connect(
        "snapshot",
        &app.url("/acme"),
        acme(json!({"snapshot": true})),
    )
    .await;
    js.open_from(
        "replay",
        &app.url("/acme"),
        acme(json!({})),
        "not-an-offset",
    )
    .await;
    js.wait_connected("replay").await;

    // The replay of "everything retained" is acme's only.
    let (event, _) = js.next_event("replay").await;
    assert_eq!(event, "sidecar.recovery");
    let (_, text) = js.next_event("replay").await;
    assert_eq!(instance_of(&text), "acme");

    post_webhook(
        &app.webhook_url(),
        event_body("messages.upsert", "other", 3),
    )
    .await;
    post_webhook(&app.webhook_url(), event_body("call", "acme", 4)).await;
    assert_eq!(
        js.next_event("snapshot").await.0,
        "call",
        "no state of another instance"
    );
    let (event, text) = js.next_event("replay").await;
    assert_eq!(
        (event.as_str(), instance_of(&text).as_str()),
        ("call", "acme")
    );
    for id in ["live", "snapshot", "replay"] {
        js.assert_no_event(id, Duration::from_millis(300)).await;
    }
    js.shutdown().await;
}

#[tokio::test]
async fn a_token_cannot_reach_another_instances_routes() {
    let (evolution, app, mut js) = setup().await;
    js.connect("a", &app.url("/acme"), with_key("websocket", ACME_TOKEN))
        .await;
    for (event, argument) in [
        (
            "message/sendText",
            json!({"number": "1", "instance": "other", "instanceName": "other"}),
        ),
        ("message/sendText/../../other", json!({"number": "1"})),
        ("instance/connectionState", json!({"instance": "other"})),
    ] {
        let ack = js.emit_ack("a", event, vec![argument]).await;
        let path = ack[0]["body"]["path"].as_str().unwrap_or("");
        assert!(
            ack[0]["status"] == 404 || path.ends_with("/acme"),
            "{event}: {ack}"
        );
    }
    assert!(
        evolution
            .requests()
            .iter()
            .all(|r| r.path.ends_with("/acme") && r.header("apikey") == Some(ACME_TOKEN))
    );
    js.shutdown().await;
}

#[tokio::test]
async fn proxied_rest_still_goes_through_evolutions_own_auth() {
    let (_evolution, app, _js) = setup().await;
    // The proxy adds no credential: Evolution decides, with the caller's own key.
    let rows: Value = http()
        .get(app.url("/instance/fetchInstances"))
        .header("apikey", ACME_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1);
    assert_eq!(rows[0]["name"], "acme");
    let refused = http()
        .get(app.url("/instance/fetchInstances"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 401);
}

#[tokio::test]
async fn a_rotated_token_is_disconnected_after_its_cache_entry_expires() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.auth.token_cache_ttl_secs = 1;
    let app = spawn_app(config).await;
    let mut js = JsDriver::start().await;
    js.connect(
        "token",
        &app.url("/acme"),
        with_key("websocket", ACME_TOKEN),
    )
    .await;
    js.connect(
        "global",
        &app.url("/acme"),
        with_key("websocket", GLOBAL_KEY),
    )
    .await;
    evolution.state.tokens.lock().unwrap().remove(ACME_TOKEN);
    let gone = js
        .wait(|r| r["id"] == "token" && r["type"] == "disconnect")
        .await;
    assert_eq!(gone["reason"], "io server disconnect");
    post_webhook(&app.webhook_url(), event_body("call", "acme", 1)).await;
    assert_eq!(
        js.next_event("global").await.0,
        "call",
        "the global key is unaffected"
    );
    js.shutdown().await;
}

#[tokio::test]
async fn deleting_an_instance_disconnects_its_token_sockets_after_the_event() {
    let (_evolution, app, mut js) = setup().await;
    js.connect(
        "token",
        &app.url("/acme"),
        with_key("websocket", ACME_TOKEN),
    )
    .await;
    js.connect(
        "global",
        &app.url("/acme"),
        with_key("websocket", GLOBAL_KEY),
    )
    .await;
    for (n, event) in ["instance.delete", "remove.instance"].iter().enumerate() {
        if n == 1 {
            js.connect("token2", &app.url("/acme"), with_key("polling", ACME_TOKEN))
                .await;
        }
        post_webhook(&app.webhook_url(), event_body(event, "acme", n as u64)).await;
        let id = if n == 0 { "token" } else { "token2" };
        assert_eq!(
            js.next_event(id).await.0,
            *event,
            "the event is delivered first"
        );
        let gone = js
            .wait(move |r| r["id"] == id && r["type"] == "disconnect")
            .await;
        assert_eq!(gone["reason"], "io server disconnect");
        assert_eq!(js.next_event("global").await.0, *event);
    }
    post_webhook(&app.webhook_url(), event_body("call", "acme", 9)).await;
    assert_eq!(
        js.next_event("global").await.0,
        "call",
        "global-key sockets stay"
    );
    js.shutdown().await;
}
