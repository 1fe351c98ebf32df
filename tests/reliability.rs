//! Faults that must lose no event and stall no namespace: a client that never reads, a
//! publish that fails. Each test measures (time, delivery counts) and has a positive
//! control, so it cannot pass because nothing happened.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// Packets queued per socket in the stall test.
const BUFFER: usize = 64;

/// The `q`-quantile of `samples` (sorted in place).
fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[index]
}

/// Finding 2 of issue 15: a recovering client's delivery task sent the state on join while
/// holding the namespace gate, waiting up to 10 s for room in a full socket queue, and
/// every webhook of the namespace (and its 200) waited with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovering_client_that_never_reads_stalls_no_webhook() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    config.hub.socket_buffer = BUFFER;
    let app = Arc::new(spawn_app(config).await);
    for event in ["connection.update", "qrcode.updated"] {
        let (status, _) = post_webhook(&app.webhook_url(), event_body(event, "acme", 0)).await;
        assert_eq!(status, 200, "the instance has state to send on join");
    }

    // Clients that read: one on rooms, one recovering.
    let mut js = JsDriver::start().await;
    let opts = json!({"transports": ["websocket"], "auth": {"apikey": GLOBAL_KEY}});
    js.open_quiet("rooms", &app.url("/acme"), opts.clone())
        .await;
    js.open_counting("log", &app.url("/acme"), opts.clone())
        .await;
    for id in ["rooms", "log"] {
        assert_eq!(js.wait_connected(id).await["type"], "connect");
    }

    // The client that never reads: a polling session that never polls, so whatever is
    // queued for it stays. Its queue is filled through another namespace of the same
    // session until exactly the CONNECT answer and one state event still fit.
    let stuck = PollingSession::open(&app).await;
    stuck
        .send(&format!("40/flood,{}", json!({"apikey": GLOBAL_KEY})))
        .await;
    eventually("the stuck client joined /flood", async || {
        app.hub.socket_count() == 3
    })
    .await;
    for n in 1..=(BUFFER as u64 - 3) {
        let (status, _) = post_webhook(&app.webhook_url(), event_body("call", "flood", n)).await;
        assert_eq!(status, 200);
    }

    // Now it joins /acme as a recovering snapshot client: the second state event finds
    // its queue full.
    let auth = json!({"apikey": GLOBAL_KEY, "offset": "", "snapshot": true});
    stuck.send(&format!("40/acme,{auth}")).await;
    eventually("the stuck client joined /acme", async || {
        app.hub.socket_count() == 4
    })
    .await;

    // 1,000 webhooks to its namespace from 16 senders, each timed.
    let total = 1000u64;
    let senders = 16;
    let mut tasks = Vec::new();
    for sender in 0..senders {
        let url = app.webhook_url();
        tasks.push(tokio::spawn(async move {
            let mut took = Vec::new();
            for n in (1..=total).filter(|n| n % senders == sender) {
                let started = Instant::now();
                let (status, _) = post_webhook(&url, event_body("call", "acme", n)).await;
                assert_eq!(status, 200);
                took.push(started.elapsed());
            }
            took
        }));
    }
    let mut took = Vec::new();
    for task in tasks {
        took.extend(task.await.unwrap());
    }
    assert_eq!(took.len() as u64, total);
    let p50 = quantile(&mut took, 0.5);
    let p99 = quantile(&mut took, 0.99);
    let max = *took.last().unwrap();
    println!("stuck recovering client: {total} webhooks, p50 {p50:?}, p99 {p99:?}, max {max:?}");
    // The failure this catches holds each webhook up to 10 s (the send timeout); a loaded
    // 2-core machine alone reached a p99 of 60 ms, so the bound sits well between the two.
    assert!(
        p99 < Duration::from_millis(500),
        "a client that never reads held the namespace: p99 {p99:?}, max {max:?}"
    );

    // Every other client got every event (from 16 senders, so not in order).
    for id in ["rooms", "log"] {
        let summary = eventually_value(
            &format!("{id} gets all {total} events"),
            Duration::from_secs(30),
            async || {
                let summary = js.summary(id).await;
                if summary["unique"] == total {
                    Ok(summary)
                } else {
                    Err(summary)
                }
            },
        )
        .await;
        assert_eq!(summary["count"], total, "{id}: {summary}");
    }
    js.shutdown().await;
}

/// Finding 6 of issue 15: evicting past the total bound scanned every namespace per
/// evicted entry (one 10 MB webhook among 40,000 namespaces took 90.9 s to answer), and
/// each namespace's last `connection.update` was kept outside the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_webhook_among_40000_namespaces_is_answered_within_a_second() {
    let evolution = FakeEvolution::start().await;
    let bound = 20 * 1024 * 1024;
    let mut config = test_config(&evolution.url());
    config.replay.max_bytes = bound;
    config.replay.max_total_bytes = bound;
    let app = evo_realtime::App::build(&config).unwrap();
    let (bus, replay) = (app.bus().clone(), app.replay().clone());
    let namespaces = 40_000u64;
    let started = Instant::now();
    for i in 0..namespaces {
        let body = json!({"event": "connection.update", "instance": format!("i{i}"),
                          "data": {"state": "open", "pad": "x".repeat(512)}});
        let envelope =
            evo_realtime::envelope::Envelope::from_webhook(body.to_string().as_bytes()).unwrap();
        bus.publish(&envelope, None).await;
    }
    println!(
        "{namespaces} namespaces with state in {:?}: {} logs, {} bytes retained",
        started.elapsed(),
        replay.log_count(),
        replay.total_bytes()
    );
    assert_eq!(replay.log_count() as u64, namespaces);
    assert!(
        replay.total_bytes() <= bound,
        "state counts towards the bound"
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(app.serve(listener, std::future::pending()));
    let url = format!("http://{addr}/_sidecar/webhook");
    // Positive control: a small webhook, answered as usual.
    let (status, _) = post_webhook(&url, event_body("call", "small", 1)).await;
    assert_eq!(status, 200);

    let large = json!({"event": "messages.upsert", "instance": "large",
                       "data": {"pad": "x".repeat(10 * 1024 * 1024)}})
    .to_string();
    let before = replay.total_bytes();
    let started = Instant::now();
    let (status, _) = post_webhook(&url, large).await;
    let took = started.elapsed();
    println!("a 10 MB webhook among {namespaces} namespaces: {status} in {took:?}");
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(replay.total_bytes() <= bound);
    assert!(
        before + 10 * 1024 * 1024 > bound,
        "the webhook really had to evict: {before} retained before"
    );
    serving.abort();
}

/// Finding 3 of issue 15: two first CONNECTs to a new namespace can each create it inside
/// socketioxide, and the loser's socket is not reached by broadcasts. It is kept as a
/// stray under the namespace gate, so no event falls between; here, with polling sessions
/// (a websocket's transport is closed instead, and the client reconnects), every socket of
/// every round gets the event, raced or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_first_connects_to_a_new_namespace_both_get_every_event() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    // A closed stray is noticed within a heartbeat: keep it short.
    config.hub.ping_interval_secs = 1;
    config.hub.ping_timeout_secs = 1;
    let app = spawn_app(config).await;
    // Races are rare (2–8 % of rounds here): run until a few happened.
    let (mut rounds, mut raced) = (0, 0);
    while rounds < 200 || (raced < 5 && rounds < 2000) {
        let round = rounds;
        rounds += 1;
        let ns = format!("/race-{round}");
        let (a, b) = tokio::join!(PollingSession::open(&app), PollingSession::open(&app));
        let connect = format!("40{ns},{}", json!({"apikey": GLOBAL_KEY}));
        let strays = app.hub.stray_count();
        tokio::join!(a.send(&connect), b.send(&connect));
        let joined = format!("40{ns},");
        for session in [&a, &b] {
            session.poll_until(&joined).await;
        }
        let (status, _) = post_webhook(
            &app.webhook_url(),
            event_body("call", &format!("race-{round}"), round),
        )
        .await;
        assert_eq!(status, 200);
        let event = format!("42{ns},[\"call\"");
        for session in [&a, &b] {
            session.poll_until(&event).await;
        }
        // Both got the event, so both connect handlers have run: strays are counted.
        if app.hub.stray_count() > strays {
            raced += 1;
        }
        tokio::join!(a.close(), b.close());
    }
    println!("{raced} of {rounds} rounds raced; every socket got every event");
    // socketioxide never reports the end of a stray's session: it is dropped once its
    // session makes no request for a heartbeat, so closed strays do not pile up.
    assert!(
        raced > 0,
        "no round raced: the test proved nothing (rerun it)"
    );
    eventually("closed sockets leave no stray behind", async || {
        app.hub.stray_count() == 0
    })
    .await;
}

/// The sidecar killed while Evolution retries: the attempt that met the dead sidecar is
/// retried after the restart, accepted and emitted once; a further retry is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_retried_across_a_sidecar_restart_arrives_once() {
    let evolution = FakeEvolution::start().await;
    let envs = [
        ("AUTHENTICATION_API_KEY", GLOBAL_KEY.to_owned()),
        ("SIDECAR_UPSTREAM_URL", evolution.url()),
    ];
    let first = Sidecar::start(&envs).await;
    let addr = first.addr;
    let url = first.url("/_sidecar/webhook");
    first.kill().await; // not drained
    let body = event_body("messages.upsert", "acme", 42);
    let attempt = http().post(&url).body(body.clone()).send().await;
    assert!(attempt.is_err(), "the dead sidecar answered: {attempt:?}");

    let launch = common::sidecar::Launch {
        listen: Some(addr),
        ..Default::default()
    };
    let second = Sidecar::launch(&envs, launch).await;
    let mut client = RawSocket::open(addr, &format!("&apikey={GLOBAL_KEY}"))
        .await
        .expect("handshake");
    let joined = client.connect("/acme", "{}").await;
    assert!(joined.is_some_and(|a| a.starts_with("40/acme,")));
    // Evolution's retry, then one more.
    let (status, reply) = post_webhook(&second.url("/_sidecar/webhook"), body.clone()).await;
    assert_eq!((status, reply), (200, json!({"ok": true})));
    let (status, reply) = post_webhook(&second.url("/_sidecar/webhook"), body).await;
    assert_eq!(
        (status, reply),
        (200, json!({"ok": true, "duplicate": true}))
    );
    let event = client.next_text().await.expect("the retried event");
    assert!(event.starts_with("42/acme,[\"messages.upsert\""), "{event}");
    assert!(
        client
            .next_text_within_or_none(Duration::from_millis(500))
            .await
            .is_none_or(|text| !text.starts_with("42/acme,")),
        "the duplicate was emitted again"
    );
}
