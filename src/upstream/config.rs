//! Settings of the upstream Evolution API (`[upstream]`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::routes::RouteSpec;
use crate::setting;

/// Settings of the upstream Evolution API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Evolution API's base URL.
    pub url: String,
    pub connect_timeout_secs: u64,
    /// The longest an emit's REST call, or a proxied request's response headers, may take.
    pub timeout_secs: u64,
    /// Emits one socket may have in flight before it is answered 429.
    pub max_in_flight: usize,
    /// Argument bytes of the emits being forwarded, across all sockets, before 429.
    pub max_bytes_in_flight: u64,
    /// Argument bytes of the emits one socket may have in flight before 429.
    pub max_bytes_in_flight_per_socket: u64,
    /// Extra or overriding routes: event name → method and path template.
    pub routes: BTreeMap<String, RouteSpec>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8080".to_owned(),
            connect_timeout_secs: 5,
            timeout_secs: 30,
            max_in_flight: 16,
            max_bytes_in_flight: 256 * 1024 * 1024,
            max_bytes_in_flight_per_socket: 32 * 1024 * 1024,
            routes: BTreeMap::new(),
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), setting::Error> {
        let uri: http::Uri = self
            .url
            .parse()
            .map_err(|err| setting::invalid("upstream.url", &self.url, err))?;
        if !matches!(uri.scheme_str(), Some("http") | Some("https")) || uri.host().is_none() {
            return Err(setting::invalid(
                "upstream.url",
                &self.url,
                "must be an http:// or https:// URL with a host",
            ));
        }
        if uri.query().is_some() {
            return Err(setting::invalid(
                "upstream.url",
                &self.url,
                "must have no query",
            ));
        }
        if self.timeout_secs == 0 {
            return Err(setting::invalid(
                "upstream.timeout_secs",
                &0,
                "must be positive",
            ));
        }
        if self.connect_timeout_secs == 0 {
            return Err(setting::invalid(
                "upstream.connect_timeout_secs",
                &0,
                "must be positive",
            ));
        }
        if self.max_in_flight == 0 {
            return Err(setting::invalid(
                "upstream.max_in_flight",
                &0,
                "must be positive",
            ));
        }
        if self.max_bytes_in_flight_per_socket < 1024 * 1024 {
            return Err(setting::invalid(
                "upstream.max_bytes_in_flight_per_socket",
                &self.max_bytes_in_flight_per_socket,
                "must be at least 1 MiB",
            ));
        }
        if self.max_bytes_in_flight < self.max_bytes_in_flight_per_socket {
            return Err(setting::invalid(
                "upstream.max_bytes_in_flight",
                &self.max_bytes_in_flight,
                "must be at least upstream.max_bytes_in_flight_per_socket",
            ));
        }
        for (event, spec) in &self.routes {
            spec.validate().map_err(|why| {
                setting::Error::new(format!(
                    "route {event:?} in [upstream.routes] is not valid: {why}"
                ))
            })?;
        }
        Ok(())
    }

    /// The base URL without a trailing `/`.
    pub fn base_url(&self) -> &str {
        self.url.trim_end_matches('/')
    }
}
