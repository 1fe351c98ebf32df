//! Health, metrics, logs, shutdown, the CLI and the deploy files: what an operator relies on.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use evo_realtime::config::ENV_VARS;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

const BINARY: &str = env!("CARGO_BIN_EXE_evo-realtime");

use common::sidecar::Launch;

async fn get(url: &str) -> (u16, String) {
    let response = http().get(url).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// A scrape of the public listener's metrics, which take the global key as a bearer token.
async fn scrape_metrics(url: &str) -> (u16, String) {
    let response = http()
        .get(url)
        .header("authorization", format!("Bearer {GLOBAL_KEY}"))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn healthz_and_readyz_follow_the_upstream() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    assert_eq!(get(&app.url("/_sidecar/healthz")).await.0, 200);
    let (status, body) = get(&app.url("/_sidecar/readyz")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["upstream"],
        "up"
    );

    evolution.stop();
    let url = app.url("/_sidecar/readyz");
    eventually("readyz turns 503 once the upstream is gone", || async {
        let (status, body) = get(&url).await;
        status == 503 && body.contains(r#""upstream":"down""#)
    })
    .await;
    assert_eq!(
        get(&app.url("/_sidecar/healthz")).await.0,
        200,
        "liveness does not depend on it"
    );

    // The upstream comes back on the same port.
    let _back = FakeEvolution::start_with(evolution.state.clone(), evolution.addr).await;
    eventually("readyz recovers", || async { get(&url).await.0 == 200 }).await;
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

/// Without TCP_NODELAY, Nagle holds every event frame written behind an unacknowledged one
/// until the client's delayed ACK: a 34 ms p99 in the latency benchmark. The app runs in
/// this process, so the accepted socket is one of our own file descriptors.
#[tokio::test]
async fn accepted_connections_have_tcp_nodelay() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    let client = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let client_addr = client.local_addr().unwrap();
    // A served request proves the server has accepted (and tapped) the connection.
    let mut client = client;
    tokio::io::AsyncWriteExt::write_all(
        &mut client,
        b"GET /_sidecar/healthz HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = [0u8; 12];
    client.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");

    let mut server_side = None;
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: only getsockopt/getsockname are called, while the app (and with it the
        // connection) is alive; a descriptor closed meanwhile just fails those calls.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&borrowed);
        let local = socket.local_addr().ok().and_then(|a| a.as_socket());
        let peer = socket.peer_addr().ok().and_then(|a| a.as_socket());
        if local == Some(app.addr) && peer == Some(client_addr) {
            server_side = Some(socket.tcp_nodelay().unwrap());
        }
    }
    assert_eq!(
        server_side,
        Some(true),
        "the accepted socket must have TCP_NODELAY"
    );
}

#[tokio::test]
async fn metrics_change_with_traffic() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    let scrape = || async { scrape_metrics(&app.url("/_sidecar/metrics")).await.1 };
    let mut js = JsDriver::start().await;
    js.connect(
        "m",
        &app.url("/metrics-ns"),
        with_key("websocket", GLOBAL_KEY),
    )
    .await;
    let before = scrape().await;

    post_webhook(
        &app.webhook_url(),
        event_body("labels.edit", "metrics-ns", 1),
    )
    .await;
    js.next_event("m").await;
    post_webhook(&app.webhook_url(), "{").await;
    let refused = js
        .connect("bad", &app.url("/metrics-ns"), with_key("polling", "nope"))
        .await;
    assert_eq!(refused["type"], "connect_error");
    js.emit_ack("m", "chat/findChats", vec![json!({})]).await;
    http()
        .get(app.url("/instance/fetchInstances"))
        .header("apikey", "nope")
        .send()
        .await
        .unwrap();

    let after = scrape().await;
    let delta = |series: &str| metric(&after, series) - metric(&before, series);
    assert_eq!(
        delta(r#"evo_webhooks_total{event="labels.edit",status="200"}"#),
        1.0,
        "{after}"
    );
    assert!(delta(r#"evo_webhooks_total{event="unknown",status="400"}"#) >= 1.0);
    assert!(delta(r#"evo_events_emitted_total{scope="instance"}"#) >= 1.0);
    assert!(delta("evo_deliveries_total") >= 1.0);
    assert!(delta(r#"evo_handshake_rejections_total{reason="invalid_key"}"#) >= 1.0);
    assert!(
        delta(r#"evo_upstream_calls_total{route="/chat/findChats/{instance}",status="201"}"#)
            >= 1.0
    );
    assert!(delta(r#"evo_proxy_requests_total{status="401"}"#) >= 1.0);
    assert!(
        metric(
            &after,
            r#"evo_sockets_connected_by_namespace{namespace="/metrics-ns"}"#
        ) >= 1.0
    );
    for name in [
        "evo_webhook_ingest_seconds_bucket",
        "evo_upstream_call_seconds_bucket",
        "evo_sockets_connected ",
    ] {
        assert!(after.contains(name), "{name} missing");
    }
    js.shutdown().await;
}

#[tokio::test]
async fn metrics_move_to_their_own_listener() {
    let evolution = FakeEvolution::start().await;
    let mut config = test_config(&evolution.url());
    let free = free_port();
    config.metrics_listen = Some(free);
    let app = evo_realtime::App::build(&config).unwrap();
    let metrics_listener = app.bind_metrics().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let public = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(app.serve_with_metrics(listener, metrics_listener, async {
        let _ = rx.await;
    }));
    assert_eq!(
        scrape_metrics(&format!("http://{public}/_sidecar/metrics"))
            .await
            .0,
        404
    );
    let scrape = async || {
        let (status, body) = get(&format!("http://{free}/_sidecar/metrics")).await;
        assert_eq!(status, 200, "{body}");
        body
    };
    // The positive control: a webhook on the public listener shows on the metrics one.
    let series = r#"evo_webhooks_total{event="chats.delete",status="200"}"#;
    let before = metric(&scrape().await, series);
    let webhook = event_body("chats.delete", "metrics-listener", 1);
    let (status, reply) = post_webhook(&format!("http://{public}/_sidecar/webhook"), webhook).await;
    assert_eq!(status, 200, "{reply}");
    let body = scrape().await;
    assert!(metric(&body, series) >= before + 1.0, "{body}");
    for name in [
        "# TYPE evo_webhooks_total counter",
        "evo_webhook_ingest_seconds_bucket",
    ] {
        assert!(body.contains(name), "{name} missing: {body}");
    }
    assert!(evolution.requests().is_empty(), "not proxied");
    let _ = tx.send(());
    let _ = tokio::time::timeout(PATIENCE, handle).await;
}

// === The real binary ===

/// The binary with its logs piped, so `finish` can read them.
async fn run_binary(envs: &[(&str, String)]) -> Sidecar {
    let launch = Launch {
        piped: true,
        ..Launch::default()
    };
    Sidecar::launch(envs, launch).await
}

#[tokio::test]
async fn sigterm_drains_finishes_in_flight_calls_and_exits_zero() {
    let evolution = FakeEvolution::start().await;
    evolution.state.delay_ms.store(1500, Ordering::SeqCst);
    let binary = run_binary(&[
        ("SIDECAR_UPSTREAM_URL", evolution.url()),
        ("AUTHENTICATION_API_KEY", GLOBAL_KEY.into()),
        ("SIDECAR_SHUTDOWN_GRACE_SECS", "5".into()),
    ])
    .await;
    let mut js = JsDriver::start().await;
    js.connect("c", &binary.url("/acme"), with_key("websocket", GLOBAL_KEY))
        .await;
    let call = js
        .start_emit(
            "c",
            "message/sendText",
            vec![json!({"number": "1", "text": "in flight"})],
        )
        .await;
    eventually("the call reached the upstream", || async {
        !evolution.requests().is_empty()
    })
    .await;

    let started = Instant::now();
    binary.terminate();
    let ready = binary.url("/_sidecar/readyz");
    eventually("readyz turns 503", || async { get(&ready).await.0 == 503 }).await;
    let (status, body) = post_webhook(
        &binary.url("/_sidecar/webhook"),
        event_body("call", "acme", 1),
    )
    .await;
    assert_eq!(
        status, 503,
        "new webhooks are refused so Evolution retries: {body}"
    );

    let ack = js.wait_ack(call).await;
    assert_eq!(
        ack[0]["status"], 201,
        "the in-flight call completed and was acked: {ack}"
    );
    // The transport is closed (not a namespace DISCONNECT), so socket.io-client reconnects
    // on its own, to another replica during a rolling deploy.
    let disconnect = js
        .wait(|r| r["id"] == "c" && r["type"] == "disconnect")
        .await;
    assert_eq!(
        disconnect["reason"], "transport close",
        "sockets are closed cleanly"
    );
    let (code, logs) = binary.finish().await;
    assert_eq!(code, Some(0), "{logs}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "within the grace time: {:?}",
        started.elapsed()
    );
    js.shutdown().await;
}

#[tokio::test]
async fn json_logs_carry_no_secret() {
    let evolution = FakeEvolution::start().await;
    let jwt_secret = "jwt-secret-never-logged";
    let path_token = "path-token-never-logged";
    let binary = run_binary(&[
        ("SIDECAR_UPSTREAM_URL", evolution.url()),
        ("AUTHENTICATION_API_KEY", GLOBAL_KEY.into()),
        ("SIDECAR_WEBHOOK_JWT_SECRET", jwt_secret.into()),
        ("SIDECAR_WEBHOOK_PATH_TOKEN", path_token.into()),
        ("SIDECAR_LOG_FORMAT", "json".into()),
        ("RUST_LOG", "debug".into()),
    ])
    .await;
    let mut js = JsDriver::start().await;
    js.connect("g", &binary.url("/acme"), with_key("polling", GLOBAL_KEY))
        .await;
    js.connect("t", &binary.url("/acme"), with_key("websocket", ACME_TOKEN))
        .await;
    js.connect(
        "w",
        &binary.url("/acme"),
        with_key("websocket", "wrong-key-never-logged"),
    )
    .await;
    js.emit_ack("t", "message/sendText", vec![json!({"number": "1"})])
        .await;
    let jwt = evolution_jwt(&webhook_credential(jwt_secret, "acme"), 0);
    let response = http()
        .post(binary.url("/_sidecar/webhook"))
        .header("authorization", format!("Bearer {jwt}"))
        .header("content-type", "application/json")
        .body(event_body("call", "acme", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (status, _) =
        post_webhook(&binary.url(&format!("/_sidecar/webhook/{path_token}")), "{").await;
    assert_eq!(status, 400);
    http()
        .get(binary.url(&format!("/x?apikey={GLOBAL_KEY}")))
        .send()
        .await
        .unwrap();
    js.shutdown().await;

    binary.terminate();
    let (code, logs) = binary.finish().await;
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 5, "debug logs were written: {logs}");
    for line in &lines {
        let parsed: Value =
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        assert!(
            parsed["level"].is_string() && parsed["timestamp"].is_string(),
            "{line}"
        );
    }
    assert!(
        logs.contains(r#""mode":"memory""#) && logs.contains("evo-realtime serving"),
        "the startup line names the mode"
    );
    assert!(
        logs.contains("webhook accepted"),
        "one line per webhook at debug"
    );
    assert!(logs.contains("request_id"), "lines carry request ids");
    assert!(
        logs.contains("webhooks accepted with") && logs.contains("JWT (per instance)"),
        "the start says what webhooks it accepts"
    );
    for secret in [
        GLOBAL_KEY,
        ACME_TOKEN,
        "wrong-key-never-logged",
        jwt_secret,
        path_token,
        jwt.as_str(),
    ] {
        assert!(
            !logs.contains(secret),
            "a secret reached the logs: {secret}"
        );
    }
}

#[test]
fn webhook_credential_prints_an_instances_headers() {
    let run = |instance: &str, envs: &[(&str, &str)]| {
        let mut command = std::process::Command::new(BINARY);
        command.args(["webhook-credential", instance]).env_clear();
        for (name, value) in envs {
            command.env(name, value);
        }
        command.output().unwrap()
    };
    let masters = [
        ("SIDECAR_WEBHOOK_JWT_SECRET", "jwt-master"),
        ("SIDECAR_WEBHOOK_SECRET", "header-master"),
    ];
    let output = run("acme", &masters);
    assert!(output.status.success(), "{output:?}");
    let printed: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        printed,
        json!({
            "jwt_key": webhook_credential("jwt-master", "acme"),
            "x-webhook-secret": webhook_credential("header-master", "acme"),
        })
    );
    let other: Value = serde_json::from_slice(&run("other", &masters).stdout).unwrap();
    assert_ne!(
        other["jwt_key"], printed["jwt_key"],
        "one credential per instance"
    );
    // Without a master secret, or in the shared mode, there is nothing per instance to print.
    for envs in [
        vec![],
        vec![masters[0], ("SIDECAR_WEBHOOK_CREDENTIALS", "shared")],
    ] {
        let output = run("acme", &envs);
        assert_eq!(output.status.code(), Some(64), "{envs:?}");
        assert!(output.stdout.is_empty());
    }
}

/// Issue 16: a misconfigured Evolution (a wrong path token, a wrong credential) looked like
/// silence at the default log level. Refusals are logged at warn, once a minute per
/// instance and reason, and every one is counted by reason.
#[tokio::test]
async fn webhook_refusals_are_warned_once_per_reason_and_all_counted() {
    let evolution = FakeEvolution::start().await;
    let launch = common::sidecar::Launch {
        piped: true,
        log: Some("info".into()),
        ..Default::default()
    };
    let sidecar = Sidecar::launch(
        &[
            ("SIDECAR_UPSTREAM_URL", evolution.url()),
            ("AUTHENTICATION_API_KEY", GLOBAL_KEY.into()),
            ("SIDECAR_WEBHOOK_PATH_TOKEN", "right-token".into()),
        ],
        launch,
    )
    .await;
    for _ in 0..3 {
        let (status, _) = post_webhook(
            &sidecar.url("/_sidecar/webhook/wrong-token"),
            event_body("call", "acme", 1),
        )
        .await;
        assert_eq!(status, 401);
    }
    let (status, _) = post_webhook(&sidecar.url("/_sidecar/webhook/right-token"), "{").await;
    assert_eq!(status, 400);
    // Positive control: an accepted webhook is neither warned about nor counted.
    let (status, _) = post_webhook(
        &sidecar.url("/_sidecar/webhook/right-token"),
        event_body("call", "acme", 2),
    )
    .await;
    assert_eq!(status, 200);
    let metrics = http()
        .get(sidecar.url("/_sidecar/metrics"))
        .bearer_auth(GLOBAL_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"evo_webhook_refusals_total{reason="unauthorized"} 3"#)
            && metrics.contains(r#"evo_webhook_refusals_total{reason="bad_json"} 1"#),
        "{metrics}"
    );
    sidecar.terminate();
    let (code, logs) = sidecar.finish().await;
    assert_eq!(code, Some(0));
    let warned = |reason: &str| {
        logs.lines()
            .filter(|line| {
                line.contains("WARN") && line.contains("webhook refused") && line.contains(reason)
            })
            .count()
    };
    assert_eq!(
        warned("unauthorized"),
        1,
        "once a minute, not three times: {logs}"
    );
    assert_eq!(warned("bad_json"), 1, "{logs}");
    assert!(
        !logs.contains("right-token") && !logs.contains("wrong-token"),
        "{logs}"
    );
}

#[tokio::test]
async fn a_misspelled_event_in_sidecar_events_is_a_warning_naming_the_closest() {
    let evolution = FakeEvolution::start().await;
    let launch = common::sidecar::Launch {
        piped: true,
        log: Some("warn".into()),
        ..Default::default()
    };
    let sidecar = Sidecar::launch(
        &[
            ("SIDECAR_UPSTREAM_URL", evolution.url()),
            ("SIDECAR_EVENTS", "MESAGES_UPSERT,CALL".into()),
        ],
        launch,
    )
    .await;
    sidecar.terminate();
    let (code, logs) = sidecar.finish().await;
    assert_eq!(code, Some(0));
    assert!(
        logs.contains("SIDECAR_EVENTS names an event Evolution does not send")
            && logs.contains("did you mean MESSAGES_UPSERT"),
        "{logs}"
    );
    // CALL is one Evolution sends: one warning, not two.
    assert_eq!(logs.matches("does not send").count(), 1, "{logs}");
}

#[tokio::test]
async fn check_config_good_and_bad() {
    let output = std::process::Command::new(BINARY)
        .arg("check-config")
        .env_clear()
        .env("AUTHENTICATION_API_KEY", "very-secret")
        .env("SIDECAR_EVENTS", "MESSAGES_UPSERT,CALL")
        .env("WEBSOCKET_GLOBAL_EVENTS", "true")
        .output()
        .unwrap();
    assert!(output.status.success());
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(
        printed.contains(r#"events = ["#) && printed.contains("MESSAGES_UPSERT"),
        "{printed}"
    );
    assert!(printed.contains("global_events = true"));
    assert!(printed.contains(r#"api_key = "***""#));
    assert!(!printed.contains("very-secret"));

    for (name, value, expected) in [
        (
            "SIDECAR_LISTEN",
            "not-an-address",
            "SIDECAR_LISTEN=\"not-an-address\" is not valid",
        ),
        (
            "SIDECAR_MAX_BODY_BYTES",
            "lots",
            "SIDECAR_MAX_BODY_BYTES=\"lots\" is not valid",
        ),
        (
            "SIDECAR_WEBHOOK_SECRET",
            "",
            "SIDECAR_WEBHOOK_SECRET (webhook.secret)",
        ),
    ] {
        let output = std::process::Command::new(BINARY)
            .arg("check-config")
            .env_clear()
            .env(name, value)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(64), "{name}");
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    }
    // Flags beat the environment, which beats the file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sidecar.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:1111\"\n[hub]\ncors_origin = [\"https://file.example\"]\n",
    )
    .unwrap();
    let output = std::process::Command::new(BINARY)
        .args(["--listen", "127.0.0.1:3333", "check-config"])
        .env_clear()
        .env("SIDECAR_CONFIG", &file)
        .env("SIDECAR_LISTEN", "127.0.0.1:2222")
        .output()
        .unwrap();
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(
        printed.contains(r#"listen = "127.0.0.1:3333""#),
        "{printed}"
    );
    assert!(printed.contains("https://file.example"), "{printed}");
}

#[test]
fn help_lists_every_flag_with_its_environment_name() {
    let output = std::process::Command::new(BINARY)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    for needle in [
        "--config",
        "SIDECAR_CONFIG",
        "--listen",
        "SIDECAR_LISTEN",
        "--upstream-url",
        "SIDECAR_UPSTREAM_URL",
        "--webhook-path",
        "SIDECAR_WEBHOOK_PATH",
        "--global-events",
        "WEBSOCKET_GLOBAL_EVENTS",
        "--events",
        "SIDECAR_EVENTS",
        "--cors-origin",
        "CORS_ORIGIN",
        "--log-format",
        "SIDECAR_LOG_FORMAT",
        "check-config",
        "healthcheck",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
    let version = std::process::Command::new(BINARY)
        .arg("--version")
        .output()
        .unwrap();
    assert!(
        String::from_utf8(version.stdout)
            .unwrap()
            .starts_with("evo-realtime ")
    );
}

#[tokio::test]
async fn healthcheck_subcommand_probes_readyz() {
    let evolution = FakeEvolution::start().await;
    let binary = run_binary(&[("SIDECAR_UPSTREAM_URL", evolution.url())]).await;
    // tokio's Command: the fake upstream runs on this runtime and must keep answering.
    let probe = |listen: String| async move {
        Command::new(BINARY)
            .arg("healthcheck")
            .env_clear()
            .env("SIDECAR_LISTEN", listen)
            .output()
            .await
            .unwrap()
            .status
    };
    assert!(probe(binary.addr.to_string()).await.success());
    assert!(
        !probe(free_port().to_string()).await.success(),
        "nothing listens there"
    );
    binary.terminate();
    binary.finish().await;
}

/// Every `SIDECAR_*` name given to the evo-realtime container or service in `deploy/`
/// exists in the configuration, so the deploy files cannot drift from the code.
#[test]
fn deploy_files_use_only_known_settings() {
    let known: BTreeSet<&str> = ENV_VARS
        .iter()
        .map(|var| var.name)
        .chain(["SIDECAR_CONFIG"])
        .collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut files = vec![
        dir.join("docker-compose.yml"),
        dir.join("docker-compose.rabbitmq.yml"),
    ];
    for entry in std::fs::read_dir(dir.join("kubernetes")).unwrap() {
        files.push(entry.unwrap().path());
    }
    let mut checked = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for document in serde_norway::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(document)
                .unwrap_or_else(|err| panic!("{}: not valid YAML: {err}", file.display()));
            for name in sidecar_env_names(&value) {
                assert!(
                    known.contains(name.as_str()),
                    "{}: unknown setting {name}",
                    file.display()
                );
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 6,
        "the sidecar's environment was found ({checked} names)"
    );
    let env_example = std::fs::read_to_string(dir.join(".env.example")).unwrap();
    for line in env_example.lines().filter(|l| l.starts_with("SIDECAR_")) {
        let name = line.split('=').next().unwrap();
        assert!(known.contains(name), ".env.example: unknown setting {name}");
    }
}

/// The environment names of every container or compose service whose image or name is evo-realtime.
fn sidecar_env_names(value: &Value) -> Vec<String> {
    let mut names = Vec::new();
    let mut stack = vec![value];
    while let Some(node) = stack.pop() {
        match node {
            Value::Object(map) => {
                let is_sidecar = ["name", "image", "container_name"].iter().any(|k| {
                    map.get(*k)
                        .and_then(Value::as_str)
                        .is_some_and(|s| s.contains("evo-realtime"))
                }) || map.get("build").is_some();
                if is_sidecar {
                    match map.get("env").or_else(|| map.get("environment")) {
                        Some(Value::Array(items)) => names.extend(
                            items
                                .iter()
                                .filter_map(|item| {
                                    item.get("name")
                                        .and_then(Value::as_str)
                                        .or_else(|| item.as_str())
                                })
                                .map(|s| s.split('=').next().unwrap_or(s).to_owned()),
                        ),
                        Some(Value::Object(map)) => names.extend(map.keys().cloned()),
                        _ => {}
                    }
                }
                stack.extend(map.values());
            }
            Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    names.retain(|name| name.starts_with("SIDECAR_"));
    names
}

/// Evolution 2.4 before its license is activated: REST answers 503 `LICENSE_REQUIRED` while
/// events flow. readyz says so and stays ready, an emit's ack and the proxy pass the answer
/// through byte for byte, and an instance token's client is told why it cannot join.
#[tokio::test]
async fn an_unlicensed_evolution_2_4_is_reported_and_its_answer_passed_through() {
    let evolution = FakeEvolution::start().await;
    evolution.state.unlicensed.store(true, Ordering::SeqCst);
    let app = spawn_app(test_config(&evolution.url())).await;

    let (status, body) = get(&app.url("/_sidecar/readyz")).await;
    assert_eq!(status, 200, "events still flow: ready");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"status": "ready", "upstream": "unlicensed"})
    );

    // An emit: the ack carries Evolution's status and body as it wrote them.
    let mut socket = RawSocket::open(app.addr, "").await.unwrap();
    let answer = socket
        .connect("/acme", &json!({"apikey": GLOBAL_KEY}).to_string())
        .await
        .unwrap();
    assert!(answer.starts_with("40/acme,"), "{answer}");
    let argument = r#"{"number":"5511999999999","text":"hi"}"#;
    assert!(
        socket
            .send(format!(r#"42/acme,1["message/sendText",{argument}]"#))
            .await
    );
    let ack = loop {
        let frame = socket.next_text().await.expect("an ack");
        if let Some(ack) = frame.strip_prefix("43/acme,1") {
            break ack.to_owned();
        }
    };
    assert_eq!(
        ack,
        format!(r#"[{{"status":503,"body":{LICENSE_REQUIRED_ANSWER}}}]"#)
    );

    // The proxy: status, and body byte for byte.
    let response = http()
        .get(app.url("/chat/findChats/acme"))
        .header("apikey", GLOBAL_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.text().await.unwrap(), LICENSE_REQUIRED_ANSWER);

    // An instance token cannot be checked: the client is told why.
    let mut socket = RawSocket::open(app.addr, "").await.unwrap();
    let answer = socket
        .connect("/acme", &json!({"apikey": ACME_TOKEN}).to_string())
        .await
        .unwrap();
    assert!(
        answer.starts_with("44/acme,") && answer.contains("LICENSE_REQUIRED"),
        "{answer}"
    );

    // Activated: readyz says up again (positive control: the probe reads the answer).
    evolution.state.unlicensed.store(false, Ordering::SeqCst);
    let url = app.url("/_sidecar/readyz");
    eventually("readyz says up once licensed", || async {
        let (status, body) = get(&url).await;
        status == 200 && body.contains(r#""upstream":"up""#)
    })
    .await;
    app.stop().await;
}

/// Silent-webhook detection: an instance whose last `connection.update` said `open` stops
/// sending; after `SIDECAR_SILENCE_ALERT_SECS` it is warned about once (with what Evolution
/// says of its state), `evo_instance_silent{instance}` is 1 and `/_sidecar/instances` marks
/// it; a closed instance that is just as quiet is not; the next event clears it.
#[tokio::test]
async fn an_open_instance_that_falls_silent_is_warned_about_once_and_shown() {
    use axum::extract::Path;
    let evolution = FakeEvolution::builder()
        .route(
            "/instance/connectionState/{name}",
            axum::routing::get(|Path(name): Path<String>| async move {
                axum::Json(json!({"instance": {"instanceName": name, "state": "open"}}))
            }),
        )
        .start()
        .await;
    let launch = Launch {
        piped: true,
        log: Some("info".into()),
        ..Default::default()
    };
    let sidecar = Sidecar::launch(
        &[
            ("SIDECAR_UPSTREAM_URL", evolution.url()),
            ("AUTHENTICATION_API_KEY", GLOBAL_KEY.into()),
            ("SIDECAR_WEBHOOK_PATH_TOKEN", "tok".into()),
            ("SIDECAR_SILENCE_ALERT_SECS", "2".into()),
        ],
        launch,
    )
    .await;
    let url = sidecar.url("/_sidecar/webhook/tok");
    let state = |instance: &str, state: &str| {
        json!({"event": "connection.update", "instance": instance,
               "data": {"instance": instance, "state": state, "statusReason": 200}})
        .to_string()
    };
    assert_eq!(post_webhook(&url, state("acme", "open")).await.0, 200);
    assert_eq!(post_webhook(&url, state("quiet-one", "close")).await.0, 200);
    for n in 0..2 {
        let body = event_body("messages.upsert", "acme", n);
        assert_eq!(post_webhook(&url, body).await.0, 200);
    }
    let mut js = JsDriver::start().await;
    let report = js
        .connect(
            "c",
            &sidecar.url("/acme"),
            with_key("websocket", GLOBAL_KEY),
        )
        .await;
    assert_eq!(report["type"], "connect");

    let instances = || async {
        let response = http()
            .get(sidecar.url("/_sidecar/instances"))
            .header("apikey", GLOBAL_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json::<Value>().await.unwrap()
    };
    let row = |body: &Value, name: &str| -> Value {
        body["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|row| row["instance"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not in {body}"))
    };
    // Operator data: not without the global key.
    let anonymous = http()
        .get(sidecar.url("/_sidecar/instances"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let body = instances().await;
    assert_eq!(body["silence_alert_secs"], 2);
    let acme = row(&body, "acme");
    assert_eq!(
        (
            &acme["state"],
            &acme["events_per_minute"],
            &acme["clients"],
            &acme["silent"]
        ),
        (&json!("open"), &json!(3), &json!(1), &json!(false)),
        "{acme}"
    );
    assert_eq!(acme["last_event"], "messages.upsert");
    assert_eq!(row(&body, "quiet-one")["state"], "close");

    let silent_metric = || async {
        let (_, text) = scrape_metrics(&sidecar.url("/_sidecar/metrics")).await;
        metric(&text, r#"evo_instance_silent{instance="acme"}"#)
    };
    eventually_value("acme falls silent", Duration::from_secs(15), async || {
        let body = instances().await;
        if row(&body, "acme")["silent"] == true {
            Ok(body)
        } else {
            Err(row(&body, "acme"))
        }
    })
    .await;
    assert_eq!(silent_metric().await, 1.0);
    let body = instances().await;
    assert_eq!(
        row(&body, "quiet-one")["silent"],
        false,
        "a closed instance may be quiet"
    );
    assert!(row(&body, "acme")["last_event_secs_ago"].as_u64().unwrap() >= 2);

    // It speaks again: cleared.
    assert_eq!(
        post_webhook(&url, event_body("call", "acme", 9)).await.0,
        200
    );
    assert_eq!(row(&instances().await, "acme")["silent"], false);
    assert_eq!(silent_metric().await, 0.0);
    js.shutdown().await;

    sidecar.terminate();
    let (_, logs) = sidecar.finish().await;
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("WARN") && line.contains("has sent no event"))
        .collect();
    assert_eq!(warnings.len(), 1, "warned once: {logs}");
    assert!(
        warnings[0].contains("acme") && warnings[0].contains("connectionState is open"),
        "{}",
        warnings[0]
    );
    assert!(logs.contains("instance sends events again"), "{logs}");
}
