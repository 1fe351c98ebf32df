//! The HTTP edge against anyone who can reach the port (issue 12, rows 6, 9 and 10), each
//! reproduced the way it was found, on the real binary as its own process:
//! - row 6: silent, half-sent, dripping and idle keep-alive connections are closed by the
//!   header timeout; accepted TCP connections are capped per client and in total (and the
//!   total fits the descriptor limit), upgraded ones included;
//! - row 9: Node's own `http` client reads every refusal's status instead of `EPIPE`;
//! - row 10: the proxy refuses `CONNECT` and `OPTIONS *`, sets `X-Forwarded-*` itself for
//!   untrusted peers, and `RUST_LOG=trace` does not log frames.
//!
//! `EDGE_BINARY=/path/to/evo-realtime cargo test --test edge -- --nocapture` runs the same
//! reproductions against another build (how the "before" numbers were taken); each test
//! prints what it measured before asserting.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::sidecar::Launch;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message;

/// `EDGE_BINARY` (or `EVO_REALTIME_BINARY`) runs these tests against another build.
fn binary() -> String {
    std::env::var("EDGE_BINARY").unwrap_or_else(|_| sidecar::binary())
}

/// Starts the binary with `envs`, optionally under `ulimit -n fd_limit` and with stderr
/// kept in a file, and waits until it serves.
async fn start(envs: &[(&str, String)], fd_limit: Option<u32>, stderr: Option<&Path>) -> Sidecar {
    let launch = Launch {
        binary: Some(binary()),
        fd_limit,
        stderr_file: stderr.map(Path::to_path_buf),
        log: Some("warn".into()),
        ..Launch::default()
    };
    Sidecar::launch(envs, launch).await
}

/// A TCP connection to `addr` from the loopback address `from`.
async fn connect_from(from: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// Reads (and discards) until the server closes; the time that took, if within `limit`.
async fn time_to_close(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    closed.ok().map(|()| started.elapsed())
}

/// How many of `streams` the server closes within `within`; the open ones are kept.
async fn closed_count(streams: &mut Vec<TcpStream>, within: Duration) -> usize {
    let results = futures_util::future::join_all(
        streams
            .iter_mut()
            .map(|stream| async move { time_to_close(stream, within).await.is_some() }),
    )
    .await;
    let before = streams.len();
    let mut flags = results.into_iter();
    streams.retain(|_| !flags.next().unwrap());
    before - streams.len()
}

/// A client bound to one loopback address, so it is counted under that address.
fn client_from(from: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(from)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn webhook_from(sidecar: &Sidecar, from: IpAddr) -> (u16, Duration) {
    let started = Instant::now();
    // `Connection: close`: the server ends the connection (and releases its count) as it
    // answers, so a cap test that opens connections right after is not off by one.
    let status = client_from(from)
        .post(sidecar.url("/_sidecar/webhook"))
        .header("content-type", "application/json")
        .header("connection", "close")
        .body(event_body(
            "connection.update",
            "acme",
            started.elapsed().as_nanos() as u64,
        ))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16());
    (status, started.elapsed())
}

async fn metric_from(sidecar: &Sidecar, from: IpAddr, series: &str) -> f64 {
    // Metrics on the public port take the global key (the sidecar's must be `GLOBAL_KEY`).
    let response = client_from(from)
        .get(sidecar.url("/_sidecar/metrics"))
        .bearer_auth(GLOBAL_KEY)
        .send()
        .await
        .unwrap();
    // An empty or refused scrape must not read as "zero".
    assert_eq!(response.status(), 200, "metrics scraped");
    let text = response.text().await.unwrap();
    text.lines()
        .filter(|line| line.starts_with(series))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |sum, value| sum + value)
}

/// An engine.io websocket that has read its open packet.
async fn websocket(
    addr: SocketAddr,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>> {
    let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let open = socket.next().await.unwrap().unwrap();
    assert!(open.to_text().unwrap().starts_with("0{"), "{open:?}");
    socket
}

/// [`websocket`] from the loopback address `from`.
async fn websocket_from(
    from: IpAddr,
    addr: SocketAddr,
) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
    let tcp = connect_from(from, addr).await;
    let (mut socket, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
    let open = socket.next().await.unwrap().unwrap();
    assert!(open.to_text().unwrap().starts_with("0{"), "{open:?}");
    socket
}

// === Row 6: header-read and idle timeouts, connection caps ===

#[tokio::test]
async fn slow_silent_and_idle_connections_are_closed_by_the_header_timeout() {
    let evolution = FakeEvolution::start().await;
    let sidecar = start(
        &[
            ("SIDECAR_UPSTREAM_URL", evolution.url()),
            ("AUTHENTICATION_API_KEY", GLOBAL_KEY.to_owned()),
            ("SIDECAR_HTTP_HEADER_TIMEOUT_SECS", "2".to_owned()),
            ("SIDECAR_PING_INTERVAL_SECS", "1".to_owned()),
        ],
        None,
        None,
    )
    .await;
    let addr = sidecar.addr;
    let patience = Duration::from_secs(10);

    let silent = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        time_to_close(&mut stream, patience).await
    });
    let half_head = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"POST /_sidecar/webhook HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        time_to_close(&mut stream, patience).await
    });
    // One header line every 500 ms: the drip that kept a connection forever.
    let drip = tokio::spawn(async move {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut read, mut write) = stream.into_split();
        let started = Instant::now();
        write
            .write_all(b"GET /_sidecar/healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        let dripping = tokio::spawn(async move {
            for n in 0.. {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if write
                    .write_all(format!("x-drip: {n}\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(patience, async {
            while let Ok(n) = read.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        dripping.abort();
        closed.ok().map(|()| started.elapsed())
    });
    // A kept-alive connection after one good request.
    let idle = tokio::spawn(async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /_sidecar/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&head).contains("\"ok\"") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before answering");
            head.extend_from_slice(&buf[..n]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "positive control: served"
        );
        time_to_close(&mut stream, patience).await
    });
    // Positive control: an upgraded websocket that answers pings outlives the timeout
    // three times over and still joins a namespace.
    let mut socket = websocket(addr).await;
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_secs(6) {
        match tokio::time::timeout(Duration::from_secs(3), socket.next()).await {
            Ok(Some(Ok(frame))) if frame.to_text().unwrap_or("") == "2" => {
                pings += 1;
                socket.send(Message::text("3")).await.unwrap();
            }
            Ok(Some(Ok(_))) => {}
            other => panic!(
                "the websocket ended after {:?}: {other:?}",
                started.elapsed()
            ),
        }
    }
    socket
        .send(Message::text(format!("40{{\"apikey\":\"{GLOBAL_KEY}\"}}")))
        .await
        .unwrap();
    let joined = loop {
        let frame = socket.next().await.unwrap().unwrap();
        let text = frame.to_text().unwrap().to_owned();
        if text != "2" {
            break text;
        }
    };

    let results = [
        ("silent", silent.await.unwrap()),
        ("half-sent head", half_head.await.unwrap()),
        ("header drip", drip.await.unwrap()),
        ("idle keep-alive", idle.await.unwrap()),
    ];
    for (what, closed) in &results {
        eprintln!("row 6: {what}: closed after {closed:?} (timeout 2 s, patience {patience:?})");
    }
    eprintln!(
        "row 6: websocket alive after {:?}, {pings} pings",
        started.elapsed()
    );
    for (what, closed) in results {
        let closed = closed.unwrap_or_else(|| panic!("{what}: still open after {patience:?}"));
        assert!(
            closed >= Duration::from_millis(1500) && closed < Duration::from_secs(5),
            "{what}: closed after {closed:?}, expected the 2 s header timeout"
        );
    }
    assert!(pings >= 3, "engine.io pinged the websocket ({pings})");
    assert!(
        joined.starts_with("40{"),
        "positive control: joined: {joined}"
    );
}

#[tokio::test]
async fn tcp_connections_are_capped_per_client_and_in_total() {
    let evolution = FakeEvolution::start().await;
    let sidecar = start(
        &[
            ("SIDECAR_UPSTREAM_URL", evolution.url()),
            ("SIDECAR_MAX_TCP_CONNECTIONS", "60".to_owned()),
            ("SIDECAR_MAX_TCP_CONNECTIONS_PER_IP", "40".to_owned()),
            ("SIDECAR_HTTP_HEADER_TIMEOUT_SECS", "60".to_owned()),
            // Webhooks come from the other loopback clients too.
            ("SIDECAR_WEBHOOK_ALLOWED_CIDRS", "127.0.0.0/8".to_owned()),
            ("AUTHENTICATION_API_KEY", GLOBAL_KEY.to_owned()),
        ],
        None,
        None,
    )
    .await;
    // Not 127.0.0.1: the start-up probe's connection (closed by the client, but maybe not
    // yet seen closed by the server) must not take one of `a`'s slots.
    let (a, b, c) = (ip("127.0.0.5"), ip("127.0.0.2"), ip("127.0.0.3"));
    let quick = Duration::from_millis(1500);
    let fds_before = sidecar.open_fds();

    let mut from_a = Vec::new();
    for _ in 0..50 {
        from_a.push(connect_from(a, sidecar.addr).await);
    }
    let refused_a = closed_count(&mut from_a, quick).await;
    // `closed_count` waited 1.5 s, so the start-up probe's connection is gone by now: these
    // are the process's descriptors with `a`'s 40 open.
    let fds_a = sidecar.open_fds();
    // Positive control: another client is served while `a` is at its cap.
    let (status_b, took_b) = webhook_from(&sidecar, b).await;
    // That connection is closed as it is answered, but the server can still hold it (and
    // its count) for a moment after the client has the answer: seen in CI under load, when
    // `b` then kept 19. The count is released with the socket, so wait for the descriptor.
    let settle = Instant::now();
    while sidecar.open_fds() > fds_a && settle.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut from_b = Vec::new();
    for _ in 0..30 {
        from_b.push(connect_from(b, sidecar.addr).await);
    }
    let refused_b = closed_count(&mut from_b, quick).await;
    let fds_full = sidecar.open_fds();
    let (status_c, _) = webhook_from(&sidecar, c).await;

    eprintln!(
        "row 6: caps 40/ip, 60 total: a kept {} refused {refused_a}; b kept {} refused \
         {refused_b}; fds {fds_before} -> {fds_full}; webhook from b while a full: \
         {status_b} in {took_b:?}; from c while all full: {status_c}",
        from_a.len(),
        from_b.len()
    );
    assert_eq!((from_a.len(), refused_a), (40, 10), "per-client cap");
    assert_eq!(status_b, 200, "positive control: another client is served");
    assert_eq!((from_b.len(), refused_b), (20, 10), "total cap");
    assert!(
        fds_full <= fds_before + 60 + 10,
        "descriptors grew {fds_before} -> {fds_full}"
    );
    assert_eq!(
        status_c, 0,
        "at the total cap a new connection is closed unserved"
    );

    // Closing releases the counts: `a` is served again.
    drop(from_a);
    drop(from_b);
    eventually("closed connections are released", || async {
        webhook_from(&sidecar, a).await.0 == 200
    })
    .await;
    let refused = metric_from(&sidecar, a, "evo_tcp_connections_refused_total").await;
    assert!(refused >= 21.0, "refusals are counted: {refused}");
}

#[tokio::test]
async fn three_thousand_idle_connections_meet_the_default_per_client_cap() {
    let evolution = FakeEvolution::start().await;
    let sidecar = start(&[("SIDECAR_UPSTREAM_URL", evolution.url())], None, None).await;
    let (fds_before, rss_before) = (sidecar.open_fds(), sidecar.rss_kib());
    let mut held = Vec::new();
    for _ in 0..3000 {
        held.push(connect_from(ip("127.0.0.2"), sidecar.addr).await);
    }
    let refused = closed_count(&mut held, Duration::from_millis(1500)).await;
    let (fds, rss) = (sidecar.open_fds(), sidecar.rss_kib());
    // Positive control: the flood costs another client nothing.
    let (status, took) = webhook_from(&sidecar, ip("127.0.0.1")).await;
    eprintln!(
        "row 6: 3000 idle from one client, defaults: kept {}, refused {refused}; fds \
         {fds_before} -> {fds}; RSS {rss_before} -> {rss} KiB; webhook {status} in {took:?}",
        held.len()
    );
    assert_eq!(held.len(), 256, "the default per-client cap");
    assert!(
        fds <= fds_before + 256 + 10,
        "descriptors {fds_before} -> {fds}"
    );
    assert!(
        rss < rss_before + 16 * 1024,
        "RSS {rss_before} -> {rss} KiB"
    );
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(1), "webhook took {took:?}");
}

#[tokio::test]
async fn an_upgraded_websocket_stays_counted_until_it_closes() {
    let sidecar = start(
        &[("SIDECAR_MAX_TCP_CONNECTIONS_PER_IP", "3".to_owned())],
        None,
        None,
    )
    .await;
    // From an address of their own: the start-up probe's kept-alive connection (from
    // 127.0.0.1, in the shared client's pool) must not take one of the three slots.
    let client = ip("127.0.0.4");
    let mut sockets = Vec::new();
    for _ in 0..3 {
        sockets.push(websocket_from(client, sidecar.addr).await);
    }
    let mut fourth = vec![connect_from(client, sidecar.addr).await];
    let refused = closed_count(&mut fourth, Duration::from_millis(1500)).await;
    assert_eq!(
        refused, 1,
        "three upgraded websockets hold the per-client cap"
    );

    let mut closing = sockets.pop().unwrap();
    closing.close(None).await.unwrap();
    while closing.next().await.is_some() {}
    eventually("a closed websocket releases its count", || async {
        let mut probe = vec![connect_from(client, sidecar.addr).await];
        closed_count(&mut probe, Duration::from_millis(300)).await == 0
    })
    .await;
}

#[tokio::test]
async fn under_a_low_descriptor_limit_the_caps_come_before_emfile() {
    let evolution = FakeEvolution::start().await;
    let sidecar = start(
        &[
            ("SIDECAR_UPSTREAM_URL", evolution.url()),
            ("SIDECAR_MAX_TCP_CONNECTIONS_PER_IP", "100".to_owned()),
            ("SIDECAR_HTTP_HEADER_TIMEOUT_SECS", "60".to_owned()),
            ("AUTHENTICATION_API_KEY", GLOBAL_KEY.to_owned()),
        ],
        Some(512),
        None,
    )
    .await;
    let quick = Duration::from_millis(1500);
    // One client floods with 600 idle connections, as in the finding.
    let flooder = ip("127.0.0.2");
    let mut held = Vec::new();
    for _ in 0..600 {
        held.push(connect_from(flooder, sidecar.addr).await);
    }
    let refused_one = closed_count(&mut held, quick).await;
    let (status_one, took_one) = webhook_from(&sidecar, ip("127.0.0.1")).await;
    // Then many clients: the total cap, fitted to the descriptor limit, holds.
    for n in 3..10 {
        for _ in 0..100 {
            held.push(connect_from(ip(&format!("127.0.0.{n}")), sidecar.addr).await);
        }
    }
    let refused_many = closed_count(&mut held, quick).await;
    let fds = sidecar.open_fds();
    let held_many = held.len();
    drop(held);
    eventually("the webhook is served once the flood ends", || async {
        webhook_from(&sidecar, ip("127.0.0.1")).await.0 == 200
    })
    .await;
    let accept_errors = metric_from(&sidecar, ip("127.0.0.1"), "evo_accept_errors_total").await;
    eprintln!(
        "row 6: ulimit -n 512: one client 600 idle: refused {refused_one}, webhook \
         {status_one} in {took_one:?}; then 9 clients: held {}, refused {refused_many}, \
         sidecar fds {fds}, accept errors {accept_errors}",
        held_many
    );
    assert_eq!(refused_one, 500, "one client holds its cap of 100");
    assert_eq!(status_one, 200, "positive control: a webhook is served");
    assert!(
        took_one < Duration::from_secs(1),
        "webhook took {took_one:?}"
    );
    let fitted = (512 - 64) / 2;
    assert!(
        held_many <= fitted && held_many >= fitted - 5,
        "the total cap is fitted to the descriptor limit: {held_many} held"
    );
    assert!(fds < 400, "sidecar descriptors {fds}");
    assert_eq!(accept_errors, 0.0, "no EMFILE: the cap came first");
}

// === Row 9: refused webhooks are read by Node's http client ===

/// Runs `tests/js/webhook_refusal.js`: what each of `attempts` POSTs saw.
async fn node_posts(url: &str, bytes: usize, attempts: usize, content_type: &str) -> Vec<String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js/webhook_refusal.js");
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new("node")
            .arg(script)
            .arg(url)
            .arg(bytes.to_string())
            .arg(attempts.to_string())
            .arg(content_type)
            .output(),
    )
    .await
    .expect("node finished")
    .expect("node is installed");
    assert!(output.status.success(), "{output:?}");
    let seen: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    seen.iter()
        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
        .collect()
}

#[tokio::test]
async fn node_reads_the_status_of_every_refused_webhook() {
    const MIB: usize = 1024 * 1024;
    let sidecar = start(
        &[
            ("SIDECAR_WEBHOOK_PATH_TOKEN", "t0ken".to_owned()),
            ("SIDECAR_MAX_BODY_BYTES", (4 * MIB).to_string()),
        ],
        None,
        None,
    )
    .await;
    let no_credentials = start(
        &[("SIDECAR_WEBHOOK_ALLOWED_CIDRS", "10.0.0.0/8".to_owned())],
        None,
        None,
    )
    .await;
    let json = "application/json";
    let cases = [
        ("413", sidecar.url("/_sidecar/webhook/t0ken"), 6 * MIB, json),
        (
            "401",
            sidecar.url("/_sidecar/webhook"),
            4 * MIB - 1000,
            json,
        ),
        (
            "415",
            sidecar.url("/_sidecar/webhook/t0ken"),
            4 * MIB - 1000,
            "text/plain",
        ),
        (
            "404",
            sidecar.url("/_sidecar/webhook/a/b/c"),
            4 * MIB - 1000,
            json,
        ),
        (
            "403",
            no_credentials.url("/_sidecar/webhook"),
            4 * MIB - 1000,
            json,
        ),
        // Positive control: a body just under the limit is accepted.
        (
            "200",
            sidecar.url("/_sidecar/webhook/t0ken"),
            4 * MIB - 1000,
            json,
        ),
    ];
    let mut failures = Vec::new();
    for (expected, url, bytes, content_type) in cases {
        let started = Instant::now();
        let seen = node_posts(&url, bytes, 12, content_type).await;
        let took = started.elapsed();
        let read = seen.iter().filter(|s| *s == expected).count();
        eprintln!("row 9: {expected}: {read} of 12 read the status in {took:?}: {seen:?}");
        if read != 12 {
            failures.push(format!("{expected}: {seen:?}"));
        }
        assert!(took < Duration::from_secs(30), "{expected}: took {took:?}");
    }
    assert!(
        failures.is_empty(),
        "not every attempt read its status: {failures:?}"
    );
}

// === Row 10: the proxy's methods and forwarding headers, and trace logs ===

/// Sends one raw request head and returns the status line.
async fn raw_status(addr: SocketAddr, head: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.windows(2).any(|w| w == b"\r\n") {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&answer);
    text.lines().next().unwrap_or("").to_owned()
}

#[tokio::test]
async fn the_proxy_refuses_connect_and_options_star() {
    let evolution = FakeEvolution::start().await;
    let app = start(&[("SIDECAR_UPSTREAM_URL", evolution.url())], None, None).await;
    let connect = raw_status(
        app.addr,
        &format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", evolution.addr),
    )
    .await;
    let options = raw_status(app.addr, "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n").await;
    // Positive control: an ordinary OPTIONS and GET are proxied.
    let preflight = raw_status(
        app.addr,
        "OPTIONS /chat/findChats/acme HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    let get = http()
        .get(app.url("/chat/findChats/acme"))
        .send()
        .await
        .unwrap()
        .status();
    let methods: Vec<String> = evolution
        .requests()
        .iter()
        .map(|r| r.method.clone())
        .collect();
    eprintln!("row 10: CONNECT -> {connect}; OPTIONS * -> {options}; upstream saw {methods:?}");
    assert!(connect.starts_with("HTTP/1.1 405"), "{connect}");
    assert!(options.starts_with("HTTP/1.1 405"), "{options}");
    assert!(preflight.starts_with("HTTP/1.1 200"), "{preflight}");
    assert_eq!(get, 200);
    assert_eq!(
        methods,
        ["OPTIONS", "GET"],
        "only the ordinary requests reached Evolution"
    );
}

#[tokio::test]
async fn forwarded_host_and_proto_are_believed_only_from_trusted_proxies() {
    let evolution = FakeEvolution::start().await;
    let untrusted = start(&[("SIDECAR_UPSTREAM_URL", evolution.url())], None, None).await;
    let trusted = start(
        &[
            ("SIDECAR_UPSTREAM_URL", evolution.url()),
            ("SIDECAR_TRUSTED_PROXIES", "127.0.0.1".to_owned()),
        ],
        None,
        None,
    )
    .await;
    for app in [&untrusted, &trusted] {
        let response = http()
            .get(app.url("/chat/findChats/acme"))
            .header("x-forwarded-host", "evil.example")
            .header("x-forwarded-proto", "https")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let requests = evolution.requests();
    let seen: Vec<(Option<&str>, Option<&str>)> = requests
        .iter()
        .map(|r| (r.header("x-forwarded-host"), r.header("x-forwarded-proto")))
        .collect();
    eprintln!("row 10: upstream saw (host, proto): {seen:?}");
    let own_host = untrusted.addr.to_string();
    assert_eq!(
        seen[0],
        (Some(own_host.as_str()), Some("http")),
        "untrusted: overwritten"
    );
    assert_eq!(
        seen[1],
        (Some("evil.example"), Some("https")),
        "trusted: kept"
    );
}

/// Connects to `/` with `key` in the CONNECT packet and returns the server's answer.
async fn connect_with_key(addr: SocketAddr, key: &str) -> String {
    let mut socket = websocket(addr).await;
    socket
        .send(Message::text(
            json!({"apikey": key}).to_string().replace('{', "40{"),
        ))
        .await
        .unwrap();
    loop {
        let frame = tokio::time::timeout(PATIENCE, socket.next())
            .await
            .expect("an answer to CONNECT")
            .unwrap()
            .unwrap();
        let text = frame.to_text().unwrap().to_owned();
        if text != "2" {
            return text;
        }
        socket.send(Message::text("3")).await.unwrap();
    }
}

#[tokio::test]
async fn trace_logging_does_not_log_frames_unless_asked_by_name() {
    let key = "edge-trace-key-5b1f0c";
    let dir = tempfile::tempdir().unwrap();
    let mut logs = Vec::new();
    for (name, filter) in [
        ("trace", "trace".to_owned()),
        // Positive control: naming the crates turns their frame logs on, so the check
        // below can see a key if one is logged.
        (
            "named",
            "trace,engineioxide=trace,socketioxide=trace,tungstenite=trace".to_owned(),
        ),
    ] {
        let path = dir.path().join(format!("{name}.log"));
        let evolution = FakeEvolution::start().await;
        // `envs` come after start's own RUST_LOG=warn, so this filter wins.
        let mut sidecar = start(
            &[
                ("SIDECAR_UPSTREAM_URL", evolution.url()),
                ("AUTHENTICATION_API_KEY", key.to_owned()),
                ("RUST_LOG", filter),
            ],
            None,
            Some(&path),
        )
        .await;
        let answer = connect_with_key(sidecar.addr, key).await;
        assert!(
            answer.starts_with("40{"),
            "positive control: the key joined: {answer}"
        );
        let _ = sidecar.child.kill().await;
        let text = std::fs::read_to_string(&path).unwrap();
        logs.push((name, text.len(), text.contains(key)));
    }
    eprintln!("row 10: (filter, log bytes, key logged): {logs:?}");
    assert!(!logs[0].2, "RUST_LOG=trace logged the key");
    assert!(
        logs[1].2,
        "positive control: named frame loggers show the key"
    );
}
