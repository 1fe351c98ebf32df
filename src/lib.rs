//! evo-realtime: realtime Socket.IO for Evolution API, as a sidecar.
//!
//! ```text
//! Evolution API --POST--> webhook (auth, parse) --Envelope--> bus --> hub --> sockets
//! Evolution's RabbitMQ --> amqp (own queue, parse) --Envelope--> bus (ack once retained)
//! sockets --emit--> hub --> upstream (route table) --> Evolution REST --> ack
//! other HTTP --> proxy --> Evolution API
//! ```
//!
//! # Layout
//! - [`config`]: layered settings (defaults < TOML < env < flags) and every `ENV_*` name.
//! - [`envelope`]: the event, its three name forms, and the byte-exact emitted payload.
//! - [`webhook`]: the ingest endpoint: credentials, limits, statuses.
//! - [`amqp`]: the second ingest: Evolution's RabbitMQ output, consumed into the bus.
//! - [`bus`]: retain, then fan out: dedupe, the Redis stream or the local log, to the hub.
//! - [`hub`]: socket.io namespaces, namespace permission, filters, delivery.
//! - [`guard`]: handshake admission: per-IP rate limit and connection cap.
//! - [`auth`]: API key → principal, cached upstream lookup, handshake check.
//! - [`upstream`]: client emits → Evolution REST, with acks.
//! - [`proxy`]: everything else, streamed to Evolution API.
//! - [`replay`]: retained events per namespace, offsets, state for late joiners.
//! - [`cluster`]: with Redis, one shared stream for fan-out and retention across replicas.
//! - [`sio_request`]: what a socket.io request says: its session id, query and key.
//! - [`expiring`]: a map whose entries leave by age and, past a byte bound, oldest first.
//! - [`json_object`]: a JSON object's top-level entries, raw, in order.
//! - [`dedupe`]: remembers accepted webhook bodies, so Evolution's retries emit once.
//! - [`telemetry`]: logs, metric names and the metrics endpoint.
//! - [`health`]: `/_sidecar/healthz` and `/_sidecar/readyz`.
//! - [`inspector`]: the live event inspector page, `/_sidecar/inspector`.
//! - [`app`]: the router, its layer order, and graceful shutdown.
//! - [`server`]: the accept loop: TCP connection caps, header/idle timeout, accept backoff.
//! - [`setting`]: value types shared by every settings section (errors, secrets, lists).
//! - [`peer`]: trusted proxies and the per-client key, shared by `server` and `proxy`.
#![forbid(unsafe_code)]

pub mod activity;
pub mod amqp;
pub mod app;
pub mod auth;
pub mod bus;
pub mod cluster;
pub mod config;
pub mod dedupe;
pub mod envelope;
pub mod expiring;
pub mod guard;
pub mod health;
pub mod hub;
pub mod inspector;
pub mod json_object;
pub mod license;
pub mod peer;
pub mod proxy;
pub mod replay;
pub mod server;
pub mod setting;
pub mod sio_request;
pub mod telemetry;
pub mod upstream;
pub mod webhook;

pub use app::App;
pub use config::Config;
