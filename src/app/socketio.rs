//! The socket.io HTTP stack, outermost first: CORS → admission (`guard::check_handshake`:
//! rate limit, connection cap) → handshake key check (`auth::check_handshake`) → the
//! request head copied out of hyper's read buffer ([`detach_head`]) → socket.io → 404 for
//! anything socket.io does not claim. The checks must sit outside socket.io: middleware
//! inside it never sees its traffic.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::IntoResponse;
use http::StatusCode;
use socketioxide::layer::SocketIoLayer;
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::auth::{self, Authenticator};
use crate::guard::{self, Guard};
use crate::hub::{self, EngineSession};
use crate::peer;
use crate::server;
use crate::sio_request;

/// The service that answers `/socket.io/`.
pub(super) fn service(
    config: &hub::Config,
    guard: Arc<Guard>,
    auth: Arc<Authenticator>,
    layer: SocketIoLayer,
) -> impl tower::Service<
    axum::extract::Request,
    Response = impl IntoResponse + use<>,
    Error = Infallible,
    Future = impl Send + use<>,
> + Clone
+ Send
+ Sync
+ 'static {
    ServiceBuilder::new()
        .layer(cors(config))
        .layer(axum::middleware::from_fn_with_state(
            guard,
            guard::check_handshake,
        ))
        .layer(axum::middleware::from_fn_with_state(
            auth,
            auth::check_handshake,
        ))
        .layer(axum::middleware::map_request(detach_head))
        .layer(layer)
        .service(tower::service_fn(|_request| async {
            Ok::<_, Infallible>(StatusCode::NOT_FOUND.into_response())
        }))
}

fn cors(config: &hub::Config) -> CorsLayer {
    let origin = if config.cors_origin.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            config
                .cors_origin
                .iter()
                .filter_map(|origin| origin.parse().ok()),
        )
    };
    CorsLayer::new()
        .allow_origin(origin)
        .allow_methods([http::Method::GET, http::Method::POST, http::Method::OPTIONS])
        .allow_headers(tower_http::cors::AllowHeaders::mirror_request())
}

/// Gives a socket.io request's URI and header values their own small allocations, and
/// keeps only the headers and extensions that something after this layer reads.
///
/// hyper parses a request head without copying: the URI and every header value are slices
/// of the connection's read buffer (8 to 16 KiB). engineioxide keeps the handshake's
/// request parts for the whole session, so each idle socket would pin that buffer for its
/// lifetime (measured with heaptrack: 16.4 KiB of 35 KiB per connection). Copying a few
/// hundred bytes here frees it when the upgrade completes.
///
/// The kept parts are also why nothing else rides along: a `HeaderMap` entry costs about
/// 90 bytes before its value, so a browser's dozen headers (user agent, cookies, accept-*)
/// would stay allocated for the session's life, and so would the extensions the outer
/// layers added (the peer address, the closer, axum's matched path). What is read later:
/// [`KEPT_HEADERS`]; hyper's `OnUpgrade` (the websocket upgrade), the admission budget
/// (`auth::Budget`, charged at CONNECT), the client's address (`peer::ClientAddr`, for a
/// keyless CONNECT from `WEBSOCKET_ALLOWED_HOSTS`) and the [`EngineSession`].
pub async fn detach_head(request: axum::extract::Request) -> axum::extract::Request {
    let (mut parts, body) = request.into_parts();
    if let Ok(uri) = http::Uri::from_maybe_shared(bytes::Bytes::from(parts.uri.to_string())) {
        parts.uri = uri;
    }
    let kept = KEPT_HEADERS
        .iter()
        .map(|name| parts.headers.get_all(name).iter().count())
        .sum();
    let mut headers = http::HeaderMap::with_capacity(kept);
    for name in KEPT_HEADERS {
        for value in parts.headers.get_all(&name) {
            // `from_bytes` copies; the bytes came from a valid value, so it cannot fail.
            if let Ok(mut copy) = http::HeaderValue::from_bytes(value.as_bytes()) {
                copy.set_sensitive(value.is_sensitive());
                headers.append(&name, copy);
            }
        }
    }
    parts.headers = headers;
    let mut extensions = http::Extensions::new();
    if let Some(upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() {
        extensions.insert(upgrade);
    }
    if let Some(budget) = parts.extensions.remove::<auth::Budget>() {
        extensions.insert(budget);
    }
    // The client's address, for a keyless CONNECT (`WEBSOCKET_ALLOWED_HOSTS`).
    if let Some(client) = parts.extensions.remove::<peer::ClientAddr>() {
        extensions.insert(client);
    }
    if sio_request::is_handshake(&parts.uri) {
        let close = parts
            .extensions
            .get::<server::ConnectionCloser>()
            .cloned()
            .map(|closer| Box::new(move || closer.close()) as Box<dyn Fn() + Send + Sync>);
        extensions.insert(Arc::new(EngineSession::new(close)));
    }
    parts.extensions = extensions;
    axum::extract::Request::from_parts(parts, body)
}

/// The request headers read after [`detach_head`]: the key (`sio_request::key_from_request`,
/// at each namespace CONNECT), the websocket key (engineioxide's upgrade answer) and the
/// content type (engineioxide's polling payload decoder).
pub const KEPT_HEADERS: [http::HeaderName; 3] = [
    http::HeaderName::from_static("apikey"),
    http::header::SEC_WEBSOCKET_KEY,
    http::header::CONTENT_TYPE,
];

#[cfg(test)]
mod tests {
    use super::*;

    /// True if `bytes` lies inside `buffer`'s allocation.
    fn inside(buffer: &bytes::Bytes, bytes: &[u8]) -> bool {
        let range = buffer.as_ptr_range();
        range.contains(&bytes.as_ptr())
    }

    #[tokio::test]
    async fn detached_head_shares_nothing_with_the_read_buffer() {
        // As hyper builds it: the URI and the values are slices of one read buffer.
        let buffer = bytes::Bytes::from_static(b"/socket.io/?EIO=4&transport=websocket secret-key");
        let uri = http::Uri::from_maybe_shared(buffer.slice(0..37)).expect("uri");
        let key = http::HeaderValue::from_maybe_shared(buffer.slice(38..)).expect("value");
        assert!(
            inside(&buffer, key.as_bytes()),
            "the fixture must share the buffer"
        );
        let mut request = axum::extract::Request::builder()
            .uri(uri)
            .header("apikey", key)
            .header("content-type", "text/plain")
            .header("content-type", "again")
            .header("user-agent", "a browser")
            .body(axum::body::Body::empty())
            .expect("request");
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((
                [127, 0, 0, 1],
                9,
            ))));
        let client = peer::ClientAddr([192, 0, 2, 1].into());
        request.extensions_mut().insert(client);
        request
            .headers_mut()
            .get_mut("apikey")
            .expect("apikey")
            .set_sensitive(true);

        let request = detach_head(request).await;

        assert_eq!(request.uri(), "/socket.io/?EIO=4&transport=websocket");
        assert!(!inside(&buffer, request.uri().path().as_bytes()));
        let key = &request.headers()["apikey"];
        assert_eq!(key, "secret-key");
        assert!(key.is_sensitive());
        assert!(!inside(&buffer, key.as_bytes()));
        let kept: Vec<_> = request.headers().get_all("content-type").iter().collect();
        assert_eq!(kept, ["text/plain", "again"]);
        // What nothing reads after the handshake is not kept for the session.
        assert_eq!(request.headers().len(), 3);
        assert!(request.headers().get("user-agent").is_none());
        assert!(
            request
                .extensions()
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .is_none()
        );
        assert!(request.extensions().get::<Arc<EngineSession>>().is_some());
        assert_eq!(
            request.extensions().get::<peer::ClientAddr>(),
            Some(&client)
        );
    }
}
