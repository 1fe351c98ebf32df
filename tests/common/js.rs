//! A driver for the official JavaScript socket.io-client: one `node tests/js/driver.js`
//! process hosting any number of clients, told what to do and reporting back as JSON lines.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use super::wait::{PATIENCE, eventually_value};

/// One `node tests/js/driver.js` process hosting any number of clients.
pub struct JsDriver {
    child: Child,
    stdin: ChildStdin,
    reports: mpsc::UnboundedReceiver<Value>,
    /// Reports read but not yet matched by a wait.
    pending: Vec<Value>,
    next_request: usize,
}

impl JsDriver {
    pub async fn start() -> Self {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js");
        assert!(
            dir.join("node_modules/socket.io-client").is_dir(),
            "socket.io-client is not installed: run `tests/setup.sh`"
        );
        let mut child = Command::new("node")
            .arg(dir.join("driver.js"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node is installed");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, reports) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(report) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(report);
                }
            }
        });
        Self {
            child,
            stdin,
            reports,
            pending: Vec::new(),
            next_request: 0,
        }
    }

    async fn send(&mut self, command: Value) {
        let mut line = command.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// Opens a client; `opts` are socket.io-client options (`transports`, `query`, `auth`, ...).
    pub async fn open(&mut self, id: &str, url: &str, opts: Value) {
        self.send(json!({"op": "connect", "id": id, "url": url, "opts": opts}))
            .await;
    }

    /// Opens a client that opts in to recovery: `auth` gets `offset` (the last one seen,
    /// `""` at first), re-evaluated at every reconnect.
    pub async fn open_recovering(&mut self, id: &str, url: &str, opts: Value) {
        self.send(json!({"op": "connect", "id": id, "url": url, "opts": opts, "recover": true}))
            .await;
    }

    /// Like [`Self::open_recovering`], starting from a given offset.
    pub async fn open_from(&mut self, id: &str, url: &str, opts: Value, offset: &str) {
        self.send(json!({"op": "connect", "id": id, "url": url, "opts": opts, "recover": offset}))
            .await;
    }

    /// A quiet, recovering client: it counts `data.n` of its events instead of reporting them.
    pub async fn open_counting(&mut self, id: &str, url: &str, opts: Value) {
        self.send(json!({"op": "connect", "id": id, "url": url, "opts": opts, "recover": true, "quiet": true}))
            .await;
    }

    /// A quiet client that does not opt in: it counts `data.n` of its one-argument events.
    pub async fn open_quiet(&mut self, id: &str, url: &str, opts: Value) {
        self.send(json!({"op": "connect", "id": id, "url": url, "opts": opts, "quiet": true}))
            .await;
    }

    /// What a quiet client counted: `count`, `unique`, `ordered`, `recoveries`, `connects`.
    pub async fn summary(&mut self, id: &str) -> Value {
        self.send(json!({"op": "summary", "id": id})).await;
        let id = id.to_owned();
        self.wait(move |r| r["id"] == id && r["type"] == "summary")
            .await
    }

    /// Waits (up to 30 s in all) until every quiet counting client has every one of
    /// `total` events, asserting none missed, none twice and all in order; returns the
    /// reconnects.
    pub async fn assert_all_delivered(&mut self, clients: &[String], total: u64) -> u64 {
        let patience = Duration::from_secs(30);
        let started = tokio::time::Instant::now();
        let mut reconnects = 0;
        for id in clients {
            let what = format!("{id} gets all {total} events");
            let left = patience.saturating_sub(started.elapsed());
            let summary = eventually_value(&what, left, async || {
                let summary = self.summary(id).await;
                if summary["unique"] == total {
                    Ok(summary)
                } else {
                    Err(format!("{id} missed events: {summary}"))
                }
            })
            .await;
            assert_eq!(summary["unique"], total, "{id} missed events: {summary}");
            assert_eq!(summary["count"], total, "{id} got duplicates: {summary}");
            assert_eq!(summary["ordered"], true, "{id}: {summary}");
            reconnects += summary["connects"].as_u64().unwrap() - 1;
        }
        reconnects
    }

    /// Drops a client's transport; with `reconnection: true` it comes back by itself.
    pub async fn blink(&mut self, id: &str) {
        self.send(json!({"op": "blink", "id": id})).await;
        let id = id.to_owned();
        self.wait(move |r| r["id"] == id && r["type"] == "blinked")
            .await;
    }

    pub async fn churn(&mut self, id: &str, min_ms: u64, max_ms: u64) {
        self.send(json!({"op": "churn", "id": id, "min": min_ms, "max": max_ms}))
            .await;
    }

    pub async fn stop_churn(&mut self, id: &str) {
        self.send(json!({"op": "stop_churn", "id": id})).await;
    }

    /// Takes every report received so far for which `matches` holds (none are awaited).
    pub fn drain_matching(&mut self, matches: impl Fn(&Value) -> bool) -> Vec<Value> {
        while let Ok(report) = self.reports.try_recv() {
            self.pending.push(report);
        }
        let (taken, kept): (Vec<Value>, Vec<Value>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|r| matches(r));
        self.pending = kept;
        taken
    }

    /// Opens a client and waits until it is connected or refused; returns the report.
    pub async fn connect(&mut self, id: &str, url: &str, opts: Value) -> Value {
        self.open(id, url, opts).await;
        self.wait_connected(id).await
    }

    pub async fn wait_connected(&mut self, id: &str) -> Value {
        let id = id.to_owned();
        self.wait(move |r| {
            r["id"] == id && (r["type"] == "connect" || r["type"] == "connect_error")
        })
        .await
    }

    pub async fn close(&mut self, id: &str) {
        self.send(json!({"op": "close", "id": id})).await;
        let id = id.to_owned();
        self.wait(move |r| r["id"] == id && r["type"] == "closed")
            .await;
    }

    /// Emits with an ack and returns the ack's arguments (parsed).
    pub async fn emit_ack(&mut self, id: &str, event: &str, args: Vec<Value>) -> Value {
        let req = self.start_emit(id, event, args).await;
        self.wait_ack(req).await
    }

    /// Emits with an ack without waiting for it; [`Self::wait_ack`] collects it.
    pub async fn start_emit(&mut self, id: &str, event: &str, args: Vec<Value>) -> String {
        self.next_request += 1;
        let req = format!("r{}", self.next_request);
        self.send(json!({"op": "emit", "id": id, "req": req, "event": event, "args": args, "ack": true, "timeout": 15000}))
            .await;
        req
    }

    pub async fn wait_ack(&mut self, req: String) -> Value {
        let report = self
            .wait(move |r| r["req"] == req && (r["type"] == "ack" || r["type"] == "ack_timeout"))
            .await;
        assert_eq!(report["type"], "ack", "no ack: {report}");
        serde_json::from_str(report["text"].as_str().unwrap()).unwrap()
    }

    /// Emits without an ack.
    pub async fn emit(&mut self, id: &str, event: &str, args: Vec<Value>) {
        self.next_request += 1;
        let req = format!("r{}", self.next_request);
        self.send(
            json!({"op": "emit", "id": id, "req": req, "event": event, "args": args, "ack": false}),
        )
        .await;
        self.wait(move |r| r["req"] == req && r["type"] == "emitted")
            .await;
    }

    /// Evolution's own emit of a fixture, computed by the reference algorithm in Node.
    pub async fn expected(&mut self, path: &std::path::Path) -> String {
        let file = path.to_string_lossy().into_owned();
        self.send(json!({"op": "expect", "file": file})).await;
        let report = self
            .wait(move |r| r["type"] == "expected" && r["file"] == file)
            .await;
        report["text"].as_str().unwrap().to_owned()
    }

    /// Waits for an event on a client; returns `(event, JSON text of the arguments)`.
    pub async fn next_event(&mut self, id: &str) -> (String, String) {
        let id = id.to_owned();
        let report = self
            .wait(move |r| r["id"] == id && r["type"] == "event")
            .await;
        (
            report["event"].as_str().unwrap().to_owned(),
            report["text"].as_str().unwrap().to_owned(),
        )
    }

    /// Waits for the first report matching `matches`, keeping the others for later waits.
    pub async fn wait(&mut self, matches: impl Fn(&Value) -> bool) -> Value {
        self.wait_for(matches, PATIENCE)
            .await
            .unwrap_or_else(|| panic!("timed out; unmatched reports: {:#?}", self.pending))
    }

    pub async fn wait_for(
        &mut self,
        matches: impl Fn(&Value) -> bool,
        patience: Duration,
    ) -> Option<Value> {
        if let Some(index) = self.pending.iter().position(&matches) {
            return Some(self.pending.remove(index));
        }
        let reports = &mut self.reports;
        let pending = &mut self.pending;
        let received = tokio::time::timeout(patience, async {
            while let Some(report) = reports.recv().await {
                if matches(&report) {
                    return Some(report);
                }
                pending.push(report);
            }
            None
        });
        received.await.ok().flatten()
    }

    /// Asserts that no event reaches client `id` within `quiet`.
    pub async fn assert_no_event(&mut self, id: &str, quiet: Duration) {
        let id = id.to_owned();
        let got = self
            .wait_for(move |r| r["id"] == id && r["type"] == "event", quiet)
            .await;
        assert!(got.is_none(), "unexpected event: {got:?}");
    }

    pub async fn shutdown(mut self) {
        drop(self.stdin);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// socket.io-client options for one transport with a key in the query.
pub fn with_key(transport: &str, key: &str) -> Value {
    json!({"transports": [transport], "query": {"apikey": key}})
}
