//! `loadgen fanout`: C clients over I namespaces, webhooks POSTed on K keep-alive connections
//! at a fixed rate or as fast as they go, for D seconds, then a drain wait. Reports webhooks
//! accepted/s, deliveries/s, lost deliveries, end-to-end latency (POST sent → event
//! received), and the server's CPU and memory. `--recovering`: clients opt in to recovery,
//! which evo-realtime serves from a task per socket (each event encoded per socket, with its
//! offset) instead of one room broadcast.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use evo_bench::now_ns;
use evo_bench::procfs::PeakRss;
use evo_bench::report::{self, Shards};
use serde_json::json;
use tokio::time::Instant;

use crate::amqp::publish_amqp;
use crate::clients::{ClientStat, connect_clients, connect_summary, print_connect};
use crate::common_args::Common;
use crate::summary::Summary;
use crate::watch::{Watch, print_server};
use crate::webhooks::{Plan, post_webhooks};

#[derive(Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
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
    /// Clients opt in to recovery: `auth: {"apikey", "offset": ""}` at CONNECT; every event
    /// must then carry a trailing offset.
    #[arg(long)]
    recovering: bool,
    /// Publish to RabbitMQ (`amqp://...`) as Evolution does instead of POSTing webhooks: the
    /// server must consume the exchange (evo-realtime: `SIDECAR_AMQP_URL`). `--conns`
    /// connections, each waiting for the broker's confirm of every message.
    #[arg(long)]
    amqp_url: Option<String>,
    /// The topic exchange to publish to (routing key = `--event`).
    #[arg(long, default_value = "evolution_exchange")]
    amqp_exchange: String,
}

pub async fn fanout(args: FanoutArgs) -> Result<Summary, String> {
    let common = &args.common;
    if args.clients == 0 || args.instances == 0 || args.conns == 0 {
        return Err("--clients, --instances and --conns must be positive".into());
    }
    let target = common.target()?;
    let watch = Watch::new(common.pid)?;
    let rss_before = watch.rss_kib();
    let peak = watch.peak();

    let ingest = match &args.amqp_url {
        Some(_) => format!(" (via RabbitMQ exchange {})", args.amqp_exchange),
        None => args.webhook_path.clone(),
    };
    println!(
        "fanout: {} {}clients over {} namespaces, {} webhooks/s on {} connections for {} s, ~{} B bodies, {}{}",
        args.clients,
        if args.recovering { "recovering " } else { "" },
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
        ingest
    );
    let latency = Arc::new(Shards::new(64));
    let clients = connect_clients(
        common,
        &target,
        args.clients,
        args.instances,
        args.recovering,
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
        accepted_seqs: None,
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
        .map(|_| match &args.amqp_url {
            Some(url) => tokio::spawn(publish_amqp(
                plan.clone(),
                url.clone(),
                args.amqp_exchange.clone(),
            )),
            None => tokio::spawn(post_webhooks(plan.clone(), target.addr)),
        })
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
                "recovering": args.recovering,
                "ingest": if args.amqp_url.is_some() { "amqp" } else { "webhook" },
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
