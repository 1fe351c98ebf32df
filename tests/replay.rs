//! No event lost: recovery on reconnect, state on join, deduplication (single node).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// The `data.n` and offset of an opted-in event report.
fn n_and_offset(text: &str) -> (u64, String) {
    let args: Value = serde_json::from_str(text).unwrap();
    assert_eq!(
        args.as_array().unwrap().len(),
        2,
        "envelope + trailing offset: {text}"
    );
    (
        args[0]["data"]["n"].as_u64().unwrap(),
        args[1].as_str().unwrap().to_owned(),
    )
}

async fn post_calls(app: &TestApp, instance: &str, range: std::ops::Range<u64>) {
    for n in range {
        let (status, _) = post_webhook(&app.webhook_url(), event_body("call", instance, n)).await;
        assert_eq!(status, 200);
    }
}

#[tokio::test]
async fn a_client_that_reconnects_with_its_offset_recovers_everything_in_order() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    let mut js = JsDriver::start().await;
    let ns = app.url("/acme");
    js.open_recovering(
        "a",
        &ns,
        json!({"transports": ["websocket"], "auth": {"apikey": GLOBAL_KEY}}),
    )
    .await;
    assert_eq!(js.wait_connected("a").await["type"], "connect");

    post_calls(&app, "acme", 0..10).await;
    let mut last = String::new();
    for expected in 0..10 {
        let (event, text) = js.next_event("a").await;
        assert_eq!(event, "call");
        let (n, offset) = n_and_offset(&text);
        assert_eq!(n, expected);
        last = offset;
    }
    js.close("a").await;

    post_calls(&app, "acme", 10..110).await;
    js.open_from(
        "b",
        &ns,
        json!({"transports": ["websocket"], "auth": {"apikey": GLOBAL_KEY}}),
        &last,
    )
    .await;
    // Events keep flowing while the client is being brought up to date.
    let webhook_url = app.webhook_url();
    let during = tokio::spawn(async move {
        for n in 110..130 {
            post_webhook(&webhook_url, event_body("call", "acme", n)).await;
        }
    });
    assert_eq!(js.wait_connected("b").await["type"], "connect");
    let (event, text) = js.next_event("b").await;
    assert_eq!(event, "sidecar.recovery");
    let recovery: Value = serde_json::from_str::<Value>(&text).unwrap()[0].clone();
    assert_eq!(recovery["recovered"], true, "{recovery}");
    assert_eq!(recovery["from"], last.as_str());
    let replayed = recovery["replayed"].as_u64().unwrap();
    assert!((100..=120).contains(&replayed), "{recovery}");

    during.await.unwrap();
    let mut offsets = Vec::new();
    for expected in 10..130 {
        let (event, text) = js.next_event("b").await;
        assert_eq!(event, "call");
        let (n, offset) = n_and_offset(&text);
        assert_eq!(n, expected, "in order, nothing missed, nothing twice");
        offsets.push(offset);
    }
    assert_eq!(
        recovery["to"],
        offsets[replayed as usize - 1].as_str(),
        "`to` is the last replayed offset"
    );
    js.assert_no_event("b", Duration::from_millis(300)).await;
    post_calls(&app, "acme", 130..131).await;
    assert_eq!(
        n_and_offset(&js.next_event("b").await.1).0,
        130,
        "then live events"
    );
    js.shutdown().await;
}

#[tokio::test]
async fn unknown_other_epoch_and_too_old_offsets_say_recovered_false() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.replay.max_events = 5;
    let app = spawn_app(config.clone()).await;
    let mut js = JsDriver::start().await;
    let ns = app.url("/acme");
    let opts = json!({"transports": ["websocket"], "auth": {"apikey": GLOBAL_KEY}});

    js.open_recovering("first", &ns, opts.clone()).await;
    js.wait_connected("first").await;
    post_calls(&app, "acme", 0..20).await;
    let (_, first_offset) = n_and_offset(&js.next_event("first").await.1);

    // Another start of the sidecar: a new epoch.
    let other = spawn_app(config).await;
    let mut other_js = JsDriver::start().await;
    other_js
        .open_recovering("o", &other.url("/acme"), opts.clone())
        .await;
    other_js.wait_connected("o").await;
    post_calls(&other, "acme", 0..1).await;
    let (_, other_epoch_offset) = n_and_offset(&other_js.next_event("o").await.1);

    for (id, offset, why) in [
        ("unknown", "not-an-offset".to_owned(), "unknown"),
        ("epoch", other_epoch_offset, "from another epoch"),
        ("old", first_offset, "older than retention (5 events)"),
    ] {
        js.open_from(id, &ns, opts.clone(), &offset).await;
        assert_eq!(js.wait_connected(id).await["type"], "connect");
        let (event, text) = js.next_event(id).await;
        assert_eq!(event, "sidecar.recovery", "{why}");
        let recovery = &serde_json::from_str::<Value>(&text).unwrap()[0];
        assert_eq!(recovery["recovered"], false, "{why}: {recovery}");
        assert_eq!(
            recovery["replayed"], 5,
            "{why}: what is retained is replayed all the same"
        );
        for expected in 15..20 {
            assert_eq!(
                n_and_offset(&js.next_event(id).await.1).0,
                expected,
                "{why}"
            );
        }
    }
    // An empty offset: from now on, no announcement.
    js.open_from("fresh", &ns, opts, "").await;
    js.wait_connected("fresh").await;
    js.assert_no_event("fresh", Duration::from_millis(300))
        .await;
    js.shutdown().await;
    other_js.shutdown().await;
}

#[tokio::test]
async fn clients_that_do_not_opt_in_get_evolutions_one_argument_events() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    let mut js = JsDriver::start().await;
    js.connect(
        "plain",
        &app.url("/acme"),
        with_key("websocket", GLOBAL_KEY),
    )
    .await;
    post_calls(&app, "acme", 0..3).await;
    for n in 0..3 {
        let (event, text) = js.next_event("plain").await;
        assert_eq!(event, "call");
        let args: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(args.as_array().unwrap().len(), 1, "{text}");
        assert_eq!(args[0]["data"]["n"], n);
    }
    let bad = js
        .connect(
            "bad",
            &app.url("/acme"),
            json!({"transports": ["websocket"], "auth": {"apikey": GLOBAL_KEY, "offset": 5}}),
        )
        .await;
    assert_eq!(bad["type"], "connect_error");
    assert_eq!(bad["message"], "offset must be a string");
    js.shutdown().await;
}

#[tokio::test]
async fn state_on_join_honours_filters() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    for name in [
        "connection-update.json",
        "qrcode-updated.json",
        "messages-upsert.json",
    ] {
        assert_eq!(post_webhook(&app.webhook_url(), fixture(name)).await.0, 200);
    }
    let mut js = JsDriver::start().await;
    let ns = app.url("/acme-support");
    js.connect(
        "late",
        &ns,
        json!({"transports": ["websocket"], "auth": {"apikey": GLOBAL_KEY, "snapshot": true}}),
    )
    .await;
    assert_eq!(js.next_event("late").await.0, "connection.update");
    assert_eq!(js.next_event("late").await.0, "qrcode.updated");
    js.assert_no_event("late", Duration::from_millis(300)).await;

    js.connect(
        "filtered",
        &ns,
        json!({"transports": ["polling"], "auth": {"apikey": GLOBAL_KEY, "snapshot": true, "events": ["CONNECTION_UPDATE"]}}),
    )
    .await;
    let (event, text) = js.next_event("filtered").await;
    assert_eq!(event, "connection.update");
    assert_eq!(
        serde_json::from_str::<Value>(&text)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1,
        "state carries no offset"
    );
    js.assert_no_event("filtered", Duration::from_millis(300))
        .await;

    js.open_recovering(
        "opted",
        &ns,
        json!({"transports": ["websocket"], "auth": {"apikey": GLOBAL_KEY, "snapshot": true}}),
    )
    .await;
    assert_eq!(js.next_event("opted").await.0, "connection.update");
    assert_eq!(js.next_event("opted").await.0, "qrcode.updated");
    post_webhook(&app.webhook_url(), event_body("call", "acme-support", 1)).await;
    let (event, text) = js.next_event("opted").await;
    assert_eq!(event, "call");
    assert_eq!(n_and_offset(&text).0, 1);

    js.connect("plain", &ns, with_key("websocket", GLOBAL_KEY))
        .await;
    js.assert_no_event("plain", Duration::from_millis(200))
        .await;
    js.shutdown().await;
}

#[tokio::test]
async fn filters_apply_to_replayed_events() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    let mut js = JsDriver::start().await;
    let ns = app.url("/acme");
    let opts =
        json!({"transports": ["websocket"], "auth": {"apikey": GLOBAL_KEY, "events": "CALL"}});
    js.open_recovering("f", &ns, opts.clone()).await;
    js.wait_connected("f").await;
    post_calls(&app, "acme", 0..1).await;
    let (_, last) = n_and_offset(&js.next_event("f").await.1);
    js.close("f").await;
    for n in 1..7 {
        let event = if n % 2 == 0 {
            "call"
        } else {
            "messages.upsert"
        };
        post_webhook(&app.webhook_url(), event_body(event, "acme", n)).await;
    }
    js.open_from("g", &ns, opts, &last).await;
    let recovery = serde_json::from_str::<Value>(&js.next_event("g").await.1).unwrap()[0].clone();
    assert_eq!(recovery["replayed"], 3, "{recovery}");
    for expected in [2, 4, 6] {
        let (event, text) = js.next_event("g").await;
        assert_eq!((event.as_str(), n_and_offset(&text).0), ("call", expected));
    }
    js.shutdown().await;
}

#[tokio::test]
async fn a_duplicate_webhook_is_delivered_once() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    let mut js = JsDriver::start().await;
    js.connect(
        "c",
        &app.url("/acme-support"),
        with_key("websocket", GLOBAL_KEY),
    )
    .await;
    let body = fixture("messages-upsert.json");
    let first = post_webhook(&app.webhook_url(), body.clone()).await;
    let retry = post_webhook(&app.webhook_url(), body).await;
    assert_eq!(first, (200, json!({"ok": true})));
    assert_eq!(retry, (200, json!({"ok": true, "duplicate": true})));
    assert_eq!(js.next_event("c").await.0, "messages.upsert");
    js.assert_no_event("c", Duration::from_millis(300)).await;
    js.shutdown().await;
}

/// 50 clients that drop and reconnect every 200–2,000 ms while 2,000 webhooks flow each
/// end up with every event, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_loss_under_reconnect_churn() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    let mut js = JsDriver::start().await;
    let ns = app.url("/churn");
    let opts = json!({
        "transports": ["websocket"], "auth": {"apikey": GLOBAL_KEY},
        "reconnection": true, "reconnectionDelay": 50, "reconnectionDelayMax": 300, "randomizationFactor": 0
    });
    let clients: Vec<String> = (0..50).map(|i| format!("c{i}")).collect();
    for id in &clients {
        js.open_counting(id, &ns, opts.clone()).await;
    }
    for id in &clients {
        assert_eq!(js.wait_connected(id).await["type"], "connect");
    }
    for id in &clients {
        js.churn(id, 200, 2000).await;
    }
    let total = 2000u64;
    for n in 0..total {
        let (status, _) = post_webhook(&app.webhook_url(), event_body("call", "churn", n)).await;
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    for id in &clients {
        js.stop_churn(id).await;
    }
    // Drain: every client ends with every event.
    let reconnects = js.assert_all_delivered(&clients, total).await;
    assert!(
        reconnects >= 100,
        "the clients really churned: {reconnects} reconnects"
    );
    println!("churn: 50 clients, {total} events each, {reconnects} reconnects, 100% delivered");
    js.shutdown().await;
}
