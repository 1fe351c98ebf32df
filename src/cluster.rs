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
//! Redis is unreachable ([`Cluster::health`] is the circuit: while it says `Down`,
//! publishers do not even try), and the connection managers reconnect. A malformed
//! entry never blocks the stream ([`StreamEntry::Malformed`]).
//! This module knows nothing of sockets or HTTP.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::StreamReadReply;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::envelope::{Envelope, EventName, InstanceName};
use crate::setting::{self, Secret};
use crate::telemetry;

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
    pub fn validate(&self) -> Result<(), setting::Error> {
        if let Some(url) = &self.url
            && redis::Client::open(url.expose()).is_err()
        {
            return Err(setting::invalid("redis.url", &"***", "not a redis:// URL"));
        }
        if self.timeout_ms == 0 {
            return Err(setting::invalid("redis.timeout_ms", &0, "must be positive"));
        }
        Ok(())
    }
}

const STREAM: &str = "evo:events";
const EPOCH_KEY: &str = "evo:epoch";
const DEDUPE_PREFIX: &str = "evo:dedupe:";
/// KEYS: stream, dedupe key (empty: no dedupe). ARGV: window, min id, event, instance,
/// payload, fingerprint. A seen fingerprint refreshes its window and returns nil.
const APPEND_ONCE: &str = r#"
if KEYS[2] ~= "" then
  if not redis.call("SET", KEYS[2], "1", "NX", "EX", ARGV[1]) then
    redis.call("EXPIRE", KEYS[2], ARGV[1])
    return false
  end
end
return redis.call("XADD", KEYS[1], "MINID", "~", ARGV[2], "*",
  "e", ARGV[3], "i", ARGV[4], "p", ARGV[5], "f", ARGV[6])
"#;
/// The most entries read per `XREAD`. A read that times out halves the next one (down
/// to one entry), a read that succeeds doubles it back: a batch always fits the timeout.
pub const READ_BATCH: usize = 512;
/// A reader with no successful read for this long, while Redis answers the writer, is
/// stalled (readyz says `"redis":"stalled"`).
const STALL_AFTER: Duration = Duration::from_secs(10);
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
    /// What the last call said: [`Health::Unknown`] until one answered.
    health: AtomicU8,
    /// When the stream reader last read successfully (entries or none).
    read_ok_at: std::sync::Mutex<std::time::Instant>,
    /// Set once this replica has read the retained stream up to its end.
    caught_up: AtomicBool,
}

/// What Redis said last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// No call has answered yet (start).
    Unknown = 0,
    Up = 1,
    Down = 2,
}

/// One entry of the stream, as read.
pub enum StreamEntry {
    Delivery(Delivery),
    /// An entry that does not parse: skipped, logged and counted by the reader.
    Malformed {
        id: String,
        why: String,
    },
}

/// One event read from the stream.
pub struct Delivery {
    pub seq: u64,
    /// The webhook body's fingerprint, when it was deduplicated.
    pub fingerprint: Option<u128>,
    pub id: String,
    pub envelope: Envelope,
}

impl Cluster {
    /// Connects lazily: a replica starts even while Redis is down.
    pub fn new(config: &Config, retention: Duration) -> Result<Option<Arc<Self>>, setting::Error> {
        config.validate()?;
        let Some(url) = &config.url else {
            return Ok(None);
        };
        let timeout = Duration::from_millis(config.timeout_ms);
        let manager = |response_timeout: Duration| {
            let client = redis::Client::open(url.expose())
                .map_err(|_| setting::invalid("redis.url", &"***", "not a redis:// URL"))?;
            let settings = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(response_timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_secs(2));
            ConnectionManager::new_lazy_with_config(client, settings)
                .map_err(|err| setting::Error::startup(format!("redis: {err}")))
        };
        Ok(Some(Arc::new(Self {
            writer: manager(timeout)?,
            reader: manager(READ_BLOCK + timeout)?,
            timeout,
            retention,
            health: AtomicU8::new(Health::Unknown as u8),
            read_ok_at: std::sync::Mutex::new(std::time::Instant::now()),
            caught_up: AtomicBool::new(false),
        })))
    }

    /// Whether this replica has read everything retained in the stream since it started:
    /// until then it is not ready, so clients do not resume against a partial log.
    pub fn is_caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Relaxed)
    }

    /// Whether the last Redis call succeeded.
    pub fn is_up(&self) -> bool {
        self.health() == Health::Up
    }

    /// What the last Redis call said. `Down` is the open circuit: publishers go local at
    /// once instead of waiting for a timeout per webhook, while the stream reader keeps
    /// trying in the background and closes it again.
    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            1 => Health::Up,
            2 => Health::Down,
            _ => Health::Unknown,
        }
    }

    /// Whether the stream reader has made no progress for a while although Redis answers.
    pub fn is_stalled(&self) -> bool {
        let read_ok_at = *self.read_ok_at.lock().unwrap_or_else(|e| e.into_inner());
        self.is_up() && read_ok_at.elapsed() > STALL_AFTER
    }

    fn record<T>(&self, result: Result<T, Error>) -> Result<T, Error> {
        // Redis is down when it does not answer; an error it answers (a refused command,
        // NOPERM from an ACL) means it is up, and the circuit stays closed.
        let up = match &result {
            Ok(_) => true,
            Err(Error::Timeout) => false,
            Err(Error::Redis(err)) => {
                !(err.is_io_error()
                    || err.is_timeout()
                    || err.is_connection_dropped()
                    || err.is_connection_refusal()
                    || err.is_unrecoverable_error())
            }
            Err(Error::Malformed(_)) => true,
        };
        telemetry::meters().redis_up.set(if up { 1.0 } else { 0.0 });
        let health = if up { Health::Up } else { Health::Down };
        if self.health.swap(health as u8, Ordering::Relaxed) != health as u8 {
            if up {
                tracing::info!("redis reachable: replicas share fan-out and retention");
            } else if let Err(err) = &result {
                tracing::warn!(error = %err, "redis unreachable: serving local clients from local state");
            }
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

    /// Appends an event to the shared stream (trimmed by age), unless `dedupe` names a
    /// fingerprint seen within its window: `Ok(None)`. One script, so "seen" and
    /// "retained" cannot be separated by a crash.
    pub async fn append(
        &self,
        envelope: &Envelope,
        dedupe: Option<(u128, Duration)>,
    ) -> Result<Option<String>, Error> {
        let mut connection = self.writer.clone();
        let min_id = format!(
            "{}-0",
            now_ms().saturating_sub(self.retention.as_millis() as u64)
        );
        let (dedupe_key, window, print) = match dedupe {
            Some((print, window)) => (
                format!("{DEDUPE_PREFIX}{print:032x}"),
                window.as_secs().max(1),
                format!("{print:032x}"),
            ),
            None => (String::new(), 0, String::new()),
        };
        let mut command = redis::cmd("EVAL");
        command
            .arg(APPEND_ONCE)
            .arg(2)
            .arg(STREAM)
            .arg(dedupe_key)
            .arg(window)
            .arg(min_id)
            .arg(envelope.event.as_str())
            .arg(envelope.instance.as_str())
            .arg(envelope.payload.get())
            .arg(print);
        let call = command.query_async::<Option<String>>(&mut connection);
        self.bounded(call, self.timeout).await
    }

    /// Up to `count` entries after stream ID `after`, waiting up to a second for new ones.
    /// An entry that does not parse (another version's, a hand-written one) is returned as
    /// [`StreamEntry::Malformed`], never failing the batch: the reader skips it.
    pub async fn read(&self, after: &str, count: usize) -> Result<Vec<StreamEntry>, Error> {
        let mut connection = self.reader.clone();
        let mut command = redis::cmd("XREAD");
        command
            .arg("COUNT")
            .arg(count.max(1))
            .arg("BLOCK")
            .arg(READ_BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(STREAM)
            .arg(after);
        let call = command.query_async::<Option<StreamReadReply>>(&mut connection);
        let reply = self.bounded(call, READ_BLOCK + self.timeout).await?;
        *self.read_ok_at.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
        let mut entries = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                entries.push(match parse_entry(&entry.id, &entry.map) {
                    Ok(delivery) => StreamEntry::Delivery(delivery),
                    Err(err) => StreamEntry::Malformed {
                        id: entry.id,
                        why: err.to_string(),
                    },
                });
            }
        }
        if entries.len() < count.max(1) {
            self.caught_up.store(true, Ordering::Relaxed);
        }
        Ok(entries)
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
    let fingerprint = text("f")
        .ok()
        .and_then(|hex| u128::from_str_radix(&hex, 16).ok());
    Ok(Delivery {
        fingerprint,
        seq: seq_of(id).ok_or_else(|| Error::Malformed(id.to_owned()))?,
        id: id.to_owned(),
        envelope: Envelope {
            event,
            instance,
            payload: Arc::new(payload),
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
