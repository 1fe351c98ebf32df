//! Settings of the RabbitMQ ingest (`[amqp]`).

use serde::{Deserialize, Serialize};

use crate::setting::{self, Secret, comma_list};

/// The most unacknowledged messages the broker may push at once.
pub const MAX_PREFETCH: u16 = 4096;

/// Settings of the RabbitMQ ingest. No URL: off.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `amqp://user:password@host:5672/vhost` (or `amqps://`); secret, since it carries a
    /// password.
    pub url: Option<Secret>,
    /// The topic exchanges Evolution publishes to: `evolution_exchange` in its global mode,
    /// one per instance (named after it) in its per-instance mode.
    #[serde(with = "comma_list")]
    pub exchange: Vec<String>,
    /// The sidecar's own durable quorum queue, bound to every exchange. Replicas that share
    /// it are competing consumers; never one of Evolution's queues.
    pub queue: String,
    /// Unacknowledged messages in flight from the broker (AMQP `basic.qos`).
    pub prefetch: u16,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            url: None,
            exchange: vec!["evolution_exchange".to_owned()],
            queue: "evo-realtime".to_owned(),
            prefetch: 256,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), setting::Error> {
        let Some(url) = &self.url else {
            return Ok(());
        };
        let uri = url
            .expose()
            .parse::<lapin::uri::AMQPUri>()
            .map_err(|_| setting::invalid("amqp.url", &"***", "not an amqp:// or amqps:// URL"))?;
        if uri.authority.host.is_empty() {
            return Err(setting::invalid("amqp.url", &"***", "names no host"));
        }
        if self.exchange.is_empty() {
            return Err(setting::invalid(
                "amqp.exchange",
                &"",
                "must name at least one exchange",
            ));
        }
        for exchange in &self.exchange {
            if let Err(reason) = check_name(exchange) {
                return Err(setting::invalid("amqp.exchange", exchange, reason));
            }
        }
        if let Err(reason) = check_name(&self.queue) {
            return Err(setting::invalid("amqp.queue", &self.queue, reason));
        }
        if self.queue.starts_with("amq.") {
            return Err(setting::invalid(
                "amqp.queue",
                &self.queue,
                "names starting with \"amq.\" are reserved by the broker",
            ));
        }
        if self.prefetch == 0 || self.prefetch > MAX_PREFETCH {
            return Err(setting::invalid(
                "amqp.prefetch",
                &self.prefetch,
                format!("must be 1 to {MAX_PREFETCH}"),
            ));
        }
        Ok(())
    }
}

/// An AMQP short string: 1 to 255 bytes, no control characters.
fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 255 {
        return Err("must be 1 to 255 bytes long");
    }
    if name.chars().any(char::is_control) {
        return Err("must not contain control characters");
    }
    Ok(())
}
