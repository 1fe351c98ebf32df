//! python-socketio, as the README shows it to Python users (bots, scripts): the plain client
//! with the key in a header, and the recovering client with an `auth` callable.
//!
//! Needs `tests/py/.venv`, which `tests/setup.sh` (part of the README's test command) makes.

mod common;

use std::path::PathBuf;
use std::process::Stdio;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

/// `tests/py/client.py` under the venv's interpreter, reporting JSON lines.
struct PyClient {
    _child: Child,
    stdin: Option<ChildStdin>,
    reports: mpsc::UnboundedReceiver<Value>,
}

impl PyClient {
    fn start(args: &[&str]) -> Self {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py");
        let python = dir.join(".venv/bin/python");
        assert!(
            python.is_file(),
            "python-socketio is not installed: run `tests/setup.sh`"
        );
        let mut child = Command::new(python)
            .arg(dir.join("client.py"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("the venv's python runs");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, reports) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Value>(&line) {
                    Ok(report) => {
                        let _ = tx.send(report);
                    }
                    Err(_) => eprintln!("client.py: {line}"),
                }
            }
        });
        Self {
            _child: child,
            stdin,
            reports,
        }
    }

    /// The next report; panics after [`PATIENCE`].
    async fn next(&mut self) -> Value {
        tokio::time::timeout(PATIENCE, self.reports.recv())
            .await
            .expect("client.py reported in time")
            .expect("client.py is running")
    }

    /// Skips reports until one of type `kind`.
    async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let report = self.next().await;
            if report["type"] == kind {
                return report;
            }
            assert_ne!(report["type"], "connect_failed", "{report}");
        }
    }

    async fn command(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
    }
}

#[tokio::test]
async fn the_readme_client_gets_evolutions_events_with_a_token_in_a_header() {
    let evolution = FakeEvolution::start().await;
    let mut js = JsDriver::start().await;
    let fixture = fixtures_dir().join("messages-upsert.json");
    let body: Value = serde_json::from_str(&fixture_text(&fixture)).unwrap();
    let instance = body["instance"].as_str().unwrap().to_owned();
    // Evolution's own emit of the fixture (the argument socket.io-client receives from it).
    let expected: Value = serde_json::from_str(&js.expected(&fixture).await).unwrap();

    for transport in ["websocket", "polling"] {
        // A fresh app each time: the same fixture again would be a duplicate.
        let app = spawn_app(test_config(&evolution.url())).await;
        let namespace = format!("/{instance}");
        let mut py = PyClient::start(&["plain", &app.url(""), &namespace, GLOBAL_KEY, transport]);
        let ready = py.next_of("ready").await;
        assert_eq!(ready["transport"], transport);
        let (status, _) = post_webhook(&app.webhook_url(), fixture_text(&fixture)).await;
        assert_eq!(status, 200);
        let event = py.next_of("event").await;
        assert_eq!(event["event"], "messages.upsert");
        // The one-argument handler of the README was called with Evolution's payload.
        assert_eq!(
            event["args"],
            Value::Array(vec![expected.clone()]),
            "{transport}"
        );
        // A second webhook: dedupe must not eat a distinct body.
        let mut again = body.clone();
        again["data"]["key"]["id"] = Value::from(format!("PY-{transport}"));
        post_webhook(&app.webhook_url(), again.to_string()).await;
        let event = py.next_of("event").await;
        assert_eq!(
            event["args"][0]["data"]["key"]["id"],
            format!("PY-{transport}")
        );
    }

    // An instance token in the header reaches its own instance and nothing else.
    let app = spawn_app(test_config(&evolution.url())).await;
    let mut own = PyClient::start(&["plain", &app.url(""), "/acme", ACME_TOKEN, "websocket"]);
    own.next_of("ready").await;
    let mut other = PyClient::start(&["plain", &app.url(""), "/other", ACME_TOKEN, "websocket"]);
    let refused = other.next().await;
    assert!(
        refused["type"] == "connect_error" || refused["type"] == "connect_failed",
        "{refused}"
    );
    post_webhook(&app.webhook_url(), event_body("messages.upsert", "acme", 7)).await;
    assert_eq!(own.next_of("event").await["args"][0]["data"]["n"], 7);
    js.shutdown().await;
}

#[tokio::test]
async fn the_readme_recovering_client_gets_what_it_missed_after_a_drop() {
    let evolution = FakeEvolution::start().await;
    let app = spawn_app(test_config(&evolution.url())).await;
    let mut py = PyClient::start(&["recover", &app.url(""), "/acme", GLOBAL_KEY]);
    py.next_of("ready").await;
    let post = |n: u64| {
        let url = app.webhook_url();
        async move {
            let (status, _) = post_webhook(&url, event_body("messages.upsert", "acme", n)).await;
            assert_eq!(status, 200);
        }
    };

    for n in 0..5 {
        post(n).await;
    }
    let mut last_offset = String::new();
    for n in 0..5 {
        let event = py.next_of("event").await;
        assert_eq!(event["n"], n, "live events in order, with their offset");
        last_offset = event["offset"].as_str().unwrap().to_owned();
    }

    // The transport drops; the client reconnects by itself 3 s later, meanwhile 10 events.
    py.command("blink").await;
    py.next_of("disconnected").await;
    for n in 5..15 {
        post(n).await;
    }
    let connected = py.next_of("connected").await;
    assert_eq!(
        connected["offset"], last_offset,
        "the auth callable was called again"
    );
    let recovery = py.next_of("recovery").await;
    assert_eq!(recovery["info"]["recovered"], true, "{recovery}");
    assert_eq!(recovery["info"]["replayed"], 10, "{recovery}");
    assert_eq!(recovery["info"]["from"], last_offset.as_str());
    for n in 5..15 {
        assert_eq!(py.next_of("event").await["n"], n, "replayed in order");
    }
    post(15).await;
    assert_eq!(py.next_of("event").await["n"], 15, "then live again");
}

fn fixture_text(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap()
}
