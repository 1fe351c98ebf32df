//! The webhook sender of `fanout`: a [`Plan`] shared by K keep-alive connections, each
//! claiming the next sequence number, waiting for its slot in the schedule (or not, at
//! `--rate 0`), POSTing a unique Evolution-like body and counting the answer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use evo_bench::now_ns;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;

use crate::http::open_http;

/// Shared by the webhook connections.
pub struct Plan {
    /// The next webhook's sequence number; also its slot in the schedule.
    pub next: AtomicU64,
    pub start: Instant,
    pub end: Instant,
    /// `None`: as fast as possible.
    pub interval: Option<Duration>,
    pub instances: u64,
    pub prefix: String,
    pub event: String,
    pub path: String,
    pub authority: String,
    pub pad: String,
    /// Accepted webhooks per namespace.
    pub accepted: Vec<AtomicU64>,
    /// If set, a bitmap of the accepted sequence numbers (`soak` checks each client against
    /// exactly these; a webhook that failed in transport may or may not have been emitted).
    pub accepted_seqs: Option<Mutex<Vec<u64>>>,
    /// Webhooks answered 200 with `"duplicate":true` (must stay 0: bodies are unique).
    pub duplicates: AtomicU64,
    /// Other statuses, by status.
    pub rejected: Mutex<BTreeMap<u16, u64>>,
    /// Transport errors (the connection is then opened again).
    pub errors: AtomicU64,
    pub first_error: Mutex<Option<String>>,
    pub post_us: Mutex<Histogram<u64>>,
    /// `now_ns` when the last response arrived.
    pub last_response_ns: AtomicU64,
    /// Largest delay of a send behind its slot in the schedule, in µs.
    pub max_lag_us: AtomicU64,
}

impl Plan {
    pub fn body(&self, seq: u64, sent_ns: u64) -> String {
        let instance = seq % self.instances;
        format!(
            concat!(
                r#"{{"event":"{event}","instance":"{prefix}{instance}","#,
                r#""data":{{"seq":{seq},"sent_ns":{sent_ns},"#,
                r#""key":{{"remoteJid":"5511900000000@s.whatsapp.net","fromMe":false,"id":"BENCH{seq:016X}"}},"#,
                r#""pushName":"bench","pad":"{pad}"}},"#,
                r#""server_url":"http://127.0.0.1:8080","date_time":"2026-01-01T00:00:00.000Z","#,
                r#""sender":"5511900000000@s.whatsapp.net","apikey":null}}"#
            ),
            event = self.event,
            prefix = self.prefix,
            instance = instance,
            seq = seq,
            sent_ns = sent_ns,
            pad = self.pad,
        )
    }

    pub fn note_error(&self, err: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(err);
    }
}

/// One keep-alive connection's loop: claim the next slot, wait for its time (fixed rate),
/// POST, count the answer; reconnect after a transport error.
pub async fn post_webhooks(plan: Arc<Plan>, addr: std::net::SocketAddr) {
    'connection: loop {
        if Instant::now() >= plan.end {
            return;
        }
        let mut sender = match open_http(addr).await {
            Ok(sender) => sender,
            Err(err) => {
                plan.note_error(err);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        loop {
            let seq = plan.next.fetch_add(1, Ordering::Relaxed);
            if let Some(interval) = plan.interval {
                let due = plan.start + interval.mul_f64(seq as f64);
                if due >= plan.end {
                    return;
                }
                tokio::time::sleep_until(due).await;
                let lag = Instant::now().saturating_duration_since(due).as_micros() as u64;
                plan.max_lag_us.fetch_max(lag, Ordering::Relaxed);
            } else if Instant::now() >= plan.end {
                return;
            }
            if sender.ready().await.is_err() {
                plan.note_error("connection closed".to_owned());
                continue 'connection;
            }
            let sent_ns = now_ns();
            let body = plan.body(seq, sent_ns);
            let request = hyper::Request::post(plan.path.as_str())
                .header(hyper::header::HOST, plan.authority.as_str())
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .expect("valid request");
            let response = match sender.send_request(request).await {
                Ok(response) => response,
                Err(err) => {
                    plan.note_error(format!("POST: {err}"));
                    continue 'connection;
                }
            };
            let status = response.status().as_u16();
            let answer = match response.into_body().collect().await {
                Ok(body) => body.to_bytes(),
                Err(err) => {
                    plan.note_error(format!("response body: {err}"));
                    continue 'connection;
                }
            };
            let done = now_ns();
            plan.post_us
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .saturating_record((done - sent_ns) / 1000);
            plan.last_response_ns.fetch_max(done, Ordering::Relaxed);
            if status != 200 {
                *plan
                    .rejected
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(status)
                    .or_default() += 1;
            } else if contains(&answer, b"\"duplicate\":true") {
                plan.duplicates.fetch_add(1, Ordering::Relaxed);
            } else {
                plan.accepted[(seq % plan.instances) as usize].fetch_add(1, Ordering::Relaxed);
                if let Some(seqs) = &plan.accepted_seqs {
                    set_bit(&mut seqs.lock().unwrap_or_else(|e| e.into_inner()), seq);
                }
            }
        }
    }
}

/// Sets bit `n` of a growable bitmap; returns whether it was already set.
pub fn set_bit(bits: &mut Vec<u64>, n: u64) -> bool {
    let (word, bit) = ((n / 64) as usize, 1u64 << (n % 64));
    if bits.len() <= word {
        bits.resize(word + 1, 0);
    }
    let was = bits[word] & bit != 0;
    bits[word] |= bit;
    was
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
