//! Inputs the fuzz targets in fuzz/ stopped on, fed as they were found (the exact
//! artifacts are kept in fuzz/regressions/) and minimized. See fuzz/README.md.

use std::collections::BTreeMap;

use evo_realtime::envelope::{Envelope, Error, InstanceName};
use evo_realtime::upstream::{RouteTable, plan};
use serde_json::Value;
use serde_json::value::RawValue;

/// webhook_envelope: a lone UTF-16 surrogate escape inside `data`. JSON text allows it
/// and Node's JSON.stringify writes one for a string cut inside a surrogate pair; the
/// envelope passes it through byte for byte, as every other value.
#[test]
fn lone_surrogate_in_a_value_passes_through() {
    let found = include_bytes!("../fuzz/regressions/webhook_envelope/lone-surrogate");
    let envelope = Envelope::from_webhook(found).expect("accepted");
    assert_eq!(envelope.event.as_str(), "presence.update");
    assert_eq!(envelope.instance.as_str(), "acme-support");
    assert!(envelope.payload.get().contains(r#""lastK\udc00nownent""#));
    // `destination` is dropped at the top level (the fuzzer spliced another copy of the
    // fixture into `data`, where it stays).
    let top: BTreeMap<String, &RawValue> =
        serde_json::from_str(envelope.payload.get()).expect("an object");
    assert!(!top.contains_key("destination"));

    let minimal = br#"{"event":"a","instance":"b","x":"\udc00"}"#;
    let envelope = Envelope::from_webhook(minimal).expect("accepted");
    assert_eq!(
        envelope.payload.get(),
        r#"{"event":"a","instance":"b","x":"\udc00"}"#
    );
    // Still JSON text (what a JavaScript client parses), re-read as a body unchanged.
    assert!(serde_json::from_str::<&RawValue>(envelope.payload.get()).is_ok());
    let again = Envelope::from_webhook(envelope.payload.get().as_bytes()).expect("again");
    assert_eq!(again.payload.get(), envelope.payload.get());
}

/// webhook_envelope: a number beyond f64 (`21e99900`) inside `data`: valid JSON text,
/// passed through byte for byte.
#[test]
fn number_beyond_f64_passes_through() {
    let found = include_bytes!("../fuzz/regressions/webhook_envelope/number-out-of-range");
    let envelope = Envelope::from_webhook(found).expect("accepted");
    assert_eq!(envelope.instance.as_str(), "acme-suppmrt");
    assert!(
        envelope
            .payload
            .get()
            .contains(r#""statusReason": 21e99900"#)
    );

    let minimal = br#"{"event":"a","instance":"b","x":1e999}"#;
    let envelope = Envelope::from_webhook(minimal).expect("accepted");
    assert_eq!(
        envelope.payload.get(),
        r#"{"event":"a","instance":"b","x":1e999}"#
    );
}

/// A body nested `depth` deep: the top-level object and `depth - 1` arrays in `data`.
fn nested(depth: usize) -> String {
    let inner = depth - 1;
    format!(
        r#"{{"event":"a","instance":"b","data":{}{}}}"#,
        "[".repeat(inner),
        "]".repeat(inner)
    )
}

/// webhook_envelope: serde_json builds a `Value` at most 127 deep, but `check_depth`
/// admitted 128 (`MAX_DEPTH` was 128), so a body 128 deep became a payload serde_json
/// refuses. Fixed by `MAX_DEPTH = 127`: the deepest body accepted is one serde_json parses.
#[test]
fn nesting_limit_matches_serde_json() {
    let ok = nested(127);
    let envelope = Envelope::from_webhook(ok.as_bytes()).expect("127 deep is accepted");
    assert!(serde_json::from_str::<Value>(envelope.payload.get()).is_ok());
    assert!(serde_json::from_str::<Value>(&ok).is_ok());

    let too_deep = nested(128);
    assert!(serde_json::from_str::<Value>(&too_deep).is_err());
    assert!(
        matches!(
            Envelope::from_webhook(too_deep.as_bytes()),
            Err(Error::Syntax(_))
        ),
        "a body 128 deep must be refused (400), as serde_json refuses it"
    );
}

/// emit_plan: an argument with the key "$serde_json::private::RawValue" (found by the
/// fuzzer). The plan sends it upstream as an ordinary key, which it is to Evolution; only
/// a serde_json reader with the `raw_value` feature (as this crate has) misreads such a
/// body as a `Value` when that key comes first, so the fuzz target reads bodies with raw
/// values instead.
#[test]
fn raw_value_token_key_is_an_ordinary_key() {
    // Layout (fuzz/README.md): selector byte, instance, event line, argument.
    let found = include_bytes!("../fuzz/regressions/emit_plan/raw-value-token-key");
    assert_eq!(found[0], 22, "the selector picks send_message");
    let mut lines = found[1..].splitn(3, |&b| b == b'\n');
    let instance = std::str::from_utf8(lines.next().unwrap()).unwrap();
    assert_eq!(lines.next(), Some(&b""[..]));
    let text = std::str::from_utf8(lines.next().unwrap()).unwrap();
    let keys = serde_json::from_str::<Value>(text)
        .unwrap()
        .as_object()
        .unwrap()
        .len();
    let argument = RawValue::from_string(text.trim_end().to_owned()).unwrap();

    let table = RouteTable::new(&BTreeMap::new());
    let instance = InstanceName::parse(instance).unwrap();
    let sent = plan(&table, &instance, "send_message", Some(&argument)).expect("planned");
    assert_eq!(sent.path_and_query, "/message/sendText/art");
    let body: BTreeMap<String, &RawValue> =
        serde_json::from_str(sent.body.as_deref().unwrap()).expect("a JSON object");
    assert_eq!(body.len(), keys);
    assert_eq!(
        body["$serde_json::private::RawValue"].get(),
        r#""5'0I\nnI01""#
    );

    let minimal =
        RawValue::from_string(r#"{"a":1,"$serde_json::private::RawValue":"x"}"#.to_owned());
    let sent = plan(
        &table,
        &instance,
        "message/sendText",
        Some(&minimal.unwrap()),
    )
    .unwrap();
    let body: BTreeMap<String, &RawValue> =
        serde_json::from_str(sent.body.as_deref().unwrap()).unwrap();
    assert_eq!(body["$serde_json::private::RawValue"].get(), r#""x""#);
    assert_eq!(body["a"].get(), "1");
}
