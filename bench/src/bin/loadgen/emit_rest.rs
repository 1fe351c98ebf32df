//! `loadgen emit-rest`: clients emit an event with an ack, which the server forwards to the
//! fake upstream this process serves; calls/s, emit → ack latency, and what the server adds
//! over calling that upstream directly (the baseline, measured first).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use evo_bench::now_ns;
use evo_bench::procfs::PeakRss;
use evo_bench::report::{self, Shards};
use evo_bench::sio::{self, Packet, Target};
use futures_util::SinkExt;
use http_body_util::{BodyExt, Full};
use serde_json::json;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::clients::namespace;
use crate::common_args::Common;
use crate::fake_upstream::serve_fake_upstream;
use crate::http::open_http;
use crate::summary::Summary;
use crate::watch::{Watch, print_server};

#[derive(Args)]
pub struct EmitRestArgs {
    #[command(flatten)]
    pub common: Common,
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

pub async fn emit_rest(args: EmitRestArgs) -> Result<Summary, String> {
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
