//! The fake Evolution API of `emit-rest`: answers every request `201` with a sendText-like
//! body, at once, so what is measured is the server under test.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// What the fake upstream answers to every request: Evolution's sendText, at once.
const UPSTREAM_ANSWER: &str = r#"{"key":{"remoteJid":"5511900000002@s.whatsapp.net","fromMe":true,"id":"3EB0BENCH"},"status":"PENDING"}"#;

pub async fn serve_fake_upstream(listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                |request: hyper::Request<hyper::body::Incoming>| async move {
                    // Read the body so keep-alive goes on.
                    let _ = request.into_body().collect().await;
                    Ok::<_, std::convert::Infallible>(
                        hyper::Response::builder()
                            .status(201)
                            .header(hyper::header::CONTENT_TYPE, "application/json")
                            .body(Full::new(Bytes::from_static(UPSTREAM_ANSWER.as_bytes())))
                            .expect("valid response"),
                    )
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
