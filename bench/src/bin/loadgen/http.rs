//! A keep-alive HTTP/1.1 client connection (hyper's low-level client, one request in flight),
//! for the webhook sender and the direct calls of `emit-rest`'s baseline.

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

pub type HttpSender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

pub async fn open_http(addr: std::net::SocketAddr) -> Result<HttpSender, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|err| format!("webhook connect: {err}"))?;
    stream.set_nodelay(true).map_err(|err| err.to_string())?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| format!("webhook handshake: {err}"))?;
    tokio::spawn(connection);
    Ok(sender)
}
