//! The event and its names: [`Envelope`], [`EventName`], [`InstanceName`].
//!
//! This is the only module that converts between the three forms of an event name
//! (dotted wire name, UPPER_SNAKE filter form, kebab URL suffix) and the only one that
//! knows the shape of Evolution API's webhook body. It knows nothing of HTTP or sockets.
//!
//! `data` and every other value are kept as the bytes Evolution sent (`RawValue`): they
//! are never parsed into `serde_json::Value`, which would reorder keys and cost time.

use std::fmt;
use std::sync::Arc;

use serde_json::value::RawValue;

use crate::json_object::Entries;

/// Why a webhook body cannot become an [`Envelope`].
///
/// `Syntax` means the bytes are not a JSON object (answered 400); `Semantic` means the
/// object lacks what we need (answered 422). Evolution retries neither.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("invalid JSON body: {0}")]
    Syntax(String),
    #[error("{0}")]
    Semantic(String),
}

/// The keys that Evolution's own socket.io integration emits, in its order.
const EMIT_ORDER: [&str; 7] = [
    "event",
    "instance",
    "data",
    "server_url",
    "date_time",
    "sender",
    "apikey",
];

/// The webhook-only key that the socket.io emit drops.
const DROPPED_KEY: &str = "destination";

/// A validated instance name: always usable as a namespace `/<name>` and, percent-encoded,
/// as a path segment.
///
/// Rule: 1–128 bytes of UTF-8; no `/`, `\` or control characters; not `.` or `..`. Every
/// other name Evolution accepts is accepted, `50%off`, `t x`, `ns?q` and `#hash` included: a
/// socket.io namespace is not URL-decoded, so `%` is special only in the REST paths the
/// sidecar builds, and those percent-encode the name (`upstream::routes`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceName(Arc<str>);

impl InstanceName {
    pub const MAX_LEN: usize = 128;

    pub fn parse(name: &str) -> Result<Self, String> {
        if name.is_empty() {
            return Err("instance name is empty".into());
        }
        if name.len() > Self::MAX_LEN {
            return Err(format!(
                "instance name is longer than {} bytes",
                Self::MAX_LEN
            ));
        }
        if name == "." || name == ".." {
            return Err(format!("instance name {name:?} is not allowed"));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| matches!(c, '/' | '\\') || c.is_control())
        {
            return Err(format!("instance name contains {bad:?}"));
        }
        Ok(Self(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The socket.io namespace of this instance.
    pub fn namespace(&self) -> String {
        format!("/{}", self.0)
    }

    /// The instance of a namespace path such as `/acme`, if it is one.
    pub fn from_namespace(ns: &str) -> Option<Self> {
        ns.strip_prefix('/').and_then(|name| Self::parse(name).ok())
    }
}

impl fmt::Display for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// An event name in its dotted wire form (`messages.upsert`, `group-participants.update`).
///
/// Only letters, digits, `.`, `_` and `-` (1–64 bytes): every Evolution event fits, and
/// socket.io's reserved names (`connect`, ...) never collide with a dotted name we emit
/// because `connect`/`disconnect` are refused below.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EventName {
    wire: Arc<str>,
    /// Computed once: filters, rooms and `SIDECAR_EVENTS` compare this form per event.
    upper: Arc<str>,
}

impl EventName {
    pub const MAX_LEN: usize = 64;

    pub fn parse(name: &str) -> Result<Self, String> {
        if name.is_empty() || name.len() > Self::MAX_LEN {
            return Err(format!(
                "event name must be 1 to {} bytes long",
                Self::MAX_LEN
            ));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(format!(
                "event name {name:?} may only contain letters, digits, '.', '_' and '-'"
            ));
        }
        if RESERVED_EVENTS.contains(&name) {
            return Err(format!("event name {name:?} is reserved by socket.io"));
        }
        Ok(Self {
            wire: Arc::from(name),
            upper: Arc::from(upper_snake(name)),
        })
    }

    /// The wire form, as emitted.
    pub fn as_str(&self) -> &str {
        &self.wire
    }

    /// `MESSAGES_UPSERT`: the form used by filters and configuration.
    pub fn upper_snake(&self) -> &str {
        &self.upper
    }

    /// `messages-upsert`: the by-events URL suffix.
    pub fn kebab(&self) -> String {
        self.wire
            .chars()
            .map(|c| match c {
                '.' | '_' => '-',
                c => c.to_ascii_lowercase(),
            })
            .collect()
    }
}

impl fmt::Display for EventName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.wire)
    }
}

impl fmt::Debug for EventName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.wire, f)
    }
}

/// The events that say an instance is gone (Evolution sends either name). They pass every
/// event filter: each replica must see them to forget the instance.
pub const DELETION_EVENTS: [&str; 2] = ["instance.delete", "remove.instance"];

/// Whether an event says the instance is gone.
pub fn is_deletion(event: &str) -> bool {
    DELETION_EVENTS.contains(&event)
}

/// Every event Evolution API sends, 2.3.6 to 2.4 (the dotted values of its `Events` enum
/// across those versions), sorted. Events outside it are still accepted and emitted: a
/// newer Evolution may add some. It names metric labels (anything else is `other`) and
/// catches misspelled filters.
pub const EVOLUTION_EVENTS: &[&str] = &[
    "application.startup",
    "call",
    "chama-ai.action",
    "chats.delete",
    "chats.set",
    "chats.update",
    "chats.upsert",
    "connection.update",
    "contacts.set",
    "contacts.update",
    "contacts.upsert",
    "creds.update",
    "group-participants.update",
    "groups.update",
    "groups.upsert",
    "instance.create",
    "instance.delete",
    "labels.association",
    "labels.edit",
    "logout.instance",
    "messages.delete",
    "messages.edited",
    "messages.set",
    "messages.update",
    "messages.upsert",
    "messaging-history.set",
    "presence.update",
    "qrcode.updated",
    "remove.instance",
    "send.message",
    "send.message.update",
    "status.instance",
    "typebot.change-status",
    "typebot.start",
];

/// The event Evolution sends under this name (any form: dotted, UPPER_SNAKE), if any.
///
/// Runs for every webhook (its metric label), so it compares in place: `snake_fold` maps
/// ASCII to ASCII and leaves every other character alone, so two names have the same
/// `upper_snake` form exactly when their bytes match after it.
pub fn evolution_event(name: &str) -> Option<&'static str> {
    EVOLUTION_EVENTS.iter().copied().find(|known| {
        known.len() == name.len()
            && known
                .bytes()
                .zip(name.bytes())
                .all(|(a, b)| snake_fold(char::from(a)) == snake_fold(char::from(b)))
    })
}

/// The Evolution event whose UPPER_SNAKE form is closest to `name`'s (edit distance), for
/// "did you mean" messages.
pub fn closest_evolution_event(name: &str) -> &'static str {
    let upper = upper_snake(name);
    EVOLUTION_EVENTS
        .iter()
        .min_by_key(|known| strsim::levenshtein(&upper_snake(known), &upper))
        .copied()
        .unwrap_or("messages.upsert")
}

/// Events the socket.io client library reserves for itself.
const RESERVED_EVENTS: [&str; 6] = [
    "connect",
    "connect_error",
    "disconnect",
    "disconnecting",
    "newListener",
    "removeListener",
];

/// Any event-name spelling to UPPER_SNAKE: `event.replace(/[.-]/g,'_').toUpperCase()`.
pub fn upper_snake(name: &str) -> String {
    name.chars().map(snake_fold).collect()
}

/// One character of `upper_snake`.
fn snake_fold(c: char) -> char {
    match c {
        '.' | '-' => '_',
        c => c.to_ascii_uppercase(),
    }
}

/// Whether a string is a well-formed UPPER_SNAKE filter name (`MESSAGES_UPSERT`).
pub fn is_filter_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= EventName::MAX_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// An event's socket.io argument, shared by the log, the stream append and every emit.
///
/// A `Box<RawValue>` behind the `Arc`, not an `Arc<RawValue>`: the box takes over the
/// `String` the payload was written into (sized exactly, so without reallocating), while an
/// `Arc<RawValue>` would copy every byte once more. Media bodies reach tens of megabytes.
pub type Payload = Arc<Box<RawValue>>;

/// One webhook, ready to emit: its routing fields and the argument, serialized once.
#[derive(Clone, Debug)]
pub struct Envelope {
    pub event: EventName,
    pub instance: InstanceName,
    /// The socket.io argument: the body without `destination`, keys in Evolution's order.
    pub payload: Payload,
}

impl Envelope {
    /// Parses a webhook body. Only `event` and `instance` are decoded; every value is
    /// copied byte for byte into the payload.
    pub fn from_webhook(body: &[u8]) -> Result<Self, Error> {
        let text = std::str::from_utf8(body)
            .map_err(|err| Error::Syntax(format!("body is not UTF-8: {err}")))?;
        check_depth(text, MAX_DEPTH)?;
        let entries = parse_top_level(text)?;

        let event = unique_string_field(&entries, "event")?;
        let instance = unique_string_field(&entries, "instance")?;
        let event = EventName::parse(&event).map_err(Error::Semantic)?;
        let instance = InstanceName::parse(&instance).map_err(Error::Semantic)?;
        let payload = reorder(&entries);
        Ok(Self {
            event,
            instance,
            payload,
        })
    }
}

/// The deepest nesting accepted: what serde_json itself parses (it refuses 128 levels), so
/// every accepted payload is one any JSON reader here could read (found by fuzzing).
/// Raw values are skipped without that limit, so it is checked here.
const MAX_DEPTH: usize = 127;

/// Refuses nesting deeper than `limit` in one linear pass (no recursion).
fn check_depth(text: &str, limit: usize) -> Result<(), Error> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in text.as_bytes() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > limit {
                    return Err(Error::Syntax(format!("nesting deeper than {limit}")));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// The body's `instance`, from its first bytes (Evolution writes it second, after
/// `event` and 2.3.7's few `extra` fields): a credential bound to an instance can be
/// judged before the rest of a large body is read.
pub fn instance_in_prefix(prefix: &[u8]) -> Option<String> {
    crate::json_object::string_in_prefix(prefix, "instance")
}

/// Evolution's envelope has about ten top-level fields (2.3.7's `extra` adds a few).
const MAX_TOP_LEVEL_FIELDS: usize = 256;

fn parse_top_level(text: &str) -> Result<Entries<'_>, Error> {
    crate::json_object::entries(text, MAX_TOP_LEVEL_FIELDS)
        .map_err(|err| Error::Syntax(err.to_string()))
}

/// Reads a string field that must appear exactly once.
fn unique_string_field(entries: &Entries<'_>, key: &str) -> Result<String, Error> {
    let mut found = entries.iter().filter(|(k, _)| k == key).map(|(_, v)| *v);
    let value = found
        .next()
        .ok_or_else(|| Error::Semantic(format!("field `{key}` is missing")))?;
    if found.next().is_some() {
        // Two `event` keys would let a reader pick either one: refuse to guess.
        return Err(Error::Syntax(format!(
            "field `{key}` appears more than once"
        )));
    }
    serde_json::from_str::<String>(value.get())
        .map_err(|_| Error::Semantic(format!("field `{key}` must be a string")))
}

/// Builds the emitted argument: unknown keys before `event` first, then the known keys
/// in Evolution's emit order, then the other unknown keys; `destination` dropped.
fn reorder(entries: &Entries<'_>) -> Payload {
    let is_known = |key: &str| EMIT_ORDER.contains(&key) || key == DROPPED_KEY;
    let event_position = entries.iter().position(|(k, _)| k == "event").unwrap_or(0);
    // Unknown keys before `event`, the known keys in Evolution's order, then the rest.
    let mut order: Vec<(&str, &RawValue)> = Vec::with_capacity(entries.len());
    for (key, value) in &entries[..event_position] {
        if !is_known(key) {
            order.push((key, value));
        }
    }
    for known in EMIT_ORDER {
        if let Some((key, value)) = entries.iter().find(|(k, _)| k == known) {
            order.push((key, value));
        }
    }
    for (key, value) in &entries[event_position..] {
        if !is_known(key) {
            order.push((key, value));
        }
    }
    // Keys are re-escaped (not copied) so a key with escapes stays valid JSON; escaping
    // them first gives the exact length, so the payload is written once, never regrown.
    let keys: Vec<String> = order.iter().map(|(key, _)| json_string(key)).collect();
    let length = 2
        + order.len().saturating_sub(1)
        + keys
            .iter()
            .zip(&order)
            .map(|(key, (_, value))| key.len() + 1 + value.get().len())
            .sum::<usize>();
    let mut out = String::with_capacity(length);
    out.push('{');
    for (i, (key, (_, value))) in keys.iter().zip(&order).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(key);
        out.push(':');
        out.push_str(value.get());
    }
    out.push('}');
    debug_assert_eq!(out.len(), length, "the payload is sized exactly");
    let raw = RawValue::from_string(out).unwrap_or_else(|_| {
        // Unreachable: every piece came from valid JSON. Stay total all the same.
        RawValue::from_string("{}".to_owned()).expect("static JSON is valid")
    });
    Arc::new(raw)
}

fn json_string(value: &str) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "\"\"".to_owned())
}

#[cfg(test)]
mod tests;
