//! The top-level entries of a JSON object, in the order written, values unparsed.
//!
//! Webhook bodies and client emits are passed on byte for byte: keys keep their order and
//! numbers their spelling, which a `serde_json::Value` round trip would lose (its map
//! sorts keys; `100000000000000000000` becomes `1e+20`). Reading only the top level
//! costs one validating scan and no tree. This module is a leaf.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer as _, MapAccess, Visitor};
use serde_json::value::RawValue;

/// `(key, raw value)` in the order written; a repeated key appears twice.
pub type Entries<'a> = Vec<(Cow<'a, str>, &'a RawValue)>;

/// Splits a JSON object into at most `max` entries; anything else (more entries, another
/// value, trailing bytes) is an error. The bound keeps what a body of a million tiny keys
/// costs (tens of bytes of bookkeeping per key) in proportion to what callers expect.
pub fn entries(text: &str, max: usize) -> Result<Entries<'_>, serde_json::Error> {
    struct ObjectVisitor {
        max: usize,
    }

    impl<'de> Visitor<'de> for ObjectVisitor {
        type Value = Entries<'de>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
            let mut entries = Vec::with_capacity(8);
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                if entries.len() == self.max {
                    return Err(serde::de::Error::custom(format!(
                        "more than {} top-level fields",
                        self.max
                    )));
                }
                let value: &'de RawValue = map.next_value()?;
                entries.push((key, value));
            }
            Ok(entries)
        }
    }

    let mut deserializer = serde_json::Deserializer::from_str(text);
    let entries = deserializer.deserialize_map(ObjectVisitor { max })?;
    deserializer.end()?;
    Ok(entries)
}

/// The first top-level `key` of an object whose text may be cut anywhere (the first bytes
/// of a body still arriving), when its value is a string that the prefix holds whole.
pub fn string_in_prefix(prefix: &[u8], key: &str) -> Option<String> {
    struct Finder<'a> {
        key: &'a str,
        found: &'a mut Option<String>,
    }

    impl<'de> Visitor<'de> for Finder<'_> {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<(), M::Error> {
            while let Some(name) = map.next_key::<Cow<'de, str>>()? {
                if name == self.key {
                    *self.found = Some(map.next_value::<String>()?);
                    // Stop here: the rest may not have arrived.
                    return Err(serde::de::Error::custom("found"));
                }
                map.next_value::<serde::de::IgnoredAny>()?;
            }
            Ok(())
        }
    }

    let text = match std::str::from_utf8(prefix) {
        Ok(text) => text,
        // Cut inside a character: the valid part is all there is yet.
        Err(err) => std::str::from_utf8(&prefix[..err.valid_up_to()]).ok()?,
    };
    let mut found = None;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let _ = deserializer.deserialize_map(Finder {
        key,
        found: &mut found,
    });
    found
}

/// Writes entries back as one object: keys re-escaped, values as they were.
pub fn write<'a>(entries: impl IntoIterator<Item = (&'a str, &'a RawValue)>) -> String {
    let mut out = String::from("{");
    for (key, value) in entries {
        if out.len() > 1 {
            out.push(',');
        }
        // A `str` always serializes.
        out.push_str(&serde_json::to_string(key).unwrap_or_default());
        out.push(':');
        out.push_str(value.get());
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_and_spelling_survive() {
        let text = r#"{"z":1,"a":100000000000000000000,"k\"ey":{"b":2,"a":1},"z":[1.50]}"#;
        let entries = entries(text, 4).unwrap();
        let keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(keys, ["z", "a", "k\"ey", "z"]);
        assert_eq!(
            write(entries.iter().map(|(k, v)| (k.as_ref(), *v))),
            text,
            "byte for byte"
        );
        assert!(super::entries("[1]", 4).is_err());
        assert!(super::entries("{} x", 4).is_err());
        assert!(super::entries(text, 3).is_err(), "one field too many");
    }

    #[test]
    fn a_string_in_a_cut_prefix() {
        let body = r#"{"isLatest":true,"event":"x","instance":"acme","data":{"instance":"no"}}"#;
        for cut in 0..body.len() {
            let found = string_in_prefix(&body.as_bytes()[..cut], "instance");
            // Whole once the closing quote of "acme" is in.
            let whole = cut >= body.find("acme").unwrap() + 5;
            assert_eq!(found.as_deref(), whole.then_some("acme"), "cut at {cut}");
        }
        assert_eq!(
            string_in_prefix(br#"{"data":{"instance":"x"}}"#, "instance"),
            None
        );
        assert_eq!(string_in_prefix(br#"{"instance":1}"#, "instance"), None);
    }
}
