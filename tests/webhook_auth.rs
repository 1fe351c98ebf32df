//! Who may POST webhooks: Evolution's JWT, a static header (each per instance by default,
//! or shared), a path token, or the peer allow-list.

mod common;

use common::*;
use evo_realtime::config::Secret;
use serde_json::{Value, json};

const JWT_SECRET: &str = "jwt-key-from-evolution-headers";

async fn post(url: &str, headers: &[(&str, String)]) -> (u16, Value) {
    let mut request = http()
        .post(url)
        .header("content-type", "application/json")
        .body(event_body("messages.upsert", "acme", 1));
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

type Headers = Vec<(&'static str, String)>;

/// Instance acme's credential under a master secret (the bodies here are acme's).
fn acme(master: &str) -> String {
    webhook_credential(master, "acme")
}

fn bearer(token: String) -> Headers {
    vec![("authorization", format!("Bearer {token}"))]
}

#[tokio::test]
async fn jwt_as_evolution_signs_it() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.webhook.jwt_secret = Some(Secret::new(JWT_SECRET));
    let app = spawn_app(config).await;
    let url = app.webhook_url();
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };

    // (what, headers, status, error contains)
    let cases: Vec<(&str, Headers, u16, &str)> = vec![
        (
            "fresh token",
            bearer(evolution_jwt(&acme(JWT_SECRET), 0)),
            200,
            "",
        ),
        // Evolution's retries reuse one token for ~20 minutes: exp (iat+600) passed 5 minutes ago.
        (
            "retried within the leeway",
            bearer(evolution_jwt(&acme(JWT_SECRET), 900)),
            200,
            "",
        ),
        (
            "expired beyond the leeway",
            bearer(evolution_jwt(&acme(JWT_SECRET), 600 + 1200 + 60)),
            401,
            "expired",
        ),
        (
            "wrong secret",
            bearer(evolution_jwt("another-secret", 0)),
            401,
            "signature",
        ),
        (
            "wrong claims",
            bearer(sign_jwt(
                &acme(JWT_SECRET),
                &json!({"iat": now(), "exp": now() + 600, "app": "other", "action": "webhook"}),
            )),
            401,
            "claims",
        ),
        (
            "no exp",
            bearer(sign_jwt(
                &acme(JWT_SECRET),
                &json!({"iat": now(), "app": "evolution", "action": "webhook"}),
            )),
            401,
            "exp",
        ),
        (
            "alg none",
            bearer(unsigned_jwt(
                &json!({"iat": now(), "exp": now() + 600, "app": "evolution", "action": "webhook"}),
            )),
            401,
            "jwt",
        ),
        ("garbage", bearer("not.a.jwt".into()), 401, "jwt"),
        ("no credential", vec![], 401, "credentials"),
    ];
    for (what, headers, status, error) in cases {
        let (got, body) = post(&url, &headers).await;
        assert_eq!(got, status, "{what}: {body}");
        if status != 200 {
            let message = body["error"].as_str().unwrap_or_default();
            assert!(message.contains(error), "{what}: {message:?}");
        }
    }
}

#[tokio::test]
async fn static_header_secret() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.webhook.secret = Some(Secret::new("s3cret-header"));
    let app = spawn_app(config).await;
    let url = app.webhook_url();
    assert_eq!(
        post(&url, &[("x-webhook-secret", acme("s3cret-header"))])
            .await
            .0,
        200
    );
    assert_eq!(
        post(&url, &[("x-webhook-secret", "s3cret-headers".into())])
            .await
            .0,
        401
    );
    assert_eq!(
        post(&url, &[("x-other", acme("s3cret-header"))]).await.0,
        401
    );
    assert_eq!(post(&url, &[]).await.0, 401);
}

#[tokio::test]
async fn one_valid_credential_suffices() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.webhook.secret = Some(Secret::new("s3cret-header"));
    config.webhook.jwt_secret = Some(Secret::new(JWT_SECRET));
    config.webhook.path_token = Some(Secret::new("tok"));
    let app = spawn_app(config).await;
    let url = app.webhook_url();
    assert_eq!(
        post(&url, &[("x-webhook-secret", acme("s3cret-header"))])
            .await
            .0,
        200
    );
    assert_eq!(
        post(&url, &bearer(evolution_jwt(&acme(JWT_SECRET), 0)))
            .await
            .0,
        200
    );
    assert_eq!(post(&format!("{url}/tok"), &[]).await.0, 200);
    assert_eq!(
        post(
            &format!("{url}/bad/messages-upsert"),
            &[("x-webhook-secret", acme("s3cret-header"))]
        )
        .await
        .0,
        401
    );
    assert_eq!(post(&url, &bearer(evolution_jwt("nope", 0))).await.0, 401);
}

#[tokio::test]
async fn path_token() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.webhook.path_token = Some(Secret::new("Zx9-path-token"));
    let app = spawn_app(config).await;
    let url = app.webhook_url();
    assert_eq!(post(&format!("{url}/Zx9-path-token"), &[]).await.0, 200);
    assert_eq!(
        post(&format!("{url}/Zx9-path-token/messages-upsert"), &[])
            .await
            .0,
        200
    );
    assert_eq!(post(&format!("{url}/Zx9-path-tokeN"), &[]).await.0, 401);
    assert_eq!(
        post(&format!("{url}/wrong/messages-upsert"), &[]).await.0,
        401
    );
    assert_eq!(post(&url, &[]).await.0, 401);
}

#[tokio::test]
async fn without_credentials_only_allowed_peers() {
    let evolution = FakeEvolution::start().await;
    // The default allow-list is loopback, where the tests run.
    let app = spawn_app(test_config(&evolution.url())).await;
    assert_eq!(post(&app.webhook_url(), &[]).await.0, 200);

    let mut config = test_config(&evolution.url());
    config.webhook.allowed_cidrs = vec!["10.0.0.0/8".into()];
    let app = spawn_app(config).await;
    let (status, body) = post(&app.webhook_url(), &[]).await;
    assert_eq!(status, 403);
    assert!(
        body["error"].as_str().unwrap().contains("127.0.0.1"),
        "{body}"
    );
}

#[tokio::test]
async fn the_shared_single_tenant_mode_accepts_the_master_secret_for_any_instance() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.webhook.secret = Some(Secret::new("s3cret-header"));
    config.webhook.jwt_secret = Some(Secret::new(JWT_SECRET));
    config.webhook.credentials = evo_realtime::webhook::CredentialMode::Shared;
    let app = spawn_app(config).await;
    let url = app.webhook_url();
    // Upgrading with SIDECAR_WEBHOOK_CREDENTIALS=shared keeps the old headers working.
    assert_eq!(
        post(&url, &[("x-webhook-secret", "s3cret-header".into())])
            .await
            .0,
        200
    );
    assert_eq!(
        post(&url, &bearer(evolution_jwt(JWT_SECRET, 0))).await.0,
        200
    );
    // Control: a wrong secret is still refused, and a derived one is not the shared one.
    assert_eq!(
        post(&url, &[("x-webhook-secret", acme("s3cret-header"))])
            .await
            .0,
        401
    );
    assert_eq!(
        post(&url, &bearer(evolution_jwt("another", 0))).await.0,
        401
    );
}

#[tokio::test]
async fn the_master_secret_is_refused_per_instance_with_a_hint() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.webhook.jwt_secret = Some(Secret::new(JWT_SECRET));
    let app = spawn_app(config).await;
    // A deployment from before per-instance credentials: Evolution signs with the master.
    let (status, body) = post(&app.webhook_url(), &bearer(evolution_jwt(JWT_SECRET, 0))).await;
    assert_eq!(status, 401);
    let message = body["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("master secret") && message.contains("webhook-credential"),
        "{message}"
    );
    // Control: acme's own credential is accepted.
    let (status, body) = post(
        &app.webhook_url(),
        &bearer(evolution_jwt(&acme(JWT_SECRET), 0)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}
