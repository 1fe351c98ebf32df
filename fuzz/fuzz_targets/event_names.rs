//! Event and instance name conversions: the three event-name forms agree with each other
//! and with the filter rule; an instance name and its namespace convert both ways.
#![no_main]

use evo_realtime::envelope::{self, EventName, InstanceName};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let text = text.as_ref();

    // upper_snake of anything: total, no '.' or '-', same number of chars, idempotent.
    let snake = envelope::upper_snake(text);
    assert!(!snake.contains(['.', '-']), "{text:?} -> {snake:?}");
    assert_eq!(snake.chars().count(), text.chars().count());
    assert_eq!(envelope::upper_snake(&snake), snake);
    if envelope::is_filter_name(text) {
        assert_eq!(snake, text, "a filter name is its own upper_snake");
    }

    if let Ok(event) = EventName::parse(text) {
        assert_eq!(event.as_str(), text);
        let kebab = event.kebab();
        assert!(!kebab.contains(['.', '_']), "{text:?} -> kebab {kebab:?}");
        assert!(
            !kebab.chars().any(|c| c.is_uppercase()),
            "{text:?} -> kebab {kebab:?} is not lowercase"
        );
        assert_eq!(kebab.len(), text.len());
        let upper = event.upper_snake();
        assert_eq!(upper, snake);
        assert!(
            envelope::is_filter_name(&upper),
            "{text:?} -> upper_snake {upper:?} is not a filter name"
        );
        // The kebab form names the same filter.
        assert_eq!(envelope::upper_snake(&kebab), upper);
    }

    match InstanceName::parse(text) {
        Ok(instance) => {
            assert_eq!(instance.as_str(), text);
            assert_eq!(instance.namespace(), format!("/{text}"));
            assert_eq!(instance.to_string(), text);
            let back = InstanceName::from_namespace(&format!("/{text}"));
            assert_eq!(back.as_ref(), Some(&instance), "{text:?}");
            assert_eq!(
                InstanceName::from_namespace(&instance.namespace()).as_ref(),
                Some(&instance)
            );
        }
        Err(_) => {
            assert!(InstanceName::from_namespace(&format!("/{text}")).is_none());
        }
    }
    // A namespace without its leading '/' is no namespace.
    if let Some(instance) = InstanceName::from_namespace(text) {
        assert_eq!(format!("/{instance}"), text);
    }
});
