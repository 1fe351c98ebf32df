//! The reverse proxy: every request that is neither socket.io nor `/_sidecar/*` is
//! streamed to Evolution API unchanged, so the sidecar can own Evolution's public port.
//!
//! Bodies stream both ways and are never buffered whole. Hop-by-hop headers are dropped,
//! `X-Forwarded-For` is appended to. `X-Forwarded-Proto`/`-Host` are set from this hop
//! (`http`, the request's `Host`), overwriting what the client sent, unless the peer is one
//! of `SIDECAR_TRUSTED_PROXIES` (then they are kept when present): a client could
//! otherwise make Evolution build links or redirects for a host of its choosing. No
//! CORS header is added: Evolution sends its own, and a duplicate breaks browsers.
//!
//! `CONNECT` (a tunnel to any address, through Evolution's network position) and
//! `OPTIONS *` are not resources of Evolution's API: they are answered 405 here.
//!
//! | failure                                  | answer      |
//! |------------------------------------------|-------------|
//! | `CONNECT`, or `OPTIONS *`                | 405 JSON    |
//! | upstream unreachable                     | 502 JSON    |
//! | no response headers within the timeout   | 504 JSON    |
//! | response body idle for the timeout       | stream cut  |

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Sleep;

use crate::peer::TrustedProxies;
use crate::setting;
use crate::upstream;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("upstream unreachable")]
    Unreachable,
    #[error("upstream did not answer within {0} seconds")]
    Timeout(u64),
    #[error("bad request target")]
    BadTarget,
    #[error("method not allowed here")]
    MethodNotAllowed,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = match self {
            Error::Unreachable => StatusCode::BAD_GATEWAY,
            Error::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Error::BadTarget => StatusCode::BAD_REQUEST,
            Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        };
        (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}

/// The proxy's client and target.
pub struct Proxy {
    client: Client<HttpConnector, Body>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    base_path: String,
    timeout: Duration,
    timeout_secs: u64,
    /// Peers whose `X-Forwarded-Proto`/`-Host` are kept.
    trusted: TrustedProxies,
}

impl Proxy {
    pub fn new(config: &upstream::Config, trusted: TrustedProxies) -> Result<Self, setting::Error> {
        config.validate()?;
        let uri: Uri = config
            .base_url()
            .parse()
            .map_err(|err| setting::invalid("upstream.url", &config.url, err))?;
        if uri.scheme_str() != Some("http") {
            // The proxy runs beside Evolution in one pod or compose file: plain HTTP keeps
            // TLS off the hot path. Emits and key lookups (reqwest) do speak https.
            tracing::warn!("upstream is not http://: the reverse proxy will answer 502");
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(config.connect_timeout_secs)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        let parts = uri.into_parts();
        Ok(Self {
            client,
            scheme: parts.scheme.unwrap_or(http::uri::Scheme::HTTP),
            authority: parts
                .authority
                .ok_or_else(|| setting::invalid("upstream.url", &config.url, "has no host"))?,
            base_path: parts
                .path_and_query
                .map(|p| p.path().trim_end_matches('/').to_owned())
                .unwrap_or_default(),
            timeout: Duration::from_secs(config.timeout_secs),
            timeout_secs: config.timeout_secs,
            trusted,
        })
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) never cross a proxy.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(listed.iter()) {
        headers.remove(name);
    }
}

/// The fallback handler: forward one request, and count the outcome.
pub async fn forward(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    let response = match send(&proxy, request).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    };
    let status = response.status().as_u16().to_string();
    metrics::counter!(crate::telemetry::names::PROXY_REQUESTS, "status" => status).increment(1);
    response
}

async fn send(proxy: &Proxy, request: Request) -> Result<Response, Error> {
    // `OPTIONS *` arrives with the URI `*`; CONNECT with an authority and no path.
    if request.method() == http::Method::CONNECT
        || (request.method() == http::Method::OPTIONS && request.uri() == "*")
    {
        return Err(Error::MethodNotAllowed);
    }
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip());
    let (mut parts, body) = request.into_parts();

    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let target = Uri::builder()
        .scheme(proxy.scheme.clone())
        .authority(proxy.authority.clone())
        .path_and_query(format!("{}{}", proxy.base_path, path_and_query))
        .build()
        .map_err(|_| Error::BadTarget)?;

    let original_host = parts.headers.get(header::HOST).cloned();
    strip_hop_by_hop(&mut parts.headers);
    let headers = &mut parts.headers;
    if let Some(ip) = peer {
        let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(previous) => format!("{previous}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
            headers.insert("x-forwarded-for", value);
        }
    }
    // In-process callers (tests through `oneshot`) have no peer: treated as untrusted.
    let trusted = peer.is_some_and(|ip| proxy.trusted.contains(ip));
    if !(trusted && headers.contains_key("x-forwarded-proto")) {
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
    if !(trusted && headers.contains_key("x-forwarded-host")) {
        match original_host {
            Some(host) => headers.insert("x-forwarded-host", host),
            None => headers.remove("x-forwarded-host"),
        };
    }
    // The upstream sees its own authority as Host, as behind any reverse proxy.
    if let Ok(host) = HeaderValue::from_str(proxy.authority.as_str()) {
        headers.insert(header::HOST, host);
    }
    parts.uri = target;
    parts.version = http::Version::HTTP_11;
    let upstream_request = http::Request::from_parts(parts, body);

    let response = tokio::time::timeout(proxy.timeout, proxy.client.request(upstream_request))
        .await
        .map_err(|_| Error::Timeout(proxy.timeout_secs))?
        .map_err(|err| {
            tracing::warn!(error = %err, "proxy: upstream request failed");
            Error::Unreachable
        })?;

    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let body = Body::new(IdleTimeout::new(body, proxy.timeout));
    Ok(Response::from_parts(parts, body))
}

/// A response body that ends with an error when no frame arrives for `idle`: a stalled
/// upstream must not hold a connection forever, while a long healthy stream may run.
struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl<B> IdleTimeout<B> {
    fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl<B> http_body::Body for IdleTimeout<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + this.idle;
                this.sleep.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err("upstream body idle timeout".into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
