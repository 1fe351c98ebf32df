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

/// Gives a socket.io request's URI and header values their own small allocations.
///
/// hyper parses a request head without copying: the URI and every header value are slices
/// of the connection's read buffer (8 to 16 KiB). engineioxide keeps the handshake's
/// request parts for the whole session, so each idle socket would pin that buffer for its
/// lifetime (measured with heaptrack: 16.4 KiB of 35 KiB per connection). Copying a few
/// hundred bytes here frees it when the upgrade completes.
pub async fn detach_head(request: axum::extract::Request) -> axum::extract::Request {
    let (mut parts, body) = request.into_parts();
    if let Ok(uri) = http::Uri::from_maybe_shared(bytes::Bytes::from(parts.uri.to_string())) {
        parts.uri = uri;
    }
    let mut headers = http::HeaderMap::with_capacity(parts.headers.len());
    for (name, value) in &parts.headers {
        // `from_bytes` copies; the bytes came from a valid value, so it cannot fail.
        if let Ok(mut copy) = http::HeaderValue::from_bytes(value.as_bytes()) {
            copy.set_sensitive(value.is_sensitive());
            headers.append(name.clone(), copy);
        }
    }
    parts.headers = headers;
    if sio_request::is_handshake(&parts.uri) {
        let close = parts
            .extensions
            .get::<server::ConnectionCloser>()
            .cloned()
            .map(|closer| Box::new(move || closer.close()) as Box<dyn Fn() + Send + Sync>);
        parts.extensions.insert(Arc::new(EngineSession::new(close)));
    }
    axum::extract::Request::from_parts(parts, body)
}

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
            .header("x-custom", "a")
            .header("x-custom", "b")
            .body(axum::body::Body::empty())
            .expect("request");
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
        let custom: Vec<_> = request.headers().get_all("x-custom").iter().collect();
        assert_eq!(custom, ["a", "b"]);
    }
}
