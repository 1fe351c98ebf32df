//! `loadgen soak`: C clients opted in to recovery over I namespaces, each dropping its
//! connection every few seconds and resuming from its last offset, while webhooks arrive
//! at a fixed rate for D seconds; the server's RSS sampled throughout. Verdict: RSS flat
//! after warm-up, nothing lost by any client, every webhook answered 200.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use evo_bench::report::{self, Shards};
use evo_bench::sio::Target;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::churn::{self, ChurnConfig, ChurnStat, Phase};
use crate::clients::namespace;
use crate::common_args::Common;
use crate::rss_series::{self, Series};
use crate::summary::Summary;
use crate::watch::Watch;
use crate::webhooks::{Plan, post_webhooks, set_bit};

#[derive(Args)]
pub struct SoakArgs {
    #[command(flatten)]
    pub common: Common,
    /// Socket.IO clients (all opted in to recovery), round-robin over the namespaces.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Namespaces (instances).
    #[arg(long, default_value_t = 10)]
    instances: usize,
    /// Webhooks per second (fixed rate).
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Keep-alive HTTP/1.1 connections POSTing webhooks.
    #[arg(long, default_value_t = 4)]
    conns: usize,
    /// Seconds of webhook sending (and churn).
    #[arg(long, default_value_t = 600.0)]
    duration: f64,
    /// Approximate webhook body size in bytes.
    #[arg(long, default_value_t = 512)]
    payload: usize,
    /// Where webhooks are POSTed.
    #[arg(long, default_value = "/_sidecar/webhook")]
    webhook_path: String,
    /// The webhook's `event`.
    #[arg(long, default_value = "messages.upsert")]
    event: String,
    /// Shortest and longest life of a connection before the client drops it, in seconds.
    #[arg(long, default_value_t = 5.0)]
    life_min: f64,
    #[arg(long, default_value_t = 30.0)]
    life_max: f64,
    /// Longest pause before a client reconnects, in seconds (uniform from 0).
    #[arg(long, default_value_t = 1.0)]
    reconnect_pause: f64,
    /// Seconds after the first webhook before RSS must be flat [default: a quarter of
    /// --duration].
    #[arg(long)]
    warmup: Option<f64>,
    /// Seconds between RSS samples [default: --duration / 120, within 1..5].
    #[arg(long)]
    sample_every: Option<f64>,
    /// RSS is flat if the mean of the last 20 % of the samples after warm-up is within this
    /// fraction of the mean of all of them.
    #[arg(long, default_value_t = 0.10)]
    rss_tolerance: f64,
    /// Longest wait, in seconds, after the last webhook for every client to be connected and
    /// complete.
    #[arg(long, default_value_t = 30.0)]
    drain: f64,
    /// Also append the RSS series as `label,t_s,rss_kib,cpu_ms` lines (label: --server).
    #[arg(long)]
    rss_csv: Option<std::path::PathBuf>,
    /// Runs `sh -c <--run>` this many seconds after the first webhook (soak.sh: the Redis
    /// restart), so its time is on the same clock as the RSS series.
    #[arg(long, requires = "run")]
    at: Option<f64>,
    /// The command for `--at`; the load continues while it runs.
    #[arg(long, requires = "at")]
    run: Option<String>,
    /// What `--run` does, for the report and the chart.
    #[arg(long, default_value = "intervention")]
    run_label: String,
    /// Seed of the churn timings.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub async fn soak(args: SoakArgs) -> Result<Summary, String> {
    let common = &args.common;
    if args.clients == 0 || args.instances == 0 || args.conns == 0 || args.rate == 0 {
        return Err("--clients, --instances, --conns and --rate must be positive".into());
    }
    if !(args.life_min > 0.0 && args.life_max > args.life_min) {
        return Err("need 0 < --life-min < --life-max".into());
    }
    let pid = common
        .pid
        .ok_or("soak needs --pid: its verdict is on the server's RSS")?;
    let target = Target::from_url(&common.url, &common.apikey)?;
    let watch = Watch::new(Some(pid))?;
    let warmup = args.warmup.unwrap_or(args.duration / 4.0);
    let period = args
        .sample_every
        .unwrap_or((args.duration / 120.0).clamp(1.0, 5.0));
    println!(
        "soak: {} recovering clients over {} namespaces, each reconnecting every {}-{} s; {} webhooks/s on {} connections for {} s; warm-up {} s, RSS every {} s; {}{}",
        args.clients,
        args.instances,
        args.life_min,
        args.life_max,
        args.rate,
        args.conns,
        args.duration,
        warmup,
        period,
        common.url,
        args.webhook_path
    );
    let rss_before = watch.rss_kib();

    // Clients: every one must have joined before the first webhook, since a first join
    // (offset "") starts from "now" and anything earlier is legitimately not theirs.
    let config = Arc::new(ChurnConfig {
        target: target.clone(),
        apikey: common.apikey.clone(),
        instances: args.instances as u64,
        life_s: (args.life_min, args.life_max),
        reconnect_pause: Duration::from_secs_f64(args.reconnect_pause),
        seed: args.seed,
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Churn);
    let latency = Arc::new(Shards::new(64));
    let first_connects = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    let stats: Vec<(usize, Arc<ChurnStat>)> = (0..args.clients)
        .map(|index| {
            let instance = index % args.instances;
            let stat = Arc::new(ChurnStat::default());
            tokio::spawn(churn::run(
                config.clone(),
                index,
                namespace(&common.instance_prefix, instance),
                stat.clone(),
                latency.clone(),
                first_connects.clone(),
                phase_rx.clone(),
            ));
            (instance, stat)
        })
        .collect();
    let connect_started = Instant::now();
    let joined = || {
        stats
            .iter()
            .filter(|(_, s)| s.joined.load(Ordering::Relaxed))
            .count()
    };
    while joined() < args.clients && connect_started.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    println!(
        "clients: {}/{} joined in {connect_seconds:.2} s",
        joined(),
        args.clients
    );
    if joined() < args.clients {
        let _ = phase_tx.send(Phase::Stop);
        return Err(format!(
            "only {}/{} clients joined within 120 s",
            joined(),
            args.clients
        ));
    }
    let rss_connected = watch.rss_kib();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut plan = Plan {
        next: AtomicU64::new(0),
        start: Instant::now(),
        end: Instant::now(),
        interval: Some(Duration::from_secs_f64(1.0 / args.rate as f64)),
        instances: args.instances as u64,
        prefix: common.instance_prefix.clone(),
        event: args.event.clone(),
        path: args.webhook_path.clone(),
        authority: target.authority.clone(),
        pad: String::new(),
        accepted: (0..args.instances).map(|_| AtomicU64::new(0)).collect(),
        accepted_seqs: Some(Mutex::new(Vec::new())),
        duplicates: AtomicU64::new(0),
        rejected: Mutex::new(BTreeMap::new()),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        post_us: Mutex::new(report::histogram()),
        last_response_ns: AtomicU64::new(0),
        max_lag_us: AtomicU64::new(0),
    };
    let bare = plan.body(100_000, 10_000_000_000).len();
    plan.pad = "x".repeat(args.payload.saturating_sub(bare));

    let cpu_start = watch.cpu();
    plan.start = Instant::now();
    plan.end = plan.start + Duration::from_secs_f64(args.duration);
    let series = Series::start(pid, Duration::from_secs_f64(period), plan.start)?;
    let plan = Arc::new(plan);
    let senders: Vec<_> = (0..args.conns)
        .map(|_| tokio::spawn(post_webhooks(plan.clone(), target.addr)))
        .collect();
    let progress = tokio::spawn(print_progress(stats.clone(), plan.clone()));
    let intervention = args.at.zip(args.run.clone()).map(|(at, command)| {
        tokio::spawn(intervene(plan.start, at, command, args.run_label.clone()))
    });
    for sender in senders {
        let _ = sender.await;
    }
    progress.abort();
    let interventions: Vec<Value> = match intervention {
        Some(task) => vec![task.await.map_err(|err| format!("--run: {err}"))?],
        None => Vec::new(),
    };
    let send_seconds = plan.start.elapsed().as_secs_f64();

    // Drain: churn stops, everyone reconnects (resuming) and catches up.
    let _ = phase_tx.send(Phase::Hold);
    let expected = per_namespace(
        &plan
            .accepted_seqs
            .as_ref()
            .expect("soak records seqs")
            .lock()
            .unwrap(),
        args.instances as u64,
    );
    let drain_started = Instant::now();
    let mut tally = Tally::of(&stats, &expected);
    while (tally.missing > 0 || tally.disconnected > 0)
        && drain_started.elapsed() < Duration::from_secs_f64(args.drain)
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
        tally = Tally::of(&stats, &expected);
    }
    let drain_seconds = drain_started.elapsed().as_secs_f64();
    let cpu_end = watch.cpu();
    let rss_after = watch.rss_kib();
    let _ = phase_tx.send(Phase::Stop);
    let samples = series.stop();
    if let Some(path) = &args.rss_csv {
        append(path, &rss_series::csv_lines(label(common), &samples))?;
    }

    // Verdicts.
    let flat = rss_series::flatness(&samples, warmup, args.duration, args.rss_tolerance);
    let sum = |f: fn(&ChurnStat) -> &AtomicU64| -> u64 {
        stats
            .iter()
            .map(|(_, s)| f(s).load(Ordering::Relaxed))
            .sum()
    };
    let accepted: u64 = plan
        .accepted
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .sum();
    let rejected: BTreeMap<String, u64> = plan
        .rejected
        .lock()
        .unwrap()
        .iter()
        .map(|(status, n)| (status.to_string(), *n))
        .collect();
    let non_200: u64 = rejected.values().sum();
    let errors = plan.errors.load(Ordering::Relaxed);
    let duplicate_answers = plan.duplicates.load(Ordering::Relaxed);
    // Slots claimed past the end were never sent (one per connection at most).
    let sent = plan
        .next
        .load(Ordering::Relaxed)
        .min(accepted + non_200 + errors + duplicate_answers);
    let answered = accepted + non_200 + duplicate_answers;
    let webhooks_ok = answered == sent && non_200 == 0 && errors == 0 && duplicate_answers == 0;
    let no_loss = tally.missing == 0 && tally.disconnected == 0;
    // A restart that failed would make the run say nothing about restarts.
    let interventions_ok = interventions.iter().all(|i| i["status"] == json!(0));
    let pass = flat.flat && no_loss && webhooks_ok && interventions_ok && accepted > 0;

    let latency = latency.merged();
    let post_us = plan.post_us.lock().unwrap().clone();
    let server = watch.server_json(
        cpu_start,
        cpu_end,
        tally.received,
        [rss_before, rss_after, None],
    );
    let connects = sum(|s| &s.connects);
    println!(
        "webhooks: {sent} sent, {answered} answered ({accepted} accepted, {non_200} other statuses {rejected:?}, {duplicate_answers} duplicate), {errors} transport errors{}; max lag behind schedule {:.1} ms; POST {}",
        plan.first_error
            .lock()
            .unwrap()
            .as_ref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        plan.max_lag_us.load(Ordering::Relaxed) as f64 / 1000.0,
        report::percentiles_line(&post_us),
    );
    println!(
        "clients: {connects} connects ({} reconnects), {} connect failures, {} dropped by the server; {} recoveries ({} recovered: false), {} events replayed",
        connects.saturating_sub(args.clients as u64),
        sum(|s| &s.connect_failures),
        sum(|s| &s.dropped_by_server),
        sum(|s| &s.recoveries),
        sum(|s| &s.not_recovered),
        sum(|s| &s.replayed),
    );
    println!(
        "deliveries: {} distinct of {} expected; missing {} ({} clients short), {} not connected at the end, after a {drain_seconds:.2} s drain; {} duplicates on {} clients, {} extra, {} unexpected",
        tally.received,
        tally.expected,
        tally.missing,
        tally.clients_short,
        tally.disconnected,
        sum(|s| &s.duplicates),
        stats
            .iter()
            .filter(|(_, s)| s.duplicates.load(Ordering::Relaxed) > 0)
            .count(),
        tally.extra,
        sum(|s| &s.unexpected),
    );
    println!(
        "latency POST sent → event received (live events; replays left out): {}",
        report::percentiles_line(&latency)
    );
    println!(
        "server RSS after warm-up ({} samples): mean {:.1} MiB, last 20 % {:.1} MiB (×{:.3}), min {:.1}, max {:.1} MiB; CPU {:.0} ms ({:.2} ms per 1,000 deliveries)",
        flat.samples,
        flat.mean_after_warmup_kib / 1024.0,
        flat.mean_last_kib / 1024.0,
        flat.ratio,
        flat.min_kib as f64 / 1024.0,
        flat.max_kib as f64 / 1024.0,
        server["cpu_ms"].as_f64().unwrap_or(f64::NAN),
        server["cpu_ms_per_1k"].as_f64().unwrap_or(f64::NAN),
    );
    println!(
        "verdict: RSS flat {}, 0 lost {}, every webhook answered 200 {}, interventions {} => {}",
        pass_word(flat.flat),
        pass_word(no_loss),
        pass_word(webhooks_ok),
        pass_word(interventions_ok),
        if pass { "PASS" } else { "FAIL" }
    );

    Ok(Summary {
        healthy: pass,
        json: json!({
            "mode": "soak",
            "config": {
                "url": common.url, "webhook_path": args.webhook_path, "clients": args.clients,
                "instances": args.instances, "rate": args.rate, "conns": args.conns,
                "duration_s": args.duration, "payload_bytes": args.payload,
                "life_s": [args.life_min, args.life_max], "reconnect_pause_s": args.reconnect_pause,
                "warmup_s": warmup, "sample_every_s": period, "rss_tolerance": args.rss_tolerance,
                "drain_s": args.drain, "seed": args.seed, "recovering": true,
            },
            "verdict": {
                "pass": pass, "rss_flat": flat.flat, "no_loss": no_loss, "webhooks_answered": webhooks_ok,
                "interventions_ok": interventions_ok,
            },
            "rss": flat.json(),
            "webhooks": {
                "sent": sent, "answered": answered, "accepted": accepted, "rejected": rejected,
                "errors": errors, "duplicate_answers": duplicate_answers,
                "send_seconds": send_seconds,
                "max_lag_ms": plan.max_lag_us.load(Ordering::Relaxed) as f64 / 1000.0,
            },
            "post_ms": report::percentiles_ms(&post_us),
            "clients": {
                "requested": args.clients, "connect_seconds": connect_seconds,
                "connects": connects, "connect_failures": sum(|s| &s.connect_failures),
                "dropped_by_server": sum(|s| &s.dropped_by_server),
                "recoveries": sum(|s| &s.recoveries), "not_recovered": sum(|s| &s.not_recovered),
                "replayed": sum(|s| &s.replayed),
            },
            "deliveries": {
                "expected": tally.expected, "received": tally.received, "lost": tally.missing,
                "clients_short": tally.clients_short, "disconnected_at_end": tally.disconnected,
                "duplicates": sum(|s| &s.duplicates), "extra": tally.extra,
                "unexpected": sum(|s| &s.unexpected), "drain_seconds": drain_seconds,
            },
            "per_client": {
                "missing": tally.per_client.iter().map(|(missing, _)| *missing).collect::<Vec<_>>(),
                "duplicates": stats.iter().map(|(_, s)| s.duplicates.load(Ordering::Relaxed)).collect::<Vec<_>>(),
                "connects": stats.iter().map(|(_, s)| s.connects.load(Ordering::Relaxed)).collect::<Vec<_>>(),
            },
            "interventions": interventions,
            "latency_ms": report::percentiles_ms(&latency),
            "server_stats": merge(server, json!({"rss_connected_kib": rss_connected})),
            "rss_series": samples.iter().map(|s| json!([s.t_s, s.rss_kib, s.cpu_ms])).collect::<Vec<_>>(),
            "loadgen": Watch::loadgen_json(cpu_start, cpu_end),
        }),
    })
}

/// Per namespace, bit k set if webhook `instance + k * instances` was accepted: the same
/// indexing as a client's `seen`, so missing = expected & !seen, word by word.
fn per_namespace(accepted: &[u64], instances: u64) -> Vec<Vec<u64>> {
    let mut out = vec![Vec::new(); instances as usize];
    for (word_index, &word) in accepted.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let seq = word_index as u64 * 64 + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            set_bit(&mut out[(seq % instances) as usize], seq / instances);
        }
    }
    out
}

/// Every client against what its namespace accepted.
struct Tally {
    expected: u64,
    received: u64,
    missing: u64,
    extra: u64,
    clients_short: u64,
    disconnected: u64,
    /// (missing, extra) per client.
    per_client: Vec<(u64, u64)>,
}

impl Tally {
    fn of(stats: &[(usize, Arc<ChurnStat>)], expected: &[Vec<u64>]) -> Self {
        let mut tally = Tally {
            expected: 0,
            received: 0,
            missing: 0,
            extra: 0,
            clients_short: 0,
            disconnected: 0,
            per_client: Vec::with_capacity(stats.len()),
        };
        for (instance, stat) in stats {
            let want = &expected[*instance];
            let seen = stat.seen.lock().unwrap_or_else(|e| e.into_inner());
            let words = want.len().max(seen.len());
            let (mut missing, mut extra) = (0u64, 0u64);
            for i in 0..words {
                let w = want.get(i).copied().unwrap_or(0);
                let s = seen.get(i).copied().unwrap_or(0);
                missing += u64::from((w & !s).count_ones());
                extra += u64::from((s & !w).count_ones());
            }
            tally.expected += want.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
            tally.received += stat.received.load(Ordering::Relaxed);
            tally.missing += missing;
            tally.extra += extra;
            tally.clients_short += u64::from(missing > 0);
            tally.disconnected += u64::from(!stat.connected.load(Ordering::Relaxed));
            tally.per_client.push((missing, extra));
        }
        tally
    }
}

/// Runs `command` at `at` seconds after `start`; `{label, at_s, done_s, status}`.
async fn intervene(start: Instant, at: f64, command: String, label: String) -> Value {
    tokio::time::sleep_until(start + Duration::from_secs_f64(at)).await;
    let at_s = start.elapsed().as_secs_f64();
    println!("  t={at_s:>4.0} s: {label}: sh -c {command:?}");
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(&command)
            .status()
    })
    .await;
    let status = match status {
        Ok(Ok(status)) => json!(status.code()),
        Ok(Err(err)) => json!(err.to_string()),
        Err(err) => json!(err.to_string()),
    };
    let done_s = start.elapsed().as_secs_f64();
    println!("  t={done_s:>4.0} s: {label} done, exit {status}");
    json!({"label": label, "at_s": at_s, "done_s": done_s, "status": status})
}

/// A line every 10 s, so a long soak shows it is alive.
async fn print_progress(stats: Vec<(usize, Arc<ChurnStat>)>, plan: Arc<Plan>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    loop {
        tick.tick().await;
        let connected = stats
            .iter()
            .filter(|(_, s)| s.connected.load(Ordering::Relaxed))
            .count();
        let connects: u64 = stats
            .iter()
            .map(|(_, s)| s.connects.load(Ordering::Relaxed))
            .sum();
        let accepted: u64 = plan
            .accepted
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum();
        println!(
            "  t={:>4.0} s: {accepted} webhooks accepted, {connected}/{} clients connected, {connects} connects so far",
            plan.start.elapsed().as_secs_f64(),
            stats.len()
        );
    }
}

fn label(common: &Common) -> &str {
    if common.server.is_empty() {
        "server"
    } else {
        &common.server
    }
}

fn append(path: &std::path::Path, text: &str) -> Result<(), String> {
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(|err| format!("cannot append to {}: {err}", path.display()))
}

fn merge(mut into: Value, from: Value) -> Value {
    if let (Some(into), Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
    into
}

fn pass_word(ok: bool) -> &'static str {
    if ok { "pass" } else { "FAIL" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has_bit(bits: &[u64], n: u64) -> bool {
        bits.get((n / 64) as usize)
            .is_some_and(|word| word & (1u64 << (n % 64)) != 0)
    }

    #[test]
    fn accepted_seqs_split_by_namespace() {
        let mut accepted = Vec::new();
        for seq in [0, 1, 2, 3, 5, 130] {
            set_bit(&mut accepted, seq);
        }
        let per = per_namespace(&accepted, 2);
        // Namespace 0: seqs 0, 2, 130 → k = 0, 1, 65.
        assert!(has_bit(&per[0], 0) && has_bit(&per[0], 1) && has_bit(&per[0], 65));
        assert!(!has_bit(&per[0], 2));
        // Namespace 1: seqs 1, 3, 5 → k = 0, 1, 2.
        assert!(has_bit(&per[1], 0) && has_bit(&per[1], 1) && has_bit(&per[1], 2));
    }

    #[test]
    fn tally_counts_missing_and_extra() {
        let mut want = Vec::new();
        for k in [0, 1, 2] {
            set_bit(&mut want, k);
        }
        let stat = Arc::new(ChurnStat::default());
        for k in [0, 2, 9] {
            set_bit(&mut stat.seen.lock().unwrap(), k);
        }
        let tally = Tally::of(&[(0, stat)], &[want]);
        assert_eq!((tally.expected, tally.missing, tally.extra), (3, 1, 1));
        assert_eq!(tally.per_client, vec![(1, 1)]);
        assert_eq!((tally.clients_short, tally.disconnected), (1, 1));
    }
}
