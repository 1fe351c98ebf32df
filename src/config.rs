//! Configuration: defaults < TOML file < environment < flags.
//!
//! Each concern owns its settings (`webhook::Config`, `hub::Config`, ...); [`Config`]
//! composes them. Every environment name is an `ENV_*` constant listed in [`ENV_VARS`]
//! with its TOML key, so the README, `config.example.toml` and the deploy files can be
//! checked against one table. The environment is passed in as a list of pairs:
//! only `main.rs` reads the process environment.
//!
//! Layering uses figment; values from the environment are strings, read leniently
//! (`"true"`, `"1200"`), while the TOML file is typed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

use crate::{
    activity, amqp, auth, cluster, guard, hub, replay, server, telemetry, upstream, webhook,
};

pub use crate::setting::{Error, Secret};

pub const ENV_CONFIG: &str = "SIDECAR_CONFIG";
pub const ENV_LISTEN: &str = "SIDECAR_LISTEN";
pub const ENV_UPSTREAM_URL: &str = "SIDECAR_UPSTREAM_URL";
pub const ENV_UPSTREAM_CONNECT_TIMEOUT_SECS: &str = "SIDECAR_UPSTREAM_CONNECT_TIMEOUT_SECS";
pub const ENV_UPSTREAM_TIMEOUT_SECS: &str = "SIDECAR_UPSTREAM_TIMEOUT_SECS";
pub const ENV_EMIT_MAX_IN_FLIGHT: &str = "SIDECAR_EMIT_MAX_IN_FLIGHT";
pub const ENV_EMIT_MAX_BYTES_IN_FLIGHT: &str = "SIDECAR_EMIT_MAX_BYTES_IN_FLIGHT";
pub const ENV_EMIT_MAX_BYTES_IN_FLIGHT_PER_SOCKET: &str =
    "SIDECAR_EMIT_MAX_BYTES_IN_FLIGHT_PER_SOCKET";
pub const ENV_API_KEY: &str = "AUTHENTICATION_API_KEY";
pub const ENV_TOKEN_CACHE_TTL_SECS: &str = "SIDECAR_TOKEN_CACHE_TTL_SECS";
pub const ENV_AUTH_LOOKUP_TIMEOUT_SECS: &str = "SIDECAR_AUTH_LOOKUP_TIMEOUT_SECS";
pub const ENV_ALLOWED_HOSTS: &str = "WEBSOCKET_ALLOWED_HOSTS";
pub const ENV_ALLOW_ANY_HOST: &str = "SIDECAR_ALLOW_ANY_HOST";
pub const ENV_GLOBAL_EVENTS: &str = "WEBSOCKET_GLOBAL_EVENTS";
pub const ENV_EVENTS: &str = "SIDECAR_EVENTS";
pub const ENV_CORS_ORIGIN: &str = "CORS_ORIGIN";
pub const ENV_SOCKET_BUFFER: &str = "SIDECAR_SOCKET_BUFFER";
pub const ENV_MAX_EMIT_BYTES: &str = "SIDECAR_MAX_EMIT_BYTES";
pub const ENV_WS_READ_BUFFER: &str = "SIDECAR_WS_READ_BUFFER";
pub const ENV_PING_INTERVAL_SECS: &str = "SIDECAR_PING_INTERVAL_SECS";
pub const ENV_PING_TIMEOUT_SECS: &str = "SIDECAR_PING_TIMEOUT_SECS";
pub const ENV_WEBHOOK_PATH: &str = "SIDECAR_WEBHOOK_PATH";
pub const ENV_WEBHOOK_JWT_SECRET: &str = "SIDECAR_WEBHOOK_JWT_SECRET";
pub const ENV_WEBHOOK_JWT_LEEWAY_SECS: &str = "SIDECAR_WEBHOOK_JWT_LEEWAY_SECS";
pub const ENV_WEBHOOK_SECRET: &str = "SIDECAR_WEBHOOK_SECRET";
pub const ENV_WEBHOOK_SECRET_HEADER: &str = "SIDECAR_WEBHOOK_SECRET_HEADER";
pub const ENV_WEBHOOK_CREDENTIALS: &str = "SIDECAR_WEBHOOK_CREDENTIALS";
pub const ENV_TOKEN_UNVERIFIED_GRACE_SECS: &str = "SIDECAR_TOKEN_UNVERIFIED_GRACE_SECS";
pub const ENV_WEBHOOK_PATH_TOKEN: &str = "SIDECAR_WEBHOOK_PATH_TOKEN";
pub const ENV_WEBHOOK_ALLOWED_CIDRS: &str = "SIDECAR_WEBHOOK_ALLOWED_CIDRS";
pub const ENV_MAX_BODY_BYTES: &str = "SIDECAR_MAX_BODY_BYTES";
pub const ENV_WEBHOOK_READ_TIMEOUT_SECS: &str = "SIDECAR_WEBHOOK_READ_TIMEOUT_SECS";
pub const ENV_LOG_FORMAT: &str = "SIDECAR_LOG_FORMAT";
pub const ENV_SHUTDOWN_GRACE_SECS: &str = "SIDECAR_SHUTDOWN_GRACE_SECS";
pub const ENV_METRICS_LISTEN: &str = "SIDECAR_METRICS_LISTEN";
pub const ENV_INSPECTOR: &str = "SIDECAR_INSPECTOR";
pub const ENV_REPLAY_MAX_EVENTS: &str = "SIDECAR_REPLAY_MAX_EVENTS";
pub const ENV_REPLAY_MAX_AGE_SECS: &str = "SIDECAR_REPLAY_MAX_AGE_SECS";
pub const ENV_REPLAY_MAX_BYTES: &str = "SIDECAR_REPLAY_MAX_BYTES";
pub const ENV_REPLAY_MAX_TOTAL_BYTES: &str = "SIDECAR_REPLAY_MAX_TOTAL_BYTES";
pub const ENV_DEDUPE_WINDOW_SECS: &str = "SIDECAR_DEDUPE_WINDOW_SECS";
pub const ENV_REDIS_URL: &str = "SIDECAR_REDIS_URL";
pub const ENV_AMQP_URL: &str = "SIDECAR_AMQP_URL";
pub const ENV_AMQP_EXCHANGE: &str = "SIDECAR_AMQP_EXCHANGE";
pub const ENV_AMQP_QUEUE: &str = "SIDECAR_AMQP_QUEUE";
pub const ENV_AMQP_PREFETCH: &str = "SIDECAR_AMQP_PREFETCH";
pub const ENV_HANDSHAKE_RATE_PER_IP: &str = "SIDECAR_HANDSHAKE_RATE_PER_IP";
pub const ENV_HANDSHAKE_BURST_PER_IP: &str = "SIDECAR_HANDSHAKE_BURST_PER_IP";
pub const ENV_TRUSTED_PROXIES: &str = "SIDECAR_TRUSTED_PROXIES";
pub const ENV_MAX_CONNECTIONS: &str = "SIDECAR_MAX_CONNECTIONS";
pub const ENV_REDIS_TIMEOUT_MS: &str = "SIDECAR_REDIS_TIMEOUT_MS";
pub const ENV_MAX_TCP_CONNECTIONS: &str = "SIDECAR_MAX_TCP_CONNECTIONS";
pub const ENV_MAX_TCP_CONNECTIONS_PER_IP: &str = "SIDECAR_MAX_TCP_CONNECTIONS_PER_IP";
pub const ENV_HTTP_HEADER_TIMEOUT_SECS: &str = "SIDECAR_HTTP_HEADER_TIMEOUT_SECS";
pub const ENV_SILENCE_ALERT_SECS: &str = "SIDECAR_SILENCE_ALERT_SECS";

/// One environment variable: its name, the TOML key it sets, and whether it is secret.
#[derive(Debug, Clone, Copy)]
pub struct EnvVar {
    pub name: &'static str,
    pub key: &'static str,
    pub secret: bool,
}

const fn var(name: &'static str, key: &'static str) -> EnvVar {
    EnvVar {
        name,
        key,
        secret: false,
    }
}

const fn secret(name: &'static str, key: &'static str) -> EnvVar {
    EnvVar {
        name,
        key,
        secret: true,
    }
}

/// Every environment variable the sidecar reads (besides `RUST_LOG` and `SIDECAR_CONFIG`).
pub const ENV_VARS: &[EnvVar] = &[
    var(ENV_LISTEN, "listen"),
    var(ENV_LOG_FORMAT, "log_format"),
    var(ENV_SHUTDOWN_GRACE_SECS, "shutdown_grace_secs"),
    var(ENV_METRICS_LISTEN, "metrics_listen"),
    var(ENV_INSPECTOR, "inspector"),
    var(ENV_UPSTREAM_URL, "upstream.url"),
    var(
        ENV_UPSTREAM_CONNECT_TIMEOUT_SECS,
        "upstream.connect_timeout_secs",
    ),
    var(ENV_UPSTREAM_TIMEOUT_SECS, "upstream.timeout_secs"),
    var(ENV_EMIT_MAX_IN_FLIGHT, "upstream.max_in_flight"),
    var(ENV_EMIT_MAX_BYTES_IN_FLIGHT, "upstream.max_bytes_in_flight"),
    var(
        ENV_EMIT_MAX_BYTES_IN_FLIGHT_PER_SOCKET,
        "upstream.max_bytes_in_flight_per_socket",
    ),
    secret(ENV_API_KEY, "auth.api_key"),
    var(ENV_TOKEN_CACHE_TTL_SECS, "auth.token_cache_ttl_secs"),
    var(ENV_AUTH_LOOKUP_TIMEOUT_SECS, "auth.lookup_timeout_secs"),
    var(ENV_ALLOWED_HOSTS, "auth.allowed_hosts"),
    var(ENV_ALLOW_ANY_HOST, "auth.allow_any_host"),
    var(ENV_GLOBAL_EVENTS, "hub.global_events"),
    var(ENV_EVENTS, "hub.events"),
    var(ENV_CORS_ORIGIN, "hub.cors_origin"),
    var(ENV_SOCKET_BUFFER, "hub.socket_buffer"),
    var(ENV_MAX_EMIT_BYTES, "hub.max_emit_bytes"),
    var(ENV_WS_READ_BUFFER, "hub.ws_read_buffer"),
    var(ENV_PING_INTERVAL_SECS, "hub.ping_interval_secs"),
    var(ENV_PING_TIMEOUT_SECS, "hub.ping_timeout_secs"),
    var(
        ENV_TOKEN_UNVERIFIED_GRACE_SECS,
        "hub.token_unverified_grace_secs",
    ),
    var(ENV_WEBHOOK_PATH, "webhook.path"),
    secret(ENV_WEBHOOK_JWT_SECRET, "webhook.jwt_secret"),
    var(ENV_WEBHOOK_JWT_LEEWAY_SECS, "webhook.jwt_leeway_secs"),
    secret(ENV_WEBHOOK_SECRET, "webhook.secret"),
    var(ENV_WEBHOOK_SECRET_HEADER, "webhook.secret_header"),
    var(ENV_WEBHOOK_CREDENTIALS, "webhook.credentials"),
    secret(ENV_WEBHOOK_PATH_TOKEN, "webhook.path_token"),
    var(ENV_WEBHOOK_ALLOWED_CIDRS, "webhook.allowed_cidrs"),
    var(ENV_MAX_BODY_BYTES, "webhook.max_body_bytes"),
    var(ENV_WEBHOOK_READ_TIMEOUT_SECS, "webhook.read_timeout_secs"),
    var(ENV_DEDUPE_WINDOW_SECS, "webhook.dedupe_window_secs"),
    var(ENV_REPLAY_MAX_EVENTS, "replay.max_events"),
    var(ENV_REPLAY_MAX_AGE_SECS, "replay.max_age_secs"),
    var(ENV_REPLAY_MAX_BYTES, "replay.max_bytes"),
    var(ENV_REPLAY_MAX_TOTAL_BYTES, "replay.max_total_bytes"),
    secret(ENV_REDIS_URL, "redis.url"),
    var(ENV_REDIS_TIMEOUT_MS, "redis.timeout_ms"),
    secret(ENV_AMQP_URL, "amqp.url"),
    var(ENV_AMQP_EXCHANGE, "amqp.exchange"),
    var(ENV_AMQP_QUEUE, "amqp.queue"),
    var(ENV_AMQP_PREFETCH, "amqp.prefetch"),
    var(ENV_HANDSHAKE_RATE_PER_IP, "guard.handshake_rate_per_ip"),
    var(ENV_HANDSHAKE_BURST_PER_IP, "guard.handshake_burst_per_ip"),
    var(ENV_TRUSTED_PROXIES, "guard.trusted_proxies"),
    var(ENV_MAX_CONNECTIONS, "guard.max_connections"),
    var(ENV_MAX_TCP_CONNECTIONS, "server.max_tcp_connections"),
    var(
        ENV_MAX_TCP_CONNECTIONS_PER_IP,
        "server.max_tcp_connections_per_ip",
    ),
    var(ENV_HTTP_HEADER_TIMEOUT_SECS, "server.header_timeout_secs"),
    var(ENV_SILENCE_ALERT_SECS, "activity.silence_alert_secs"),
];

/// The whole configuration, one section per concern.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the public listener binds (webhooks, socket.io, proxy, `/_sidecar/*`).
    pub listen: SocketAddr,
    /// `text` (human) or `json` logs.
    pub log_format: telemetry::LogFormat,
    /// How long a graceful shutdown may take before connections are cut.
    pub shutdown_grace_secs: u64,
    /// When set, `/_sidecar/metrics` is served here only, not on `listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the live event inspector page at `/_sidecar/inspector`.
    pub inspector: bool,
    pub upstream: upstream::Config,
    pub auth: auth::Config,
    pub hub: hub::Config,
    pub webhook: webhook::Config,
    pub replay: replay::Config,
    pub redis: cluster::Config,
    pub amqp: amqp::Config,
    pub guard: guard::Config,
    pub server: server::Config,
    pub activity: activity::Config,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8081)),
            log_format: telemetry::LogFormat::Text,
            shutdown_grace_secs: 10,
            metrics_listen: None,
            inspector: true,
            upstream: upstream::Config::default(),
            auth: auth::Config::default(),
            hub: hub::Config::default(),
            webhook: webhook::Config::default(),
            replay: replay::Config::default(),
            redis: cluster::Config::default(),
            amqp: amqp::Config::default(),
            guard: guard::Config::default(),
            server: server::Config::default(),
            activity: activity::Config::default(),
        }
    }
}

/// Values given as command-line flags: the top layer, keyed like the TOML file.
pub type Overrides = BTreeMap<&'static str, String>;

impl Config {
    /// Layers defaults, the TOML file, the environment and the flags, then validates.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &Overrides,
    ) -> Result<Self, Error> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(Error::new(format!(
                    "{ENV_CONFIG}={:?} is not valid: no such file",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let env = EnvProvider::new(env);
        figment = figment.merge(env.clone());
        figment = figment.merge(FlagProvider(flags.clone()));

        let config: Config = figment
            .extract_lossy()
            .map_err(|err| describe(err, &env, flags))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that figment's types cannot express, naming the variable.
    pub fn validate(&self) -> Result<(), Error> {
        let sections = [
            self.upstream.validate(),
            self.auth.validate(),
            self.hub.validate(),
            self.webhook.validate(),
            self.replay.validate(),
            self.redis.validate(),
            self.amqp.validate(),
            self.guard.validate(),
            self.server.validate(),
        ];
        sections
            .into_iter()
            .collect::<Result<(), Error>>()
            .map_err(name_variable)
    }

    /// The effective configuration as TOML, with secrets masked.
    pub fn to_masked_toml(&self) -> String {
        toml::to_string_pretty(self)
            .unwrap_or_else(|err| format!("# could not render configuration: {err}\n"))
    }
}

/// Names the environment variable in an invalid value's message:
/// `NAME (key)="value" is not valid: reason`, since the value may come from either.
pub fn name_variable(err: Error) -> Error {
    err.with_variable(|key| {
        ENV_VARS
            .iter()
            .find(|var| var.key == key)
            .map(|var| var.name)
    })
}

/// The command-line flag of each key that has one.
pub const FLAGS: &[(&str, &str)] = &[
    ("listen", "--listen"),
    ("upstream.url", "--upstream-url"),
    ("webhook.path", "--webhook-path"),
    ("hub.global_events", "--global-events"),
    ("hub.events", "--events"),
    ("hub.cors_origin", "--cors-origin"),
    ("log_format", "--log-format"),
];

fn describe(err: figment::Error, env: &EnvProvider, flags: &Overrides) -> Error {
    let key = err.path.join(".");
    let var = ENV_VARS.iter().find(|var| var.key == key);
    let reason = err.kind.to_string();
    let from_env = err
        .metadata
        .as_ref()
        .is_some_and(|m| m.name == ENV_SOURCE_NAME);
    let from_flag = err
        .metadata
        .as_ref()
        .is_some_and(|m| m.name == FLAG_SOURCE_NAME);
    match var {
        Some(var) if from_flag => {
            let value = flags.get(var.key).map(String::as_str).unwrap_or("");
            let flag = FLAGS
                .iter()
                .find(|(key, _)| *key == var.key)
                .map_or(var.key, |(_, flag)| flag);
            Error::new(format!(
                "{flag}=\"{}\" is not valid: {reason}",
                mask(var, value)
            ))
        }
        Some(var) if from_env => {
            let value = env.value_of(var.name).unwrap_or_default();
            Error::new(format!(
                "{}=\"{}\" is not valid: {reason}",
                var.name,
                mask(var, &value)
            ))
        }
        _ if key.is_empty() => Error::new(format!("configuration is not valid: {err}")),
        _ => Error::new(format!("configuration key `{key}` is not valid: {reason}")),
    }
}

fn mask<'a>(var: &EnvVar, value: &'a str) -> &'a str {
    if var.secret { "***" } else { value }
}

const ENV_SOURCE_NAME: &str = "environment";
const FLAG_SOURCE_NAME: &str = "command-line flags";

/// The environment as a figment provider: only the names in [`ENV_VARS`], as strings.
#[derive(Clone)]
struct EnvProvider {
    values: Vec<(&'static EnvVar, String)>,
}

impl EnvProvider {
    fn new(env: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut values = Vec::new();
        for (name, value) in env {
            if let Some(var) = ENV_VARS.iter().find(|var| var.name == name) {
                values.push((var, value));
            }
        }
        Self { values }
    }

    fn value_of(&self, name: &str) -> Option<String> {
        self.values
            .iter()
            .find(|(var, _)| var.name == name)
            .map(|(_, value)| value.clone())
    }
}

impl Provider for EnvProvider {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENV_SOURCE_NAME)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (var, value) in &self.values {
            insert_path(&mut dict, var.key, Value::from(value.clone()));
        }
        Ok(Profile::Default.collect(dict))
    }
}

struct FlagProvider(Overrides);

impl Provider for FlagProvider {
    fn metadata(&self) -> Metadata {
        Metadata::named(FLAG_SOURCE_NAME)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (key, value) in &self.0 {
            insert_path(&mut dict, key, Value::from(value.clone()));
        }
        Ok(Profile::Default.collect(dict))
    }
}

fn insert_path(dict: &mut Dict, path: &str, value: Value) {
    match path.split_once('.') {
        None => {
            dict.insert(path.to_owned(), value);
        }
        Some((head, rest)) => {
            let entry = dict
                .entry(head.to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests;
