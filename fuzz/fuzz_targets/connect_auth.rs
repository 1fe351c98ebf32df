//! The CONNECT packet's `auth` payload, the one thing an anonymous peer sends that is
//! parsed before its key is checked: any bytes give a request or a refusal, never a
//! panic; a payload over `MAX_AUTH_BYTES` is refused before it is read; the key comes
//! only from a string `apikey`; the options (read after authentication) hold at most
//! `MAX_FILTER_EVENTS` well-formed, distinct events.
//!
//! Input: the raw `auth` JSON (inputs that are not JSON are skipped, as socketioxide
//! refuses them before our middleware runs).
#![no_main]

use evo_realtime::envelope;
use evo_realtime::hub::{ConnectError, ConnectRequest, MAX_AUTH_BYTES, MAX_FILTER_EVENTS};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use serde_json::value::RawValue;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(raw) = serde_json::from_str::<Box<RawValue>>(text) else {
        return;
    };
    let (parts, ()) = http::Request::builder()
        .uri("/socket.io/?EIO=4&transport=websocket")
        .body(())
        .expect("a valid request")
        .into_parts();
    let request = match ConnectRequest::parse(&parts, Some(&raw)) {
        Ok(request) => request,
        Err(ConnectError::AuthTooLarge) => {
            assert!(raw.get().len() > MAX_AUTH_BYTES);
            return;
        }
        Err(_) => return,
    };
    assert!(raw.get().len() <= MAX_AUTH_BYTES, "a large payload was read");
    let value: Value = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
    if let Some(key) = request.key() {
        // serde_json keeps the last of repeated keys; so does the raw reader.
        assert_eq!(value.get("apikey").and_then(Value::as_str), Some(key.as_str()));
    }
    let Ok(options) = request.options() else {
        return;
    };
    assert!(options.filter.len() <= MAX_FILTER_EVENTS);
    for (i, name) in options.filter.iter().enumerate() {
        assert!(envelope::is_filter_name(name), "{name:?}");
        assert!(!options.filter[..i].contains(name), "{name:?} twice");
    }
});
