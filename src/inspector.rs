//! The live event inspector: one static page at `GET /_sidecar/inspector`.
//!
//! The page is an ordinary socket.io client of this sidecar: the user types an API key
//! (kept in the browser's `sessionStorage`), the page lists the key's instances through the
//! proxied `GET /instance/fetchInstances`, joins `/<instance>` with `auth.apikey` and
//! `auth.offset` (recovery), and sends test messages with the `message/sendText` emit.
//! The page therefore carries no secret and needs no state here.
//!
//! HTML, CSS and JS are compiled into the binary; the JS is served as files of its own so
//! the Content-Security-Policy allows no inline script. `socket.io.min.js` is vendored
//! unmodified from the npm package `socket.io-client` (version and license in
//! `src/inspector/VENDORED.md` and `src/inspector/LICENSE`).
//!
//! Turned off with `SIDECAR_INSPECTOR=false` (`inspector = false`): `app` then does not
//! merge these routes, and the path is a 404 like any unknown `/_sidecar/*` path.

use std::sync::LazyLock;

use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderValue};

/// Where the page is served.
pub const PATH: &str = "/_sidecar/inspector";

/// The policy of every inspector response: same-origin scripts, styles and sockets only,
/// no inline script or style, never framed.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; connect-src 'self' ws: wss:; \
     img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    content_type: &'static str,
    body: &'static str,
    /// A strong validator: the content's hash, so a new binary invalidates old copies.
    etag: HeaderValue,
}

impl Asset {
    fn new(content_type: &'static str, body: &'static str) -> Self {
        let hash = xxhash_rust::xxh3::xxh3_64(body.as_bytes());
        let etag =
            HeaderValue::from_str(&format!("\"{hash:016x}\"")).expect("hex is a valid header");
        Self {
            content_type,
            body,
            etag,
        }
    }

    /// 200 with the body, or 304 when the browser's copy is current. Browsers keep a copy
    /// but ask again each time (`no-cache`): a cheap 304 unless the binary changed.
    fn respond(&self, request: &HeaderMap) -> Response {
        let fresh = request
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(|tag| tag.trim().trim_start_matches("W/"))
            .any(|tag| tag == "*" || tag.as_bytes() == self.etag.as_bytes());
        let mut response = if fresh {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(self.content_type),
                )],
                self.body,
            )
                .into_response()
        };
        let headers = response.headers_mut();
        headers.insert(header::ETAG, self.etag.clone());
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        response
    }
}

static PAGE: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        "text/html; charset=utf-8",
        include_str!("inspector/index.html"),
    )
});
static SCRIPT: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        "text/javascript; charset=utf-8",
        include_str!("inspector/inspector.js"),
    )
});
static STYLE: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        "text/css; charset=utf-8",
        include_str!("inspector/inspector.css"),
    )
});
static SOCKET_IO: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        "text/javascript; charset=utf-8",
        include_str!("inspector/socket.io.min.js"),
    )
});

/// The page and its three files (GET and HEAD). Stateless: merge it into any router.
pub fn routes() -> Router {
    Router::new()
        .route(PATH, get(|h: HeaderMap| async move { PAGE.respond(&h) }))
        // The page's links are relative to `/_sidecar/inspector`, so send `.../inspector/`
        // there (relative, so it also works under a path prefix).
        .route(
            "/_sidecar/inspector/",
            get(|| async {
                (
                    StatusCode::PERMANENT_REDIRECT,
                    [(header::LOCATION, HeaderValue::from_static("../inspector"))],
                )
            }),
        )
        .route(
            "/_sidecar/inspector/inspector.js",
            get(|h: HeaderMap| async move { SCRIPT.respond(&h) }),
        )
        .route(
            "/_sidecar/inspector/inspector.css",
            get(|h: HeaderMap| async move { STYLE.respond(&h) }),
        )
        .route(
            "/_sidecar/inspector/socket.io.min.js",
            get(|h: HeaderMap| async move { SOCKET_IO.respond(&h) }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::Request;
    use tower::ServiceExt;

    async fn get(router: Router, path: &str, etag: Option<&HeaderValue>) -> Response {
        let mut request = Request::get(path);
        if let Some(etag) = etag {
            request = request.header(header::IF_NONE_MATCH, etag);
        }
        router
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn serves_each_file_with_its_type_validator_and_policy() {
        for (path, content_type) in [
            ("/_sidecar/inspector", "text/html; charset=utf-8"),
            (
                "/_sidecar/inspector/inspector.js",
                "text/javascript; charset=utf-8",
            ),
            (
                "/_sidecar/inspector/inspector.css",
                "text/css; charset=utf-8",
            ),
            (
                "/_sidecar/inspector/socket.io.min.js",
                "text/javascript; charset=utf-8",
            ),
        ] {
            let response = get(routes(), path, None).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            let headers = response.headers();
            assert_eq!(headers[header::CONTENT_TYPE], content_type, "{path}");
            assert_eq!(
                headers[header::CONTENT_SECURITY_POLICY],
                CONTENT_SECURITY_POLICY
            );
            assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(headers[header::CACHE_CONTROL], "no-cache");
            let etag = headers[header::ETAG].clone();

            let again = get(routes(), path, Some(&etag)).await;
            assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
            assert_eq!(again.headers()[header::ETAG], etag);
            assert_eq!(
                again.headers()[header::CONTENT_SECURITY_POLICY],
                CONTENT_SECURITY_POLICY
            );
        }
        let other = get(routes(), "/_sidecar/inspector/nope.js", None).await;
        assert_eq!(other.status(), StatusCode::NOT_FOUND);
        let slash = get(routes(), "/_sidecar/inspector/", None).await;
        assert_eq!(slash.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(slash.headers()[header::LOCATION], "../inspector");
    }

    /// On by default; `inspector = false` leaves the path to the `/_sidecar/*` 404.
    #[tokio::test]
    async fn the_app_serves_it_unless_turned_off() {
        for (enabled, expected) in [(true, StatusCode::OK), (false, StatusCode::NOT_FOUND)] {
            let config = crate::Config {
                inspector: enabled,
                ..crate::Config::default()
            };
            let app = crate::App::build(&config).expect("default config");
            for path in [PATH, "/_sidecar/inspector/inspector.js"] {
                let response = get(app.router(), path, None).await;
                assert_eq!(response.status(), expected, "inspector = {enabled}: {path}");
            }
        }
        assert!(crate::Config::default().inspector);
    }

    /// The policy forbids inline script and style: the page must not need any.
    #[test]
    fn the_page_has_no_inline_script_or_style() {
        let html = include_str!("inspector/index.html");
        let mut rest = html;
        while let Some(at) = rest.find("<script") {
            let tag_end = rest[at..].find('>').expect("closed tag") + at;
            assert!(
                rest[at..tag_end].contains(" src="),
                "inline <script> in index.html"
            );
            assert!(
                rest[tag_end + 1..].starts_with("</script>"),
                "<script> with a body"
            );
            rest = &rest[tag_end..];
        }
        assert!(!html.contains("<style"), "inline <style> in index.html");
        assert!(!html.contains(" style="), "style attribute in index.html");
        let handler = html.match_indices(" on").any(|(at, _)| {
            let name: String = html[at + 3..]
                .chars()
                .take_while(char::is_ascii_lowercase)
                .collect();
            !name.is_empty() && html[at + 3 + name.len()..].starts_with('=')
        });
        assert!(!handler, "inline event handler in index.html");
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "external URL"
        );
        let js = include_str!("inspector/inspector.js");
        for forbidden in ["eval(", "new Function", "innerHTML", "document.write"] {
            assert!(!js.contains(forbidden), "inspector.js uses {forbidden}");
        }
    }

    #[test]
    fn the_vendored_client_is_the_tested_version() {
        let vendored = include_str!("inspector/socket.io.min.js");
        assert!(vendored.starts_with("/*!\n * Socket.IO v4.8.3\n"));
        assert!(include_str!("inspector/VENDORED.md").contains("| 4.8.3 |"));
        // The same version the integration tests drive.
        assert!(
            include_str!("../tests/js/package.json").contains(r#""socket.io-client": "4.8.3""#)
        );
        assert!(include_str!("inspector/LICENSE").starts_with("The MIT License"));
    }
}
