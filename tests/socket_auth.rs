//! Who may join which namespace, through the official socket.io-client.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn the_global_key_joins_any_namespace_and_root_on_both_transports() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    let mut js = JsDriver::start().await;
    for transport in ["websocket", "polling"] {
        for ns in ["/acme", "/other", "/"] {
            let id = format!("{transport}{ns}");
            let report = js
                .connect(&id, &app.url(ns), with_key(transport, GLOBAL_KEY))
                .await;
            assert_eq!(report["type"], "connect", "{id}: {report}");
        }
    }
    // The browser form: the key in `auth`, not in the URL.
    let report = js
        .connect(
            "browser",
            &app.url("/acme"),
            json!({"transports": ["websocket"], "auth": {"apikey": GLOBAL_KEY}}),
        )
        .await;
    assert_eq!(report["type"], "connect");
    assert_eq!(evolution.lookups(), 0, "the global key is never looked up");
    js.shutdown().await;
}

#[tokio::test]
async fn an_instance_token_is_confined_to_its_instance() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    let mut js = JsDriver::start().await;

    for (how, opts) in [
        ("query", with_key("websocket", ACME_TOKEN)),
        (
            "header",
            json!({"transports": ["polling"], "extraHeaders": {"apikey": ACME_TOKEN}}),
        ),
        (
            "auth",
            json!({"transports": ["websocket"], "auth": {"apikey": ACME_TOKEN}}),
        ),
    ] {
        let own = js
            .connect(&format!("{how}-own"), &app.url("/acme"), opts.clone())
            .await;
        assert_eq!(own["type"], "connect", "{how}: {own}");
        for ns in ["/other", "/"] {
            let refused = js
                .connect(&format!("{how}{ns}"), &app.url(ns), opts.clone())
                .await;
            assert_eq!(refused["type"], "connect_error", "{how} on {ns}: {refused}");
            assert!(
                refused["message"]
                    .as_str()
                    .unwrap()
                    .contains("may not join"),
                "{refused}"
            );
        }
    }

    // Events of another instance never reach the token's socket.
    post_webhook(
        &app.webhook_url(),
        event_body("messages.upsert", "other", 1),
    )
    .await;
    post_webhook(&app.webhook_url(), event_body("messages.upsert", "acme", 2)).await;
    let (_, text) = js.next_event("query-own").await;
    assert!(text.contains(r#""instance":"acme""#), "{text}");
    js.assert_no_event("query-own", Duration::from_millis(300))
        .await;
    js.shutdown().await;
}

#[tokio::test]
async fn a_refused_namespace_leaves_the_others_working_on_one_connection() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    let mut js = JsDriver::start().await;
    // One Manager (shared Engine.IO connection) multiplexing two namespaces.
    let opts =
        json!({"transports": ["websocket"], "forceNew": false, "query": {"apikey": ACME_TOKEN}});
    assert_eq!(
        js.connect("own", &app.url("/acme"), opts.clone()).await["type"],
        "connect"
    );
    assert_eq!(
        js.connect("foreign", &app.url("/other"), opts).await["type"],
        "connect_error"
    );
    post_webhook(&app.webhook_url(), event_body("call", "acme", 1)).await;
    assert_eq!(js.next_event("own").await.0, "call");
    js.shutdown().await;
}

#[tokio::test]
async fn a_wrong_key_is_refused_like_evolution_on_both_transports() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;

    // Raw handshakes: polling → 403 {"code":4}, websocket → 400.
    let polling = http()
        .get(app.url("/socket.io/?EIO=4&transport=polling&apikey=wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(polling.status().as_u16(), 403);
    let body: Value = polling.json().await.unwrap();
    assert_eq!(body["code"], 4);
    assert_eq!(body["message"], "invalid api key");
    let websocket = http()
        .get(app.url("/socket.io/?EIO=4&transport=websocket"))
        .header("apikey", "wrong")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(websocket.status().as_u16(), 400);

    let mut js = JsDriver::start().await;
    for transport in ["websocket", "polling"] {
        let report = js
            .connect(transport, &app.url("/acme"), with_key(transport, "wrong"))
            .await;
        assert_eq!(report["type"], "connect_error", "{transport}: {report}");
    }
    let report = js
        .connect(
            "auth",
            &app.url("/acme"),
            json!({"transports": ["websocket"], "auth": {"apikey": "wrong"}}),
        )
        .await;
    assert_eq!(report["type"], "connect_error");
    assert_eq!(report["message"], "invalid api key");
    let report = js
        .connect(
            "none",
            &app.url("/acme"),
            json!({"transports": ["websocket"]}),
        )
        .await;
    assert_eq!(report["type"], "connect_error", "no key at all: {report}");
    // An empty global key never matches.
    let report = js
        .connect("empty", &app.url("/acme"), with_key("websocket", ""))
        .await;
    assert_eq!(report["type"], "connect_error");
    assert_eq!(
        evolution.lookups(),
        1,
        "one lookup for 'wrong', then the negative cache"
    );
    js.shutdown().await;
}

#[tokio::test]
async fn many_connections_with_one_token_make_one_lookup() {
    let evolution = FakeEvolution::start().await;
    // A slow upstream keeps the lookups concurrent.
    evolution
        .state
        .lookup_delay_ms
        .store(300, std::sync::atomic::Ordering::SeqCst);
    let app = spawn_app(test_config(&evolution.url())).await;
    let mut js = JsDriver::start().await;
    let ids: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let transport = if i % 2 == 0 { "websocket" } else { "polling" };
        js.open(id, &app.url("/acme"), with_key(transport, ACME_TOKEN))
            .await;
    }
    for id in &ids {
        assert_eq!(js.wait_connected(id).await["type"], "connect", "{id}");
    }
    assert_eq!(evolution.lookups(), 1);
    js.shutdown().await;
}

#[tokio::test]
async fn the_token_cache_expires() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.auth.token_cache_ttl_secs = 1;
    let app = spawn_app(config).await;
    let mut js = JsDriver::start().await;
    assert_eq!(
        js.connect("a", &app.url("/acme"), with_key("websocket", ACME_TOKEN))
            .await["type"],
        "connect"
    );
    assert_eq!(evolution.lookups(), 1);
    // Revoke the token upstream; after the TTL the sidecar asks again and refuses.
    evolution.state.tokens.lock().unwrap().remove(ACME_TOKEN);
    let mut attempt = 0;
    eventually("the revoked token is re-checked", async || {
        attempt += 1;
        let report = js
            .connect(
                &format!("b{attempt}"),
                &app.url("/acme"),
                with_key("websocket", ACME_TOKEN),
            )
            .await;
        report["type"] == "connect_error"
    })
    .await;
    // The revalidator may have asked too (it re-checks connected token sockets every TTL).
    assert!(evolution.lookups() >= 2);
    js.shutdown().await;
}

#[tokio::test]
async fn upstream_down_refuses_promptly_and_never_hangs() {
    // Nothing listens on this port any more.
    let closed = free_port();
    let app = spawn_app(test_config(&format!("http://{closed}"))).await;
    let started = Instant::now();
    let response = http()
        .get(app.url(&format!(
            "/socket.io/?EIO=4&transport=polling&apikey={ACME_TOKEN}"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("authentication unavailable"),
        "{body}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // An upstream that accepts but never answers: refused within the lookup timeout.
    let evolution = FakeEvolution::start().await;
    evolution
        .state
        .lookup_delay_ms
        .store(30_000, std::sync::atomic::Ordering::SeqCst);
    let mut config = test_config(&evolution.url());
    config.auth.lookup_timeout_secs = 1;
    let app = spawn_app(config).await;
    let mut js = JsDriver::start().await;
    let started = Instant::now();
    let report = js
        .connect("hang", &app.url("/acme"), with_key("polling", ACME_TOKEN))
        .await;
    assert_eq!(report["type"], "connect_error", "{report}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The global key does not depend on the upstream.
    assert_eq!(
        js.connect(
            "global",
            &app.url("/acme"),
            with_key("websocket", GLOBAL_KEY)
        )
        .await["type"],
        "connect"
    );
    js.shutdown().await;
}

/// Evolution's Manager: `io(API_URL, {transports: ["websocket", "polling"],
/// reconnectionAttempts: 5})` on `/` without a key. From an address in
/// `WEBSOCKET_ALLOWED_HOSTS` it joins (websocket or polling) and gets every instance's
/// events on `/`; its emits are refused; from any other address it is refused.
#[tokio::test]
async fn the_manager_joins_without_a_key_only_from_an_allowed_host() {
    let evolution = FakeEvolution::start().await;
    let manager = |transports: Value, forwarded_for: Option<&str>| {
        let mut opts = json!({"transports": transports, "reconnectionAttempts": 5});
        if let Some(client) = forwarded_for {
            opts["extraHeaders"] = json!({"x-forwarded-for": client});
        }
        opts
    };
    let both = json!(["websocket", "polling"]);

    // Directly: the browser's own address (here 127.0.0.1) is listed.
    let mut config = test_config(&evolution.url());
    config.hub.global_events = true;
    config.auth.allowed_hosts = vec!["127.0.0.1".into()];
    let direct = spawn_app(config).await;
    let mut js = JsDriver::start().await;
    for (id, transports) in [("manager", both.clone()), ("polling", json!(["polling"]))] {
        let report = js
            .connect(id, &direct.url("/"), manager(transports, None))
            .await;
        assert_eq!(report["type"], "connect", "{id}: {report}");
    }
    let body = fixture("messages-upsert.json");
    assert_eq!(post_webhook(&direct.webhook_url(), body).await.0, 200);
    for id in ["manager", "polling"] {
        let (event, text) = js.next_event(id).await;
        assert_eq!(event, "messages.upsert", "{id}");
        assert!(
            text.contains(r#""instance":"acme-support""#),
            "{id}: {text}"
        );
    }
    // Every namespace, like Evolution; but no emits: the sidecar has no key to send.
    let report = js
        .connect(
            "instance",
            &direct.url("/acme"),
            manager(both.clone(), None),
        )
        .await;
    assert_eq!(report["type"], "connect", "{report}");
    let ack = js
        .emit_ack(
            "instance",
            "message/sendText",
            vec![json!({"number": "1", "text": "x"})],
        )
        .await;
    assert_eq!(ack[0]["status"], 401, "{ack}");
    assert!(
        ack[0]["error"]
            .as_str()
            .unwrap()
            .contains("WEBSOCKET_ALLOWED_HOSTS"),
        "{ack}"
    );
    assert!(evolution.requests().is_empty(), "nothing was forwarded");

    // Behind a trusted proxy: the address is X-Forwarded-For's.
    let mut config = test_config(&evolution.url());
    config.hub.global_events = true;
    config.guard.trusted_proxies = vec!["127.0.0.1".into()];
    config.auth.allowed_hosts = vec!["192.0.2.0/24".into()];
    let proxied = spawn_app(config).await;
    let report = js
        .connect(
            "operator",
            &proxied.url("/"),
            manager(both.clone(), Some("192.0.2.10")),
        )
        .await;
    assert_eq!(report["type"], "connect", "{report}");
    for (id, client) in [("stranger", Some("198.51.100.7")), ("proxy-itself", None)] {
        for transports in [json!(["websocket"]), json!(["polling"])] {
            let id = format!("{id}-{}", transports[0].as_str().unwrap());
            let report = js
                .connect(&id, &proxied.url("/"), manager(transports, client))
                .await;
            assert_eq!(report["type"], "connect_error", "{id}: {report}");
            assert_eq!(
                report["message"],
                "an api key is required (apikey in the query, header or auth payload)"
            );
        }
    }
    // A key still works from anywhere (positive control for the refusals above).
    let mut with_key = manager(both, Some("198.51.100.7"));
    with_key["auth"] = json!({"apikey": GLOBAL_KEY});
    let report = js.connect("keyed", &proxied.url("/"), with_key).await;
    assert_eq!(report["type"], "connect", "{report}");
    assert_eq!(
        post_webhook(&proxied.webhook_url(), fixture("send-message.json"))
            .await
            .0,
        200
    );
    for id in ["operator", "keyed"] {
        assert_eq!(js.next_event(id).await.0, "send.message", "{id}");
    }
    js.shutdown().await;
}

#[test]
fn any_host_needs_its_own_setting() {
    let mut config = evo_realtime::Config::default();
    config.auth.allowed_hosts = vec!["*".into()];
    let err = config.validate().unwrap_err();
    assert!(err.to_string().contains("SIDECAR_ALLOW_ANY_HOST"), "{err}");
    config.auth.allow_any_host = true;
    config.validate().expect("both settings: accepted");
}
