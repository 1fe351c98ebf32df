//! Client emit → REST call: any instance, event and argument give a plan or a 400/404
//! ack, never a panic. A plan's path is the route template with the instance name
//! percent-encoded as exactly one segment where `{instance}` was; it has no dot-segment
//! and is a valid HTTP path-and-query.
//!
//! Input: `selector instance \n event \n argument`. A selector byte below 0xF0 picks one
//! of the default events (the `event` line is then ignored) so routes are hit without
//! guessing their names; otherwise the `event` line is the event. Instances that
//! `InstanceName::parse` refuses, and arguments that are not JSON, are skipped.
#![no_main]

use std::collections::BTreeMap;
use std::sync::LazyLock;

use evo_realtime::envelope::InstanceName;
use evo_realtime::upstream::{self, AckReply, RouteTable};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use serde_json::value::RawValue;

static ROUTES: LazyLock<RouteTable> = LazyLock::new(|| RouteTable::new(&BTreeMap::new()));
/// The default routes' events and the `send_message` alias, in a stable order.
static EVENTS: LazyLock<Vec<&'static str>> = LazyLock::new(|| upstream::default_events().collect());

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let mut lines = rest.splitn(3, |&b| b == b'\n');
    let instance = lines.next().unwrap_or_default();
    let raw_event = lines.next().unwrap_or_default();
    let argument = lines.next().unwrap_or_default();

    let Ok(instance) = std::str::from_utf8(instance) else {
        return;
    };
    let Ok(instance) = InstanceName::parse(instance) else {
        return;
    };
    let event = if selector < 0xF0 {
        EVENTS[usize::from(selector) % EVENTS.len()].to_owned()
    } else {
        String::from_utf8_lossy(raw_event).into_owned()
    };
    // The argument as socketioxide hands it over: raw JSON, or nothing.
    let argument: Option<Box<RawValue>> = if argument.is_empty() {
        None
    } else {
        match std::str::from_utf8(argument).map(|text| serde_json::from_str(text)) {
            Ok(Ok(raw)) => Some(raw),
            _ => return,
        }
    };
    // The last `requestId` wins in a `Value`; the plan reads the same one.
    let request_id = argument
        .as_deref()
        .and_then(|raw| serde_json::from_str::<BTreeMap<String, &RawValue>>(raw.get()).ok())
        .and_then(|fields| fields.get("requestId").map(|raw| raw.get().to_owned()))
        .map(|raw| serde_json::from_str::<Value>(&raw).unwrap_or(Value::Null));

    let route = ROUTES.get(&event).cloned();
    let plan = match upstream::plan(&ROUTES, &instance, &event, argument.as_deref()) {
        Ok(plan) => plan,
        Err(err) => {
            let status = err.status();
            let reply = AckReply::from(err);
            assert!(matches!(reply, AckReply::Error { .. }));
            assert_eq!(reply.status(), status);
            assert!(status == 400 || status == 404, "status {status}");
            assert_eq!(status == 404, route.is_none(), "404 iff no route");
            return;
        }
    };
    let route = route.expect("a plan has a route");
    assert_eq!(plan.method, route.method);
    assert_eq!(plan.route, route.template);

    let full = plan.path_and_query.as_str();
    assert!(full.starts_with('/'), "{full:?}");
    let (path, query) = match full.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (full, None),
    };

    // The instance sits, encoded, exactly where the template had `{instance}`.
    let encoded = encode_segment(instance.as_str());
    let (before, after) = route
        .template
        .split_once("{instance}")
        .expect("default templates contain {instance}");
    assert_eq!(path, format!("{before}{encoded}{after}"), "{instance:?}");
    let segment = &path[before.len()..path.len() - after.len()];
    assert!(!segment.contains('/'), "raw '/' in segment {segment:?}");
    assert_eq!(decode(segment), instance.as_str().as_bytes(), "{segment:?}");

    // No dot-segment, so no normalization can move the call to another route.
    for part in path.split('/') {
        assert!(part != ".." && part != ".", "dot-segment in {path:?}");
    }
    assert!(!path.contains("/../") && !path.ends_with("/.."), "{path:?}");

    // Both the path alone and the whole thing are valid request targets.
    assert!(
        path.parse::<http::uri::PathAndQuery>().is_ok(),
        "path {path:?} is not a valid PathAndQuery"
    );
    let parsed: http::uri::PathAndQuery = match full.parse() {
        Ok(parsed) => parsed,
        Err(err) => panic!("{full:?} is not a valid PathAndQuery: {err}"),
    };
    assert_eq!(parsed.path(), path);
    assert_eq!(parsed.query(), query);

    // The requestId is taken out as the idempotency key, or refused if not a string.
    match request_id {
        Some(Value::String(id)) => {
            assert!(id.len() <= upstream::MAX_REQUEST_ID_BYTES, "long requestId accepted");
            assert!(plan.request_id.is_some());
        }
        Some(other) => panic!("requestId {other} was accepted"),
        None => assert_eq!(plan.request_id, None),
    }
    if plan.method == http::Method::GET {
        assert_eq!(plan.body, None);
        if let Some(query) = query {
            for pair in query.split('&') {
                let (key, _) = pair.split_once('=').expect("key=value");
                assert_ne!(decode(key), b"requestId", "requestId sent upstream");
            }
        }
    } else {
        assert_eq!(query, None, "only GET routes have a query");
        let body = plan.body.as_deref().expect("non-GET plans have a body");
        // Read with values left raw: with serde_json's `raw_value` feature (on in this
        // crate), a `Value` reads an object whose first key is
        // "$serde_json::private::RawValue" as the JSON text in its value, so a client's
        // argument with that key (an ordinary key to Evolution) is no `Value` object.
        // Found by this target; see fuzz/README.md and tests/fuzz_regressions.rs.
        let fields: BTreeMap<String, &RawValue> = match serde_json::from_str(body) {
            Ok(fields) => fields,
            Err(err) => panic!("body is not a JSON object ({err}): {body:?}"),
        };
        assert!(!fields.contains_key("requestId"), "requestId sent upstream");
    }
});

/// RFC 3986 segment encoding, written independently of the crate: every byte but the
/// unreserved characters becomes `%XX`.
fn encode_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16).expect("hex digit after '%'") as u8;
            out.push(hex(bytes[i + 1]) * 16 + hex(bytes[i + 2]));
            i += 3;
        } else {
            assert_ne!(bytes[i], b'%', "truncated escape in {text:?}");
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}
