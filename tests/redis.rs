//! Several replicas acting as one through a real Redis (started by each test on a free port).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn n_of(text: &str) -> u64 {
    serde_json::from_str::<Value>(text).unwrap()[0]["data"]["n"]
        .as_u64()
        .unwrap()
}

async fn replicas(redis: &RedisServer, evolution: &FakeEvolution) -> (TestApp, TestApp) {
    // Both follow the stream once Redis answered their readiness.
    (
        one_replica(redis, evolution).await,
        one_replica(redis, evolution).await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_to_one_replica_reaches_clients_on_both_once() {
    let redis = RedisServer::start().await;
    let evolution = FakeEvolution::start().await;
    let (a, b) = replicas(&redis, &evolution).await;
    let mut js = JsDriver::start().await;
    js.connect("on-a", &a.url("/acme"), with_key("websocket", GLOBAL_KEY))
        .await;
    js.connect("on-b", &b.url("/acme"), with_key("polling", GLOBAL_KEY))
        .await;

    for n in 0..5 {
        let target = if n % 2 == 0 { &a } else { &b };
        assert_eq!(
            post_webhook(&target.webhook_url(), event_body("call", "acme", n))
                .await
                .0,
            200
        );
    }
    for id in ["on-a", "on-b"] {
        for n in 0..5 {
            let (event, text) = js.next_event(id).await;
            assert_eq!(
                (event.as_str(), n_of(&text)),
                ("call", n),
                "{id}: one order on every replica"
            );
        }
        js.assert_no_event(id, Duration::from_millis(200)).await;
    }
    js.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_connecting_at_once_to_a_new_instance_on_another_replica() {
    let redis = RedisServer::start().await;
    let evolution = FakeEvolution::start().await;
    let (a, b) = replicas(&redis, &evolution).await;
    let mut js = JsDriver::start().await;
    let ids: Vec<String> = (0..30).map(|i| format!("c{i}")).collect();
    for id in &ids {
        js.open(id, &b.url("/brand-new"), with_key("websocket", GLOBAL_KEY))
            .await;
    }
    // Webhooks flow to the other replica while they connect.
    post_webhook(&a.webhook_url(), event_body("call", "brand-new", 0)).await;
    for id in &ids {
        assert_eq!(js.wait_connected(id).await["type"], "connect");
    }
    post_webhook(&a.webhook_url(), event_body("call", "brand-new", 1)).await;
    for id in &ids {
        loop {
            let (_, text) = js.next_event(id).await;
            if n_of(&text) == 1 {
                break;
            }
        }
    }
    js.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_sent_to_the_other_replica_is_delivered_once() {
    let redis = RedisServer::start().await;
    let evolution = FakeEvolution::start().await;
    let (a, b) = replicas(&redis, &evolution).await;
    let mut js = JsDriver::start().await;
    js.connect(
        "c",
        &a.url("/acme-support"),
        with_key("websocket", GLOBAL_KEY),
    )
    .await;
    let body = fixture("messages-upsert.json");
    assert_eq!(
        post_webhook(&a.webhook_url(), body.clone()).await,
        (200, json!({"ok": true}))
    );
    assert_eq!(
        post_webhook(&b.webhook_url(), body).await,
        (200, json!({"ok": true, "duplicate": true}))
    );
    assert_eq!(js.next_event("c").await.0, "messages.upsert");
    js.assert_no_event("c", Duration::from_millis(300)).await;
    js.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reconnecting_to_the_other_replica_recovers_everything() {
    let redis = RedisServer::start().await;
    let evolution = FakeEvolution::start().await;
    let (a, b) = replicas(&redis, &evolution).await;
    let mut js = JsDriver::start().await;
    let opts = json!({"transports": ["websocket"], "auth": {"apikey": GLOBAL_KEY}});
    js.open_recovering("first", &a.url("/acme"), opts.clone())
        .await;
    js.wait_connected("first").await;
    for n in 0..5 {
        post_webhook(&a.webhook_url(), event_body("call", "acme", n)).await;
    }
    let mut last = String::new();
    for n in 0..5 {
        let (_, text) = js.next_event("first").await;
        assert_eq!(n_of(&text), n);
        last = serde_json::from_str::<Value>(&text).unwrap()[1]
            .as_str()
            .unwrap()
            .to_owned();
    }
    js.close("first").await;
    for n in 5..25 {
        let target = if n % 2 == 0 { &a } else { &b };
        post_webhook(&target.webhook_url(), event_body("call", "acme", n)).await;
    }
    js.open_from("second", &b.url("/acme"), opts, &last).await;
    let (event, text) = js.next_event("second").await;
    assert_eq!(event, "sidecar.recovery");
    let recovery = &serde_json::from_str::<Value>(&text).unwrap()[0];
    assert_eq!(recovery["recovered"], true, "{recovery}");
    assert_eq!(recovery["replayed"], 20, "{recovery}");
    for n in 5..25 {
        assert_eq!(n_of(&js.next_event("second").await.1), n);
    }
    js.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_stream_degrades_then_recovers() {
    let mut redis = RedisServer::start().await;
    let port = redis.port;
    let evolution = FakeEvolution::start().await;
    let (a, b) = replicas(&redis, &evolution).await;
    let mut js = JsDriver::start().await;
    js.connect("on-a", &a.url("/acme"), with_key("websocket", GLOBAL_KEY))
        .await;
    js.connect("on-b", &b.url("/acme"), with_key("websocket", GLOBAL_KEY))
        .await;
    post_webhook(&a.webhook_url(), event_body("call", "acme", 0)).await;
    assert_eq!(n_of(&js.next_event("on-a").await.1), 0);
    assert_eq!(n_of(&js.next_event("on-b").await.1), 0);

    redis.kill();
    // Local clients still get events, promptly, and the webhook is still accepted.
    let started = std::time::Instant::now();
    assert_eq!(
        post_webhook(&a.webhook_url(), event_body("call", "acme", 1))
            .await
            .0,
        200
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(n_of(&js.next_event("on-a").await.1), 1);
    let ready = http().get(a.url("/_sidecar/readyz")).send().await.unwrap();
    assert_eq!(
        ready.status().as_u16(),
        200,
        "a Redis outage does not take the replica out"
    );
    assert_eq!(ready.json::<Value>().await.unwrap()["redis"], "degraded");

    let _redis = RedisServer::start_on(port).await;
    // Once both replicas follow the stream again, fan-out across them resumes.
    let mut n = 100;
    let resumed = async || {
        post_webhook(&a.webhook_url(), event_body("call", "acme", n)).await;
        let id = "on-b".to_owned();
        let got = js
            .wait_for(
                move |r| r["id"] == id && r["type"] == "event",
                Duration::from_millis(500),
            )
            .await;
        if got.is_some_and(|r| n_of(r["text"].as_str().unwrap()) == n) {
            return true;
        }
        n += 1;
        false
    };
    eventually_within(
        "cross-replica fan-out resumes",
        Duration::from_secs(20),
        resumed,
    )
    .await;
    let ready: Value = http()
        .get(a.url("/_sidecar/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["redis"], "ok");
    js.shutdown().await;
}

/// 50 clients split over two replicas, dropping and reconnecting every 200–2,000 ms,
/// while 2,000 webhooks alternate between the replicas: every client gets every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_loss_under_churn_across_two_replicas() {
    let redis = RedisServer::start().await;
    let evolution = FakeEvolution::start().await;
    let (a, b) = replicas(&redis, &evolution).await;
    let mut js = JsDriver::start().await;
    let opts = json!({
        "transports": ["websocket"], "auth": {"apikey": GLOBAL_KEY},
        "reconnection": true, "reconnectionDelay": 50, "reconnectionDelayMax": 300, "randomizationFactor": 0
    });
    let clients: Vec<String> = (0..50).map(|i| format!("c{i}")).collect();
    for (i, id) in clients.iter().enumerate() {
        let replica = if i % 2 == 0 { &a } else { &b };
        js.open_counting(id, &replica.url("/churn"), opts.clone())
            .await;
    }
    for id in &clients {
        assert_eq!(js.wait_connected(id).await["type"], "connect");
        js.churn(id, 200, 2000).await;
    }
    let total = 2000u64;
    for n in 0..total {
        let target = if n % 2 == 0 { &a } else { &b };
        assert_eq!(
            post_webhook(&target.webhook_url(), event_body("call", "churn", n))
                .await
                .0,
            200
        );
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    for id in &clients {
        js.stop_churn(id).await;
    }
    let reconnects = js.assert_all_delivered(&clients, total).await;
    assert!(
        reconnects >= 100,
        "the clients really churned: {reconnects}"
    );
    println!(
        "churn over two replicas: 50 clients, {total} events each, {reconnects} reconnects, 100% delivered"
    );
    js.shutdown().await;
}

/// Redis clients connected now, other than the one asking (`CLIENT LIST`).
async fn redis_clients(redis: &RedisServer) -> usize {
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let list: String = ::redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut connection)
        .await
        .unwrap();
    list.lines().count().saturating_sub(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_app_takes_its_tasks_and_redis_connections_with_it() {
    let redis = RedisServer::start().await;
    let evolution = FakeEvolution::start().await;
    assert_eq!(
        redis_clients(&redis).await,
        0,
        "a fresh Redis has no clients"
    );

    let app = evo_realtime::App::build(&redis_config(&evolution.url(), &redis)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let serving = tokio::spawn(app.serve(listener, std::future::pending()));
    // Positive control: the served app's stream reader and writer are connected.
    eventually("the app connects to redis", async || {
        redis_clients(&redis).await >= 2
    })
    .await;

    // Dropped rather than served to completion: no shutdown signal, the future is gone.
    serving.abort();
    let _ = serving.await;
    eventually("every connection of the dropped app closes", async || {
        redis_clients(&redis).await == 0
    })
    .await;
}

async fn one_replica(redis: &RedisServer, evolution: &FakeEvolution) -> TestApp {
    let app = spawn_app(redis_config(&evolution.url(), redis)).await;
    let url = app.url("/_sidecar/readyz");
    eventually_value("redis reports ok", PATIENCE, async || {
        let body: Value = http().get(&url).send().await.unwrap().json().await.unwrap();
        if body["redis"] == "ok" {
            Ok(())
        } else {
            Err(body)
        }
    })
    .await;
    app
}

/// Finding 4 of issue 15: one entry that does not parse (version skew in a rolling
/// upgrade) failed the whole read batch, and the reader retried it for as long as it was
/// retained: no replica delivered anything, while webhooks kept getting 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_stream_entry_is_skipped_and_counted() {
    let redis = RedisServer::start().await;
    let evolution = FakeEvolution::start().await;
    let app = one_replica(&redis, &evolution).await;
    let mut js = JsDriver::start().await;
    js.connect("c", &app.url("/acme"), with_key("websocket", GLOBAL_KEY))
        .await;
    let skipped_before = metric(&app, "evo_redis_malformed_entries_total").await;

    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let _: String = ::redis::cmd("XADD")
        .arg("evo:events")
        .arg("*")
        .arg("e")
        .arg("not an event!")
        .arg("i")
        .arg("acme")
        .arg("p")
        .arg("{")
        .query_async(&mut connection)
        .await
        .unwrap();

    // The event behind the poisoned entry still arrives.
    let (status, _) = post_webhook(&app.webhook_url(), event_body("call", "acme", 7)).await;
    assert_eq!(status, 200);
    assert_eq!(n_of(&js.next_event("c").await.1), 7);
    eventually("the skipped entry is counted", async || {
        metric(&app, "evo_redis_malformed_entries_total").await > skipped_before
    })
    .await;
    js.shutdown().await;
}

/// Finding 5 of issue 15: with Redis down, every publish still tried Redis first (p50
/// 150 ms per webhook in the review). The circuit opens at the first failure: webhooks are
/// delivered locally at once until the stream reader finds Redis again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_stay_fast_while_redis_is_down() {
    let mut redis = RedisServer::start().await;
    let port = redis.port;
    let evolution = FakeEvolution::start().await;
    let app = one_replica(&redis, &evolution).await;
    let mut js = JsDriver::start().await;
    js.open_quiet("c", &app.url("/acme"), with_key("websocket", GLOBAL_KEY))
        .await;
    assert_eq!(js.wait_connected("c").await["type"], "connect");

    redis.kill();
    // A steady 20 webhooks/s for 60 s during the outage, each timed.
    let total = 1200u64;
    let mut took = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for n in 0..total {
        tick.tick().await;
        let started = std::time::Instant::now();
        let (status, _) = post_webhook(&app.webhook_url(), event_body("call", "acme", n)).await;
        assert_eq!(status, 200);
        took.push(started.elapsed());
    }
    took.sort();
    let p50 = took[took.len() / 2];
    let p99 = took[took.len() * 99 / 100 - 1];
    let max = *took.last().unwrap();
    println!("redis down: {total} webhooks at 20/s, p50 {p50:?}, p99 {p99:?}, max {max:?}");
    assert!(p99 < Duration::from_millis(50), "p99 {p99:?}, max {max:?}");
    let summary = eventually_value("the local client gets every event", PATIENCE, async || {
        let summary = js.summary("c").await;
        if summary["unique"] == total {
            Ok(summary)
        } else {
            Err(summary)
        }
    })
    .await;
    assert_eq!(summary["count"], total);

    // Redis back: the circuit closes and events go through the stream again.
    let _redis = RedisServer::start_on(port).await;
    let url = app.url("/_sidecar/readyz");
    eventually("redis is ok again", async || {
        let body: Value = http().get(&url).send().await.unwrap().json().await.unwrap();
        body["redis"] == "ok"
    })
    .await;
    let (status, _) = post_webhook(&app.webhook_url(), event_body("call", "acme", total)).await;
    assert_eq!(status, 200);
    eventually("the event after the outage arrives", async || {
        js.summary("c").await["unique"] == total + 1
    })
    .await;
    js.shutdown().await;
}

/// Issue 15: a stream reader that makes no progress while Redis answers (here an ACL that
/// lets the sidecar append but not read) showed `"redis":"ok"` with nothing delivered.
/// It shows as stalled, in readyz and in a metric, and the replica is not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_cannot_read_shows_as_stalled() {
    let redis = RedisServer::start().await;
    let evolution = FakeEvolution::start().await;
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let _: String = ::redis::cmd("ACL")
        .arg("SETUSER")
        .arg("sidecar")
        .arg("on")
        .arg(">secret")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .arg("-xread")
        .query_async(&mut connection)
        .await
        .unwrap();
    let mut config = test_config(&evolution.url());
    config.redis.url = Some(evo_realtime::config::Secret::new(format!(
        "redis://sidecar:secret@127.0.0.1:{}/",
        redis.port
    )));
    let app = spawn_app(config).await;
    // Redis answers: webhooks are appended to the stream.
    let (status, _) = post_webhook(&app.webhook_url(), event_body("call", "acme", 1)).await;
    assert_eq!(status, 200);
    let url = app.url("/_sidecar/readyz");
    let (status, body) =
        eventually_value("readyz says stalled", Duration::from_secs(30), async || {
            let response = http().get(&url).send().await.unwrap();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            if body["redis"] == "stalled" {
                Ok((status, body))
            } else {
                Err(body)
            }
        })
        .await;
    assert_eq!(status, 503, "a stalled reader never caught up: {body}");
    eventually("the stall shows in the metric", async || {
        metric(&app, "evo_redis_reader_stalled").await == 1.0
    })
    .await;
}
