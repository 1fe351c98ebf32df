//! Two numbers for the no-loss design: the memory a full retention log costs, and
//! webhook throughput in memory mode next to Redis mode (a local `redis-server` on a free
//! port, started and stopped by this program).
//!
//! Run with: `cargo run --release --example retention_and_throughput`

use std::time::{Duration, Instant};

use evo_realtime::config::Secret;
use evo_realtime::envelope::Envelope;
use evo_realtime::{App, Config};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

fn body(n: u64, pad: usize) -> String {
    serde_json::json!({
        "event": "messages.upsert", "instance": "acme",
        "data": {"key": {"id": format!("3EB0{n:016X}"), "remoteJid": "5511900000002@s.whatsapp.net"}, "pad": "x".repeat(pad)},
        "destination": "https://x", "date_time": "2025-10-21T11:03:11.412Z", "server_url": "https://evo.example.com", "apikey": null
    })
    .to_string()
}

async fn retention(events: u64, pad: usize) {
    let app = App::build(&Config::default()).expect("valid config");
    let before = rss_kib();
    let mut payload_bytes = 0;
    for n in 0..events {
        let envelope = Envelope::from_webhook(body(n, pad).as_bytes()).unwrap();
        payload_bytes += envelope.payload.get().len() as u64;
        app.bus().publish(&envelope, None).await;
    }
    let after = rss_kib();
    println!(
        "retention: {events} events of ~{} B in one namespace: payloads {:.1} MiB, RSS +{:.1} MiB ({:.0} B per event beyond its payload)",
        payload_bytes / events,
        payload_bytes as f64 / 1048576.0,
        (after - before) as f64 / 1024.0,
        ((after - before) * 1024).saturating_sub(payload_bytes) as f64 / events as f64
    );
}

async fn throughput(label: &str, config: Config, seconds: u64, concurrency: usize) {
    let app = App::build(&config).expect("valid config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/_sidecar/webhook", listener.local_addr().unwrap());
    tokio::spawn(app.serve(listener, std::future::pending()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for worker in 0..concurrency as u64 {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut accepted = 0u64;
            let mut n = worker << 40;
            while Instant::now() < deadline {
                n += 1;
                let response = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body(n, 1024))
                    .send()
                    .await
                    .unwrap();
                if response.status() == 200 {
                    accepted += 1;
                }
            }
            accepted
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        accepted += task.await.unwrap();
    }
    println!(
        "throughput ({label}): {:.0} webhooks/s accepted (1 KiB bodies, {concurrency} keep-alive senders, {seconds} s)",
        accepted as f64 / seconds as f64
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    retention(10_000, 1024).await;
    retention(4_000, 16 * 1024).await;

    let mut memory = Config::default();
    memory.webhook.allowed_cidrs = vec!["127.0.0.0/8".into()];
    throughput("memory mode", memory.clone(), 5, 8).await;

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut redis = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut with_redis = memory;
    with_redis.redis.url = Some(Secret::new(format!("redis://127.0.0.1:{port}/")));
    throughput("Redis mode", with_redis, 5, 8).await;
    let _ = redis.kill();
    let _ = redis.wait();
}
