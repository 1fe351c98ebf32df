//! `loadgen idle`: C idle connections held for a settle time; the server's RSS per connection
//! and connect-time percentiles.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Args;
use evo_bench::procfs::PeakRss;
use evo_bench::report::{self, Shards};
use serde_json::json;

use crate::clients::{connect_clients, connect_summary, print_connect};
use crate::common_args::Common;
use crate::polling::connect_polling_clients;
use crate::summary::Summary;
use crate::watch::{Watch, print_server};

#[derive(Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Namespaces (instances).
    #[arg(long, default_value_t = 10)]
    instances: usize,
    /// Seconds to wait after the last connect before RSS is read.
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
    /// `websocket`, or `polling`: each client an Engine.IO long-polling session with one
    /// request always waiting (the floor serves websockets only).
    #[arg(long, default_value = "websocket", value_parser = ["websocket", "polling"])]
    transport: String,
    /// Seconds to keep the connections open after the measurement, announced by a line
    /// `holding connections` (for a profiler to take its snapshot; bench/heaptrack.sh).
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
}

pub async fn idle(args: IdleArgs) -> Result<Summary, String> {
    let common = &args.common;
    if args.clients == 0 || args.instances == 0 {
        return Err("--clients and --instances must be positive".into());
    }
    let target = common.target()?;
    let watch = Watch::new(common.pid)?;
    println!(
        "idle: {} {} connections over {} namespaces to {}",
        args.clients, args.transport, args.instances, common.url
    );
    let rss_before = watch.rss_kib();
    let peak = watch.peak();
    let cpu_start = watch.cpu();
    let clients = if args.transport == "polling" {
        connect_polling_clients(common, &target, args.clients, args.instances).await
    } else {
        connect_clients(
            common,
            &target,
            args.clients,
            args.instances,
            false,
            Arc::new(Shards::new(1)),
        )
        .await
    };
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
    if args.hold > 0.0 {
        println!("holding connections for {} s", args.hold);
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    }
    Ok(Summary {
        healthy: clients.failed == 0 && gone == 0,
        json: json!({
            "mode": "idle",
            "config": {"url": common.url, "clients": args.clients, "instances": args.instances,
                       "settle_s": args.settle, "transport": args.transport,
                       "source_addrs": common.source_addrs},
            "clients": connect_summary(&clients, args.clients),
            "connect_ms": report::percentiles_ms(&clients.connect_us),
            "disconnected": gone,
            "server_stats": server,
            "loadgen": Watch::loadgen_json(cpu_start, cpu_end),
        }),
    })
}
