//! RabbitMQ ingest: Evolution's AMQP output, consumed from the sidecar's own queue and
//! handed to the bus exactly as a webhook is.
//!
//! Evolution (`RABBITMQ_ENABLED=true`) publishes every event to a topic exchange
//! (`evolution_exchange`, or one named after the instance), routing key = the dotted event,
//! body = the webhook's envelope without `destination`, no message properties. The
//! [`Consumer`] declares those exchanges as Evolution does (topic, durable, not
//! auto-deleted), its own durable quorum queue (`SIDECAR_AMQP_QUEUE`) bound to each with
//! `#` (or the dotted names of `SIDECAR_EVENTS`, deletions included), and consumes it.
//! Evolution's own per-event queues are never touched.
//!
//! One delivery at a time, in queue order ([`Consumer::handle`]): size limit (the webhook's
//! `SIDECAR_MAX_BODY_BYTES`) → [`Envelope::from_webhook`] → fingerprint → [`bus::retained`]
//! (`Bus::publish`: filter, dedupe, retain, fan out) → `basic.ack`. So a message is acked
//! only once retained, and a sidecar killed in between gets it again from the broker
//! (at least once; the fingerprint makes the redelivery a duplicate). A message that is no
//! envelope, or too large, is rejected without requeue (to the queue's dead-letter
//! exchange, if the operator set one by policy), counted and logged at debug.
//!
//! The broker down or gone: [`Consumer::run`] reconnects forever with capped exponential
//! backoff and jitter; meanwhile readyz says `"amqp":"degraded"` (never not ready: the
//! webhook path still works) and `evo_amqp_up` is 0.
//!
//! Shutting down (the app's draining flag, set on SIGTERM): the consumer stops taking
//! messages and closes its connection, so the broker requeues what was prefetched but not
//! acked, for another replica or the next start, as webhooks answer 503 for Evolution to retry.
//!
//! This module knows nothing of sockets or HTTP: it imports neither `hub` nor `webhook`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ConnectionProperties, ExchangeKind};

use crate::bus::{self, Bus, Published};
use crate::dedupe;
use crate::envelope::{self, Envelope};
use crate::telemetry;

mod config;

pub use config::{Config, MAX_PREFETCH};

/// How long connecting (TCP, TLS, AMQP handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long any one broker call (declare, bind, consume, ack) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The first pause before reconnecting; it doubles per failure up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// The pause before a message whose publish failed (a panic) is offered again.
const NOT_RETAINED_PAUSE: Duration = Duration::from_secs(1);
/// How often an idle consumer looks at the draining flag.
const DRAIN_CHECK: Duration = Duration::from_millis(100);

/// Why a session with the broker ended. Every one leads to a reconnect.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("amqp: {0}")]
    Broker(#[from] lapin::Error),
    #[error("amqp: {0} timed out")]
    Timeout(&'static str),
    #[error("amqp: the broker cancelled the consumer")]
    Cancelled,
    #[error("amqp: shutting down")]
    Draining,
}

/// What became of one message; the `outcome` label of `evo_amqp_messages_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Retained and handed over, then acked.
    Published,
    /// Seen within the dedupe window (a redelivery): acked, not emitted again.
    Duplicate,
    /// Dropped by `SIDECAR_EVENTS`: acked.
    Filtered,
    /// Larger than `SIDECAR_MAX_BODY_BYTES`: rejected without requeue.
    TooLarge,
    /// Not a JSON object: rejected without requeue.
    BadJson,
    /// A JSON object that is no envelope: rejected without requeue.
    BadEnvelope,
    /// Publishing failed (a panic): requeued after a pause.
    NotRetained,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Published => "published",
            Outcome::Duplicate => "duplicate",
            Outcome::Filtered => "filtered",
            Outcome::TooLarge => "too_large",
            Outcome::BadJson => "bad_json",
            Outcome::BadEnvelope => "bad_envelope",
            Outcome::NotRetained => "not_retained",
        }
    }
}

/// The RabbitMQ consumer: one connection, one channel, one consumer on the sidecar's queue.
pub struct Consumer {
    config: Config,
    /// The connection URL, from `config.url` (checked by `Config::validate`).
    url: String,
    bus: Arc<Bus>,
    /// The webhook's body limit: the same events, the same bound.
    max_body_bytes: u64,
    /// Whether bodies are fingerprinted for deduplication (`SIDECAR_DEDUPE_WINDOW_SECS` > 0).
    dedupe: bool,
    /// The routing keys bound on every exchange.
    routing_keys: Vec<String>,
    /// Whether a consumer is running on the broker right now (readyz, `evo_amqp_up`).
    up: AtomicBool,
    /// The app's shutdown flag: once set, no message is taken any more.
    draining: Arc<AtomicBool>,
}

impl Consumer {
    /// The consumer, or `None` when `SIDECAR_AMQP_URL` is unset. `events` is
    /// `SIDECAR_EVENTS` (UPPER_SNAKE, empty: all).
    pub fn new(
        config: &Config,
        bus: Arc<Bus>,
        max_body_bytes: u64,
        dedupe_window_secs: u64,
        events: &[String],
        draining: Arc<AtomicBool>,
    ) -> Option<Arc<Self>> {
        let url = config.url.as_ref()?.expose().to_owned();
        telemetry::meters().amqp_up.set(0.0);
        Some(Arc::new(Self {
            config: config.clone(),
            url,
            bus,
            max_body_bytes,
            dedupe: dedupe_window_secs > 0,
            routing_keys: routing_keys(events),
            up: AtomicBool::new(false),
            draining,
        }))
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether the consumer is attached to the broker.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
        telemetry::meters().amqp_up.set(if up { 1.0 } else { 0.0 });
    }

    /// Consumes forever: connects, consumes until the connection or channel fails, waits a
    /// capped, jittered, growing pause, and starts again. Ends only when its task is aborted
    /// (the app is dropped); the connection closes with it.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        // A failure is logged at warn when it is new (a refused declare must not hide at
        // debug), at debug while it repeats (a broker down for an hour logs once).
        let mut last_failure = String::new();
        loop {
            let err = self.session(&mut backoff).await;
            let was_up = self.is_up();
            self.set_up(false);
            if self.is_draining() {
                tracing::info!(
                    "amqp consumer stopped for shutdown: unacked messages go back to the queue"
                );
                // The task ends with the app.
                return std::future::pending().await;
            }
            let pause = backoff.next_pause();
            let failure = err.to_string();
            if was_up || failure != last_failure {
                tracing::warn!(error = %failure, retry_in_ms = pause.as_millis() as u64, "amqp consumer detached: reconnecting (readyz says \"amqp\":\"degraded\")");
            } else {
                tracing::debug!(error = %failure, retry_in_ms = pause.as_millis() as u64, "amqp broker still unreachable");
            }
            last_failure = failure;
            tokio::time::sleep(pause).await;
        }
    }

    /// One connection's life: declare, consume, handle each delivery in order. Returns why
    /// it ended.
    async fn session(&self, backoff: &mut Backoff) -> Error {
        let connection = match bounded(
            "connect",
            CONNECT_TIMEOUT,
            Connection::connect(&self.url, properties()),
        )
        .await
        {
            Ok(connection) => connection,
            Err(err) => return err,
        };
        let result = self.consume(&connection, backoff).await;
        // Best effort: the broker may be gone already.
        let _ = tokio::time::timeout(
            CALL_TIMEOUT,
            connection.close(200, "evo-realtime reconnecting".into()),
        )
        .await;
        match result {
            Ok(never) => match never {},
            Err(err) => err,
        }
    }

    async fn consume(
        &self,
        connection: &Connection,
        backoff: &mut Backoff,
    ) -> Result<std::convert::Infallible, Error> {
        let channel = bounded("channel", CALL_TIMEOUT, connection.create_channel()).await?;
        // Bounds what the broker pushes before we ack: the memory of in-flight messages.
        bounded(
            "basic.qos",
            CALL_TIMEOUT,
            channel.basic_qos(self.config.prefetch, BasicQosOptions::default()),
        )
        .await?;
        for exchange in &self.config.exchange {
            // What Evolution declares (`assertExchange(name, 'topic', {durable: true,
            // autoDelete: false})`): the same arguments, so neither side's declare fails.
            let options = ExchangeDeclareOptions {
                durable: true,
                auto_delete: false,
                ..ExchangeDeclareOptions::default()
            };
            let declare = channel.exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                options,
                FieldTable::default(),
            );
            bounded("exchange.declare", CALL_TIMEOUT, declare).await?;
        }
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let queue = self.config.queue.as_str();
        let declare = channel.queue_declare(queue.into(), options, arguments);
        bounded("queue.declare", CALL_TIMEOUT, declare).await?;
        for exchange in &self.config.exchange {
            for key in &self.routing_keys {
                let bind = channel.queue_bind(
                    queue.into(),
                    exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                );
                bounded("queue.bind", CALL_TIMEOUT, bind).await?;
            }
        }
        let consume = channel.basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        );
        let mut deliveries = bounded("basic.consume", CALL_TIMEOUT, consume).await?;
        self.set_up(true);
        backoff.reset();
        tracing::info!(
            queue,
            exchanges = %self.config.exchange.join(","),
            routing_keys = %self.routing_keys.join(","),
            prefetch = self.config.prefetch,
            "amqp consumer attached"
        );
        // One at a time: publish, then ack, then the next, so the queue's order holds. The
        // draining flag is looked at between messages and while idle; closing the
        // connection then hands unacked messages back to the broker.
        let mut drain_check = tokio::time::interval(DRAIN_CHECK);
        loop {
            let delivery = tokio::select! {
                delivery = deliveries.next() => delivery,
                _ = drain_check.tick() => {
                    if self.is_draining() {
                        return Err(Error::Draining);
                    }
                    continue;
                }
            };
            let Some(delivery) = delivery else {
                return Err(Error::Cancelled);
            };
            let delivery = delivery?;
            if self.is_draining() {
                return Err(Error::Draining);
            }
            self.handle(delivery).await?;
        }
    }

    /// One message: judged, published through the bus like a webhook, then settled. An
    /// error is the broker's (the ack or reject could not be sent): the session ends, and
    /// the broker redelivers whatever was not acked.
    async fn handle(&self, delivery: lapin::message::Delivery) -> Result<Outcome, Error> {
        let outcome = self.publish(&delivery.data).await;
        telemetry::meters()
            .amqp_message(outcome.label())
            .increment(1);
        match outcome {
            Outcome::Published | Outcome::Duplicate | Outcome::Filtered => {
                let ack = delivery.ack(BasicAckOptions::default());
                bounded("basic.ack", CALL_TIMEOUT, ack).await?;
            }
            Outcome::TooLarge | Outcome::BadJson | Outcome::BadEnvelope => {
                // Never requeued: it would come back forever. A dead-letter exchange set
                // on the queue by policy keeps it for the operator.
                let reject = delivery.reject(BasicRejectOptions { requeue: false });
                bounded("basic.reject", CALL_TIMEOUT, reject).await?;
            }
            Outcome::NotRetained => {
                tokio::time::sleep(NOT_RETAINED_PAUSE).await;
                let reject = delivery.reject(BasicRejectOptions { requeue: true });
                bounded("basic.reject", CALL_TIMEOUT, reject).await?;
            }
        }
        Ok(outcome)
    }

    /// The webhook's path for one body: limit, envelope, fingerprint, retained publish.
    async fn publish(&self, body: &[u8]) -> Outcome {
        if body.len() as u64 > self.max_body_bytes {
            tracing::debug!(
                bytes = body.len(),
                limit = self.max_body_bytes,
                "amqp message rejected: larger than SIDECAR_MAX_BODY_BYTES"
            );
            return Outcome::TooLarge;
        }
        let envelope = match Envelope::from_webhook(body) {
            Ok(envelope) => envelope,
            Err(err) => {
                tracing::debug!(error = %err, "amqp message rejected: not an event envelope");
                return match err {
                    envelope::Error::Syntax(_) => Outcome::BadJson,
                    envelope::Error::Semantic(_) => Outcome::BadEnvelope,
                };
            }
        };
        let fingerprint = self.dedupe.then(|| dedupe::fingerprint(body));
        let (bus, event) = (self.bus.clone(), envelope.clone());
        match bus::retained(async move { bus.publish(&event, fingerprint).await }).await {
            Ok(Published::Fresh) => Outcome::Published,
            Ok(Published::Duplicate) => {
                tracing::debug!(instance = %envelope.instance, event = %envelope.event, "duplicate amqp message");
                Outcome::Duplicate
            }
            Ok(Published::Filtered) => Outcome::Filtered,
            Err(err) => {
                tracing::error!(instance = %envelope.instance, event = %envelope.event, error = %err, "amqp message not retained: requeued");
                Outcome::NotRetained
            }
        }
    }
}

/// The connection's client properties: the broker's management UI names the connection.
fn properties() -> ConnectionProperties {
    ConnectionProperties::default().with_connection_name("evo-realtime".into())
}

/// `future`, failing with [`Error::Timeout`] after `limit`.
async fn bounded<T>(
    what: &'static str,
    limit: Duration,
    future: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(limit, future).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Error::Timeout(what)),
    }
}

/// The routing keys to bind: `#` (everything), or, with `SIDECAR_EVENTS`, the dotted name
/// of each listed event Evolution sends, plus the deletions (which pass every filter).
pub fn routing_keys(events: &[String]) -> Vec<String> {
    if events.is_empty() {
        return vec!["#".to_owned()];
    }
    let mut keys: Vec<String> = events
        .iter()
        .filter_map(|name| envelope::evolution_event(name))
        .chain(envelope::DELETION_EVENTS)
        .map(str::to_owned)
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Capped exponential backoff with jitter: each pause is drawn from the upper half of a
/// window that doubles per failure, so replicas that lost the broker together do not
/// return together.
pub struct Backoff {
    min: Duration,
    max: Duration,
    window: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            window: min,
        }
    }

    /// The next pause, between half the current window and the window (at most `max`).
    pub fn next_pause(&mut self) -> Duration {
        let window = self.window;
        self.window = (self.window * 2).min(self.max);
        let half = window / 2;
        let jitter = half.mul_f64(jitter_fraction());
        (half + jitter).max(self.min.min(window))
    }

    /// Back to the shortest pause, after a session got as far as consuming.
    pub fn reset(&mut self) {
        self.window = self.min;
    }
}

/// A fraction in [0, 1) from the clock: jitter needs spread, not cryptographic randomness.
fn jitter_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos());
    let mixed = xxhash_rust::xxh3::xxh3_64(&nanos.to_le_bytes());
    (mixed >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests;
