use super::config::Config;
use super::credentials::proxy_header;
use super::path::{PathToken, WebhookPath};
use super::*;
use crate::envelope::InstanceName;
use crate::setting::Secret;

fn config(token: Option<&str>) -> Config {
    Config {
        path_token: token.map(Secret::new),
        ..Config::default()
    }
}

#[test]
fn paths() {
    let parse = |token, path: &str| WebhookPath::parse(&config(token), path);
    let plain = parse(None, "/_sidecar/webhook").unwrap();
    assert_eq!(plain.suffix, None);
    let suffixed = parse(None, "/_sidecar/webhook//messages-upsert").unwrap();
    assert_eq!(suffixed.suffix.as_deref(), Some("messages-upsert"));
    let token = parse(Some("s3cret"), "/_sidecar/webhook/s3cret").unwrap();
    assert!(token.token == PathToken::Matched && token.suffix.is_none());
    let both = parse(Some("s3cret"), "/_sidecar/webhook/s3cret/call").unwrap();
    assert!(both.token == PathToken::Matched && both.suffix.as_deref() == Some("call"));
    let wrong = parse(Some("s3cret"), "/_sidecar/webhook/nope/call").unwrap();
    assert!(wrong.token == PathToken::Wrong);
    assert!(parse(None, "/_sidecar/webhooks").is_err());
    assert!(parse(None, "/_sidecar/webhook/a/b/c").is_err());
}

#[test]
fn instance_credentials_are_the_documented_hmac() {
    // `printf %s acme | openssl dgst -sha256 -hmac jwt-master`, as the README says.
    let master = Secret::new("jwt-master");
    let acme = InstanceName::parse("acme").unwrap();
    assert_eq!(
        instance_credential(&master, &acme),
        "f2f8739ec12d9a065ad037a67a466a37033645c0767ae27903b7328fd335b11d"
    );
    let other = InstanceName::parse("other").unwrap();
    assert_ne!(
        instance_credential(&master, &other),
        instance_credential(&master, &acme)
    );
}

#[test]
fn proxy_headers_are_recognized() {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "application/json".parse().unwrap());
    headers.insert("x-request-id", "1".parse().unwrap());
    assert_eq!(proxy_header(&headers), None);
    for name in [
        "x-forwarded-for",
        "forwarded",
        "via",
        "x-envoy-attempt-count",
    ] {
        let mut proxied = headers.clone();
        proxied.insert(http::HeaderName::from_static(name), "x".parse().unwrap());
        assert_eq!(proxy_header(&proxied), Some(name));
    }
}

#[test]
fn config_rules() {
    let mut config = Config::default();
    assert!(config.validate().is_ok());
    config.path = "/".into();
    assert!(config.validate().is_err());
    config.path = "/hooks/".into();
    assert!(config.validate().is_err());
    config.path = "/hooks".into();
    config.allowed_cidrs = vec!["10.0.0.0/8".into(), "192.168.1.7".into()];
    assert!(config.validate().is_ok());
    config.allowed_cidrs = vec!["nope".into()];
    assert!(config.validate().is_err());
}

#[tokio::test]
async fn a_publish_that_panics_is_a_retried_503_never_a_200() {
    // The failure, injected: the publishing task panics before anything is retained.
    let failed = retained(async { panic!("injected: publishing failed") }).await;
    let err = failed.expect_err("a panicked publish is not accepted");
    assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        !err.body_unread(),
        "the body was read: the connection may stay"
    );
    // Positive control: a publish that returns is what it returned.
    assert_eq!(
        retained(async { Published::Fresh }).await.unwrap(),
        Published::Fresh
    );
}
