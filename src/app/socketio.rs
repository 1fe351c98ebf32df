//! The socket.io HTTP stack, outermost first: CORS → [`Gate`]: admission
//! (`guard::check_handshake`: rate limit, connection cap) → handshake key check
//! (`auth::check_handshake`) → the request head copied out of hyper's read buffer
//! ([`detach_head`]) → socket.io → 404 for anything socket.io does not claim. The checks
//! must sit outside socket.io: middleware inside it never sees its traffic.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use futures_util::TryFutureExt;
use futures_util::future::{self, BoxFuture, Either, MapOk, Ready};
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
    Request,
    Response = impl IntoResponse + use<>,
    Error = Infallible,
    Future = impl Send + use<>,
> + Clone
+ Send
+ Sync
+ 'static {
    ServiceBuilder::new()
        .layer(cors(config))
        .layer(tower::layer::layer_fn(move |inner| Gate {
            guard: guard.clone(),
            auth: auth.clone(),
            inner,
        }))
        .layer(layer)
        .service(tower::service_fn(|_request| async {
            Ok::<_, Infallible>(StatusCode::NOT_FOUND.into_response())
        }))
}

/// Admission (`guard::check_handshake`), the handshake key check (`auth::check_handshake`)
/// and [`detach_head`], in that order, in front of socket.io, as one tower service.
///
/// Written out rather than as `axum::middleware` layers: each of those boxes the
/// middleware's future, the inner service's future and a clone of the inner service for
/// every request, and a parked long-poll `GET` holds all of them until it is answered
/// (heaptrack: ≈ 5 KB per polling session for the three layers this replaces). Here a
/// request after the handshake costs no allocation of ours: admission is synchronous and
/// socket.io's future is used as it is. Only a handshake, which may wait for a key lookup,
/// boxes its future, and only while it is being answered.
#[derive(Clone)]
struct Gate<S> {
    guard: Arc<Guard>,
    auth: Arc<Authenticator>,
    inner: S,
}

type Answer = Result<Response, Infallible>;

impl<S> tower::Service<Request> for Gate<S>
where
    S: tower::Service<Request, Error = Infallible> + Clone + Send + 'static,
    S::Response: IntoResponse,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    #[allow(clippy::type_complexity)]
    type Future = Either<
        Ready<Answer>,
        Either<MapOk<S::Future, fn(S::Response) -> Response>, BoxFuture<'static, Answer>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        if let Err(refusal) = guard::check_handshake(&self.guard, &mut request) {
            return Either::Left(future::ready(Ok(*refusal)));
        }
        if !sio_request::is_handshake(request.uri()) {
            let into: fn(S::Response) -> Response = IntoResponse::into_response;
            return Either::Right(Either::Left(
                self.inner.call(detach_head(request)).map_ok(into),
            ));
        }
        // `poll_ready` readied this service: the call takes it and leaves a clone.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Either::Right(Either::Right(Box::pin(async move {
            match auth::check_handshake(&auth, request).await {
                Ok(request) => inner
                    .call(detach_head(request))
                    .await
                    .map(IntoResponse::into_response),
                Err(refusal) => Ok(*refusal),
            }
        })))
    }
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
pub fn detach_head(request: Request) -> Request {
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
    Request::from_parts(parts, body)
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

    #[test]
    fn detached_head_shares_nothing_with_the_read_buffer() {
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

        let request = detach_head(request);

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
