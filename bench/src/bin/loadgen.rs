//! Run with: cargo run --release -p evo-bench --bin loadgen -- fanout --url http://127.0.0.1:8093 --apikey secret --pid <server pid>
//!
//! Load generator for evo-realtime and its peers, speaking raw Engine.IO v4 / Socket.IO v5
//! over WebSocket so the client side stays cheap (one task and a 4 KiB read buffer per
//! connection). Modes:
//!
//! - `fanout`: C clients over I namespaces `/bench-<n>`; webhooks POSTed on K keep-alive
//!   HTTP/1.1 connections at a fixed rate or as fast as they go, for D seconds; each body
//!   carries `data.seq` and `data.sent_ns`. Reports webhooks accepted/s, deliveries/s, lost
//!   deliveries after a drain wait, end-to-end latency (POST sent → event received).
//! - `idle`: C idle connections; server RSS per connection and connect-time percentiles.
//! - `emit-rest`: clients emit `message/sendText` with an ack, which the server forwards to a
//!   fake upstream run by this process; calls/s and the latency added over a direct call.
//! - `wait`: waits until a server accepts TCP connections (for scripts).
//! - `table`: prints the comparison table of a results file written with `--json-out`.
//!
//! With `--pid`, the server's CPU time and RSS are read from `/proc/<pid>`. Human lines go
//! to stdout; the last stdout line is a one-line JSON summary (also appended to
//! `--json-out FILE`).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use evo_bench::now_ns;
use evo_bench::procfs::{PeakRss, Proc};
use evo_bench::report::{self, Shards};
use evo_bench::sio::{self, Packet, Target, Ws};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

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
    /// Client emits with ack through the server to a fake upstream run here.
    EmitRest(EmitRestArgs),
    /// Waits until the server accepts TCP connections.
    Wait(WaitArgs),
    /// Prints the comparison table of a results file (one JSON summary per line).
    Table(TableArgs),
}

#[derive(Args, Clone)]
struct Common {
    /// Base URL of the server under test: socket.io and webhooks.
    #[arg(long, default_value = "http://127.0.0.1:8093")]
    url: String,
    /// Sent as `?apikey=` at the handshake.
    #[arg(long, default_value = "secret")]
    apikey: String,
    /// The server's process id: CPU time and RSS are read from /proc/<pid>.
    #[arg(long)]
    pid: Option<u32>,
    /// Runtime worker threads [default: the CPUs this process may run on].
    #[arg(long)]
    threads: Option<usize>,
    /// Namespaces are `/<prefix><n>`, n = 0..instances.
    #[arg(long, default_value = "bench-")]
    instance_prefix: String,
    /// Handshakes in flight at once while clients connect. Keep it under the server's listen
    /// backlog (128 for a tokio `TcpListener::bind`), or connect times measure SYN retries.
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// Copied into the JSON summary (run.sh: the scenario's name).
    #[arg(long, default_value = "")]
    scenario: String,
    /// Copied into the JSON summary (run.sh: ours, peer or floor).
    #[arg(long, default_value = "")]
    server: String,
    /// Also append the JSON summary to this file.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
    /// Exit with status 2 if a delivery was lost, a client failed or nothing was accepted.
    #[arg(long)]
    strict: bool,
}

#[derive(Args)]
struct FanoutArgs {
    #[command(flatten)]
    common: Common,
    /// Socket.IO clients, spread round-robin over the namespaces.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Namespaces (instances).
    #[arg(long, default_value_t = 10)]
    instances: usize,
    /// Webhooks per second; 0 = as fast as the keep-alive connections allow.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Keep-alive HTTP/1.1 connections POSTing webhooks (one request in flight each).
    #[arg(long, default_value_t = 4)]
    conns: usize,
    /// Seconds of webhook sending.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Approximate webhook body size in bytes (padded with `data.pad`).
    #[arg(long, default_value_t = 512)]
    payload: usize,
    /// Where webhooks are POSTed: evo-realtime `/_sidecar/webhook`, the Node peer and the
    /// floor `/webhook`.
    #[arg(long, default_value = "/_sidecar/webhook")]
    webhook_path: String,
    /// The webhook's `event`, and the event name clients receive.
    #[arg(long, default_value = "messages.upsert")]
    event: String,
    /// Longest wait, in seconds, for outstanding deliveries after the last webhook.
    #[arg(long, default_value_t = 10.0)]
    drain: f64,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Namespaces (instances).
    #[arg(long, default_value_t = 10)]
    instances: usize,
    /// Seconds to wait after the last connect before RSS is read.
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
}

#[derive(Args)]
struct EmitRestArgs {
    #[command(flatten)]
    common: Common,
    /// Clients, each with one emit in flight at a time.
    #[arg(long, default_value_t = 10)]
    clients: usize,
    /// Namespaces (instances).
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Seconds of emitting (and as long again of direct calls, for the baseline).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Where this process serves the fake upstream; start the server with
    /// `SIDECAR_UPSTREAM_URL=http://<this address>`.
    #[arg(long, default_value = "127.0.0.1:8099")]
    upstream_listen: std::net::SocketAddr,
    /// The emitted event (a route of the server's route table).
    #[arg(long, default_value = "message/sendText")]
    event: String,
}

#[derive(Args)]
struct WaitArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8093")]
    url: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Give up at once if this process is gone.
    #[arg(long)]
    pid: Option<u32>,
}

#[derive(Args)]
struct TableArgs {
    /// A file of JSON summaries, one per line (`--json-out`).
    results: std::path::PathBuf,
}

fn main() {
    let cli = Cli::parse();
    let threads = match &cli.mode {
        Mode::Fanout(a) => a.common.threads,
        Mode::Idle(a) => a.common.threads,
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
            Mode::Fanout(args) => finish(&args.common.clone(), fanout(args).await),
            Mode::Idle(args) => finish(&args.common.clone(), idle(args).await),
            Mode::EmitRest(args) => finish(&args.common.clone(), emit_rest(args).await),
            Mode::Wait(args) => wait(args).await,
            Mode::Table(args) => table(args),
        }
    });
    // Client tasks are still connected: exit without waiting for them.
    std::process::exit(code);
}

/// Prints (and appends) the summary; returns the exit code.
fn finish(common: &Common, outcome: Result<Summary, String>) -> i32 {
    let (mut summary, healthy) = match outcome {
        Ok(Summary { json, healthy }) => (json, healthy),
        Err(err) => {
            eprintln!("loadgen: {err}");
            (json!({"error": err}), false)
        }
    };
    summary["scenario"] = json!(common.scenario);
    summary["server"] = json!(common.server);
    let line = summary.to_string();
    println!("{line}");
    if let Some(path) = &common.json_out {
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut file| writeln!(file, "{line}"));
        if let Err(err) = appended {
            eprintln!("loadgen: cannot append to {}: {err}", path.display());
            return 1;
        }
    }
    if summary.get("error").is_some() {
        1
    } else if common.strict && !healthy {
        eprintln!("loadgen: --strict: lost deliveries, failed clients or nothing accepted");
        2
    } else {
        0
    }
}

/// A mode's JSON summary, and whether nothing was lost or failed (for `--strict`).
struct Summary {
    json: Value,
    healthy: bool,
}

// === Clients ===

/// What one client saw. Atomics, because the drain loop reads them while the task runs.
#[derive(Default)]
struct ClientStat {
    /// Distinct events received on its namespace.
    received: AtomicU64,
    /// Events received twice (same `seq`).
    duplicates: AtomicU64,
    /// Packets that were not expected: another namespace, or no `sent_ns`.
    unexpected: AtomicU64,
    /// `now_ns` of the last event received.
    last_ns: AtomicU64,
    /// The connection ended before the run did.
    gone: AtomicBool,
}

/// The connected clients of a run.
struct Clients {
    /// Per client: its namespace index and what it saw; `None` if it failed to connect.
    stats: Vec<Option<(usize, Arc<ClientStat>)>>,
    connect_us: Histogram<u64>,
    connected: usize,
    failed: usize,
    /// The first few connect errors, for the report.
    errors: Vec<String>,
    elapsed: Duration,
}

fn namespace(prefix: &str, index: usize) -> String {
    format!("/{prefix}{index}")
}

/// Connects `count` clients, client i on namespace i mod `instances`, with at most
/// `connect_concurrency` handshakes at once; each connected client then runs `receive`.
async fn connect_clients(
    common: &Common,
    target: &Target,
    count: usize,
    instances: usize,
    latency: Arc<Shards>,
) -> Clients {
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    let (report_tx, mut report_rx) = mpsc::unbounded_channel();
    for index in 0..count {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("open semaphore");
        let target = target.clone();
        let instance = index % instances;
        let ns = namespace(&common.instance_prefix, instance);
        let report_tx = report_tx.clone();
        let latency = latency.clone();
        tokio::spawn(async move {
            let begun = now_ns();
            let joined =
                tokio::time::timeout(Duration::from_secs(30), sio::connect(&target, &ns)).await;
            drop(permit);
            let elapsed_us = (now_ns() - begun) / 1000;
            match joined {
                Ok(Ok(ws)) => {
                    let stat = Arc::new(ClientStat::default());
                    let _ = report_tx.send((index, Ok((elapsed_us, instance, stat.clone()))));
                    drop(report_tx);
                    receive(ws, ns, instances as u64, stat, latency, index).await;
                }
                Ok(Err(err)) => {
                    let _ = report_tx.send((index, Err(err)));
                }
                Err(_) => {
                    let _ = report_tx.send((index, Err("connect timed out after 30 s".into())));
                }
            }
        });
    }
    drop(report_tx);
    let mut clients = Clients {
        stats: (0..count).map(|_| None).collect(),
        connect_us: report::histogram(),
        connected: 0,
        failed: 0,
        errors: Vec::new(),
        elapsed: Duration::ZERO,
    };
    // Connected clients keep their sender while they live: count the reports instead of
    // waiting for the channel to close.
    for _ in 0..count {
        let Some((index, outcome)) = report_rx.recv().await else {
            break;
        };
        match outcome {
            Ok((micros, instance, stat)) => {
                clients.connect_us.saturating_record(micros);
                clients.stats[index] = Some((instance, stat));
                clients.connected += 1;
            }
            Err(err) => {
                clients.failed += 1;
                if clients.errors.len() < 5 {
                    clients.errors.push(err);
                }
            }
        }
    }
    clients.elapsed = started.elapsed();
    clients
}

/// A connected client's life: count events on `ns`, answer pings, until the connection
/// ends. `seq`s of one namespace are `instance + k * instances`, so `seq / instances`
/// indexes a bitmap that spots duplicates.
async fn receive(
    mut ws: Ws,
    ns: String,
    instances: u64,
    stat: Arc<ClientStat>,
    latency: Arc<Shards>,
    index: usize,
) {
    let mut seen: Vec<u64> = Vec::new();
    while let Some(message) = ws.next().await {
        let text = match message {
            Ok(Message::Text(text)) => text,
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        match sio::parse(text.as_str()) {
            Packet::Event { ns: on, json, .. } => {
                let now = now_ns();
                let sent = sio::u64_after(json, "\"sent_ns\":");
                let seq = sio::u64_after(json, "\"seq\":");
                let (Some(sent), Some(seq), true) = (sent, seq, on == ns) else {
                    stat.unexpected.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let slot = (seq / instances) as usize;
                let (word, bit) = (slot / 64, 1u64 << (slot % 64));
                if seen.len() <= word {
                    seen.resize(word + 1, 0);
                }
                if seen[word] & bit != 0 {
                    stat.duplicates.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                seen[word] |= bit;
                latency.record(index, now.saturating_sub(sent) / 1000);
                stat.received.fetch_add(1, Ordering::Relaxed);
                stat.last_ns.fetch_max(now, Ordering::Relaxed);
            }
            // A ping whose pong cannot be sent ends the client; otherwise nothing to do.
            Packet::Ping if ws.send(Message::text("3")).await.is_err() => break,
            Packet::Close | Packet::Disconnect { .. } => break,
            _ => {}
        }
    }
    stat.gone.store(true, Ordering::Relaxed);
}

fn connect_summary(clients: &Clients, requested: usize) -> Value {
    json!({
        "requested": requested,
        "connected": clients.connected,
        "failed": clients.failed,
        "errors": clients.errors,
        "connect_seconds": clients.elapsed.as_secs_f64(),
    })
}

fn print_connect(clients: &Clients, requested: usize) {
    println!(
        "clients: {}/{} connected in {:.2} s, {} failed; connect {}",
        clients.connected,
        requested,
        clients.elapsed.as_secs_f64(),
        clients.failed,
        report::percentiles_line(&clients.connect_us)
    );
    for err in &clients.errors {
        println!("  connect error: {err}");
    }
}

// === The server under test ===

/// The server's process, if `--pid` was given, and this process.
struct Watch {
    server: Option<Proc>,
    me: Option<Proc>,
}

/// CPU readings at one instant.
#[derive(Clone, Copy)]
struct CpuMark {
    server_ms: Option<f64>,
    me_ms: Option<f64>,
    at: Instant,
}

impl Watch {
    fn new(pid: Option<u32>) -> Result<Self, String> {
        let server = pid
            .map(|pid| Proc::new(pid).map_err(|err| format!("--pid {pid}: {err}")))
            .transpose()?;
        Ok(Self {
            server,
            me: Proc::current().ok(),
        })
    }

    fn rss_kib(&self) -> Option<u64> {
        self.server.as_ref().and_then(|p| p.rss_kib().ok())
    }

    fn cpu(&self) -> CpuMark {
        CpuMark {
            server_ms: self.server.as_ref().and_then(|p| p.cpu_ms().ok()),
            me_ms: self.me.as_ref().and_then(|p| p.cpu_ms().ok()),
            at: Instant::now(),
        }
    }

    fn peak(&self) -> Option<PeakRss> {
        self.server
            .as_ref()
            .map(|p| p.sample_peak_rss(Duration::from_millis(100)))
    }

    /// `{"pid", "cpu_ms", "cpu_ms_per_1k", "rss_*_kib", "hwm_kib"}`; nulls without `--pid`.
    fn server_json(
        &self,
        from: CpuMark,
        to: CpuMark,
        per_1k_of: u64,
        rss: [Option<u64>; 3],
    ) -> Value {
        let cpu_ms = from.server_ms.zip(to.server_ms).map(|(a, b)| b - a);
        let per_1k = cpu_ms
            .filter(|_| per_1k_of > 0)
            .map(|ms| ms * 1000.0 / per_1k_of as f64);
        json!({
            "pid": self.server.as_ref().map(Proc::pid),
            "cpu_ms": cpu_ms,
            "cpu_ms_per_1k": per_1k,
            "rss_before_kib": rss[0],
            "rss_after_kib": rss[1],
            "rss_peak_kib": rss[2],
            "hwm_kib": self.server.as_ref().and_then(|p| p.hwm_kib().ok()),
        })
    }

    /// This process's CPU use over the interval, in % of one core.
    fn loadgen_json(from: CpuMark, to: CpuMark) -> Value {
        let wall_ms = to.at.duration_since(from.at).as_secs_f64() * 1000.0;
        let cpu_ms = from.me_ms.zip(to.me_ms).map(|(a, b)| b - a);
        json!({
            "cpu_ms": cpu_ms,
            "cpu_percent": cpu_ms.filter(|_| wall_ms > 0.0).map(|ms| ms * 100.0 / wall_ms),
        })
    }
}

fn print_server(server: &Value, per: &str) {
    if server["pid"].is_null() {
        println!("server: not watched (no --pid)");
        return;
    }
    let mib = |key: &str| server[key].as_f64().map_or(f64::NAN, |kib| kib / 1024.0);
    println!(
        "server: CPU {:.0} ms ({:.2} ms per 1,000 {per}); RSS before {:.1} MiB, after {:.1} MiB, peak {:.1} MiB (VmHWM {:.1} MiB)",
        server["cpu_ms"].as_f64().unwrap_or(f64::NAN),
        server["cpu_ms_per_1k"].as_f64().unwrap_or(f64::NAN),
        mib("rss_before_kib"),
        mib("rss_after_kib"),
        mib("rss_peak_kib"),
        mib("hwm_kib"),
    );
}

// === fanout ===

/// Shared by the webhook connections.
struct Plan {
    /// The next webhook's sequence number; also its slot in the schedule.
    next: AtomicU64,
    start: Instant,
    end: Instant,
    /// `None`: as fast as possible.
    interval: Option<Duration>,
    instances: u64,
    prefix: String,
    event: String,
    path: String,
    authority: String,
    pad: String,
    /// Accepted webhooks per namespace.
    accepted: Vec<AtomicU64>,
    /// Webhooks answered 200 with `"duplicate":true` (must stay 0: bodies are unique).
    duplicates: AtomicU64,
    /// Other statuses, by status.
    rejected: Mutex<BTreeMap<u16, u64>>,
    /// Transport errors (the connection is then opened again).
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    post_us: Mutex<Histogram<u64>>,
    /// `now_ns` when the last response arrived.
    last_response_ns: AtomicU64,
    /// Largest delay of a send behind its slot in the schedule, in µs.
    max_lag_us: AtomicU64,
}

impl Plan {
    fn body(&self, seq: u64, sent_ns: u64) -> String {
        let instance = seq % self.instances;
        format!(
            concat!(
                r#"{{"event":"{event}","instance":"{prefix}{instance}","#,
                r#""data":{{"seq":{seq},"sent_ns":{sent_ns},"#,
                r#""key":{{"remoteJid":"5511900000000@s.whatsapp.net","fromMe":false,"id":"BENCH{seq:016X}"}},"#,
                r#""pushName":"bench","pad":"{pad}"}},"#,
                r#""server_url":"http://127.0.0.1:8080","date_time":"2026-01-01T00:00:00.000Z","#,
                r#""sender":"5511900000000@s.whatsapp.net","apikey":null}}"#
            ),
            event = self.event,
            prefix = self.prefix,
            instance = instance,
            seq = seq,
            sent_ns = sent_ns,
            pad = self.pad,
        )
    }

    fn note_error(&self, err: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(err);
    }
}

/// One keep-alive connection's loop: claim the next slot, wait for its time (fixed rate),
/// POST, count the answer; reconnect after a transport error.
async fn post_webhooks(plan: Arc<Plan>, addr: std::net::SocketAddr) {
    'connection: loop {
        if Instant::now() >= plan.end {
            return;
        }
        let mut sender = match open_http(addr).await {
            Ok(sender) => sender,
            Err(err) => {
                plan.note_error(err);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        loop {
            let seq = plan.next.fetch_add(1, Ordering::Relaxed);
            if let Some(interval) = plan.interval {
                let due = plan.start + interval.mul_f64(seq as f64);
                if due >= plan.end {
                    return;
                }
                tokio::time::sleep_until(due).await;
                let lag = Instant::now().saturating_duration_since(due).as_micros() as u64;
                plan.max_lag_us.fetch_max(lag, Ordering::Relaxed);
            } else if Instant::now() >= plan.end {
                return;
            }
            if sender.ready().await.is_err() {
                plan.note_error("connection closed".to_owned());
                continue 'connection;
            }
            let sent_ns = now_ns();
            let body = plan.body(seq, sent_ns);
            let request = hyper::Request::post(plan.path.as_str())
                .header(hyper::header::HOST, plan.authority.as_str())
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .expect("valid request");
            let response = match sender.send_request(request).await {
                Ok(response) => response,
                Err(err) => {
                    plan.note_error(format!("POST: {err}"));
                    continue 'connection;
                }
            };
            let status = response.status().as_u16();
            let answer = match response.into_body().collect().await {
                Ok(body) => body.to_bytes(),
                Err(err) => {
                    plan.note_error(format!("response body: {err}"));
                    continue 'connection;
                }
            };
            let done = now_ns();
            plan.post_us
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .saturating_record((done - sent_ns) / 1000);
            plan.last_response_ns.fetch_max(done, Ordering::Relaxed);
            if status != 200 {
                *plan
                    .rejected
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(status)
                    .or_default() += 1;
            } else if contains(&answer, b"\"duplicate\":true") {
                plan.duplicates.fetch_add(1, Ordering::Relaxed);
            } else {
                plan.accepted[(seq % plan.instances) as usize].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

type HttpSender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn open_http(addr: std::net::SocketAddr) -> Result<HttpSender, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|err| format!("webhook connect: {err}"))?;
    stream.set_nodelay(true).map_err(|err| err.to_string())?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| format!("webhook handshake: {err}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

async fn fanout(args: FanoutArgs) -> Result<Summary, String> {
    let common = &args.common;
    if args.clients == 0 || args.instances == 0 || args.conns == 0 {
        return Err("--clients, --instances and --conns must be positive".into());
    }
    let target = Target::from_url(&common.url, &common.apikey)?;
    let watch = Watch::new(common.pid)?;
    let rss_before = watch.rss_kib();
    let peak = watch.peak();

    println!(
        "fanout: {} clients over {} namespaces, {} webhooks/s on {} connections for {} s, ~{} B bodies, {}{}",
        args.clients,
        args.instances,
        if args.rate == 0 {
            "max".to_owned()
        } else {
            args.rate.to_string()
        },
        args.conns,
        args.duration,
        args.payload,
        common.url,
        args.webhook_path
    );
    let latency = Arc::new(Shards::new(64));
    let clients = connect_clients(
        common,
        &target,
        args.clients,
        args.instances,
        latency.clone(),
    )
    .await;
    print_connect(&clients, args.clients);
    if clients.connected == 0 {
        return Err(format!("no client connected: {:?}", clients.errors));
    }
    let rss_connected = watch.rss_kib();
    // Let the server finish its per-connection work before CPU is measured.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut plan = Plan {
        next: AtomicU64::new(0),
        start: Instant::now(),
        end: Instant::now(),
        interval: (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / args.rate as f64)),
        instances: args.instances as u64,
        prefix: common.instance_prefix.clone(),
        event: args.event.clone(),
        path: args.webhook_path.clone(),
        authority: target.authority.clone(),
        pad: String::new(),
        accepted: (0..args.instances).map(|_| AtomicU64::new(0)).collect(),
        duplicates: AtomicU64::new(0),
        rejected: Mutex::new(BTreeMap::new()),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        post_us: Mutex::new(report::histogram()),
        last_response_ns: AtomicU64::new(0),
        max_lag_us: AtomicU64::new(0),
    };
    // Sized for a typical seq (6 digits) and sent_ns (11 digits).
    let bare = plan.body(100_000, 10_000_000_000).len();
    plan.pad = "x".repeat(args.payload.saturating_sub(bare));
    let body_bytes = plan.body(100_000, 10_000_000_000).len();

    let cpu_start = watch.cpu();
    let start_ns = now_ns();
    plan.start = Instant::now();
    plan.end = plan.start + Duration::from_secs_f64(args.duration);
    let plan = Arc::new(plan);
    let senders: Vec<_> = (0..args.conns)
        .map(|_| tokio::spawn(post_webhooks(plan.clone(), target.addr)))
        .collect();
    for sender in senders {
        let _ = sender.await;
    }
    let sent_done = Instant::now();

    // Drain: wait until every connected client has every accepted webhook of its namespace.
    let connected: Vec<(usize, &Arc<ClientStat>)> = clients
        .stats
        .iter()
        .flatten()
        .map(|(instance, stat)| (*instance, stat))
        .collect();
    let accepted: Vec<u64> = plan
        .accepted
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .collect();
    let expected: u64 = connected.iter().map(|(i, _)| accepted[*i]).sum();
    let received = || -> u64 {
        connected
            .iter()
            .map(|(_, s)| s.received.load(Ordering::Relaxed))
            .sum()
    };
    let drain_deadline = sent_done + Duration::from_secs_f64(args.drain);
    while received() < expected && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drain = sent_done.elapsed();
    let cpu_end = watch.cpu();
    let rss_after = watch.rss_kib();
    // The sampler may have missed the last growth: the peak is at least the last reading.
    let rss_peak = peak
        .as_ref()
        .map(PeakRss::kib)
        .map(|kib| kib.max(rss_after.unwrap_or(0)));
    drop(peak);

    // Per client: what it should have had against what it got.
    let (mut delivered, mut lost, mut extra, mut duplicates, mut unexpected, mut gone) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut clients_short = 0u64;
    let mut last_ns = start_ns;
    for (instance, stat) in &connected {
        let got = stat.received.load(Ordering::Relaxed);
        let want = accepted[*instance];
        delivered += got;
        lost += want.saturating_sub(got);
        extra += got.saturating_sub(want);
        clients_short += u64::from(got < want);
        duplicates += stat.duplicates.load(Ordering::Relaxed);
        unexpected += stat.unexpected.load(Ordering::Relaxed);
        gone += u64::from(stat.gone.load(Ordering::Relaxed));
        last_ns = last_ns.max(stat.last_ns.load(Ordering::Relaxed));
    }
    let accepted_total: u64 = accepted.iter().sum();
    let attempted = plan.next.load(Ordering::Relaxed).min(
        // Slots claimed past the end were never sent.
        accepted_total
            + plan.duplicates.load(Ordering::Relaxed)
            + plan.errors.load(Ordering::Relaxed)
            + plan.rejected.lock().unwrap().values().sum::<u64>(),
    );
    let send_seconds =
        (plan.last_response_ns.load(Ordering::Relaxed).max(start_ns) - start_ns) as f64 / 1e9;
    let delivery_seconds = (last_ns - start_ns) as f64 / 1e9;
    let per_s = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let latency = latency.merged();
    let post_us = plan.post_us.lock().unwrap().clone();
    let rejected: BTreeMap<String, u64> = plan
        .rejected
        .lock()
        .unwrap()
        .iter()
        .map(|(status, n)| (status.to_string(), *n))
        .collect();
    let mut server = watch.server_json(
        cpu_start,
        cpu_end,
        delivered,
        [rss_before, rss_after, rss_peak],
    );
    server["rss_connected_kib"] = json!(rss_connected);
    let loadgen = Watch::loadgen_json(cpu_start, cpu_end);

    println!(
        "webhooks: {} accepted of {} sent in {:.2} s = {:.0}/s; {} rejected {:?}, {} errors{}, {} answered duplicate; max lag behind schedule {:.1} ms; {} B bodies",
        accepted_total,
        attempted,
        send_seconds,
        per_s(accepted_total, send_seconds),
        rejected.values().sum::<u64>(),
        rejected,
        plan.errors.load(Ordering::Relaxed),
        plan.first_error
            .lock()
            .unwrap()
            .as_ref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        plan.duplicates.load(Ordering::Relaxed),
        plan.max_lag_us.load(Ordering::Relaxed) as f64 / 1000.0,
        body_bytes,
    );
    println!(
        "webhook POST round trip: {}",
        report::percentiles_line(&post_us)
    );
    println!(
        "deliveries: {delivered} of {expected} expected = {:.0}/s over {:.2} s; lost {lost} ({clients_short} clients short) after a {:.2} s drain; {extra} extra, {duplicates} duplicates, {unexpected} unexpected packets, {gone} clients disconnected",
        per_s(delivered, delivery_seconds),
        delivery_seconds,
        drain.as_secs_f64(),
    );
    println!(
        "latency POST sent → event received: {}",
        report::percentiles_line(&latency)
    );
    print_server(&server, "deliveries");
    println!(
        "loadgen: CPU {:.0}% of one core",
        loadgen["cpu_percent"].as_f64().unwrap_or(f64::NAN)
    );

    let healthy = lost == 0 && clients.failed == 0 && accepted_total > 0 && gone == 0;
    Ok(Summary {
        healthy,
        json: json!({
            "mode": "fanout",
            "config": {
                "url": common.url, "webhook_path": args.webhook_path, "clients": args.clients,
                "instances": args.instances, "rate": args.rate, "conns": args.conns,
                "duration_s": args.duration, "payload_bytes": body_bytes, "drain_s": args.drain,
            },
            "clients": connect_summary(&clients, args.clients),
            "connect_ms": report::percentiles_ms(&clients.connect_us),
            "webhooks": {
                "sent": attempted,
                "accepted": accepted_total,
                "accepted_per_s": per_s(accepted_total, send_seconds),
                "rejected": rejected,
                "errors": plan.errors.load(Ordering::Relaxed),
                "duplicate_answers": plan.duplicates.load(Ordering::Relaxed),
                "send_seconds": send_seconds,
                "max_lag_ms": plan.max_lag_us.load(Ordering::Relaxed) as f64 / 1000.0,
            },
            "post_ms": report::percentiles_ms(&post_us),
            "deliveries": {
                "expected": expected,
                "delivered": delivered,
                "per_s": per_s(delivered, delivery_seconds),
                "lost": lost,
                "clients_short": clients_short,
                "extra": extra,
                "duplicates": duplicates,
                "unexpected": unexpected,
                "clients_disconnected": gone,
                "drain_seconds": drain.as_secs_f64(),
            },
            "latency_ms": report::percentiles_ms(&latency),
            "server_stats": server,
            "loadgen": loadgen,
        }),
    })
}

// === idle ===

async fn idle(args: IdleArgs) -> Result<Summary, String> {
    let common = &args.common;
    if args.clients == 0 || args.instances == 0 {
        return Err("--clients and --instances must be positive".into());
    }
    let target = Target::from_url(&common.url, &common.apikey)?;
    let watch = Watch::new(common.pid)?;
    println!(
        "idle: {} connections over {} namespaces to {}",
        args.clients, args.instances, common.url
    );
    let rss_before = watch.rss_kib();
    let peak = watch.peak();
    let cpu_start = watch.cpu();
    let clients = connect_clients(
        common,
        &target,
        args.clients,
        args.instances,
        Arc::new(Shards::new(1)),
    )
    .await;
    print_connect(&clients, args.clients);
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let cpu_end = watch.cpu();
    let rss_after = watch.rss_kib();
    // The sampler may have missed the last growth: the peak is at least the last reading.
    let rss_peak = peak
        .as_ref()
        .map(PeakRss::kib)
        .map(|kib| kib.max(rss_after.unwrap_or(0)));
    drop(peak);
    let gone = clients
        .stats
        .iter()
        .flatten()
        .filter(|(_, s)| s.gone.load(Ordering::Relaxed))
        .count();
    let per_connection = rss_before
        .zip(rss_after)
        .filter(|_| clients.connected > 0)
        .map(|(before, after)| (after as f64 - before as f64) * 1024.0 / clients.connected as f64);
    let mut server = watch.server_json(
        cpu_start,
        cpu_end,
        clients.connected as u64,
        [rss_before, rss_after, rss_peak],
    );
    server["rss_bytes_per_connection"] = json!(per_connection);
    print_server(&server, "connections");
    println!(
        "server RSS per connection: {} bytes; {gone} connections closed during the settle time",
        per_connection.map_or("?".to_owned(), |b| format!("{b:.0}"))
    );
    Ok(Summary {
        healthy: clients.failed == 0 && gone == 0,
        json: json!({
            "mode": "idle",
            "config": {"url": common.url, "clients": args.clients, "instances": args.instances,
                       "settle_s": args.settle},
            "clients": connect_summary(&clients, args.clients),
            "connect_ms": report::percentiles_ms(&clients.connect_us),
            "disconnected": gone,
            "server_stats": server,
            "loadgen": Watch::loadgen_json(cpu_start, cpu_end),
        }),
    })
}

// === emit-rest ===

/// What the fake upstream answers to every request: Evolution's sendText, at once.
const UPSTREAM_ANSWER: &str = r#"{"key":{"remoteJid":"5511900000002@s.whatsapp.net","fromMe":true,"id":"3EB0BENCH"},"status":"PENDING"}"#;

async fn serve_fake_upstream(listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                |request: hyper::Request<hyper::body::Incoming>| async move {
                    // Read the body so keep-alive goes on.
                    let _ = request.into_body().collect().await;
                    Ok::<_, std::convert::Infallible>(
                        hyper::Response::builder()
                            .status(201)
                            .header(hyper::header::CONTENT_TYPE, "application/json")
                            .body(Full::new(Bytes::from_static(UPSTREAM_ANSWER.as_bytes())))
                            .expect("valid response"),
                    )
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn emit_rest(args: EmitRestArgs) -> Result<Summary, String> {
    let common = &args.common;
    if args.clients == 0 || args.instances == 0 {
        return Err("--clients and --instances must be positive".into());
    }
    let target = Target::from_url(&common.url, &common.apikey)?;
    let watch = Watch::new(common.pid)?;
    let listener = tokio::net::TcpListener::bind(args.upstream_listen)
        .await
        .map_err(|err| format!("fake upstream on {}: {err}", args.upstream_listen))?;
    tokio::spawn(serve_fake_upstream(listener));
    println!(
        "emit-rest: {} clients over {} namespaces emit {:?} with ack for {} s; fake upstream on {}",
        args.clients, args.instances, args.event, args.duration, args.upstream_listen
    );
    let text_body = r#"{"number":"5511900000002","text":"bench"}"#;

    // Baseline: the same number of callers POST to the fake upstream directly.
    let direct = Arc::new(Shards::new(16));
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let callers: Vec<_> = (0..args.clients)
        .map(|caller| {
            let direct = direct.clone();
            let path = format!(
                "/message/sendText/{}{}",
                common.instance_prefix,
                caller % args.instances
            );
            let upstream = args.upstream_listen;
            tokio::spawn(async move {
                let Ok(mut sender) = open_http(upstream).await else {
                    return;
                };
                while Instant::now() < deadline {
                    if sender.ready().await.is_err() {
                        return;
                    }
                    let begun = now_ns();
                    let request = hyper::Request::post(path.as_str())
                        .header(hyper::header::HOST, upstream.to_string())
                        .header(hyper::header::CONTENT_TYPE, "application/json")
                        .body(Full::new(Bytes::from_static(text_body.as_bytes())))
                        .expect("valid request");
                    let Ok(response) = sender.send_request(request).await else {
                        return;
                    };
                    let _ = response.into_body().collect().await;
                    direct.record(caller, (now_ns() - begun) / 1000);
                }
            })
        })
        .collect();
    for caller in callers {
        let _ = caller.await;
    }
    let direct = direct.merged();
    println!(
        "direct POST to the fake upstream: {}",
        report::percentiles_line(&direct)
    );

    // Emits: each client emits, waits for its ack, and emits again.
    let mut sockets = Vec::new();
    let mut errors = Vec::new();
    for index in 0..args.clients {
        let ns = namespace(&common.instance_prefix, index % args.instances);
        match sio::connect(&target, &ns).await {
            Ok(ws) => sockets.push((ns, ws)),
            Err(err) => errors.push(err),
        }
    }
    if sockets.is_empty() {
        return Err(format!("no client connected: {errors:?}"));
    }
    let acks = Arc::new(Shards::new(16));
    let statuses = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let rss_before = watch.rss_kib();
    let peak = watch.peak();
    let cpu_start = watch.cpu();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.duration);
    let tasks: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(index, (ns, mut ws))| {
            let acks = acks.clone();
            let statuses = statuses.clone();
            let array = format!(
                "[{},{text_body}]",
                serde_json::to_string(&args.event).unwrap()
            );
            tokio::spawn(async move {
                let mut calls = 0u64;
                let mut id = 0u64;
                while Instant::now() < deadline {
                    id += 1;
                    let begun = now_ns();
                    let packet = sio::event_packet(&ns, Some(id), &array);
                    if ws.send(Message::text(packet)).await.is_err() {
                        break;
                    }
                    let status = tokio::time::timeout(Duration::from_secs(30), async {
                        loop {
                            let text = sio::next_text(&mut ws).await?;
                            match sio::parse(&text) {
                                Packet::Ack {
                                    ack_id: Some(got),
                                    json,
                                    ..
                                } if got == id => {
                                    return Ok(sio::u64_after(json, "\"status\":"));
                                }
                                Packet::Ping => ws
                                    .send(Message::text("3"))
                                    .await
                                    .map_err(|err| err.to_string())?,
                                Packet::Close => return Err("closed".to_owned()),
                                _ => {}
                            }
                        }
                    })
                    .await;
                    let key = match status {
                        Ok(Ok(Some(status))) => status.to_string(),
                        Ok(Ok(None)) => "no status".to_owned(),
                        Ok(Err(err)) => {
                            *statuses.lock().unwrap().entry(err).or_default() += 1;
                            break;
                        }
                        Err(_) => {
                            *statuses
                                .lock()
                                .unwrap()
                                .entry("timeout".into())
                                .or_default() += 1;
                            break;
                        }
                    };
                    acks.record(index, (now_ns() - begun) / 1000);
                    *statuses.lock().unwrap().entry(key).or_default() += 1;
                    calls += 1;
                }
                calls
            })
        })
        .collect();
    let mut calls = 0;
    for task in tasks {
        calls += task.await.unwrap_or(0);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_end = watch.cpu();
    let rss_after = watch.rss_kib();
    // The sampler may have missed the last growth: the peak is at least the last reading.
    let rss_peak = peak
        .as_ref()
        .map(PeakRss::kib)
        .map(|kib| kib.max(rss_after.unwrap_or(0)));
    drop(peak);
    let acks = acks.merged();
    let statuses = statuses.lock().unwrap().clone();
    let failed: u64 = statuses
        .iter()
        .filter(|(status, _)| status.as_str() != "201")
        .map(|(_, n)| n)
        .sum();
    let added = |q: f64| -> Option<f64> {
        (!acks.is_empty() && !direct.is_empty()).then(|| {
            (acks.value_at_quantile(q) as f64 - direct.value_at_quantile(q) as f64) / 1000.0
        })
    };
    let server = watch.server_json(cpu_start, cpu_end, calls, [rss_before, rss_after, rss_peak]);
    println!(
        "emits: {calls} acked in {elapsed:.2} s = {:.0}/s; statuses {statuses:?}; {} clients failed to connect",
        calls as f64 / elapsed,
        errors.len()
    );
    println!("emit → ack: {}", report::percentiles_line(&acks));
    println!(
        "added over a direct call: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms",
        added(0.5).unwrap_or(f64::NAN),
        added(0.9).unwrap_or(f64::NAN),
        added(0.99).unwrap_or(f64::NAN)
    );
    print_server(&server, "calls");
    Ok(Summary {
        healthy: failed == 0 && errors.is_empty() && calls > 0,
        json: json!({
            "mode": "emit-rest",
            "config": {"url": common.url, "clients": args.clients, "instances": args.instances,
                       "duration_s": args.duration, "event": args.event},
            "clients": {"requested": args.clients, "failed": errors.len(), "errors": errors},
            "calls": {"acked": calls, "per_s": calls as f64 / elapsed, "failed": failed,
                      "statuses": statuses},
            "ack_ms": report::percentiles_ms(&acks),
            "direct_ms": report::percentiles_ms(&direct),
            "added_ms": {"p50": added(0.5), "p90": added(0.9), "p99": added(0.99)},
            "server_stats": server,
            "loadgen": Watch::loadgen_json(cpu_start, cpu_end),
        }),
    })
}

// === wait, table ===

async fn wait(args: WaitArgs) -> i32 {
    let target = match Target::from_url(&args.url, "") {
        Ok(target) => target,
        Err(err) => {
            eprintln!("loadgen wait: {err}");
            return 1;
        }
    };
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout);
    loop {
        if TcpStream::connect(target.addr).await.is_ok() {
            return 0;
        }
        if let Some(pid) = args.pid
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            eprintln!(
                "loadgen wait: process {pid} exited before {} answered",
                args.url
            );
            return 1;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "loadgen wait: {} not answering after {} s",
                args.url, args.timeout
            );
            return 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn table(args: TableArgs) -> i32 {
    let text = match std::fs::read_to_string(&args.results) {
        Ok(text) => text,
        Err(err) => {
            eprintln!("loadgen table: {}: {err}", args.results.display());
            return 1;
        }
    };
    let results: Vec<Value> = text
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    print!("{}", report::table(&results));
    0
}
