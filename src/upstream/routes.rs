//! The route table: event name → HTTP method and path, Evolution v2's message and chat
//! routes by default, overridable in `[upstream.routes]`.

use std::collections::{BTreeMap, HashMap};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};

use crate::envelope::InstanceName;

/// One route: an HTTP method and a path template containing `{instance}` once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub method: String,
    pub path: String,
}

impl RouteSpec {
    pub(super) fn validate(&self) -> Result<(), String> {
        let method = self.method.to_ascii_uppercase();
        if !matches!(method.as_str(), "GET" | "POST" | "PUT" | "PATCH" | "DELETE") {
            return Err(format!(
                "method {:?} is not GET, POST, PUT, PATCH or DELETE",
                self.method
            ));
        }
        if !self.path.starts_with('/') || self.path.matches("{instance}").count() != 1 {
            return Err(format!(
                "path {:?} must start with '/' and contain {{instance}} exactly once",
                self.path
            ));
        }
        if self.path.contains(['?', '#']) {
            return Err(format!("path {:?} may not contain '?' or '#'", self.path));
        }
        Ok(())
    }
}

/// Evolution v2's message, chat, instance and group routes: `(event, method)`; the path is
/// `/{event}/{instance}`.
const DEFAULT_ROUTES: &[(&str, &str)] = &[
    ("message/sendText", "POST"),
    ("message/sendMedia", "POST"),
    ("message/sendWhatsAppAudio", "POST"),
    ("message/sendSticker", "POST"),
    ("message/sendLocation", "POST"),
    ("message/sendContact", "POST"),
    ("message/sendReaction", "POST"),
    ("message/sendPoll", "POST"),
    ("message/sendList", "POST"),
    ("message/sendButtons", "POST"),
    ("chat/markMessageAsRead", "POST"),
    ("chat/sendPresence", "POST"),
    ("chat/whatsappNumbers", "POST"),
    ("chat/updateMessage", "POST"),
    ("chat/deleteMessageForEveryone", "DELETE"),
    ("chat/archiveChat", "POST"),
    ("chat/findMessages", "POST"),
    ("chat/findChats", "POST"),
    ("chat/findContacts", "POST"),
    ("chat/fetchProfilePictureUrl", "POST"),
    ("instance/connectionState", "GET"),
    ("group/fetchAllGroups", "GET"),
];

/// Evolution's websocket docs show `socket.emit('send_message', {message})`.
pub(super) const SEND_MESSAGE_ALIAS: &str = "send_message";

/// A resolved route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub method: http::Method,
    /// `/message/sendText/{instance}`
    pub template: String,
}

impl Route {
    /// The request path for `instance`, with the name percent-encoded as one segment.
    pub fn path_for(&self, instance: &InstanceName) -> String {
        let encoded = utf8_percent_encode(instance.as_str(), PATH_SEGMENT).to_string();
        self.template.replace("{instance}", &encoded)
    }
}

/// Everything but RFC 3986 unreserved characters is encoded in a path segment.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Event name → route.
#[derive(Debug, Clone)]
pub struct RouteTable(HashMap<String, Route>);

impl RouteTable {
    pub fn new(overrides: &BTreeMap<String, RouteSpec>) -> Self {
        let mut routes: HashMap<String, Route> = DEFAULT_ROUTES
            .iter()
            .map(|(event, method)| {
                let route = Route {
                    method: method.parse().unwrap_or(http::Method::POST),
                    template: format!("/{event}/{{instance}}"),
                };
                ((*event).to_owned(), route)
            })
            .collect();
        for (event, spec) in overrides {
            let method = spec
                .method
                .to_ascii_uppercase()
                .parse()
                .unwrap_or(http::Method::POST);
            routes.insert(
                event.clone(),
                Route {
                    method,
                    template: spec.path.clone(),
                },
            );
        }
        Self(routes)
    }

    pub fn get(&self, event: &str) -> Option<&Route> {
        let event = if event == SEND_MESSAGE_ALIAS {
            "message/sendText"
        } else {
            event
        };
        self.0.get(event)
    }
}

/// The events of Evolution's default routes, in the order listed, then the `send_message`
/// alias (the emit fuzz target picks events by index from this).
pub fn default_events() -> impl Iterator<Item = &'static str> {
    DEFAULT_ROUTES
        .iter()
        .map(|(event, _)| *event)
        .chain([SEND_MESSAGE_ALIAS])
}

pub(super) fn encode_query(text: &str) -> String {
    utf8_percent_encode(text, PATH_SEGMENT).to_string()
}
