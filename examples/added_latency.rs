//! The latency the sidecar adds to a REST call: reverse proxy and emit→REST, against a
//! fake upstream that answers at once, compared with calling that upstream directly.
//!
//! Run with: `npm ci --prefix tests/js && cargo run --release --example added_latency [calls]`

use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use evo_realtime::config::Secret;
use evo_realtime::{App, Config};

const KEY: &str = "bench-global-key";

#[tokio::main]
async fn main() {
    let calls: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);

    // A fake Evolution that answers like sendText, immediately.
    let upstream = Router::new()
        .route(
            "/message/sendText/{instance}",
            post(|| async {
                (
                    http::StatusCode::CREATED,
                    axum::Json(serde_json::json!({"key": {"id": "3EB0"}, "status": "PENDING"})),
                )
            }),
        )
        .route("/", get(|| async { "ok" }));
    let upstream_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream_listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(upstream_listener, upstream).await });

    let mut config = Config::default();
    config.upstream.url = format!("http://{upstream_addr}");
    config.auth.api_key = Some(Secret::new(KEY));
    let app = App::build(&config).expect("valid config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sidecar_addr = listener.local_addr().unwrap();
    tokio::spawn(app.serve(listener, std::future::pending()));
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The proxy, from a Rust client: direct and proxied calls alternate.
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let call = |base: String| {
        let client = client.clone();
        async move {
            let started = std::time::Instant::now();
            let response = client
                .post(format!("{base}/message/sendText/bench"))
                .header("apikey", KEY)
                .header("content-type", "application/json")
                .body(r#"{"number":"5511900000002","text":"latency probe"}"#)
                .send()
                .await
                .unwrap();
            response.bytes().await.unwrap();
            started.elapsed().as_secs_f64() * 1000.0
        }
    };
    let (direct_url, proxied_url) = (
        format!("http://{upstream_addr}"),
        format!("http://{sidecar_addr}"),
    );
    let (mut direct, mut proxied) = (Vec::new(), Vec::new());
    for round in 0..calls + 300 {
        let d = call(direct_url.clone()).await;
        let p = call(proxied_url.clone()).await;
        if round >= 300 {
            direct.push(d);
            proxied.push(p);
        }
    }
    let (direct, proxied) = (percentiles(direct), percentiles(proxied));
    println!("{calls} sequential calls each, loopback, fake upstream answering at once");
    println!("{:<30}{:>12}{:>12}", "", "median ms", "p99 ms");
    println!(
        "{:<30}{:>12.3}{:>12.3}",
        "REST direct (Rust client)", direct.0, direct.1
    );
    println!(
        "{:<30}{:>12.3}{:>12.3}",
        "REST via proxy (Rust client)", proxied.0, proxied.1
    );
    println!(
        "{:<30}{:>12.3}{:>12.3}",
        "added by the proxy",
        proxied.0 - direct.0,
        proxied.1 - direct.1
    );

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/added_latency.js");
    let output = tokio::process::Command::new("node")
        .arg(script)
        .arg(format!("http://{sidecar_addr}"))
        .arg(format!("http://{upstream_addr}"))
        .arg(KEY)
        .arg(calls.to_string())
        .output()
        .await
        .expect("node runs");
    if !output.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        std::process::exit(1);
    }
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    let ms = |kind: &str, stat: &str| report[kind][stat].as_f64().unwrap_or(f64::NAN);
    println!(
        "{:<30}{:>12.3}{:>12.3}",
        "REST direct (Node http)",
        ms("direct", "median_ms"),
        ms("direct", "p99_ms")
    );
    println!(
        "{:<30}{:>12.3}{:>12.3}",
        "emit→REST ack (socket.io-client)",
        ms("emitted", "median_ms"),
        ms("emitted", "p99_ms")
    );
    println!(
        "{:<30}{:>12.3}{:>12.3}",
        "emit→REST minus direct",
        ms("emitted", "median_ms") - ms("direct", "median_ms"),
        ms("emitted", "p99_ms") - ms("direct", "p99_ms")
    );
}

/// Median and p99 of samples in ms.
fn percentiles(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((q * samples.len() as f64) as usize).min(samples.len() - 1)];
    (at(0.5), at(0.99))
}
