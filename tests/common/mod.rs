//! Helpers shared by the integration tests, one module per concern. Every wait has a
//! timeout; nothing sleeps to synchronise.
//! - `app`: the app in this process (`spawn_app`, `test_config`) and the HTTP client;
//! - `evolution`: a fake Evolution API that records what it gets, with a builder for a
//!   test's own routes;
//! - `js`: a driver for the official JavaScript socket.io-client;
//! - `raw_sio`: a raw Engine.IO/Socket.IO websocket client;
//! - `redis`: a real Redis for one test;
//! - `rabbitmq`: a real RabbitMQ on free ports, and publishing as Evolution does;
//! - `jwt`: webhook credentials and JWTs as Evolution signs them;
//! - `webhook`: posting webhooks (over TCP or in process), fixtures and bodies;
//! - `sidecar`: the real binary as its own process;
//! - `wait`: the one `eventually`, `PATIENCE` and `free_port`.
#![allow(dead_code, unused_imports)] // each test file uses a different subset

pub mod app;
pub mod evolution;
pub mod js;
pub mod jwt;
pub mod polling;
pub mod rabbitmq;
pub mod raw_sio;
pub mod redis;
pub mod sidecar;
pub mod wait;
pub mod webhook;

pub use app::*;
pub use evolution::*;
pub use js::*;
pub use jwt::*;
pub use polling::PollingSession;
pub use rabbitmq::*;
pub use raw_sio::RawSocket;
pub use redis::*;
pub use sidecar::Sidecar;
pub use wait::*;
pub use webhook::*;
