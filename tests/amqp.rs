//! RabbitMQ ingest against a real `rabbitmq-server` started on free ports: events published
//! the way Evolution publishes them (topic exchange, routing key = the dotted event, the
//! fixture bodies, no message properties) reach socket.io clients exactly as webhooks do,
//! survive a sidecar restart and a broker restart, malformed ones are rejected and counted,
//! and two replicas share one queue.
//!
//! A broker takes 5-15 s to start, so the tests that do not restart it share one (each
//! with its own exchange and queue); a test that restarts the broker has its own.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// The broker shared by the tests of this file that do not restart it.
async fn shared_broker() -> &'static RabbitMq {
    static SHARED: tokio::sync::OnceCell<RabbitMq> = tokio::sync::OnceCell::const_new();
    SHARED.get_or_init(RabbitMq::start).await
}

fn n_of(text: &str) -> u64 {
    serde_json::from_str::<Value>(text).unwrap()[0]["data"]["n"]
        .as_u64()
        .unwrap()
}

/// readyz's body of a sidecar at `base`.
async fn readyz(base: &str) -> (u16, Value) {
    let response = http()
        .get(format!("{base}/_sidecar/readyz"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn wait_amqp_up(base: &str) {
    eventually("the amqp consumer is attached", async || {
        readyz(base).await.1["amqp"] == "up"
    })
    .await;
}

/// Issue 18: a message is the webhook's event. The same envelope, posted as a webhook and
/// published to RabbitMQ, gives byte-identical socket.io frames, for every fixture.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_clients_exactly_as_webhooks_do() {
    let broker = shared_broker().await;
    let evolution = FakeEvolution::start().await;
    let config = with_amqp(
        test_config(&evolution.url()),
        broker,
        "evolution_exchange_identical",
        "evo-realtime-identical",
    );
    let app = spawn_app(config).await;
    wait_amqp_up(&app.url("")).await;
    let publisher = broker.publisher().await;
    publisher
        .declare_exchange("evolution_exchange_identical")
        .await;

    let fixtures = [
        "messages-upsert.json",
        "messages-update.json",
        "connection-update.json",
        "presence-update.json",
        "qrcode-updated.json",
        "send-message.json",
    ];
    let mut compared = 0;
    for name in fixtures {
        let webhook_body = fixture(name);
        let envelope: Value = serde_json::from_str(&webhook_body).unwrap();
        let (event, instance) = (
            envelope["event"].as_str().unwrap(),
            envelope["instance"].as_str().unwrap(),
        );
        let mut client = RawSocket::open(app.addr, &format!("&apikey={GLOBAL_KEY}"))
            .await
            .expect("handshake");
        let ns = format!("/{instance}");
        let joined = client.connect(&ns, "{}").await;
        assert!(joined.is_some_and(|a| a.starts_with(&format!("40{ns},"))));
        // Skip the state a late joiner is sent (connection.update, qrcode.updated).
        while client
            .next_text_within_or_none(Duration::from_millis(300))
            .await
            .is_some()
        {}

        // The webhook (with `destination`, as Evolution POSTs it) ...
        let (status, _) = post_webhook(&app.webhook_url(), webhook_body.clone()).await;
        assert_eq!(status, 200, "{name}");
        let from_webhook = client.next_text().await.expect("the webhook's frame");
        // ... and Evolution's AMQP message for the same event (no `destination`).
        let message = amqp_body(&webhook_body);
        assert!(!message.contains("\"destination\""));
        publisher
            .publish("evolution_exchange_identical", event, message.as_bytes())
            .await;
        let from_amqp = client.next_text().await.expect("the amqp message's frame");
        assert!(
            from_webhook.starts_with(&format!("42{ns},[\"{event}\"")),
            "{from_webhook}"
        );
        assert_eq!(
            from_amqp, from_webhook,
            "{name}: the same frame from both feeds"
        );

        // One dedupe window for both feeds: the same bytes again, from either, are a retry.
        publisher
            .publish("evolution_exchange_identical", event, message.as_bytes())
            .await;
        let (status, reply) = post_webhook(&app.webhook_url(), message).await;
        assert_eq!(
            (status, reply),
            (200, json!({"ok": true, "duplicate": true}))
        );
        assert!(
            client
                .next_text_within_or_none(Duration::from_millis(300))
                .await
                .is_none_or(|text| !text.starts_with("42")),
            "{name}: a duplicate was emitted"
        );
        compared += 1;
    }
    assert_eq!(compared, fixtures.len());
}

/// Issue 18: the sidecar (the real binary, Redis mode) is killed, 500 events are published
/// while it is down, and it is started again: every event is delivered, in order, and an
/// opted-in client connected before the kill recovers them once. Redis keeps the offsets'
/// epoch and the retained log across the restart (memory mode would start a new epoch:
/// the client would be told `recovered: false`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_stopped_while_500_events_are_published_delivers_them_all_after_restart() {
    let broker = shared_broker().await;
    let redis = RedisServer::start().await;
    let evolution = FakeEvolution::start().await;
    let exchange = "evolution_exchange_restart";
    let envs = [
        ("AUTHENTICATION_API_KEY", GLOBAL_KEY.to_owned()),
        ("SIDECAR_UPSTREAM_URL", evolution.url()),
        ("SIDECAR_REDIS_URL", redis.url()),
        ("SIDECAR_AMQP_URL", broker.url()),
        ("SIDECAR_AMQP_EXCHANGE", exchange.to_owned()),
        ("SIDECAR_AMQP_QUEUE", "evo-realtime-restart".to_owned()),
        ("SIDECAR_HANDSHAKE_RATE_PER_IP", "0".to_owned()),
    ];
    let first = Sidecar::start(&envs).await;
    let addr = first.addr;
    wait_amqp_up(&first.url("")).await;
    let publisher = broker.publisher().await;
    publisher.declare_exchange(exchange).await;

    let mut js = JsDriver::start().await;
    let opts = json!({"transports": ["websocket"], "auth": {"apikey": GLOBAL_KEY},
                      "reconnection": true, "reconnectionDelay": 200, "reconnectionDelayMax": 500});
    js.open_counting("opted-in", &first.url("/acme"), opts)
        .await;
    assert_eq!(js.wait_connected("opted-in").await["type"], "connect");
    let before = 10u64;
    for n in 0..before {
        let body = amqp_body(&event_body("messages.upsert", "acme", n));
        publisher
            .publish(exchange, "messages.upsert", body.as_bytes())
            .await;
    }
    eventually_value("the first events arrive", PATIENCE, async || {
        let summary = js.summary("opted-in").await;
        if summary["unique"] == before {
            Ok(())
        } else {
            Err(summary)
        }
    })
    .await;

    first.kill().await;
    let total = 510u64;
    for n in before..total {
        let body = amqp_body(&event_body("messages.upsert", "acme", n));
        publisher
            .publish(exchange, "messages.upsert", body.as_bytes())
            .await;
    }
    let launch = common::sidecar::Launch {
        listen: Some(addr),
        log: Some("warn".into()),
        ..Default::default()
    };
    let second = Sidecar::launch(&envs, launch).await;
    wait_amqp_up(&second.url("")).await;

    // Every event, each once, in publish order: the 10 before the kill live, the 500 after
    // the restart recovered with the offset the client reconnected with.
    let reconnects = js
        .assert_all_delivered(&["opted-in".to_owned()], total)
        .await;
    // The opted-in client reconnected (with its offset) and got each event once, in order.
    let summary = js.summary("opted-in").await;
    assert!(
        summary["connects"].as_u64().unwrap() >= 2
            && summary["recoveries"].as_u64().unwrap() >= 1
            && reconnects >= 1,
        "the opted-in client reconnected and recovered: {summary}"
    );
    js.shutdown().await;
}

/// Issue 18: the broker stopped and restarted mid-stream (`rabbitmqctl stop`, as an
/// upgrade does; after a SIGKILL, RabbitMQ 3.10 here did not elect the single-node quorum
/// queue's leader again within a minute, which no client can change). While it is down readyz stays
/// 200 with `"amqp":"degraded"`, `evo_amqp_up` is 0, and webhooks still work; once it is
/// back the consumer reattaches by itself, and nothing published after that is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_loses_nothing_published_after_it_came_back() {
    let mut broker = RabbitMq::start().await;
    let evolution = FakeEvolution::start().await;
    let config = with_amqp(
        test_config(&evolution.url()),
        &broker,
        "evolution_exchange",
        "evo-realtime",
    );
    let app = spawn_app(config).await;
    let base = app.url("");
    wait_amqp_up(&base).await;
    assert_eq!(metric(&app, "evo_amqp_up").await, 1.0);
    let mut js = JsDriver::start().await;
    let opts = json!({"transports": ["websocket"], "auth": {"apikey": GLOBAL_KEY}});
    js.open_counting("c", &app.url("/acme"), opts).await;
    assert_eq!(js.wait_connected("c").await["type"], "connect");

    let publisher = broker.publisher().await;
    publisher.declare_exchange("evolution_exchange").await;
    let mut n = 0u64;
    for _ in 0..50 {
        let body = amqp_body(&event_body("messages.upsert", "acme", n));
        publisher
            .publish("evolution_exchange", "messages.upsert", body.as_bytes())
            .await;
        n += 1;
    }
    eventually_value("the first 50 arrive", PATIENCE, async || {
        let summary = js.summary("c").await;
        if summary["unique"] == 50 {
            Ok(())
        } else {
            Err(summary)
        }
    })
    .await;

    drop(publisher);
    broker.stop().await;
    eventually("readyz says amqp is degraded", async || {
        let (status, body) = readyz(&base).await;
        status == 200 && body["amqp"] == "degraded" && body["status"] == "ready"
    })
    .await;
    assert_eq!(metric(&app, "evo_amqp_up").await, 0.0);
    // Webhooks keep working side by side.
    let (status, _) =
        post_webhook(&app.webhook_url(), event_body("messages.upsert", "acme", n)).await;
    assert_eq!(status, 200);
    n += 1;

    broker.restart().await;
    println!("broker restarted in {:?}", broker.started_in);
    let publisher = broker.publisher().await;
    publisher.declare_exchange("evolution_exchange").await;
    // Published at once, possibly before the consumer is back: the durable queue and its
    // binding survived the restart and hold them.
    for _ in 0..100 {
        let body = amqp_body(&event_body("messages.upsert", "acme", n));
        publisher
            .publish("evolution_exchange", "messages.upsert", body.as_bytes())
            .await;
        n += 1;
    }
    // The consumer retries on its backoff (at most 10 s apart); after a crash the broker
    // may also hold `basic.consume` until the quorum queue has elected its leader again
    // (the call times out after 10 s and the session starts over).
    let restarted = std::time::Instant::now();
    eventually_within(
        "the consumer reattaches",
        Duration::from_secs(60),
        async || readyz(&base).await.1["amqp"] == "up",
    )
    .await;
    println!(
        "the consumer reattached {:?} after the broker accepted connections",
        restarted.elapsed()
    );
    assert_eq!(metric(&app, "evo_amqp_up").await, 1.0);
    js.assert_all_delivered(&["c".to_owned()], n).await;
    js.shutdown().await;
}

/// Issue 18: a message that is not JSON, JSON that is no envelope, or a body over
/// `SIDECAR_MAX_BODY_BYTES` is rejected without requeue (so a dead-letter exchange set by
/// policy gets it, once), counted by outcome, and the messages after it are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_rejected_without_requeue_and_counted() {
    let broker = shared_broker().await;
    let evolution = FakeEvolution::start().await;
    let (exchange, queue) = ("evolution_exchange_malformed", "evo-realtime-malformed");
    // The operator's dead-letter exchange, set on the sidecar's queue by policy.
    broker.set_policy(
        "evo-dlx",
        &format!("^{queue}$"),
        r#"{"dead-letter-exchange":"evo-dead"}"#,
    );
    let publisher = broker.publisher().await;
    let channel = publisher.channel();
    channel
        .exchange_declare(
            "evo-dead".into(),
            lapin::ExchangeKind::Fanout,
            lapin::options::ExchangeDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_declare(
            "evo-dead-letters".into(),
            lapin::options::QueueDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            "evo-dead-letters".into(),
            "evo-dead".into(),
            "".into(),
            lapin::options::QueueBindOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();

    let mut config = with_amqp(test_config(&evolution.url()), broker, exchange, queue);
    config.webhook.max_body_bytes = 64 * 1024;
    let app = spawn_app(config).await;
    wait_amqp_up(&app.url("")).await;
    publisher.declare_exchange(exchange).await;
    let mut js = JsDriver::start().await;
    js.connect("c", &app.url("/acme"), with_key("websocket", GLOBAL_KEY))
        .await;

    let too_large = json!({"event": "messages.upsert", "instance": "acme",
                           "data": {"n": 99, "pad": "x".repeat(70 * 1024)}})
    .to_string();
    let bad: [(&str, &[u8]); 4] = [
        ("bad_json", b"not json at all"),
        ("bad_json", b"[1,2,3]"),
        ("bad_envelope", br#"{"event":"messages.upsert","data":{}}"#),
        ("too_large", too_large.as_bytes()),
    ];
    for (_, body) in bad {
        publisher.publish(exchange, "messages.upsert", body).await;
    }
    let good = amqp_body(&event_body("messages.upsert", "acme", 1));
    publisher
        .publish(exchange, "messages.upsert", good.as_bytes())
        .await;
    let (event, text) = js.next_event("c").await;
    assert_eq!((event.as_str(), n_of(&text)), ("messages.upsert", 1));

    let series = |outcome: &str| format!("evo_amqp_messages_total{{outcome=\"{outcome}\"}}");
    assert_eq!(metric(&app, &series("bad_json")).await, 2.0);
    assert_eq!(metric(&app, &series("bad_envelope")).await, 1.0);
    assert_eq!(metric(&app, &series("too_large")).await, 1.0);
    // Each went to the dead-letter queue once, not back to the sidecar's queue.
    let dead = eventually_value("four dead letters", PATIENCE, async || {
        let queue = channel
            .queue_declare(
                "evo-dead-letters".into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        if queue.message_count() == 4 {
            Ok(4)
        } else {
            Err(queue.message_count())
        }
    })
    .await;
    assert_eq!(dead, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        metric(&app, &series("bad_json")).await,
        2.0,
        "a rejected message came back"
    );
    js.assert_no_event("c", Duration::from_millis(200)).await;
    js.shutdown().await;
}

/// Issue 18: two replicas (real binaries) with Redis consume one queue as competing
/// consumers; the Redis stream fans every event out to both, so each client, on either
/// replica, gets each event exactly once, and both replicas did part of the consuming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_queue_deliver_each_event_once_to_every_client() {
    let broker = shared_broker().await;
    let redis = RedisServer::start().await;
    let evolution = FakeEvolution::start().await;
    let exchange = "evolution_exchange_replicas";
    let envs = [
        ("AUTHENTICATION_API_KEY", GLOBAL_KEY.to_owned()),
        ("SIDECAR_UPSTREAM_URL", evolution.url()),
        ("SIDECAR_REDIS_URL", redis.url()),
        ("SIDECAR_AMQP_URL", broker.url()),
        ("SIDECAR_AMQP_EXCHANGE", exchange.to_owned()),
        ("SIDECAR_AMQP_QUEUE", "evo-realtime-replicas".to_owned()),
        // Small prefetch: the broker hands messages to both consumers in turn.
        ("SIDECAR_AMQP_PREFETCH", "1".to_owned()),
        ("SIDECAR_HANDSHAKE_RATE_PER_IP", "0".to_owned()),
    ];
    let (a, b) = (Sidecar::start(&envs).await, Sidecar::start(&envs).await);
    for replica in [&a, &b] {
        wait_amqp_up(&replica.url("")).await;
    }
    let mut js = JsDriver::start().await;
    let clients: Vec<String> = (0..4).map(|i| format!("c{i}")).collect();
    for (i, id) in clients.iter().enumerate() {
        let replica = if i % 2 == 0 { &a } else { &b };
        let transport = if i < 2 { "websocket" } else { "polling" };
        js.open_quiet(id, &replica.url("/acme"), with_key(transport, GLOBAL_KEY))
            .await;
        assert_eq!(js.wait_connected(id).await["type"], "connect");
    }
    let publisher = broker.publisher().await;
    publisher.declare_exchange(exchange).await;
    let total = 300u64;
    for n in 0..total {
        let body = amqp_body(&event_body("messages.upsert", "acme", n));
        publisher
            .publish(exchange, "messages.upsert", body.as_bytes())
            .await;
    }
    // Competing consumers: the order across replicas is the order they appended to the
    // stream, so only once-each is asserted here.
    for id in &clients {
        let summary = eventually_value(
            &format!("{id} gets all"),
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
        assert_eq!(summary["count"], total, "{id} got duplicates: {summary}");
    }
    let published = "evo_amqp_messages_total{outcome=\"published\"}";
    let (on_a, on_b) = (
        metric_at(&a.url(""), published).await,
        metric_at(&b.url(""), published).await,
    );
    println!("replica a consumed {on_a}, replica b {on_b}");
    assert_eq!(on_a + on_b, total as f64, "each message consumed once");
    assert!(
        on_a > 0.0 && on_b > 0.0,
        "both replicas consumed: {on_a} + {on_b}"
    );
    js.shutdown().await;
}

/// An App dropped instead of served to completion takes its consumer with it: the broker
/// sees the consumer, then no consumer on the queue (the connection closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_app_takes_its_amqp_consumer_with_it() {
    let broker = shared_broker().await;
    let evolution = FakeEvolution::start().await;
    let queue = "evo-realtime-dropped";
    let config = with_amqp(
        test_config(&evolution.url()),
        broker,
        "evolution_exchange_dropped",
        queue,
    );
    let app = spawn_app(config).await;
    wait_amqp_up(&app.url("")).await;
    let publisher = broker.publisher().await;
    let consumers = async || {
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declared = publisher
            .channel()
            .queue_declare(queue.into(), passive, lapin::types::FieldTable::default())
            .await
            .unwrap();
        declared.consumer_count()
    };
    assert_eq!(consumers().await, 1);
    drop(app);
    eventually("the consumer is gone from the broker", async || {
        consumers().await == 0
    })
    .await;
}

/// On shutdown the consumer stops taking messages and detaches while the app still drains
/// (readyz answers 503 "draining"), so the broker keeps what is left for another replica or
/// the next start, as Evolution retries webhooks refused with 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_app_detaches_its_consumer_and_leaves_messages_queued() {
    let broker = shared_broker().await;
    let evolution = FakeEvolution::start().await;
    let (exchange, queue) = ("evolution_exchange_drain", "evo-realtime-drain");
    let mut config = with_amqp(test_config(&evolution.url()), broker, exchange, queue);
    config.shutdown_grace_secs = 5;
    let app = spawn_app(config).await;
    let base = app.url("");
    wait_amqp_up(&base).await;
    let publisher = broker.publisher().await;
    publisher.declare_exchange(exchange).await;
    let declared = async || {
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        publisher
            .channel()
            .queue_declare(queue.into(), passive, lapin::types::FieldTable::default())
            .await
            .unwrap()
    };
    assert_eq!(declared().await.consumer_count(), 1);

    let stopped = tokio::spawn(app.stop());
    eventually("the consumer detaches while the app drains", async || {
        let draining = readyz(&base).await.1["status"] == "draining";
        draining && declared().await.consumer_count() == 0
    })
    .await;
    let body = amqp_body(&event_body("messages.upsert", "acme", 1));
    publisher
        .publish(exchange, "messages.upsert", body.as_bytes())
        .await;
    eventually("the message stays queued", async || {
        declared().await.message_count() == 1
    })
    .await;
    stopped.await.unwrap();
}
