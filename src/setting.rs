//! Value types shared by every module's settings: the one error type of configuration,
//! [`Secret`], comma lists and CIDR lists.
//!
//! A leaf: it imports nothing from the crate, so each module can own its `Config` section
//! without importing `config`, and only `config` imports the sections.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why the sidecar cannot start.
///
/// [`Error::Invalid`] and [`Error::Config`] are the operator's to fix (exit 64, before any
/// port is bound); [`Error::Startup`] is not configuration (an HTTP client that cannot be
/// built) and exits 1.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// One value is wrong. `config` adds the environment variable's name to the message.
    #[error("{}{key}=\"{value}\" is not valid: {reason}", variable_prefix(.variable))]
    Invalid {
        key: String,
        value: String,
        reason: String,
        /// The environment variable that sets `key`, filled in by `config`.
        variable: Option<&'static str>,
    },
    /// A configuration problem that no single key names.
    #[error("{0}")]
    Config(String),
    /// Not a configuration problem.
    #[error("{0}")]
    Startup(String),
}

fn variable_prefix(variable: &Option<&'static str>) -> String {
    variable.map_or_else(String::new, |name| format!("{name} ("))
}

impl Error {
    pub fn new(message: impl Into<String>) -> Self {
        Self::Config(message.into())
    }

    pub fn startup(message: impl Into<String>) -> Self {
        Self::Startup(message.into())
    }

    /// Whether the operator's configuration is at fault (exit 64).
    pub fn is_config(&self) -> bool {
        !matches!(self, Self::Startup(_))
    }

    /// Names the environment variable of an [`Error::Invalid`] whose key it sets.
    pub fn with_variable(self, lookup: impl Fn(&str) -> Option<&'static str>) -> Self {
        match self {
            Self::Invalid {
                key,
                value,
                reason,
                variable: None,
            } => {
                let variable = lookup(&key);
                let key = match variable {
                    // `NAME (key)="value"`: the closing parenthesis goes with the key.
                    Some(_) => format!("{key})"),
                    None => key,
                };
                Self::Invalid {
                    key,
                    value,
                    reason,
                    variable,
                }
            }
            other => other,
        }
    }
}

/// The error for one invalid value: `key="value" is not valid: reason`.
pub fn invalid(key: &str, value: &dyn fmt::Display, reason: impl fmt::Display) -> Error {
    Error::Invalid {
        key: key.to_owned(),
        value: value.to_string(),
        reason: reason.to_string(),
        variable: None,
    }
}

/// A secret string: its `Debug` and serialized forms are `***`, so it cannot reach a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // An environment value such as `123456` arrives as a number: keep its text.
        struct SecretVisitor;
        impl serde::de::Visitor<'_> for SecretVisitor {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret(v.to_owned()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
        }
        deserializer.deserialize_any(SecretVisitor)
    }
}

/// Serde helpers for comma-separated lists: `"A, B"` in the environment, `["A","B"]` in TOML.
pub mod comma_list {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Text(String),
        List(Vec<String>),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<String>, D::Error> {
        let items = match Either::deserialize(deserializer)? {
            Either::Text(text) => text.split(',').map(str::to_owned).collect(),
            Either::List(list) => list,
        };
        Ok(items
            .into_iter()
            .map(|item| item.trim().to_owned())
            .filter(|item| !item.is_empty())
            .collect())
    }

    pub fn serialize<S: Serializer>(items: &[String], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(items)
    }
}

/// Parses a list of networks (`10.0.0.0/8`) or bare addresses (`192.0.2.7`, as a /32 or
/// /128) set by `key`.
pub fn cidr_list(key: &str, items: &[String]) -> Result<Vec<IpNet>, Error> {
    items
        .iter()
        .map(|text| {
            text.parse::<IpNet>()
                .or_else(|err| text.parse::<IpAddr>().map(IpNet::from).map_err(|_| err))
                .map_err(|err| invalid(key, &items.join(","), format!("{text:?}: {err}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_names_the_variable_once_config_knows_it() {
        let err = invalid("hub.events", &"X", "bad");
        assert_eq!(err.to_string(), r#"hub.events="X" is not valid: bad"#);
        let named = err.with_variable(|_| Some("SIDECAR_EVENTS"));
        assert_eq!(
            named.to_string(),
            r#"SIDECAR_EVENTS (hub.events)="X" is not valid: bad"#
        );
        assert!(named.is_config());
        assert!(!Error::startup("http client").is_config());
    }

    #[test]
    fn cidrs_and_bare_addresses() {
        let nets = cidr_list("k", &["10.0.0.0/8".into(), "192.0.2.7".into()]).unwrap();
        assert!(nets[0].contains(&"10.1.2.3".parse::<IpAddr>().unwrap()));
        assert_eq!(nets[1].prefix_len(), 32);
        let err = cidr_list("k", &["nope".into()]).unwrap_err();
        assert!(
            err.to_string().starts_with(r#"k="nope" is not valid"#),
            "{err}"
        );
    }
}
