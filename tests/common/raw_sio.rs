//! A raw Engine.IO v4 / Socket.IO v5 websocket client: for what the official client will
//! not send (thousands of CONNECT packets on one connection, crafted auth payloads,
//! megabyte names and keys). Every receive has a timeout.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::wait::PATIENCE;

pub struct RawSocket {
    ws: WebSocketStream<tokio::net::TcpStream>,
}

impl RawSocket {
    /// Opens `ws://addr/socket.io/?EIO=4&transport=websocket{query}` and reads the OPEN
    /// packet; `Err(status)` when the handshake is refused.
    pub async fn open(addr: SocketAddr, query: &str) -> Result<Self, u16> {
        Self::open_from(addr, query, std::net::Ipv4Addr::LOCALHOST).await
    }

    /// [`RawSocket::open`] from another loopback source address (its own rate bucket).
    pub async fn open_from(
        addr: SocketAddr,
        query: &str,
        source: std::net::Ipv4Addr,
    ) -> Result<Self, u16> {
        let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket{query}");
        let mut config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default();
        config.max_message_size = Some(64 << 20);
        config.max_frame_size = Some(64 << 20);
        let tcp = tokio::net::TcpSocket::new_v4().unwrap();
        tcp.bind(SocketAddr::from((source, 0))).unwrap();
        let stream = tcp.connect(addr).await.expect("tcp connect");
        let connected = tokio_tungstenite::client_async_with_config(url, stream, Some(config));
        let (ws, _) = match tokio::time::timeout(PATIENCE, connected).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
                return Err(response.status().as_u16());
            }
            Ok(Err(err)) => panic!("websocket handshake failed: {err}"),
            Err(_) => panic!("websocket handshake timed out"),
        };
        let mut socket = Self { ws };
        let open = socket.next_text().await.expect("an OPEN packet");
        assert!(open.starts_with("0{"), "{open}");
        Ok(socket)
    }

    pub async fn send(&mut self, text: impl Into<String>) -> bool {
        self.ws.send(Message::text(text.into())).await.is_ok()
    }

    /// The next text frame, answering pings; `None` once the connection is closed.
    pub async fn next_text(&mut self) -> Option<String> {
        self.next_text_within(PATIENCE).await
    }

    pub async fn next_text_within(&mut self, patience: Duration) -> Option<String> {
        self.receive(patience).await.expect("a frame in time")
    }

    /// The next text frame within `patience`, or `None` when none came (or it closed).
    pub async fn next_text_within_or_none(&mut self, patience: Duration) -> Option<String> {
        self.receive(patience).await.ok().flatten()
    }

    /// The next text frame, answering pings: `Ok(None)` once closed, `Err` on a timeout.
    async fn receive(
        &mut self,
        patience: Duration,
    ) -> Result<Option<String>, tokio::time::error::Elapsed> {
        loop {
            let Some(frame) = tokio::time::timeout(patience, self.ws.next()).await? else {
                return Ok(None);
            };
            match frame {
                Ok(Message::Text(text)) if text.as_str() == "2" => {
                    let _ = self.ws.send(Message::text("3")).await;
                }
                Ok(Message::Text(text)) => return Ok(Some(text.as_str().to_owned())),
                Ok(Message::Close(_)) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    }

    /// Sends `40{ns},{auth}` and returns the answer for that namespace (`40...` or `44...`).
    pub async fn connect(&mut self, ns: &str, auth: &str) -> Option<String> {
        if !self.send(format!("40{ns},{auth}")).await {
            return None;
        }
        self.answer_for(ns).await
    }

    /// The next CONNECT or CONNECT_ERROR packet for `ns`, skipping events.
    pub async fn answer_for(&mut self, ns: &str) -> Option<String> {
        let connect = format!("40{ns},");
        let refused = format!("44{ns},");
        loop {
            let text = self.next_text().await?;
            if text.starts_with(&connect) || text.starts_with(&refused) {
                return Some(text);
            }
        }
    }

    /// Waits until the server closes the connection; `false` if it stays open `patience`.
    pub async fn closed_within(&mut self, patience: Duration) -> bool {
        let closed = async {
            loop {
                match self.ws.next().await {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return true,
                    Some(Ok(Message::Text(text))) if text.as_str() == "2" => {
                        let _ = self.ws.send(Message::text("3")).await;
                    }
                    Some(Ok(_)) => {}
                }
            }
        };
        tokio::time::timeout(patience, closed)
            .await
            .unwrap_or(false)
    }
}
