//! Webhook body → `Envelope`: any bytes give an envelope or an error, never a panic; an
//! envelope's payload is a JSON object without `destination` whose `event`/`instance`
//! are the envelope's, and parsing that payload again gives the same envelope.
#![no_main]

use std::collections::BTreeMap;

use evo_realtime::envelope::{Envelope, EventName, InstanceName};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use serde_json::value::RawValue;

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = Envelope::from_webhook(data) else {
        return;
    };
    let text = envelope.payload.get();
    // Strict: the payload is a JSON value serde_json can build. Known exceptions (see
    // fuzz/README.md; each is pinned by tests/fuzz_regressions.rs):
    // - a lone UTF-16 surrogate escape ("\udc00") inside a value, which is valid JSON
    //   text, passed through byte for byte as Node's JSON.stringify writes it;
    // - a number beyond f64 (1e999), also valid JSON text, passed through;
    // - an object whose first key is "$serde_json::private::RawValue": with the
    //   `raw_value` feature a `Value` reads it as the JSON text in its value (found by
    //   emit_plan; passed through here as any other key).
    if let Err(err) = serde_json::from_str::<Value>(text) {
        let message = err.to_string();
        let known = message.contains("surrogate")
            || message.contains("hex escape")
            || message.contains("unicode code point")
            || message.contains("number out of range")
            || text.contains("$serde_json::private::RawValue");
        assert!(known, "payload is not JSON ({err}): {text:?}");
    }
    // Structure, read with values left raw (top-level keys are always re-encoded).
    let object: BTreeMap<String, &RawValue> = match serde_json::from_str(text) {
        Ok(object) => object,
        Err(err) => panic!("payload is not a JSON object ({err}): {text:?}"),
    };
    assert!(
        !object.contains_key("destination"),
        "payload keeps `destination`: {text:?}"
    );
    let string = |key: &str| {
        object
            .get(key)
            .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
    };
    assert_eq!(
        string("event").as_deref(),
        Some(envelope.event.as_str()),
        "payload `event` differs: {text:?}"
    );
    assert_eq!(
        string("instance").as_deref(),
        Some(envelope.instance.as_str()),
        "payload `instance` differs: {text:?}"
    );
    // The names were validated.
    assert!(EventName::parse(envelope.event.as_str()).is_ok());
    assert!(InstanceName::parse(envelope.instance.as_str()).is_ok());

    // Emitting is idempotent: the payload is itself a body that gives the same envelope,
    // byte for byte (keys already in order, nothing left to drop).
    let again = match Envelope::from_webhook(text.as_bytes()) {
        Ok(again) => again,
        Err(err) => panic!("payload is refused as a body ({err}): {text:?}"),
    };
    assert_eq!(again.event, envelope.event);
    assert_eq!(again.instance, envelope.instance);
    assert_eq!(again.payload.get(), text, "reordering is not idempotent");
});
