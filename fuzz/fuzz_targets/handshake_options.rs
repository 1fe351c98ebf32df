//! Handshake key and option parsing: any query, `apikey` header and CONNECT payload give
//! options or a refusal, never a panic; accepted filters are well-formed and unique, the
//! key follows Evolution's order (query, header, `auth.apikey`), and a percent-encoded
//! query parameter decodes back to what was encoded.
//!
//! Input: `query \n header \n payload`. The header is sent when its line is non-empty and
//! the payload when its part is non-empty; inputs that are not a valid URI, header value
//! or JSON are skipped.
#![no_main]

use evo_realtime::sio_request as auth;
use evo_realtime::envelope;
use evo_realtime::hub::{ClientOptions, Resume};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use serde_json::value::RawValue;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == b'\n');
    let query = parts.next().unwrap_or_default();
    let header = parts.next().filter(|h| !h.is_empty());
    let payload = parts.next().filter(|p| !p.is_empty());

    // query_param alone, on any text (not only valid URIs): total.
    let query_text = String::from_utf8_lossy(query);
    let _ = auth::query_param(&query_text, "apikey");
    let _ = auth::query_param(&query_text, "events");

    // Round trip: a fully encoded value decodes to itself, whatever precedes it.
    if let Some(value) = header.and_then(|h| std::str::from_utf8(h).ok()) {
        let encoded = encode_all(value);
        let q = format!("{query_text}&apikey={encoded}");
        let first = auth::query_param(&query_text, "apikey");
        let expected = first.unwrap_or_else(|| value.to_owned());
        assert_eq!(
            auth::query_param(&q, "apikey").as_deref(),
            Some(expected.as_str()),
            "{q:?}"
        );
    }

    let Ok(query) = std::str::from_utf8(query) else {
        return;
    };
    let raw_payload: Option<Box<RawValue>> = match payload {
        None => None,
        Some(bytes) => match std::str::from_utf8(bytes).map(serde_json::from_str) {
            Ok(Ok(raw)) => Some(raw),
            _ => return,
        },
    };
    let payload: Option<Value> = match raw_payload.as_deref() {
        None => None,
        Some(raw) => match serde_json::from_str(raw.get()) {
            Ok(value) => Some(value),
            Err(_) => return,
        },
    };
    let mut builder = http::Request::builder().uri(format!("/socket.io/?{query}"));
    if let Some(header) = header {
        let Ok(value) = http::HeaderValue::from_bytes(header) else {
            return;
        };
        builder = builder.header("apikey", value);
    }
    let Ok(request) = builder.body(()) else {
        return;
    };
    let (parts, ()) = request.into_parts();

    let key = auth::key_from_request(&parts);
    let uri_query = parts.uri.query().unwrap_or("");
    if let Some(from_query) = auth::query_param(uri_query, "apikey") {
        assert_eq!(key.as_deref(), Some(from_query.as_str()), "query key first");
    } else if let Some(from_header) = parts.headers.get("apikey").and_then(|v| v.to_str().ok()) {
        assert_eq!(key.as_deref(), Some(from_header), "then the header");
    } else {
        assert_eq!(key, None);
    }

    let Ok(options) = ClientOptions::parse(&parts, raw_payload.as_deref()) else {
        return;
    };
    assert!(options.filter.len() <= evo_realtime::hub::MAX_FILTER_EVENTS);
    let payload_key = payload
        .as_ref()
        .and_then(|p| p.get("apikey"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    assert_eq!(options.key, key.or(payload_key), "then auth.apikey");
    for (i, name) in options.filter.iter().enumerate() {
        assert!(
            envelope::is_filter_name(name),
            "accepted filter {name:?} is not a filter name"
        );
        assert!(
            !options.filter[..i].contains(name),
            "filter {name:?} is listed twice"
        );
    }
    match payload.as_ref().and_then(|p| p.get("offset")) {
        None => assert_eq!(options.resume, Resume::No),
        Some(Value::Null) => assert_eq!(options.resume, Resume::FromNow),
        Some(Value::String(offset)) if offset.is_empty() => {
            assert_eq!(options.resume, Resume::FromNow)
        }
        Some(Value::String(offset)) => {
            assert_eq!(options.resume, Resume::After(offset.clone()))
        }
        Some(other) => panic!("offset {other} was accepted"),
    }
});

/// Percent-encodes every byte but ASCII letters and digits.
fn encode_all(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
