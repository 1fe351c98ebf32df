//! Tenants stay apart: a webhook credential for one instance never posts for another, a
//! deleted instance leaves nothing behind, the default webhook mode does not trust a
//! same-host proxy, metrics are not public, and revoked tokens go within one TTL.
//! Instance `acme` is ACME_TOKEN's; instance `other` is OTHER_TOKEN's.

mod common;

use std::time::{Duration, Instant};

use common::*;
use evo_realtime::config::Secret;
use serde_json::{Value, json};

const JWT_MASTER: &str = "jwt-master-secret-0123";
const HEADER_MASTER: &str = "header-master-secret-4567";
const PATH_TOKEN: &str = "server-wide-path-token";

async fn post(url: &str, body: &Value, headers: &[(&str, String)]) -> (u16, Value) {
    let mut request = http()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn qrcode(instance: &str, base64: &str) -> Value {
    json!({"event": "qrcode.updated", "instance": instance, "data": {"qrcode": {"base64": base64}}})
}

type Headers = Vec<(&'static str, String)>;

fn bearer(token: String) -> Headers {
    vec![("authorization", format!("Bearer {token}"))]
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn a_webhook_credential_for_one_instance_is_refused_for_another() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.webhook.jwt_secret = Some(Secret::new(JWT_MASTER));
    config.webhook.secret = Some(Secret::new(HEADER_MASTER));
    config.webhook.path_token = Some(Secret::new(PATH_TOKEN));
    let app = spawn_app(config).await;
    let url = app.webhook_url();
    let mut js = JsDriver::start().await;
    js.connect(
        "other",
        &app.url("/other"),
        with_key("websocket", GLOBAL_KEY),
    )
    .await;

    // What acme's owner can read back from GET /webhook/find/acme.
    let acme_jwt_key = webhook_credential(JWT_MASTER, "acme");
    let acme_header = webhook_credential(HEADER_MASTER, "acme");
    let cases: Vec<(&str, Value, Headers, u16)> = vec![
        (
            "acme's JWT for acme",
            qrcode("acme", "a"),
            bearer(evolution_jwt(&acme_jwt_key, 0)),
            200,
        ),
        (
            "acme's JWT for other",
            qrcode("other", "attacker"),
            bearer(evolution_jwt(&acme_jwt_key, 0)),
            401,
        ),
        (
            "acme's header secret for acme",
            qrcode("acme", "b"),
            vec![("x-webhook-secret", acme_header.clone())],
            200,
        ),
        (
            "acme's header secret for other",
            qrcode("other", "attacker"),
            vec![("x-webhook-secret", acme_header.clone())],
            401,
        ),
        (
            "the master JWT secret itself (the old shared credential)",
            qrcode("other", "attacker"),
            bearer(evolution_jwt(JWT_MASTER, 0)),
            401,
        ),
        (
            "the master header secret itself (the old shared credential)",
            qrcode("other", "attacker"),
            vec![("x-webhook-secret", HEADER_MASTER.to_owned())],
            401,
        ),
        (
            "other's own JWT for other",
            qrcode("other", "legit-jwt"),
            bearer(evolution_jwt(&webhook_credential(JWT_MASTER, "other"), 0)),
            200,
        ),
    ];
    for (what, body, headers, status) in &cases {
        let (got, answer) = post(&url, body, headers).await;
        assert_eq!(got, *status, "{what}: {answer}");
        if *status == 401 {
            let message = answer["error"].as_str().unwrap_or_default();
            assert!(
                message.contains("other"),
                "{what}: names the instance: {message}"
            );
        }
    }
    // The server-wide path token (the global webhook's) accepts any instance.
    for instance in ["acme", "other"] {
        let body = qrcode(instance, "legit-path");
        let (got, answer) = post(&format!("{url}/{PATH_TOKEN}"), &body, &[]).await;
        assert_eq!(got, 200, "path token for {instance}: {answer}");
    }
    // Only the two legitimate events for `other` reached its sockets, in order.
    for expected in ["legit-jwt", "legit-path"] {
        let (event, text) = js.next_event("other").await;
        assert_eq!(event, "qrcode.updated");
        let args: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(args[0]["data"]["qrcode"]["base64"], expected, "{text}");
    }
    js.assert_no_event("other", Duration::from_millis(300))
        .await;
    js.shutdown().await;
}

#[tokio::test]
async fn a_jwt_not_yet_valid_is_refused() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.webhook.jwt_secret = Some(Secret::new(JWT_MASTER));
    let leeway = config.webhook.jwt_leeway_secs as i64;
    let app = spawn_app(config).await;
    let key = webhook_credential(JWT_MASTER, "acme");
    let claims = |nbf: i64| json!({"iat": now(), "nbf": nbf, "exp": now() + 600, "app": "evolution", "action": "webhook"});
    let cases = [
        ("nbf now", now(), 200),
        (
            "nbf within the leeway (clock skew)",
            now() + leeway / 2,
            200,
        ),
        ("nbf beyond the leeway", now() + leeway + 600, 401),
    ];
    for (what, nbf, status) in cases {
        let headers = bearer(sign_jwt(&key, &claims(nbf)));
        // A distinct body per case, so none is answered as a duplicate.
        let body = qrcode("acme", what);
        let (got, answer) = post(&app.webhook_url(), &body, &headers).await;
        assert_eq!(got, status, "{what}: {answer}");
        if status == 401 {
            let message = answer["error"].as_str().unwrap_or_default();
            assert!(message.contains("not valid yet"), "{what}: {message}");
        }
    }
}

#[tokio::test]
async fn an_expired_jwt_is_refused_before_its_body_is_read() {
    // The refusal is decided from the head: a body that is not even JSON gets the JWT's
    // 401, while with a valid token the same body is read and parsed (400). The refused
    // body is drained unparsed so Node's client reads the status (tests/edge.rs).
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.webhook.jwt_secret = Some(Secret::new(JWT_MASTER));
    let app = spawn_app(config).await;
    let key = webhook_credential(JWT_MASTER, "acme");
    let garbage = "x".repeat(1_000_000);
    let expired = http()
        .post(app.webhook_url())
        .header("content-type", "application/json")
        .bearer_auth(evolution_jwt(&key, 600 + 1200 + 60))
        .body(garbage.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(expired.status(), 401);
    assert!(expired.text().await.unwrap().contains("jwt expired"));
    // Control: a valid token gets its body read and parsed, and refused for what it is
    // (a body under 64 KiB: a longer one must name its instance within that much).
    let valid = http()
        .post(app.webhook_url())
        .header("content-type", "application/json")
        .bearer_auth(evolution_jwt(&key, 0))
        .body(garbage[..60_000].to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(valid.status(), 400);
}

#[tokio::test]
async fn a_same_host_proxy_cannot_post_in_the_default_mode() {
    let evolution = FakeEvolution::start().await;
    // No webhook credential: the default peer mode.
    let app = spawn_app(test_config(&evolution.url())).await;
    let url = app.webhook_url();
    let body = qrcode("acme", "x");
    let (status, answer) = post(&url, &body, &[]).await;
    assert_eq!(status, 200, "Evolution on loopback, no proxy: {answer}");
    // What nginx, Caddy, Envoy/Istio add in front of the sidecar.
    for (name, value) in [
        ("x-forwarded-for", "203.0.113.7"),
        ("forwarded", "for=203.0.113.7"),
        ("via", "1.1 caddy"),
        ("x-real-ip", "203.0.113.7"),
        ("x-forwarded-proto", "https"),
        ("x-envoy-attempt-count", "1"),
        (
            "x-forwarded-client-cert",
            "By=spiffe://cluster.local/ns/x/sa/y",
        ),
    ] {
        let (status, answer) = post(&url, &body, &[(name, value.to_owned())]).await;
        assert_eq!(status, 403, "{name}: {answer}");
        let message = answer["error"].as_str().unwrap_or_default();
        assert!(message.contains(name), "{name}: {message}");
    }
    // Istio's inbound sidecar (REDIRECT mode) connects from 127.0.0.6: not Evolution.
    let mesh = reqwest::Client::builder()
        .no_proxy()
        .local_address(std::net::IpAddr::from([127, 0, 0, 6]))
        .build()
        .unwrap();
    let response = mesh
        .post(&url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403, "a peer at 127.0.0.6");
}

#[tokio::test]
async fn anonymous_metrics_are_refused() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    let mut js = JsDriver::start().await;
    js.connect(
        "a",
        &app.url("/secret-tenant"),
        with_key("websocket", GLOBAL_KEY),
    )
    .await;
    let scrape = |auth: Option<String>| {
        let mut request = http().get(app.url("/_sidecar/metrics"));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        }
    };
    for (what, auth) in [
        ("anonymous", None),
        ("an instance token", Some(format!("Bearer {ACME_TOKEN}"))),
        ("a wrong key", Some(format!("Bearer {GLOBAL_KEY}x"))),
        (
            "the global key, not as a bearer",
            Some(GLOBAL_KEY.to_owned()),
        ),
    ] {
        let (status, text) = scrape(auth).await;
        assert_eq!(status, 401, "{what}: {text}");
        assert!(!text.contains("secret-tenant"), "{what}: {text}");
    }
    let (status, text) = scrape(Some(format!("Bearer {GLOBAL_KEY}"))).await;
    assert_eq!(status, 200);
    assert!(text.contains("namespace=\"/secret-tenant\""), "{text}");
    js.shutdown().await;
}

#[tokio::test]
async fn deleting_an_instance_forgets_it() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    // Long enough that only the deletion can make the sidecar ask Evolution again.
    config.auth.token_cache_ttl_secs = 3600;
    let app = spawn_app(config).await;
    let url = app.webhook_url();
    let mut js = JsDriver::start().await;
    let opts =
        |key: &str| json!({"transports": ["websocket"], "auth": {"apikey": key, "snapshot": true}});

    // The old owner's instance: a state (with its phone number) and a private message.
    js.connect("old", &app.url("/acme"), with_key("websocket", ACME_TOKEN))
        .await;
    let state = json!({"event": "connection.update", "instance": "acme",
                       "data": {"state": "open", "wuid": "5511999990000@s.whatsapp.net"}});
    let private = json!({"event": "messages.upsert", "instance": "acme",
                         "data": {"message": {"conversation": "old owner's secret"}}});
    for body in [&state, &private] {
        assert_eq!(post_webhook(&url, body.to_string()).await.0, 200);
    }
    // Control: before the deletion, a bogus offset replays what is retained.
    js.open_from("before", &app.url("/acme"), opts(ACME_TOKEN), "bogus")
        .await;
    let mut before = Vec::new();
    for _ in 0..4 {
        before.push(js.next_event("before").await.0);
    }
    // The state, then the recovery announcement and everything retained.
    assert_eq!(
        before,
        [
            "connection.update",
            "sidecar.recovery",
            "connection.update",
            "messages.upsert"
        ],
        "the test can see retained events"
    );
    js.close("before").await;

    // Evolution deletes the instance and its token; someone re-creates the name.
    let new_token = "new-owner-token-1357";
    {
        let mut tokens = evolution.state.tokens.lock().unwrap();
        tokens.remove(ACME_TOKEN);
        tokens.insert(new_token.into(), vec!["acme".into()]);
    }
    let deleted =
        json!({"event": "instance.delete", "instance": "acme", "data": {"instanceName": "acme"}});
    assert_eq!(post_webhook(&url, deleted.to_string()).await.0, 200);
    js.wait(|r| r["id"] == "old" && r["type"] == "disconnect")
        .await;

    // The deleted token is refused at once, not after its cache entry's 3600 s.
    let lookups = evolution.lookups();
    let refused = js
        .connect(
            "again",
            &app.url("/acme"),
            with_key("websocket", ACME_TOKEN),
        )
        .await;
    assert_eq!(refused["type"], "connect_error", "{refused}");
    assert!(evolution.lookups() > lookups, "Evolution was asked again");

    // The new owner sees nothing of the old one: no state, nothing replayed.
    js.open_from("new", &app.url("/acme"), opts(new_token), "bogus")
        .await;
    let (event, text) = js.next_event("new").await;
    assert_eq!(event, "sidecar.recovery", "no state first: {text}");
    let recovery: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(recovery[0]["recovered"], false, "{text}");
    assert_eq!(recovery[0]["replayed"], 0, "{text}");
    // Positive control: the new owner's own events arrive, and only those.
    let fresh = json!({"event": "messages.upsert", "instance": "acme",
                       "data": {"message": {"conversation": "new owner"}}});
    assert_eq!(post_webhook(&url, fresh.to_string()).await.0, 200);
    let (event, text) = js.next_event("new").await;
    assert_eq!(event, "messages.upsert");
    assert!(
        text.contains("new owner") && !text.contains("old owner"),
        "{text}"
    );
    js.shutdown().await;
}

#[tokio::test]
async fn a_revoked_token_is_disconnected_within_one_ttl() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    let ttl = Duration::from_secs(3);
    config.auth.token_cache_ttl_secs = ttl.as_secs();
    let app = spawn_app(config).await;
    let mut js = JsDriver::start().await;
    js.connect(
        "global",
        &app.url("/acme"),
        with_key("websocket", GLOBAL_KEY),
    )
    .await;
    // Connecting caches the token's positive answer for one TTL from now.
    let joined = js
        .connect(
            "token",
            &app.url("/acme"),
            with_key("websocket", ACME_TOKEN),
        )
        .await;
    assert_eq!(joined["type"], "connect");
    evolution.state.tokens.lock().unwrap().remove(ACME_TOKEN);
    let revoked = Instant::now();
    let gone = js
        .wait_for(|r| r["id"] == "token" && r["type"] == "disconnect", ttl * 3)
        .await
        .expect("the revoked token's socket is disconnected");
    let took = revoked.elapsed();
    eprintln!("revoked token disconnected {took:?} after the revocation (TTL {ttl:?})");
    assert_eq!(gone["reason"], "io server disconnect");
    // One TTL, plus a lookup and the disconnect's trip to the client.
    assert!(
        took < ttl + Duration::from_millis(500),
        "disconnected {took:?} after the revocation (TTL {ttl:?})"
    );
    // Control: the global key's socket stays and still gets events.
    post_webhook(&app.webhook_url(), event_body("call", "acme", 1)).await;
    assert_eq!(js.next_event("global").await.0, "call");
    js.shutdown().await;
}

#[tokio::test]
async fn while_evolution_errs_token_sockets_are_kept_for_a_bounded_time() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.auth.token_cache_ttl_secs = 1;
    let grace = Duration::from_secs(4);
    config.hub.token_unverified_grace_secs = grace.as_secs();
    let app = spawn_app(config).await;
    let mut js = JsDriver::start().await;
    js.connect(
        "global",
        &app.url("/acme"),
        with_key("websocket", GLOBAL_KEY),
    )
    .await;
    js.connect(
        "token",
        &app.url("/acme"),
        with_key("websocket", ACME_TOKEN),
    )
    .await;
    evolution
        .state
        .lookup_status
        .store(500, std::sync::atomic::Ordering::SeqCst);
    let failing = Instant::now();
    let gone = js
        .wait_for(
            |r| r["id"] == "token" && r["type"] == "disconnect",
            grace * 4,
        )
        .await
        .expect("an unverifiable token socket is disconnected after the grace time");
    let took = failing.elapsed();
    eprintln!("unverifiable token disconnected {took:?} after Evolution started failing");
    assert_eq!(gone["reason"], "io server disconnect");
    // Never unverified for longer than the grace time since the last check that passed
    // (one TTL before the failures at most), and kept at least grace - 2 TTL: here 2 s.
    assert!(
        took > Duration::from_millis(1500) && took < grace + Duration::from_millis(500),
        "disconnected {took:?} after Evolution started failing (grace {grace:?})"
    );
    let metrics = http()
        .get(app.url("/_sidecar/metrics"))
        .header("authorization", format!("Bearer {GLOBAL_KEY}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.lines().any(
            |line| line.starts_with("evo_token_revalidation_failures_total")
                && !line.ends_with(" 0")
        ),
        "{metrics}"
    );
    // Control: the global key does not depend on Evolution.
    post_webhook(&app.webhook_url(), event_body("call", "acme", 1)).await;
    assert_eq!(js.next_event("global").await.0, "call");
    js.shutdown().await;
}

/// Review finding: with `SIDECAR_EVENTS` set (the per-instance recipe lists a few events),
/// `instance.delete` was dropped by the filter before the hub could forget the instance,
/// so the deleted token's socket stayed and its cached answer lived on.
#[tokio::test]
async fn deletion_is_seen_through_an_event_filter() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.hub.events = vec!["MESSAGES_UPSERT".into()];
    config.auth.token_cache_ttl_secs = 3600;
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
    let deleted =
        json!({"event": "instance.delete", "instance": "acme", "data": {"instanceName": "acme"}});
    assert_eq!(
        post_webhook(&app.webhook_url(), deleted.to_string())
            .await
            .0,
        200
    );
    js.wait(|r| r["id"] == "token" && r["type"] == "disconnect")
        .await;
    let refused = js
        .connect(
            "again",
            &app.url("/acme"),
            with_key("websocket", ACME_TOKEN),
        )
        .await;
    assert_eq!(refused["type"], "connect_error", "{refused}");
    // Positive control: the filter still filters, and the global socket stays.
    let call = json!({"event": "call", "instance": "acme", "data": {}});
    post_webhook(&app.webhook_url(), call.to_string()).await;
    let upsert = json!({"event": "messages.upsert", "instance": "acme", "data": {}});
    post_webhook(&app.webhook_url(), upsert.to_string()).await;
    let mut events = Vec::new();
    while events.last().map(String::as_str) != Some("messages.upsert") {
        events.push(js.next_event("global").await.0);
    }
    assert!(!events.iter().any(|e| e == "call"), "{events:?}");
    js.shutdown().await;
}
