//! Settings of the ingest endpoint (`[webhook]`) and how credentials relate to instances.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::setting::{self, Secret, comma_list};

/// Settings of the ingest endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where Evolution POSTs: `{path}[/{path_token}][/{event-suffix}]`.
    pub path: String,
    /// The master secret of webhook JWTs (HS256). Per instance (the default), the `jwt_key`
    /// in an instance's webhook headers is [`instance_credential`] of it; shared, it is
    /// this value itself.
    pub jwt_secret: Option<Secret>,
    /// Evolution signs once per event and reuses the token over ~20 minutes of retries.
    pub jwt_leeway_secs: u64,
    /// The master secret of the static header credential expected in `secret_header`,
    /// derived per instance like `jwt_secret`.
    pub secret: Option<Secret>,
    pub secret_header: String,
    /// Whether the JWT and header credentials are bound to one instance each.
    pub credentials: CredentialMode,
    /// A secret path segment: the only credential Evolution's global webhook can carry.
    pub path_token: Option<Secret>,
    /// Peers accepted when no credential is configured at all.
    #[serde(with = "comma_list")]
    pub allowed_cidrs: Vec<String>,
    /// The largest body accepted; history batches and media reach tens of MB.
    pub max_body_bytes: u64,
    /// A body that stops arriving is cut off after this long.
    pub read_timeout_secs: u64,
    /// An identical body within this window (refreshed on each repeat) is a retry of an
    /// accepted event: answered 200 and not emitted again. 0 turns deduplication off.
    pub dedupe_window_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            path: "/_sidecar/webhook".to_owned(),
            jwt_secret: None,
            jwt_leeway_secs: 1200,
            secret: None,
            secret_header: "x-webhook-secret".to_owned(),
            credentials: CredentialMode::PerInstance,
            path_token: None,
            // 127.0.0.1 only: Istio's inbound sidecar connects from 127.0.0.6.
            allowed_cidrs: vec!["127.0.0.1/32".to_owned(), "::1/128".to_owned()],
            max_body_bytes: 64 * 1024 * 1024,
            read_timeout_secs: 30,
            dedupe_window_secs: 1200,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), setting::Error> {
        let path = &self.path;
        if !path.starts_with("/") || path.len() < 2 || path.ends_with('/') || path.contains("//") {
            return Err(setting::invalid(
                "webhook.path",
                path,
                "must start with '/', not end with '/' and not be '/'",
            ));
        }
        if path.contains(['{', '}', '*', '?', '#']) {
            return Err(setting::invalid(
                "webhook.path",
                path,
                "may not contain '{', '}', '*', '?' or '#'",
            ));
        }
        if path == "/socket.io" || path.starts_with("/socket.io/") {
            return Err(setting::invalid(
                "webhook.path",
                path,
                "collides with /socket.io/",
            ));
        }
        self.cidrs()?;
        if http::HeaderName::from_bytes(self.secret_header.as_bytes()).is_err() {
            return Err(setting::invalid(
                "webhook.secret_header",
                &self.secret_header,
                "not a valid header name",
            ));
        }
        // An empty credential would match an empty header and switch off the peer allow-list.
        for (key, secret) in [
            ("webhook.jwt_secret", &self.jwt_secret),
            ("webhook.secret", &self.secret),
        ] {
            if secret.as_ref().is_some_and(|s| s.expose().is_empty()) {
                return Err(setting::invalid(
                    key,
                    &"",
                    "must not be empty; unset it instead",
                ));
            }
        }
        if let Some(token) = &self.path_token
            && (token.expose().is_empty() || token.expose().contains(['/', '?', '#', '%']))
        {
            return Err(setting::invalid(
                "webhook.path_token",
                &"***",
                "must be non-empty and contain no '/', '?', '#' or '%'",
            ));
        }
        if self.max_body_bytes == 0 {
            return Err(setting::invalid(
                "webhook.max_body_bytes",
                &0,
                "must be positive",
            ));
        }
        Ok(())
    }

    pub(super) fn cidrs(&self) -> Result<Vec<IpNet>, setting::Error> {
        setting::cidr_list("webhook.allowed_cidrs", &self.allowed_cidrs)
    }

    /// Whether any credential (JWT, header secret, path token) is configured.
    pub fn has_credentials(&self) -> bool {
        self.jwt_secret.is_some() || self.secret.is_some() || self.path_token.is_some()
    }
}

/// How the JWT and static header credentials relate to instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CredentialMode {
    /// Each instance has its own credential, derived from the master secret: whoever can
    /// read one instance's webhook headers can post events for that instance only.
    PerInstance,
    /// The master secret is every instance's credential (one tenant only: any instance
    /// owner can read it back from Evolution and post as any other instance).
    Shared,
}
