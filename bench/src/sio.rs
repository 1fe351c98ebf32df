//! Run with: used by `loadgen` (`cargo run --release -p evo-bench --bin loadgen -- --help`).
//!
//! The client half of Engine.IO v4 / Socket.IO v5 over a raw WebSocket, as little of it as a
//! load generator needs: open `ws://host/socket.io/?EIO=4&transport=websocket&apikey=KEY`, read
//! the open packet `0{...}`, send `40/<ns>,`, wait for `40/<ns>,{"sid":...}`, answer pings
//! (`2` → `3`) and classify text packets without parsing their JSON. A CONNECT may carry an
//! `auth` object (recovery: `{"apikey":...,"offset":...}`). No polling transport, no
//! automatic reconnection, no binary packets.

use std::net::{IpAddr, SocketAddr};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// One client connection.
pub type Ws = WebSocketStream<TcpStream>;

/// Where and how clients connect.
#[derive(Debug, Clone)]
pub struct Target {
    /// The server's address, resolved once.
    pub addr: SocketAddr,
    /// `host:port` as given in the URL, for `Host` headers and the WebSocket URL.
    pub authority: String,
    /// Sent as `?apikey=`; empty means no key.
    pub apikey: String,
    /// Local addresses client *i* binds to, round-robin (empty: the kernel's choice). The
    /// kernel has ~28,000 ephemeral ports per (source, destination) pair, so 50,000
    /// connections to one server need at least two loopback sources.
    pub sources: Vec<IpAddr>,
}

impl Target {
    /// From a base URL such as `http://127.0.0.1:8093` (a path, if any, is ignored).
    pub fn from_url(url: &str, apikey: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("ws://"))
            .ok_or_else(|| format!("{url:?}: only http:// or ws:// URLs are supported"))?;
        let authority = rest.split('/').next().unwrap_or_default().to_owned();
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&authority)
            .map_err(|err| format!("{authority:?}: {err}"))?
            .next()
            .ok_or_else(|| format!("{authority:?}: no address"))?;
        Ok(Self {
            addr,
            authority,
            apikey: apikey.to_owned(),
            sources: Vec::new(),
        })
    }

    /// The local address client `index` binds to, if sources are set.
    pub fn source(&self, index: usize) -> Option<IpAddr> {
        (!self.sources.is_empty()).then(|| self.sources[index % self.sources.len()])
    }

    /// A TCP connection to the server from `source` (any port), with `TCP_NODELAY`.
    pub async fn tcp(&self, source: Option<IpAddr>) -> Result<TcpStream, String> {
        let tcp = match source {
            None => TcpStream::connect(self.addr).await,
            Some(ip) => {
                let socket = if ip.is_ipv4() {
                    TcpSocket::new_v4()
                } else {
                    TcpSocket::new_v6()
                }
                .map_err(|err| format!("socket: {err}"))?;
                socket
                    .bind(SocketAddr::new(ip, 0))
                    .map_err(|err| format!("bind {ip}: {err}"))?;
                socket.connect(self.addr).await
            }
        }
        .map_err(|err| format!("tcp connect: {err}"))?;
        tcp.set_nodelay(true)
            .map_err(|err| format!("nodelay: {err}"))?;
        Ok(tcp)
    }

    fn socket_url(&self) -> String {
        let mut url = format!(
            "ws://{}/socket.io/?EIO=4&transport=websocket",
            self.authority
        );
        if !self.apikey.is_empty() {
            url.push_str("&apikey=");
            url.push_str(&self.apikey);
        }
        url
    }
}

/// Small buffers: a client reads one event at a time, and 10,000 of them share one core.
/// Writes (pongs, emits) go out at once.
pub fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// Opens a WebSocket, reads the Engine.IO open packet and joins `namespace` (`/acme`, or `/`).
/// Returns once the server answered the CONNECT; a CONNECT_ERROR is an `Err` with its text.
pub async fn connect(target: &Target, namespace: &str) -> Result<Ws, String> {
    connect_with_auth(target, namespace, None).await
}

/// [`connect`], with `auth` (a JSON object) in the CONNECT packet.
pub async fn connect_with_auth(
    target: &Target,
    namespace: &str,
    auth: Option<&str>,
) -> Result<Ws, String> {
    connect_from(target, None, namespace, auth).await
}

/// [`connect_with_auth`] from a given local address ([`Target::source`]).
pub async fn connect_from(
    target: &Target,
    source: Option<IpAddr>,
    namespace: &str,
    auth: Option<&str>,
) -> Result<Ws, String> {
    let tcp = target.tcp(source).await?;
    let (mut ws, _response) = tokio_tungstenite::client_async_with_config(
        target.socket_url(),
        tcp,
        Some(client_config()),
    )
    .await
    .map_err(|err| format!("websocket handshake: {err}"))?;

    let open = next_text(&mut ws).await?;
    if !open.starts_with('0') {
        return Err(format!("expected the open packet, got {}", clip(&open)));
    }
    let mut packet = connect_packet(namespace);
    if let Some(auth) = auth {
        packet.push_str(auth);
    }
    ws.send(Message::text(packet))
        .await
        .map_err(|err| format!("send CONNECT: {err}"))?;
    loop {
        let text = next_text(&mut ws).await?;
        match parse(&text) {
            Packet::Connect { ns, .. } if ns == namespace => return Ok(ws),
            Packet::ConnectError { ns, json } if ns == namespace => {
                return Err(format!("connect_error on {ns}: {}", clip(json)));
            }
            Packet::Ping => ws
                .send(Message::text("3"))
                .await
                .map_err(|err| format!("send pong: {err}"))?,
            Packet::Close => return Err("closed by the server before CONNECT".to_owned()),
            _ => {}
        }
    }
}

/// The next text message, skipping WebSocket control frames.
pub async fn next_text(ws: &mut Ws) -> Result<String, String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => return Ok(text.as_str().to_owned()),
            Some(Ok(Message::Close(frame))) => return Err(format!("websocket closed: {frame:?}")),
            Some(Ok(_)) => continue,
            Some(Err(err)) => return Err(format!("websocket: {err}")),
            None => return Err("connection ended".to_owned()),
        }
    }
}

/// `40/acme,` (or `40` for `/`).
pub fn connect_packet(namespace: &str) -> String {
    if namespace == "/" {
        "40".to_owned()
    } else {
        format!("40{namespace},")
    }
}

/// The `auth` of a client that opts in to recovery: the key, and the last offset it saw
/// (`""`: from now on).
pub fn recovery_auth(apikey: &str, offset: &str) -> String {
    serde_json::json!({"apikey": apikey, "offset": offset}).to_string()
}

/// The offset a recovering client's event carries as its last argument
/// (`["event",{...},"<epoch>-<seq>"]`), without parsing the JSON; `None` if the last
/// argument is not a plain string.
pub fn trailing_offset(json: &str) -> Option<&str> {
    let inner = json.trim_end().strip_suffix(']')?.trim_end();
    let inner = inner.strip_suffix('"')?;
    let open = inner.rfind('"')?;
    let offset = &inner[open + 1..];
    let before = inner[..open].trim_end();
    // Offsets need no escaping: a backslash means this is the tail of another string.
    (before.ends_with(',') && !offset.contains('\\')).then_some(offset)
}

/// An EVENT packet: `42/acme,17["name",arg]` (no `/acme,` on `/`, no id without an ack).
pub fn event_packet(namespace: &str, ack_id: Option<u64>, json_array: &str) -> String {
    let mut packet = String::with_capacity(json_array.len() + namespace.len() + 24);
    packet.push_str("42");
    if namespace != "/" {
        packet.push_str(namespace);
        packet.push(',');
    }
    if let Some(id) = ack_id {
        packet.push_str(&id.to_string());
    }
    packet.push_str(json_array);
    packet
}

/// A text packet, classified. JSON payloads are left unparsed.
#[derive(Debug, PartialEq, Eq)]
pub enum Packet<'a> {
    /// Engine.IO ping (`2`): answer `3`.
    Ping,
    /// Engine.IO close (`1`).
    Close,
    /// Socket.IO CONNECT acknowledged (`40/ns,{"sid":...}`).
    Connect { ns: &'a str, json: &'a str },
    /// Socket.IO DISCONNECT of one namespace (`41/ns,`).
    Disconnect { ns: &'a str },
    /// Socket.IO EVENT (`42/ns,[...]`).
    Event {
        ns: &'a str,
        ack_id: Option<u64>,
        json: &'a str,
    },
    /// Socket.IO ACK (`43/ns,17[...]`).
    Ack {
        ns: &'a str,
        ack_id: Option<u64>,
        json: &'a str,
    },
    /// Socket.IO CONNECT_ERROR (`44/ns,{...}`).
    ConnectError { ns: &'a str, json: &'a str },
    /// Anything else (pong, noop, binary packets, ...).
    Other,
}

/// Classifies one WebSocket text message.
pub fn parse(text: &str) -> Packet<'_> {
    let bytes = text.as_bytes();
    match bytes.first() {
        Some(b'2') => return Packet::Ping,
        Some(b'1') => return Packet::Close,
        Some(b'4') => {}
        _ => return Packet::Other,
    }
    let Some(&kind) = bytes.get(1) else {
        return Packet::Other;
    };
    let mut rest = &text[2..];
    let ns = if rest.starts_with('/') {
        match rest.find(',') {
            Some(comma) => {
                let ns = &rest[..comma];
                rest = &rest[comma + 1..];
                ns
            }
            None => std::mem::take(&mut rest),
        }
    } else {
        "/"
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let ack_id = rest[..digits].parse().ok();
    let json = &rest[digits..];
    match kind {
        b'0' => Packet::Connect { ns, json },
        b'1' => Packet::Disconnect { ns },
        b'2' => Packet::Event { ns, ack_id, json },
        b'3' => Packet::Ack { ns, ack_id, json },
        b'4' => Packet::ConnectError { ns, json },
        _ => Packet::Other,
    }
}

/// The unsigned integer after the first `needle` (such as `"seq":`) in `json`, without
/// parsing the JSON: the fields the load generator reads come first in `data`.
pub fn u64_after(json: &str, needle: &str) -> Option<u64> {
    let start = json.find(needle)? + needle.len();
    let rest = json[start..].trim_start();
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    rest[..digits].parse().ok()
}

fn clip(text: &str) -> &str {
    let mut end = text.len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_server_packets() {
        assert_eq!(parse("2"), Packet::Ping);
        assert_eq!(parse("1"), Packet::Close);
        assert_eq!(parse("3"), Packet::Other);
        assert_eq!(
            parse(r#"40/acme,{"sid":"x"}"#),
            Packet::Connect {
                ns: "/acme",
                json: r#"{"sid":"x"}"#
            }
        );
        assert_eq!(
            parse(r#"40{"sid":"x"}"#),
            Packet::Connect {
                ns: "/",
                json: r#"{"sid":"x"}"#
            }
        );
        assert_eq!(
            parse(r#"42/bench-1,["messages.upsert",{"a":1}]"#),
            Packet::Event {
                ns: "/bench-1",
                ack_id: None,
                json: r#"["messages.upsert",{"a":1}]"#
            }
        );
        assert_eq!(
            parse(r#"43/acme,17[{"status":201}]"#),
            Packet::Ack {
                ns: "/acme",
                ack_id: Some(17),
                json: r#"[{"status":201}]"#
            }
        );
        assert_eq!(
            parse(r#"44/acme,{"message":"no"}"#),
            Packet::ConnectError {
                ns: "/acme",
                json: r#"{"message":"no"}"#
            }
        );
        assert_eq!(parse("41/acme,"), Packet::Disconnect { ns: "/acme" });
    }

    #[test]
    fn builds_client_packets() {
        assert_eq!(connect_packet("/acme"), "40/acme,");
        assert_eq!(connect_packet("/"), "40");
        assert_eq!(
            event_packet("/acme", Some(7), "[\"e\"]"),
            "42/acme,7[\"e\"]"
        );
        assert_eq!(event_packet("/", None, "[\"e\"]"), "42[\"e\"]");
    }

    #[test]
    fn reads_numbers_without_parsing_json() {
        let json = r#"["messages.upsert",{"data":{"seq":42,"sent_ns": 123456789,"pad":"x"}}]"#;
        assert_eq!(u64_after(json, "\"seq\":"), Some(42));
        assert_eq!(u64_after(json, "\"sent_ns\":"), Some(123_456_789));
        assert_eq!(u64_after(json, "\"missing\":"), None);
    }

    #[test]
    fn reads_trailing_offsets() {
        let json = r#"["messages.upsert",{"data":{"seq":1,"pad":"x"}},"3fa-17"]"#;
        assert_eq!(trailing_offset(json), Some("3fa-17"));
        assert_eq!(trailing_offset(r#"["e",{"a":"b"}]"#), None);
        assert_eq!(trailing_offset(r#"["e"]"#), None);
        assert_eq!(trailing_offset(r#"["e", "x" ]"#), Some("x"));
        assert_eq!(recovery_auth("k", ""), r#"{"apikey":"k","offset":""}"#);
    }

    #[test]
    fn target_from_url() {
        let target = Target::from_url("http://127.0.0.1:8093/ignored", "k").unwrap();
        assert_eq!(target.authority, "127.0.0.1:8093");
        assert_eq!(
            target.socket_url(),
            "ws://127.0.0.1:8093/socket.io/?EIO=4&transport=websocket&apikey=k"
        );
        assert!(Target::from_url("https://x", "k").is_err());
    }
}
