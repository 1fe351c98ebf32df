//! Idle Engine.IO sessions on the HTTP long-polling transport, for `loadgen idle --transport
//! polling`: per session one keep-alive HTTP/1.1 connection that opens the session (`GET`),
//! joins a namespace (`POST 40/<ns>,`), and then always has one long-poll `GET` waiting,
//! answering each ping `2` with a `POST 3`. That is what an idle socket.io client on
//! polling costs a server: a session, a parked request and its connection.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use evo_bench::now_ns;
use evo_bench::report;
use evo_bench::sio::{self, Packet, Target};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use crate::clients::{ClientStat, Clients, namespace};
use crate::common_args::Common;
use crate::http::HttpSender;

/// Engine.IO's packet separator in a polling payload.
const SEPARATOR: char = '\u{1e}';

struct Session {
    http: HttpSender,
    /// `/socket.io/?EIO=4&transport=polling&sid=...`
    path: String,
    authority: String,
}

impl Session {
    async fn request(&mut self, post: Option<&str>) -> Result<String, String> {
        let builder = hyper::Request::builder()
            .uri(&self.path)
            .header(hyper::header::HOST, &self.authority);
        let request = match post {
            Some(body) => builder
                .method(hyper::Method::POST)
                .header(hyper::header::CONTENT_TYPE, "text/plain;charset=UTF-8")
                .body(Full::new(Bytes::from(body.to_owned()))),
            None => builder.body(Full::new(Bytes::new())),
        }
        .map_err(|err| err.to_string())?;
        let response = self
            .http
            .send_request(request)
            .await
            .map_err(|err| format!("polling request: {err}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| format!("polling body: {err}"))?
            .to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        if !status.is_success() {
            return Err(format!(
                "polling {status}: {}",
                body.chars().take(120).collect::<String>()
            ));
        }
        Ok(body)
    }
}

/// Opens a polling session from `source` and joins `ns`; returns once the CONNECT is answered.
async fn open(
    target: &Target,
    source: Option<std::net::IpAddr>,
    ns: &str,
) -> Result<Session, String> {
    let tcp = target.tcp(source).await?;
    let (http, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|err| format!("http handshake: {err}"))?;
    tokio::spawn(connection);
    let mut path = "/socket.io/?EIO=4&transport=polling".to_owned();
    if !target.apikey.is_empty() {
        path.push_str("&apikey=");
        path.push_str(&target.apikey);
    }
    let mut session = Session {
        http,
        path,
        authority: target.authority.clone(),
    };
    let open = session.request(None).await?;
    let sid = open
        .split("\"sid\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .ok_or_else(|| format!("no sid in the open packet {open:?}"))?
        .to_owned();
    session.path = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
    session.request(Some(&sio::connect_packet(ns))).await?;
    loop {
        let payload = session.request(None).await?;
        for packet in payload.split(SEPARATOR) {
            match sio::parse(packet) {
                Packet::Connect { ns: on, .. } if on == ns => return Ok(session),
                Packet::ConnectError { json, .. } => {
                    return Err(format!("connect_error on {ns}: {json}"));
                }
                Packet::Ping => {
                    session.request(Some("3")).await?;
                }
                Packet::Close => return Err("closed by the server before CONNECT".into()),
                _ => {}
            }
        }
    }
}

/// An open session's idle life: one long poll waiting at all times, pings answered.
async fn hold(mut session: Session, stat: Arc<ClientStat>) {
    'life: while let Ok(payload) = session.request(None).await {
        for packet in payload.split(SEPARATOR) {
            match sio::parse(packet) {
                Packet::Ping if session.request(Some("3")).await.is_err() => break 'life,
                Packet::Close | Packet::Disconnect { .. } => break 'life,
                _ => {}
            }
        }
    }
    stat.gone.store(true, Ordering::Relaxed);
}

/// Opens `count` idle polling sessions, session i on namespace i mod `instances`, with at
/// most `connect_concurrency` being opened at once.
pub async fn connect_polling_clients(
    common: &Common,
    target: &Target,
    count: usize,
    instances: usize,
) -> Clients {
    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    let (report_tx, mut report_rx) = mpsc::unbounded_channel();
    for index in 0..count {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("open semaphore");
        let target = target.clone();
        let instance = index % instances;
        let ns = namespace(&common.instance_prefix, instance);
        let report_tx = report_tx.clone();
        tokio::spawn(async move {
            let begun = now_ns();
            let opened = tokio::time::timeout(
                Duration::from_secs(30),
                open(&target, target.source(index), &ns),
            )
            .await;
            drop(permit);
            let elapsed_us = (now_ns() - begun) / 1000;
            match opened {
                Ok(Ok(session)) => {
                    let stat = Arc::new(ClientStat::default());
                    let _ = report_tx.send((index, Ok((elapsed_us, instance, stat.clone()))));
                    drop(report_tx);
                    hold(session, stat).await;
                }
                Ok(Err(err)) => {
                    let _ = report_tx.send((index, Err(err)));
                }
                Err(_) => {
                    let _ = report_tx.send((index, Err("connect timed out after 30 s".into())));
                }
            }
        });
    }
    drop(report_tx);
    let mut clients = Clients {
        stats: (0..count).map(|_| None).collect(),
        connect_us: report::histogram(),
        connected: 0,
        failed: 0,
        errors: Vec::new(),
        elapsed: Duration::ZERO,
    };
    for _ in 0..count {
        let Some((index, outcome)) = report_rx.recv().await else {
            break;
        };
        match outcome {
            Ok((micros, instance, stat)) => {
                clients.connect_us.saturating_record(micros);
                clients.stats[index] = Some((instance, stat));
                clients.connected += 1;
            }
            Err(err) => {
                clients.failed += 1;
                if clients.errors.len() < 5 {
                    clients.errors.push(err);
                }
            }
        }
    }
    clients.elapsed = started.elapsed();
    clients
}
