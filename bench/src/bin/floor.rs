//! Run with: cargo run --release -p evo-bench --bin floor -- --listen 127.0.0.1:8095
//!
//! The floor: what this machine can do at best for the fan-out job, with no socket.io
//! library, no auth, no filters, no retention. It speaks just enough Engine.IO v4 /
//! Socket.IO v5 over WebSocket for `loadgen`:
//!
//! - `GET /socket.io/?EIO=4&transport=websocket...` (any path and query; the apikey is
//!   ignored): the open packet `0{...}`, then `40/<ns>,{"sid":...}` for any `40/<ns>,`.
//!   No pings are sent (loadgen does not need them).
//! - `POST /webhook...` with a JSON body holding `event` and `instance`: the frame
//!   `42/<instance>,["<event>",<body>]` is encoded once and queued to every socket of
//!   `/<instance>`; answered `200 {"ok":true}` (keep-alive). A socket whose queue (4,096
//!   frames) is full misses the frame, as in evo-realtime.
//!
//! A connection's first bytes tell the two apart (`GET ` or anything else).

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

#[derive(Parser)]
#[command(about = "Floor server: the least work a webhook-to-socket.io fan-out can do")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8095")]
    listen: SocketAddr,
}

/// Frames queued per socket.
const QUEUE: usize = 4096;

/// One socket's frame queue, with its connection id.
type Queue = (u64, mpsc::Sender<Utf8Bytes>);

/// The sockets of each namespace (`/acme`).
#[derive(Default)]
struct Registry {
    namespaces: Mutex<HashMap<String, Vec<Queue>>>,
    dropped: AtomicU64,
}

impl Registry {
    fn join(&self, namespace: &str, id: u64, queue: mpsc::Sender<Utf8Bytes>) {
        let mut namespaces = self.namespaces.lock().unwrap_or_else(|e| e.into_inner());
        namespaces
            .entry(namespace.to_owned())
            .or_default()
            .push((id, queue));
    }

    fn leave(&self, namespace: &str, id: u64) {
        let mut namespaces = self.namespaces.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sockets) = namespaces.get_mut(namespace) {
            sockets.retain(|(socket, _)| *socket != id);
            if sockets.is_empty() {
                namespaces.remove(namespace);
            }
        }
    }

    /// Queues `frame` to every socket of `namespace`.
    fn publish(&self, namespace: &str, frame: Utf8Bytes) {
        let mut dropped = 0;
        {
            let namespaces = self.namespaces.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(sockets) = namespaces.get(namespace) {
                for (_, queue) in sockets {
                    if queue.try_send(frame.clone()).is_err() {
                        dropped += 1;
                    }
                }
            }
        }
        if dropped > 0 {
            let before = self.dropped.fetch_add(dropped, Ordering::Relaxed);
            if before == 0 {
                eprintln!("floor: full socket queues: frames dropped (first drop on {namespace})");
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let listener = match listen(args.listen) {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("floor: cannot listen on {}: {err}", args.listen);
            std::process::exit(1);
        }
    };
    eprintln!("floor: listening on {}", args.listen);
    let registry = Arc::new(Registry::default());
    let mut next_id = 0u64;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors, most likely: wait instead of spinning.
                eprintln!("floor: accept: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        next_id += 1;
        let id = next_id;
        let registry = registry.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            match first_bytes(&stream).await {
                Some(true) => socket(stream, id, &registry).await,
                Some(false) => webhooks(stream, &registry).await,
                None => {}
            }
        });
    }
}

/// A listener with a 1,024-connection backlog (tokio's `bind` uses 128, which drops SYNs
/// when hundreds of clients connect at once).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// `Some(true)` for a `GET ` (WebSocket upgrade), `Some(false)` for anything else, `None`
/// if the peer went away first.
async fn first_bytes(stream: &TcpStream) -> Option<bool> {
    let mut head = [0u8; 4];
    loop {
        let n = stream.peek(&mut head).await.ok()?;
        if n == 0 {
            return None;
        }
        if n == head.len() {
            return Some(&head == b"GET ");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// One socket.io client: namespace CONNECTs in, queued frames out.
async fn socket(stream: TcpStream, id: u64, registry: &Registry) {
    let config = WebSocketConfig::default().read_buffer_size(1024);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let sid = format!("{id:016x}");
    let open = format!(
        r#"0{{"sid":"{sid}","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}}"#
    );
    if ws.send(Message::text(open)).await.is_err() {
        return;
    }
    let (queue, mut frames) = mpsc::channel::<Utf8Bytes>(QUEUE);
    let mut joined: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            frame = frames.recv() => {
                let Some(frame) = frame else { break };
                if ws.feed(Message::Text(frame)).await.is_err() {
                    break;
                }
                let mut failed = false;
                while let Ok(frame) = frames.try_recv() {
                    if ws.feed(Message::Text(frame)).await.is_err() {
                        failed = true;
                        break;
                    }
                }
                if failed || ws.flush().await.is_err() {
                    break;
                }
            }
            message = ws.next() => {
                let text = match message {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => continue,
                };
                if let Some(rest) = text.as_str().strip_prefix("40") {
                    let namespace = namespace_of(rest);
                    if !joined.iter().any(|ns| ns == namespace) {
                        registry.join(namespace, id, queue.clone());
                        joined.push(namespace.to_owned());
                    }
                    let reply = if namespace == "/" {
                        format!(r#"40{{"sid":"{sid}"}}"#)
                    } else {
                        format!(r#"40{namespace},{{"sid":"{sid}"}}"#)
                    };
                    if ws.send(Message::text(reply)).await.is_err() {
                        break;
                    }
                } else if let Some(rest) = text.as_str().strip_prefix("41") {
                    let namespace = namespace_of(rest);
                    registry.leave(namespace, id);
                    joined.retain(|ns| ns != namespace);
                }
                // `3` (pong) and everything else: ignored.
            }
        }
    }
    for namespace in joined {
        registry.leave(&namespace, id);
    }
}

/// `/acme` from what follows `40` in `40/acme,{...}`; `/` when no namespace is given.
fn namespace_of(rest: &str) -> &str {
    if rest.starts_with('/') {
        rest.split(',').next().unwrap_or("/")
    } else {
        "/"
    }
}

/// The fields a webhook is routed by; the rest of the body is skipped, not kept.
#[derive(Deserialize)]
struct Routing<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    instance: Cow<'a, str>,
}

/// Keep-alive HTTP/1.1: `POST /webhook...` publishes, anything else is 404.
async fn webhooks(mut stream: TcpStream, registry: &Registry) {
    let mut buffer: Vec<u8> = Vec::with_capacity(4096);
    loop {
        // The request head.
        let (head_len, body_len, is_webhook) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut request = httparse::Request::new(&mut headers);
            match request.parse(&buffer) {
                Ok(httparse::Status::Complete(head_len)) => {
                    let body_len = request
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| std::str::from_utf8(h.value).ok())
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    let is_webhook = request.method == Some("POST")
                        && request.path.is_some_and(|p| p.starts_with("/webhook"));
                    break (head_len, body_len, is_webhook);
                }
                Ok(httparse::Status::Partial) => {
                    if !read_more(&mut stream, &mut buffer).await {
                        return;
                    }
                }
                Err(_) => {
                    let _ = stream
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                }
            }
        };
        while buffer.len() < head_len + body_len {
            if !read_more(&mut stream, &mut buffer).await {
                return;
            }
        }
        let body = &buffer[head_len..head_len + body_len];
        let answer: &[u8] = if !is_webhook {
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
        } else if publish(registry, body) {
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}"
        } else {
            b"HTTP/1.1 422 Unprocessable Entity\r\ncontent-length: 0\r\n\r\n"
        };
        if stream.write_all(answer).await.is_err() {
            return;
        }
        buffer.drain(..head_len + body_len);
    }
}

async fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> bool {
    if buffer.capacity() - buffer.len() < 1024 {
        buffer.reserve(buffer.capacity().max(4096));
    }
    matches!(stream.read_buf(buffer).await, Ok(n) if n > 0)
}

/// Encodes the frame once and queues it to the namespace's sockets. `false` for a body
/// without `event` and `instance`.
fn publish(registry: &Registry, body: &[u8]) -> bool {
    let Ok(routing) = serde_json::from_slice::<Routing>(body) else {
        return false;
    };
    let Ok(body) = std::str::from_utf8(body) else {
        return false;
    };
    let namespace = format!("/{}", routing.instance);
    let event = serde_json::to_string(&routing.event).expect("a string serializes");
    let mut frame = String::with_capacity(body.len() + namespace.len() + event.len() + 8);
    frame.push_str("42");
    frame.push_str(&namespace);
    frame.push_str(",[");
    frame.push_str(&event);
    frame.push(',');
    frame.push_str(body);
    frame.push(']');
    registry.publish(&namespace, Utf8Bytes::from(frame));
    true
}
