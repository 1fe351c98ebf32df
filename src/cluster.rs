//! Several replicas acting as one, through Redis.
//!
//! One Redis Stream (`evo:events`) is both the fan-out and the shared retained log: the
//! replica that receives a webhook appends it (`XADD`, trimmed by age), and every replica,
//! that one included, reads the stream in order and delivers locally. Stream IDs become
//! sequence numbers (`ms << 20 | n`), so every replica numbers an event alike and a client
//! can resume on any of them. The epoch of the offsets lives in Redis (`evo:epoch`), and
//! webhook fingerprints for deduplication are keys with a TTL (`evo:dedupe:<hex>`).
//!
//! Why not socketioxide-redis' adapter: it would carry the broadcast only, beside a
//! separate log with its own order; here one write gives fan-out and retention in a single
//! order. It also avoids the adapter's namespace-creation race (design.md §8). Remote
//! socket operations are not needed: a client's emits are served by the replica it is on.
//!
//! Every call has a timeout; callers fall back to local delivery and local state while
//! Redis is unreachable ([`Cluster::is_up`]), and the connection managers reconnect.
//! This module knows nothing of sockets or HTTP.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::StreamReadReply;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::{self, Secret};
use crate::envelope::{Envelope, EventName, InstanceName};

/// Redis settings; no URL means one process with everything in memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `redis://[:password@]host:port[/db]`; secret, since it may carry a password.
    pub url: Option<Secret>,
    /// The longest any Redis call may take before the replica falls back to local state.
    pub timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            url: None,
            timeout_ms: 1000,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), config::Error> {
        if let Some(url) = &self.url
            && redis::Client::open(url.expose()).is_err()
        {
            return Err(config::invalid("redis.url", &"***", "not a redis:// URL"));
        }
        if self.timeout_ms == 0 {
            return Err(config::invalid("redis.timeout_ms", &0, "must be positive"));
        }
        Ok(())
    }
}

const STREAM: &str = "evo:events";
const EPOCH_KEY: &str = "evo:epoch";
const DEDUPE_PREFIX: &str = "evo:dedupe:";
/// Entries read per `XREAD`.
const READ_BATCH: usize = 512;
/// How long one `XREAD` waits for new entries.
const READ_BLOCK: Duration = Duration::from_millis(1000);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("redis timed out")]
    Timeout,
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("malformed stream entry {0}")]
    Malformed(String),
}

/// The connections to Redis and what this replica knows of its health.
pub struct Cluster {
    writer: ConnectionManager,
    /// `XREAD BLOCK` holds its connection: it gets its own.
    reader: ConnectionManager,
    timeout: Duration,
    retention: Duration,
    up: AtomicBool,
}

/// One event read from the stream.
pub struct Delivery {
    pub seq: u64,
    pub id: String,
    pub envelope: Envelope,
}

impl Cluster {
    /// Connects lazily: a replica starts even while Redis is down.
    pub fn new(config: &Config, retention: Duration) -> Result<Option<Arc<Self>>, config::Error> {
        config.validate()?;
        let Some(url) = &config.url else {
            return Ok(None);
        };
        let timeout = Duration::from_millis(config.timeout_ms);
        let manager = |response_timeout: Duration| {
            let client = redis::Client::open(url.expose())
                .map_err(|_| config::invalid("redis.url", &"***", "not a redis:// URL"))?;
            let settings = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(response_timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(2));
            ConnectionManager::new_lazy_with_config(client, settings)
                .map_err(|err| config::Error::new(format!("redis: {err}")))
        };
        Ok(Some(Arc::new(Self {
            writer: manager(timeout)?,
            reader: manager(READ_BLOCK + timeout)?,
            timeout,
            retention,
            up: AtomicBool::new(false),
        })))
    }

    /// Whether the last Redis call succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn record<T>(&self, result: Result<T, Error>) -> Result<T, Error> {
        let up = result.is_ok();
        if self.up.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("redis reachable: replicas share fan-out and retention");
            } else if let Err(err) = &result {
                tracing::warn!(error = %err, "redis unreachable: serving local clients from local state");
            }
            metrics::gauge!(crate::telemetry::names::REDIS_UP).set(if up { 1.0 } else { 0.0 });
        }
        result
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
        limit: Duration,
    ) -> Result<T, Error> {
        let result = match tokio::time::timeout(limit, call).await {
            Ok(result) => result.map_err(Error::from),
            Err(_) => Err(Error::Timeout),
        };
        self.record(result)
    }

    /// The cluster's epoch: set by the first replica that asks (to `candidate`, its own),
    /// shared by all. A replica that finds it gone (Redis lost its data) restores its own.
    pub async fn epoch(&self, candidate: &str) -> Result<String, Error> {
        let mut connection = self.writer.clone();
        let call = async move {
            let _: Option<String> = redis::cmd("SET")
                .arg(EPOCH_KEY)
                .arg(candidate)
                .arg("NX")
                .query_async(&mut connection)
                .await?;
            redis::cmd("GET")
                .arg(EPOCH_KEY)
                .query_async::<String>(&mut connection)
                .await
        };
        self.bounded(call, self.timeout).await
    }

    /// Appends an event to the shared stream, trimming what is older than retention.
    pub async fn append(&self, envelope: &Envelope) -> Result<String, Error> {
        let mut connection = self.writer.clone();
        let min_id = format!(
            "{}-0",
            now_ms().saturating_sub(self.retention.as_millis() as u64)
        );
        let mut command = redis::cmd("XADD");
        command
            .arg(STREAM)
            .arg("MINID")
            .arg("~")
            .arg(min_id)
            .arg("*")
            .arg("e")
            .arg(envelope.event.as_str())
            .arg("i")
            .arg(envelope.instance.as_str())
            .arg("p")
            .arg(envelope.payload.get());
        let call = command.query_async::<String>(&mut connection);
        self.bounded(call, self.timeout).await
    }

    /// Whether a webhook fingerprint was seen within `window` (shared by all replicas).
    pub async fn seen(&self, fingerprint: u128, window: Duration) -> Result<bool, Error> {
        let mut connection = self.writer.clone();
        let key = format!("{DEDUPE_PREFIX}{fingerprint:032x}");
        let seconds = window.as_secs().max(1);
        let call = async move {
            let fresh: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(1)
                .arg("NX")
                .arg("EX")
                .arg(seconds)
                .query_async(&mut connection)
                .await?;
            if fresh.is_none() {
                // A repeat refreshes the window, as Evolution keeps retrying.
                let _: i64 = redis::cmd("EXPIRE")
                    .arg(&key)
                    .arg(seconds)
                    .query_async(&mut connection)
                    .await?;
            }
            Ok(fresh.is_none())
        };
        self.bounded(call, self.timeout).await
    }

    /// The entries after stream ID `after`, waiting up to a second for new ones.
    pub async fn read(&self, after: &str) -> Result<Vec<Delivery>, Error> {
        let mut connection = self.reader.clone();
        let mut command = redis::cmd("XREAD");
        command
            .arg("COUNT")
            .arg(READ_BATCH)
            .arg("BLOCK")
            .arg(READ_BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(STREAM)
            .arg(after);
        let call = command.query_async::<Option<StreamReadReply>>(&mut connection);
        let reply = self.bounded(call, READ_BLOCK + self.timeout).await?;
        let mut deliveries = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                deliveries.push(parse_entry(&entry.id, &entry.map)?);
            }
        }
        Ok(deliveries)
    }

    /// Where a new replica starts reading: the oldest entry still within retention.
    pub fn start_id(&self) -> String {
        format!(
            "{}-0",
            now_ms().saturating_sub(self.retention.as_millis() as u64)
        )
    }
}

fn parse_entry(
    id: &str,
    map: &std::collections::HashMap<String, redis::Value>,
) -> Result<Delivery, Error> {
    let text = |field: &str| -> Result<String, Error> {
        match map.get(field) {
            Some(value) => redis::from_redis_value::<String>(value.clone())
                .map_err(|_| Error::Malformed(id.to_owned())),
            None => Err(Error::Malformed(id.to_owned())),
        }
    };
    let malformed = |_| Error::Malformed(id.to_owned());
    let event = EventName::parse(&text("e")?).map_err(malformed)?;
    let instance = InstanceName::parse(&text("i")?).map_err(malformed)?;
    let payload = RawValue::from_string(text("p")?).map_err(|_| Error::Malformed(id.to_owned()))?;
    Ok(Delivery {
        seq: seq_of(id).ok_or_else(|| Error::Malformed(id.to_owned()))?,
        id: id.to_owned(),
        envelope: Envelope {
            event,
            instance,
            payload: Arc::from(payload),
        },
    })
}

/// A stream ID `ms-n` as one number that orders like it: `ms << 20 | n`.
pub fn seq_of(id: &str) -> Option<u64> {
    let (ms, n) = id.split_once('-')?;
    let (ms, n) = (ms.parse::<u64>().ok()?, n.parse::<u64>().ok()?);
    (n < (1 << 20) && ms < (1 << 43)).then_some((ms << 20) | n)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_order_as_sequences() {
        let a = seq_of("1700000000000-0").unwrap();
        let b = seq_of("1700000000000-1").unwrap();
        let c = seq_of("1700000000001-0").unwrap();
        assert!(a < b && b < c);
        assert_eq!(seq_of("x-1"), None);
        assert_eq!(seq_of("1-2000000"), None);
    }
}
