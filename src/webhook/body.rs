//! Reading a webhook's body: bounded in bytes and time, judged early by its first bytes,
//! and drained (bounded) when refused, so the client reads the status.

use axum::extract::Request;
use http::header;
use http_body_util::BodyExt;

use super::config::Config;
use super::error::Error;

/// A refused body is read and discarded up to this many times `max_body_bytes`: enough
/// for Evolution's over-limit batches to read their 413, and bounded for anyone else.
pub(super) const DRAIN_FACTOR: u64 = 2;

/// Reads and discards a refused request's body, up to `limit` bytes and `deadline`, so
/// the answer is not lost to a reset. One frame is held at a time.
pub(super) async fn drain(request: Request, limit: u64, deadline: tokio::time::Instant) {
    let headers = request.headers();
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Reading would send `100 Continue` and invite the body we are refusing.
    let expects_continue = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue || declared.is_some_and(|length| length > limit) {
        return;
    }
    discard(request.into_body(), limit, deadline).await;
}

async fn discard(mut body: axum::body::Body, limit: u64, deadline: tokio::time::Instant) {
    let mut seen = 0u64;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, body.frame()).await {
        if let Some(data) = frame.data_ref() {
            seen = seen.saturating_add(data.len() as u64);
            if seen > limit {
                return;
            }
        }
    }
}

/// The body, at most `max_body_bytes`, complete by `deadline`. Past the limit, the rest
/// is drained (up to `DRAIN_FACTOR` times the limit in all) before the 413.
/// The bytes of a body within which a per-instance credential's instance must appear.
const INSTANCE_PREFIX: usize = 64 * 1024;

/// Reads the body within `max_body_bytes` and the deadline. `early` is called once, when
/// [`INSTANCE_PREFIX`] bytes are in (or the body ended sooner); its refusal stops the read
/// (the rest is drained, bounded, so the client reads the status).
pub(super) async fn read_body(
    request: Request,
    config: &Config,
    deadline: tokio::time::Instant,
    early: impl FnOnce(&[u8], bool) -> Result<(), Error>,
) -> Result<bytes::Bytes, Error> {
    let limit = config.max_body_bytes;
    let drain_limit = limit.saturating_mul(DRAIN_FACTOR);
    let mut body = request.into_body();
    let mut buffer = bytes::BytesMut::new();
    let mut early = Some(early);
    loop {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .map_err(|_| Error::ReadTimeout(config.read_timeout_secs))?;
        let Some(frame) = frame else {
            if let Some(check) = early.take() {
                check(&buffer, true)?;
            }
            return Ok(buffer.freeze());
        };
        let frame = frame.map_err(|err| Error::BodyCut(err.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buffer.len() as u64 + data.len() as u64 > limit {
            let read = buffer.len() as u64 + data.len() as u64;
            drop(buffer);
            discard(body, drain_limit.saturating_sub(read), deadline).await;
            return Err(Error::TooLarge { limit });
        }
        buffer.extend_from_slice(&data);
        // With a limit this small the whole body is the prefix (checked when it ends).
        if limit > INSTANCE_PREFIX as u64
            && buffer.len() >= INSTANCE_PREFIX
            && let Some(check) = early.take()
            && let Err(err) = check(&buffer[..INSTANCE_PREFIX], false)
        {
            let read = buffer.len() as u64;
            drop(buffer);
            discard(body, drain_limit.saturating_sub(read), deadline).await;
            return Err(err);
        }
    }
}
