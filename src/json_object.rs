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

/// Splits a JSON object into its entries; anything else (or trailing bytes) is an error.
pub fn entries(text: &str) -> Result<Entries<'_>, serde_json::Error> {
    struct ObjectVisitor;

    impl<'de> Visitor<'de> for ObjectVisitor {
        type Value = Entries<'de>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
            let mut entries = Vec::with_capacity(8);
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                let value: &'de RawValue = map.next_value()?;
                entries.push((key, value));
            }
            Ok(entries)
        }
    }

    let mut deserializer = serde_json::Deserializer::from_str(text);
    let entries = deserializer.deserialize_map(ObjectVisitor)?;
    deserializer.end()?;
    Ok(entries)
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
        let entries = entries(text).unwrap();
        let keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(keys, ["z", "a", "k\"ey", "z"]);
        assert_eq!(
            write(entries.iter().map(|(k, v)| (k.as_ref(), *v))),
            text,
            "byte for byte"
        );
        assert!(super::entries("[1]").is_err());
        assert!(super::entries("{} x").is_err());
    }
}
