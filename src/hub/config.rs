//! Settings of the socket.io side (`[hub]`).

use serde::{Deserialize, Serialize};

use crate::envelope;
use crate::setting::{self, comma_list};

/// Settings of the socket.io side.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Also emit every instance's events on `/` (global key only).
    pub global_events: bool,
    /// UPPER_SNAKE events to emit; empty means all.
    #[serde(with = "comma_list")]
    pub events: Vec<String>,
    /// Allowed CORS origins for the socket.io endpoint; `*` means any.
    #[serde(with = "comma_list")]
    pub cors_origin: Vec<String>,
    /// Packets queued per socket before it counts as a slow consumer and misses events.
    pub socket_buffer: usize,
    /// The largest packet a client may send (socketioxide's default of 100 kB is too
    /// small for base64 media); a larger one closes that client's connection.
    pub max_emit_bytes: u64,
    /// Bytes each websocket reads at a time, allocated per connection for its life: idle
    /// sockets cost this much each; a larger emit takes more reads (it is still read whole,
    /// up to `max_emit_bytes`).
    pub ws_read_buffer: usize,
    /// Engine.IO heartbeat: a client that answers no ping within interval + timeout (a
    /// dead peer, or one that stopped reading) is disconnected. Node's defaults.
    pub ping_interval_secs: u64,
    pub ping_timeout_secs: u64,
    /// While Evolution cannot say whether a connected socket's instance token is still
    /// valid, the socket is kept until its key has gone unverified this long.
    pub token_unverified_grace_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            global_events: false,
            events: Vec::new(),
            cors_origin: vec!["*".to_owned()],
            socket_buffer: 4096,
            max_emit_bytes: 16 * 1024 * 1024,
            ws_read_buffer: 512,
            ping_interval_secs: 25,
            ping_timeout_secs: 20,
            token_unverified_grace_secs: 300,
        }
    }
}

/// The smallest websocket read buffer: a frame header (up to 14 bytes) must fit, and below
/// this a pong already takes several reads.
pub const MIN_WS_READ_BUFFER: usize = 64;

impl Config {
    pub fn validate(&self) -> Result<(), setting::Error> {
        if let Some(bad) = self.events.iter().find(|e| !envelope::is_filter_name(e)) {
            return Err(setting::invalid(
                "hub.events",
                &self.events.join(","),
                format!("{bad:?} is not an UPPER_SNAKE event name such as MESSAGES_UPSERT"),
            ));
        }
        for (key, secs) in [
            ("hub.ping_interval_secs", self.ping_interval_secs),
            ("hub.ping_timeout_secs", self.ping_timeout_secs),
        ] {
            if secs == 0 {
                return Err(setting::invalid(key, &0, "must be positive"));
            }
        }
        if self.socket_buffer == 0 {
            return Err(setting::invalid(
                "hub.socket_buffer",
                &0,
                "must be positive",
            ));
        }
        if self.max_emit_bytes < 1024 {
            return Err(setting::invalid(
                "hub.max_emit_bytes",
                &self.max_emit_bytes,
                "must be at least 1024",
            ));
        }
        if self.ws_read_buffer < MIN_WS_READ_BUFFER {
            return Err(setting::invalid(
                "hub.ws_read_buffer",
                &self.ws_read_buffer,
                format!("must be at least {MIN_WS_READ_BUFFER}"),
            ));
        }
        for origin in &self.cors_origin {
            if origin != "*" && http::HeaderValue::from_str(origin).is_err() {
                return Err(setting::invalid(
                    "hub.cors_origin",
                    &self.cors_origin.join(","),
                    format!("{origin:?} is not a valid origin"),
                ));
            }
        }
        Ok(())
    }
}
