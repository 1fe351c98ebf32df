//! A CONNECT's request and `auth` payload, read in two steps: the key first, the rest
//! (filter, offset, snapshot) only after the key is accepted.

use std::collections::HashSet;

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::session::{ConnectError, Resume};
use crate::envelope;
use crate::sio_request;

/// The largest CONNECT `auth` payload: a key, a filter of every event and an offset fit
/// many times over. Far below the emit limit, and checked before the payload is parsed.
pub const MAX_AUTH_BYTES: usize = 8 * 1024;

/// The most events one filter may list (Evolution has about 30).
pub const MAX_FILTER_EVENTS: usize = 64;

/// A CONNECT's request, checked for size but not yet read beyond what finding the key
/// needs: the filter, offset and snapshot are parsed only after authentication.
pub struct ConnectRequest<'a> {
    parts: &'a http::request::Parts,
    fields: AuthFields<'a>,
}

/// The `auth` fields we read, each kept raw; every other field is skipped unparsed.
#[derive(Default, Deserialize)]
struct AuthFields<'a> {
    #[serde(default, borrow)]
    apikey: RawField<'a>,
    #[serde(default, borrow)]
    events: RawField<'a>,
    #[serde(default, borrow)]
    offset: RawField<'a>,
    #[serde(default, borrow)]
    snapshot: RawField<'a>,
}

/// A field that was present (`null` included) or absent.
#[derive(Default)]
struct RawField<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for RawField<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        <&'a RawValue>::deserialize(deserializer).map(|raw| RawField(Some(raw)))
    }
}

impl RawField<'_> {
    fn parse<T: serde::de::DeserializeOwned>(&self) -> Option<Result<T, serde_json::Error>> {
        self.0.map(|raw| serde_json::from_str(raw.get()))
    }
}

impl<'a> ConnectRequest<'a> {
    /// Refuses an `auth` over [`MAX_AUTH_BYTES`] or that is not an object (or absent).
    pub fn parse(
        parts: &'a http::request::Parts,
        payload: Option<&'a RawValue>,
    ) -> Result<Self, ConnectError> {
        let fields = match payload {
            None => AuthFields::default(),
            Some(raw) if raw.get().len() > MAX_AUTH_BYTES => {
                return Err(ConnectError::AuthTooLarge);
            }
            Some(raw) if raw.get() == "null" => AuthFields::default(),
            Some(raw) => serde_json::from_str(raw.get()).map_err(|_| ConnectError::BadAuth)?,
        };
        Ok(Self { parts, fields })
    }

    /// `?apikey=`, else the `apikey` header, else `auth.apikey` (a string).
    pub fn key(&self) -> Option<String> {
        sio_request::key_from_request(self.parts)
            .or_else(|| self.fields.apikey.parse::<String>().and_then(Result::ok))
    }

    /// The rest of what the client asked for. Call it once the key is accepted.
    pub fn options(&self) -> Result<ClientOptions, ConnectError> {
        let filter = parse_filter(self.parts, &self.fields.events)?;
        let resume = match self.fields.offset.parse::<Option<String>>() {
            None => Resume::No,
            Some(Ok(None)) => Resume::FromNow,
            Some(Ok(Some(offset))) if offset.is_empty() => Resume::FromNow,
            Some(Ok(Some(offset))) => Resume::After(offset),
            Some(Err(_)) => return Err(ConnectError::BadOffset),
        };
        let snapshot = matches!(self.fields.snapshot.parse::<bool>(), Some(Ok(true)));
        Ok(ClientOptions {
            key: self.key(),
            filter,
            resume,
            snapshot,
        })
    }
}

/// What a client asks for at CONNECT, from its handshake request and its `auth` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// `?apikey=`, else the `apikey` header, else `auth.apikey`.
    pub key: Option<String>,
    /// UPPER_SNAKE events; empty means all.
    pub filter: Vec<String>,
    /// `auth.offset`: absent, `null` or `""` (from now on), or the offset to resume after.
    pub resume: Resume,
    /// `auth.snapshot`.
    pub snapshot: bool,
}

impl ClientOptions {
    /// Pure, so it can be fuzzed: any request and payload give options or a refusal.
    pub fn parse(
        parts: &http::request::Parts,
        payload: Option<&RawValue>,
    ) -> Result<Self, ConnectError> {
        ConnectRequest::parse(parts, payload)?.options()
    }
}

/// The event filter: `auth.events` (string or list) first, then the `events` query
/// parameter. Dotted or UPPER_SNAKE names are accepted; anything else is refused, and so
/// is a list of more than [`MAX_FILTER_EVENTS`].
fn parse_filter(
    parts: &http::request::Parts,
    events: &RawField<'_>,
) -> Result<Vec<String>, ConnectError> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Events {
        Text(String),
        List(Vec<Value>),
    }
    let names: Vec<String> = match events.parse::<Option<Events>>() {
        Some(Ok(Some(Events::Text(text)))) => text.split(',').map(str::to_owned).collect(),
        Some(Ok(Some(Events::List(items)))) => {
            if items.len() > MAX_FILTER_EVENTS {
                return Err(ConnectError::FilterTooLong);
            }
            items
                .into_iter()
                .map(|item| match item {
                    Value::String(name) => Ok(name),
                    other => Err(ConnectError::BadFilter(other.to_string())),
                })
                .collect::<Result<_, _>>()?
        }
        Some(Ok(None)) | None => {
            sio_request::query_param(parts.uri.query().unwrap_or(""), "events")
                .map(|text| text.split(',').map(str::to_owned).collect())
                .unwrap_or_default()
        }
        Some(Err(_)) => {
            let raw = events.0.map(RawValue::get).unwrap_or_default();
            return Err(ConnectError::BadFilter(raw.chars().take(64).collect()));
        }
    };
    if names.len() > MAX_FILTER_EVENTS {
        return Err(ConnectError::FilterTooLong);
    }
    let mut filter = Vec::new();
    let mut seen = HashSet::new();
    for name in names {
        let name = name.trim();
        if name.is_empty() {
            continue;
        }
        let upper = envelope::upper_snake(name);
        if !envelope::is_filter_name(&upper) {
            return Err(ConnectError::BadFilter(name.chars().take(64).collect()));
        }
        if seen.insert(upper.clone()) {
            filter.push(upper);
        }
    }
    // A filter of names Evolution never sends would deliver nothing, silently: a typo.
    if !filter.is_empty()
        && filter
            .iter()
            .all(|name| envelope::evolution_event(name).is_none())
    {
        let closest = envelope::upper_snake(envelope::closest_evolution_event(&filter[0]));
        return Err(ConnectError::UnknownEvents {
            names: filter.join(","),
            closest,
        });
    }
    Ok(filter)
}
