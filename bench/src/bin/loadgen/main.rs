//! Run with: cargo run --release -p evo-bench --bin loadgen -- fanout --url http://127.0.0.1:8093 --apikey secret --pid <server pid>
//!
//! Load generator for evo-realtime and its peers, speaking raw Engine.IO v4 / Socket.IO v5
//! over WebSocket so the client side stays cheap (one task and a 4 KiB read buffer per
//! connection). Modes:
//!
//! - `fanout`: C clients over I namespaces `/bench-<n>`; webhooks POSTed on K keep-alive
//!   HTTP/1.1 connections at a fixed rate or as fast as they go, for D seconds; each body
//!   carries `data.seq` and `data.sent_ns`. Reports webhooks accepted/s, deliveries/s, lost
//!   deliveries after a drain wait, end-to-end latency (POST sent → event received). With
//!   `--amqp-url`, the same bodies are published to RabbitMQ as Evolution does instead.
//! - `idle`: C idle connections; server RSS per connection and connect-time percentiles.
//! - `soak`: C clients opted in to recovery, each dropping its connection every few seconds
//!   and resuming from its last offset, webhooks at a fixed rate for D seconds, the server's
//!   RSS sampled throughout; verdict: RSS flat after warm-up, 0 lost, every webhook answered.
//! - `emit-rest`: clients emit `message/sendText` with an ack, which the server forwards to a
//!   fake upstream run by this process; calls/s and the latency added over a direct call.
//! - `wait`: waits until a server accepts TCP connections (for scripts).
//! - `table`: prints the comparison table of a results file written with `--json-out`.
//!
//! With `--pid`, the server's CPU time and RSS are read from `/proc/<pid>`. Human lines go
//! to stdout; the last stdout line is a one-line JSON summary (also appended to
//! `--json-out FILE`).
//!
//! # Layout
//! This file holds the command line and the dispatch; a module per mode, and what they share:
//! - [`fanout`], [`idle`], [`soak`], [`emit_rest`], [`wait`], [`table`]: one mode each, with
//!   its options.
//! - [`common_args`]: the options every measuring mode takes.
//! - [`summary`]: prints and appends a mode's JSON summary and picks the exit code.
//! - [`clients`]: connects the socket.io clients of a run and counts what each receives.
//! - [`watch`]: CPU time and RSS of the server under test and of this process.
//! - [`webhooks`]: the webhook sender of `fanout` and `soak` (schedule, bodies, answers).
//! - [`amqp`]: the RabbitMQ publisher of `fanout --amqp-url` (same schedule and bodies).
//! - [`churn`]: a `soak` client that drops its connection and resumes from its last offset.
//! - [`rss_series`]: the server's RSS over time, and the flatness verdict on it.
//! - [`http`]: opens a keep-alive HTTP/1.1 client connection.
//! - [`polling`]: idle Engine.IO sessions on the long-polling transport (`idle --transport
//!   polling`).
//! - [`fake_upstream`]: the fake Evolution API that `emit-rest` serves.

mod amqp;
mod churn;
mod clients;
mod common_args;
mod emit_rest;
mod fake_upstream;
mod fanout;
mod http;
mod idle;
mod polling;
mod rss_series;
mod soak;
mod summary;
mod table;
mod wait;
mod watch;
mod webhooks;

use clap::{Parser, Subcommand};

use crate::emit_rest::EmitRestArgs;
use crate::fanout::FanoutArgs;
use crate::idle::IdleArgs;
use crate::soak::SoakArgs;
use crate::summary::finish;
use crate::table::TableArgs;
use crate::wait::WaitArgs;

#[derive(Parser)]
#[command(about = "Load generator for evo-realtime (raw Engine.IO/Socket.IO over WebSocket)")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// C clients over I namespaces, webhooks POSTed for D seconds; deliveries, loss, latency.
    Fanout(FanoutArgs),
    /// C idle connections: server RSS per connection, connect-time percentiles.
    Idle(IdleArgs),
    /// Recovering clients with reconnect churn under steady webhooks; RSS over time, loss.
    Soak(SoakArgs),
    /// Client emits with ack through the server to a fake upstream run here.
    EmitRest(EmitRestArgs),
    /// Waits until the server accepts TCP connections.
    Wait(WaitArgs),
    /// Prints the comparison table of a results file (one JSON summary per line).
    Table(TableArgs),
}

fn main() {
    let cli = Cli::parse();
    let threads = match &cli.mode {
        Mode::Fanout(a) => a.common.threads,
        Mode::Idle(a) => a.common.threads,
        Mode::Soak(a) => a.common.threads,
        Mode::EmitRest(a) => a.common.threads,
        Mode::Wait(_) | Mode::Table(_) => Some(1),
    };
    let threads = threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(async move {
        match cli.mode {
            Mode::Fanout(args) => finish(&args.common.clone(), fanout::fanout(args).await),
            Mode::Idle(args) => finish(&args.common.clone(), idle::idle(args).await),
            Mode::Soak(args) => finish(&args.common.clone(), soak::soak(args).await),
            Mode::EmitRest(args) => finish(&args.common.clone(), emit_rest::emit_rest(args).await),
            Mode::Wait(args) => wait::wait(args).await,
            Mode::Table(args) => table::table(args),
        }
    });
    // Client tasks are still connected: exit without waiting for them.
    std::process::exit(code);
}
