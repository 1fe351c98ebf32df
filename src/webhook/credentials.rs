//! Who may post an event, and for which instance: the path token, per-instance (or
//! shared) JWT and header secrets, and the peer allow-list when no credential is set.

use std::net::IpAddr;
use std::sync::atomic::Ordering;

use http::{HeaderMap, header};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::Webhook;
use super::config::{Config, CredentialMode};
use super::error::Error;
use super::path::{PathToken, WebhookPath};
use crate::envelope::{self, InstanceName};
use crate::setting::{self, Secret};

/// The webhook credential of `instance`: lowercase hex of HMAC-SHA256(master, instance),
/// so `printf %s NAME | openssl dgst -sha256 -hmac MASTER` gives it too.
pub fn instance_credential(master: &Secret, instance: &InstanceName) -> String {
    use aws_lc_rs::hmac;
    let key = hmac::Key::new(hmac::HMAC_SHA256, master.expose().as_bytes());
    let tag = hmac::sign(&key, instance.as_str().as_bytes());
    tag.as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The headers to put into `instance`'s webhook (`jwt_key`, the header secret), as a JSON
/// object: what `evo-realtime webhook-credential <instance>` prints.
pub fn instance_headers(
    config: &Config,
    instance: &str,
) -> Result<serde_json::Value, setting::Error> {
    let instance = InstanceName::parse(instance)
        .map_err(|err| setting::Error::new(format!("instance {instance:?} is not valid: {err}")))?;
    if config.credentials == CredentialMode::Shared {
        return Err(setting::invalid(
            "webhook.credentials",
            &"shared",
            "every instance uses the master secrets themselves; per-instance credentials need \"per-instance\"",
        ));
    }
    let mut headers = serde_json::Map::new();
    if let Some(master) = &config.jwt_secret {
        headers.insert(
            "jwt_key".into(),
            instance_credential(master, &instance).into(),
        );
    }
    if let Some(master) = &config.secret {
        headers.insert(
            config.secret_header.clone(),
            instance_credential(master, &instance).into(),
        );
    }
    if headers.is_empty() {
        return Err(setting::Error::new(
            "no webhook master secret configured: set SIDECAR_WEBHOOK_JWT_SECRET or SIDECAR_WEBHOOK_SECRET",
        ));
    }
    Ok(serde_json::Value::Object(headers))
}

/// Headers a proxy or a service mesh adds. In the peer mode (no credential), a request
/// carrying one came through something on an allowed address, not from Evolution itself.
const PROXY_HEADERS: &[&str] = &[
    "forwarded",
    "via",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "cf-connecting-ip",
];
const PROXY_HEADER_PREFIXES: &[&str] = &["x-forwarded-", "x-envoy-", "x-b3-", "x-istio-"];

pub(super) fn proxy_header(headers: &HeaderMap) -> Option<&str> {
    headers.keys().map(http::HeaderName::as_str).find(|name| {
        PROXY_HEADERS.contains(name)
            || PROXY_HEADER_PREFIXES
                .iter()
                .any(|prefix| name.starts_with(prefix))
    })
}

/// What the credentials seen before the body allow. A per-instance credential can only
/// be judged once the body names its instance ([`Admission::check`]).
pub(super) enum Admission {
    /// The path token, a shared credential or an allowed peer: any instance.
    AnyInstance,
    /// Header credentials, to be checked against the body's instance.
    PerInstance {
        secret: Option<http::HeaderValue>,
        jwt: Option<String>,
    },
}

pub(super) fn authenticate(
    webhook: &Webhook,
    route: &WebhookPath,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
) -> Result<Admission, Error> {
    let config = &webhook.config;
    if route.token == PathToken::Wrong {
        return Err(Error::Unauthorized("invalid path token"));
    }
    if !config.has_credentials() {
        // Behind a same-host proxy or a mesh sidecar, the peer is the proxy: everyone.
        if let Some(name) = proxy_header(headers) {
            return Err(Error::Proxied(name.to_owned()));
        }
        return match peer {
            Some(ip) if webhook.cidrs.iter().any(|net| net.contains(&ip)) => {
                Ok(Admission::AnyInstance)
            }
            Some(ip) => Err(Error::Forbidden(ip)),
            // In-process callers (tests through `oneshot`) have no peer address.
            None => Ok(Admission::AnyInstance),
        };
    }
    if route.token == PathToken::Matched {
        return Ok(Admission::AnyInstance);
    }
    let secret = config
        .secret
        .as_ref()
        .and_then(|_| headers.get(config.secret_header.as_str()))
        .cloned();
    let jwt = webhook
        .jwt
        .as_ref()
        .and_then(|_| bearer(headers))
        .map(str::to_owned);
    if secret.is_none() && jwt.is_none() {
        return Err(Error::Unauthorized(
            "missing or invalid webhook credentials",
        ));
    }
    if config.credentials == CredentialMode::PerInstance {
        // The key depends on the body's instance, but the rest of the token does not: an
        // expired, immature or malformed JWT is refused before its body is read.
        if let (None, Some(validation), Some(token)) = (&secret, &webhook.jwt, &jwt) {
            precheck_jwt(token, validation)?;
        }
        return Ok(Admission::PerInstance { secret, jwt });
    }
    if let (Some(expected), Some(given)) = (&config.secret, &secret)
        && bool::from(expected.expose().as_bytes().ct_eq(given.as_bytes()))
    {
        return Ok(Admission::AnyInstance);
    }
    if let (Some(master), Some(validation), Some(token)) = (&config.jwt_secret, &webhook.jwt, &jwt)
    {
        let key = jsonwebtoken::DecodingKey::from_secret(master.expose().as_bytes());
        return verify_jwt(token, &key, validation).map(|()| Admission::AnyInstance);
    }
    Err(Error::Unauthorized(
        "missing or invalid webhook credentials",
    ))
}

/// How to fix a webhook that presents the master secret where an instance's own
/// credential belongs (a deployment from before per-instance credentials).
const UPGRADE_HINT: &str = "is the master secret, not this instance's credential: put the output \
     of `evo-realtime webhook-credential <instance>` into the instance's webhook headers, or set \
     SIDECAR_WEBHOOK_CREDENTIALS=shared for a single tenant";

impl Admission {
    /// [`Admission::check`] on the instance named in a body's first bytes. `complete`:
    /// `prefix` is the whole body (then a body naming no instance is left to the envelope
    /// parser, which refuses it).
    pub(super) fn check_prefix(
        &self,
        webhook: &Webhook,
        prefix: &[u8],
        complete: bool,
    ) -> Result<(), Error> {
        if matches!(self, Admission::AnyInstance) {
            return Ok(());
        }
        match envelope::instance_in_prefix(prefix) {
            Some(name) => match InstanceName::parse(&name) {
                Ok(instance) => self.check(webhook, &instance),
                Err(why) => Err(Error::Envelope(envelope::Error::Semantic(why))),
            },
            None if complete => Ok(()),
            None => Err(Error::Unauthorized(
                "a per-instance credential needs `instance` within the body's first 64 KiB",
            )),
        }
    }

    /// Whether the credentials are valid for `instance`.
    pub(super) fn check(&self, webhook: &Webhook, instance: &InstanceName) -> Result<(), Error> {
        let Admission::PerInstance { secret, jwt } = self else {
            return Ok(());
        };
        let config = &webhook.config;
        let wrong = |reason: &'static str| Error::WrongInstance {
            instance: instance.as_str().to_owned(),
            reason,
        };
        if let (Some(master), Some(given)) = (&config.secret, secret) {
            let expected = instance_credential(master, instance);
            if bool::from(expected.as_bytes().ct_eq(given.as_bytes())) {
                return Ok(());
            }
            if jwt.is_none() {
                if bool::from(master.expose().as_bytes().ct_eq(given.as_bytes())) {
                    webhook.warn_upgrade();
                    return Err(wrong(
                        "header secret is the master secret itself, not this instance's credential (see `evo-realtime webhook-credential`)",
                    ));
                }
                return Err(wrong("header secret is not this instance's credential"));
            }
        }
        let (Some(master), Some(validation), Some(token)) = (&config.jwt_secret, &webhook.jwt, jwt)
        else {
            return Err(wrong("header secret is not this instance's credential"));
        };
        let derived = instance_credential(master, instance);
        let key = jsonwebtoken::DecodingKey::from_secret(derived.as_bytes());
        match verify_jwt(token, &key, validation) {
            Err(Error::Unauthorized(SIGNATURE_INVALID)) => {
                let legacy = jsonwebtoken::DecodingKey::from_secret(master.expose().as_bytes());
                if verify_jwt(token, &legacy, validation).is_ok() {
                    webhook.warn_upgrade();
                    return Err(wrong(
                        "jwt is signed with the master secret itself, not this instance's credential (see `evo-realtime webhook-credential`)",
                    ));
                }
                Err(wrong("jwt signature is not this instance's credential"))
            }
            other => other,
        }
    }
}

impl Webhook {
    fn warn_upgrade(&self) {
        if !self.upgrade_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!("a webhook's credential {UPGRADE_HINT}");
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

const SIGNATURE_INVALID: &str = "jwt signature is invalid";

/// What can be judged of a JWT without its key: the algorithm, `exp` and `nbf` (with the
/// leeway). Not a verification: [`verify_jwt`] still runs with the instance's key.
fn precheck_jwt(token: &str, validation: &jsonwebtoken::Validation) -> Result<(), Error> {
    #[derive(Deserialize)]
    struct Times {
        exp: Option<f64>,
        nbf: Option<f64>,
    }
    let header =
        jsonwebtoken::decode_header(token).map_err(|_| Error::Unauthorized("jwt is invalid"))?;
    if !validation.algorithms.contains(&header.alg) {
        return Err(Error::Unauthorized("jwt algorithm must be HS256"));
    }
    let times: Times = jsonwebtoken::dangerous::insecure_decode_claims(token)
        .map_err(|_| Error::Unauthorized("jwt is invalid"))?;
    let now = jsonwebtoken::get_current_timestamp() as f64;
    let leeway = validation.leeway as f64;
    match times.exp {
        None => Err(Error::Unauthorized("jwt has no exp claim")),
        Some(exp) if exp < now - leeway => Err(Error::Unauthorized("jwt expired")),
        _ if times.nbf.is_some_and(|nbf| nbf > now + leeway) => {
            Err(Error::Unauthorized("jwt is not valid yet (nbf)"))
        }
        _ => Ok(()),
    }
}

/// Evolution's webhook JWT: HS256, `{iat, exp, app: "evolution", action: "webhook"}`.
fn verify_jwt(
    token: &str,
    key: &jsonwebtoken::DecodingKey,
    validation: &jsonwebtoken::Validation,
) -> Result<(), Error> {
    #[derive(Deserialize)]
    struct Claims {
        app: Option<String>,
        action: Option<String>,
    }
    let data = jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|err| {
        use jsonwebtoken::errors::ErrorKind;
        match err.kind() {
            ErrorKind::ExpiredSignature => Error::Unauthorized("jwt expired"),
            ErrorKind::InvalidSignature => Error::Unauthorized(SIGNATURE_INVALID),
            ErrorKind::ImmatureSignature => Error::Unauthorized("jwt is not valid yet (nbf)"),
            ErrorKind::MissingRequiredClaim(_) => Error::Unauthorized("jwt has no exp claim"),
            ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                Error::Unauthorized("jwt algorithm must be HS256")
            }
            _ => Error::Unauthorized("jwt is invalid"),
        }
    })?;
    let claims = data.claims;
    if claims.app.as_deref() != Some("evolution") || claims.action.as_deref() != Some("webhook") {
        return Err(Error::Unauthorized("jwt claims are not evolution/webhook"));
    }
    Ok(())
}
