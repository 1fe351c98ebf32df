//! Client emits → Evolution REST: the route table, the call, and its ack.
//!
//! A socket on `/<instance>` emits `message/sendText` with an object; [`Upstream::forward`]
//! maps the event through the [`RouteTable`] to `POST /message/sendText/<instance>`,
//! calls it with the socket's own key, and returns the [`AckReply`]. Sending a message is
//! not idempotent, so nothing here ever retries; a `requestId` makes a repeated emit
//! return the first call's ack instead of calling again.
//!
//! | failure                          | ack                            |
//! |----------------------------------|--------------------------------|
//! | emit on `/` (no instance)        | `{"status":400,"error":...}`   |
//! | argument not an object           | `{"status":400,"error":...}`   |
//! | no route for the event           | `{"status":404,"error":...}`   |
//! | too many calls in flight         | `{"status":429,"error":...}`   |
//! | upstream unreachable             | `{"status":502,"error":...}`   |
//! | upstream timed out               | `{"status":504,"error":...}`   |
//! | any upstream answer              | `{"status":N,"body":...}`      |

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::OnceCell;

use crate::config;
use crate::envelope::InstanceName;
use crate::hub::Session;
use crate::telemetry::names;

/// Settings of the upstream Evolution API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Evolution API's base URL.
    pub url: String,
    pub connect_timeout_secs: u64,
    /// The longest an emit's REST call, or a proxied request's response headers, may take.
    pub timeout_secs: u64,
    /// Emits one socket may have in flight before it is answered 429.
    pub max_in_flight: usize,
    /// Extra or overriding routes: event name → method and path template.
    pub routes: BTreeMap<String, RouteSpec>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8080".to_owned(),
            connect_timeout_secs: 5,
            timeout_secs: 30,
            max_in_flight: 16,
            routes: BTreeMap::new(),
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), config::Error> {
        let uri: http::Uri = self
            .url
            .parse()
            .map_err(|err| config::invalid("upstream.url", &self.url, err))?;
        if !matches!(uri.scheme_str(), Some("http") | Some("https")) || uri.host().is_none() {
            return Err(config::invalid(
                "upstream.url",
                &self.url,
                "must be an http:// or https:// URL with a host",
            ));
        }
        if uri.query().is_some() {
            return Err(config::invalid(
                "upstream.url",
                &self.url,
                "must have no query",
            ));
        }
        if self.timeout_secs == 0 {
            return Err(config::invalid(
                "upstream.timeout_secs",
                &0,
                "must be positive",
            ));
        }
        if self.connect_timeout_secs == 0 {
            return Err(config::invalid(
                "upstream.connect_timeout_secs",
                &0,
                "must be positive",
            ));
        }
        if self.max_in_flight == 0 {
            return Err(config::invalid(
                "upstream.max_in_flight",
                &0,
                "must be positive",
            ));
        }
        for (event, spec) in &self.routes {
            spec.validate().map_err(|why| {
                config::Error::new(format!(
                    "route {event:?} in [upstream.routes] is not valid: {why}"
                ))
            })?;
        }
        Ok(())
    }

    /// The base URL without a trailing `/`.
    pub fn base_url(&self) -> &str {
        self.url.trim_end_matches('/')
    }
}

/// One route: an HTTP method and a path template containing `{instance}` once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub method: String,
    pub path: String,
}

impl RouteSpec {
    fn validate(&self) -> Result<(), String> {
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
const SEND_MESSAGE_ALIAS: &str = "send_message";

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

/// The answer to every emit: the upstream's answer, or why there was none.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum AckReply {
    Upstream { status: u16, body: Value },
    Error { status: u16, error: String },
}

impl AckReply {
    pub fn error(status: u16, error: impl Into<String>) -> Self {
        AckReply::Error {
            status,
            error: error.into(),
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            AckReply::Upstream { status, .. } | AckReply::Error { status, .. } => *status,
        }
    }
}

/// One emit, ready to send: what [`plan`] makes of an event and its argument.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub method: http::Method,
    /// `/message/sendText/acme%20support`, with `?query` for GET routes.
    pub path_and_query: String,
    /// The JSON body (not for GET).
    pub body: Option<String>,
    /// Stripped from the argument: the idempotency key.
    pub request_id: Option<String>,
    /// The route's template, for metrics and logs.
    pub route: String,
}

/// Maps an emit to its REST call, for `instance` only. Pure, so it can be fuzzed: every
/// input gives a plan or the ack that refuses it.
pub fn plan(
    routes: &RouteTable,
    instance: &InstanceName,
    event: &str,
    argument: Value,
) -> Result<Plan, AckReply> {
    let Some(route) = routes.get(event) else {
        return Err(AckReply::error(404, format!("unknown event {event:?}")));
    };
    let mut fields = match argument {
        Value::Object(fields) => fields,
        Value::Null if route.method == http::Method::GET => Map::new(),
        _ => return Err(AckReply::error(400, "argument must be a JSON object")),
    };
    if event == SEND_MESSAGE_ALIAS
        && !fields.contains_key("text")
        && let Some(message) = fields.remove("message")
    {
        fields.insert("text".to_owned(), message);
    }
    let request_id = match fields.remove("requestId") {
        Some(Value::String(id)) => Some(id),
        Some(_) => return Err(AckReply::error(400, "requestId must be a string")),
        None => None,
    };
    let mut path_and_query = route.path_for(instance);
    let body = if route.method == http::Method::GET {
        let query: Vec<String> = fields
            .into_iter()
            .map(|(key, value)| {
                let value = match value {
                    Value::String(text) => text,
                    other => other.to_string(),
                };
                format!("{}={}", encode_query(&key), encode_query(&value))
            })
            .collect();
        if !query.is_empty() {
            path_and_query.push('?');
            path_and_query.push_str(&query.join("&"));
        }
        None
    } else {
        Some(Value::Object(fields).to_string())
    };
    Ok(Plan {
        method: route.method.clone(),
        path_and_query,
        body,
        request_id,
        route: route.template.clone(),
    })
}

/// How long a `requestId` is remembered.
const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(300);
/// At most this many remembered `requestId`s; the oldest are dropped beyond it.
const MAX_REMEMBERED_REQUESTS: usize = 100_000;

struct Remembered {
    reply: OnceCell<AckReply>,
    created: Instant,
}

/// The REST client for emits.
pub struct Upstream {
    http: reqwest::Client,
    base_url: String,
    routes: RouteTable,
    max_in_flight: usize,
    /// Keyed by instance, the caller's key and the requestId: one client's answer is
    /// never handed to another.
    remembered: Mutex<HashMap<(InstanceName, String, String), Arc<Remembered>>>,
    /// Calls in flight across all sockets, for shutdown.
    active: Arc<AtomicUsize>,
    idle: Arc<tokio::sync::Notify>,
    draining: AtomicBool,
}

impl Upstream {
    pub fn new(config: &Config) -> Result<Self, config::Error> {
        config.validate()?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(config.connect_timeout_secs))
            .timeout(Duration::from_secs(config.timeout_secs))
            .build()
            .map_err(|err| config::Error::new(format!("http client: {err}")))?;
        Ok(Self {
            http,
            base_url: config.base_url().to_owned(),
            routes: RouteTable::new(&config.routes),
            max_in_flight: config.max_in_flight,
            remembered: Mutex::new(HashMap::new()),
            active: Arc::new(AtomicUsize::new(0)),
            idle: Arc::new(tokio::sync::Notify::new()),
            draining: AtomicBool::new(false),
        })
    }

    /// Forwards one emit of `session`'s socket and says what to ack.
    pub async fn forward(&self, session: &Session, event: &str, argument: Value) -> AckReply {
        let Some(instance) = &session.instance else {
            return AckReply::error(400, "emits on / have no instance: connect to /<instance>");
        };
        let plan = match plan(&self.routes, instance, event, argument) {
            Ok(plan) => plan,
            Err(reply) => return reply,
        };

        if self.draining.load(Ordering::Acquire) {
            return AckReply::error(503, "shutting down, retry later");
        }
        let _active = Active::enter(&self.active, &self.idle);
        let Some(_permit) = InFlight::acquire(session, self.max_in_flight) else {
            return AckReply::error(
                429,
                format!(
                    "more than {} calls in flight on this socket",
                    self.max_in_flight
                ),
            );
        };
        let Some(request_id) = plan.request_id.clone() else {
            return self.call(&plan, instance, session).await;
        };
        // A repeat of the same requestId waits for, then shares, the first answer.
        let key = (
            instance.clone(),
            session.key.expose().to_owned(),
            request_id,
        );
        let remembered = self.remember(&key);
        let reply = remembered
            .reply
            .get_or_init(|| self.call(&plan, instance, session))
            .await
            .clone();
        if reply.status() == 502 {
            // The request never reached the upstream: a retry may really try again.
            let mut map = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
            if map
                .get(&key)
                .is_some_and(|entry| Arc::ptr_eq(entry, &remembered))
            {
                map.remove(&key);
            }
        }
        reply
    }

    /// Refuses new calls and waits until those in flight are done, or `deadline`.
    pub async fn drain(&self, deadline: tokio::time::Instant) -> bool {
        self.draining.store(true, Ordering::Release);
        loop {
            let notified = self.idle.notified();
            if self.active.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.active.load(Ordering::Acquire) == 0;
            }
        }
    }

    fn remember(&self, key: &(InstanceName, String, String)) -> Arc<Remembered> {
        let now = Instant::now();
        let mut remembered = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
        let key = key.clone();
        if let Some(entry) = remembered.get(&key)
            && now.duration_since(entry.created) < IDEMPOTENCY_WINDOW
        {
            return entry.clone();
        }
        if remembered.len() >= MAX_REMEMBERED_REQUESTS {
            remembered.retain(|_, entry| now.duration_since(entry.created) < IDEMPOTENCY_WINDOW);
            if remembered.len() >= MAX_REMEMBERED_REQUESTS {
                remembered.clear();
            }
        }
        let entry = Arc::new(Remembered {
            reply: OnceCell::new(),
            created: now,
        });
        remembered.insert(key, entry.clone());
        entry
    }

    async fn call(&self, plan: &Plan, instance: &InstanceName, session: &Session) -> AckReply {
        let url = format!("{}{}", self.base_url, plan.path_and_query);
        let mut request = self
            .http
            .request(plan.method.clone(), &url)
            .header("apikey", session.key.expose());
        if let Some(body) = &plan.body {
            request = request
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
        }
        let route = plan.route.as_str();

        let started = Instant::now();
        let outcome = async {
            let response = request.send().await?;
            let status = response.status().as_u16();
            Ok::<_, reqwest::Error>((status, response.bytes().await?))
        }
        .await;
        let label = route.to_owned();
        metrics::histogram!(names::UPSTREAM_SECONDS, "route" => label.clone())
            .record(started.elapsed().as_secs_f64());
        let (status, body) = match outcome {
            Ok(answer) => answer,
            Err(err) => {
                let reply = failure(&err, instance, route);
                let status = reply.status().to_string();
                metrics::counter!(names::UPSTREAM_CALLS, "route" => label, "status" => status)
                    .increment(1);
                return reply;
            }
        };
        metrics::counter!(names::UPSTREAM_CALLS, "route" => label, "status" => status.to_string())
            .increment(1);
        tracing::debug!(
            instance = %instance,
            route = %route,
            upstream_status = status,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "emit forwarded"
        );
        let body = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        AckReply::Upstream { status, body }
    }
}

fn encode_query(text: &str) -> String {
    utf8_percent_encode(text, PATH_SEGMENT).to_string()
}

fn failure(err: &reqwest::Error, instance: &InstanceName, route: &str) -> AckReply {
    tracing::warn!(instance = %instance, route = %route, error = %err, "emit call failed");
    if err.is_timeout() {
        AckReply::error(504, "upstream timed out")
    } else {
        AckReply::error(502, "upstream unreachable")
    }
}

/// One call counted as active until dropped; the last one out wakes a drain.
struct Active(Arc<AtomicUsize>, Arc<tokio::sync::Notify>);

impl Active {
    fn enter(active: &Arc<AtomicUsize>, idle: &Arc<tokio::sync::Notify>) -> Self {
        active.fetch_add(1, Ordering::AcqRel);
        Self(active.clone(), idle.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        if self.0.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.1.notify_waiters();
        }
    }
}

/// One call counted against its socket's in-flight limit until dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn acquire(session: &Session, max: usize) -> Option<Self> {
        let counter = session.in_flight.clone();
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(counter))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_and_alias() {
        let table = RouteTable::new(&BTreeMap::new());
        let acme = InstanceName::parse("acme support").unwrap();
        let send = table.get("message/sendText").unwrap();
        assert_eq!(send.method, http::Method::POST);
        assert_eq!(send.path_for(&acme), "/message/sendText/acme%20support");
        assert_eq!(table.get("send_message"), Some(send));
        assert_eq!(
            table.get("chat/deleteMessageForEveryone").unwrap().method,
            http::Method::DELETE
        );
        assert_eq!(
            table.get("group/fetchAllGroups").unwrap().method,
            http::Method::GET
        );
        assert!(table.get("instance/delete").is_none());
        let events: Vec<&str> = default_events().collect();
        assert_eq!(events.len(), 23, "22 routes and the alias");
        assert_eq!(events[0], "message/sendText");
        assert_eq!(events[22], "send_message");
        assert!(events.iter().all(|event| table.get(event).is_some()));
    }

    #[test]
    fn overrides() {
        let mut overrides = BTreeMap::new();
        overrides.insert(
            "custom/ping".to_owned(),
            RouteSpec {
                method: "put".into(),
                path: "/custom/{instance}/ping".into(),
            },
        );
        let table = RouteTable::new(&overrides);
        let route = table.get("custom/ping").unwrap();
        assert_eq!(route.method, http::Method::PUT);
        let name = InstanceName::parse("a?b#c").unwrap();
        assert_eq!(route.path_for(&name), "/custom/a%3Fb%23c/ping");
    }

    #[test]
    fn plans() {
        let table = RouteTable::new(&BTreeMap::new());
        let acme = InstanceName::parse("acme").unwrap();
        let plan = plan(
            &table,
            &acme,
            "send_message",
            serde_json::json!({"number": "1", "message": "hi", "requestId": "r1"}),
        )
        .unwrap();
        assert_eq!(plan.method, http::Method::POST);
        assert_eq!(plan.path_and_query, "/message/sendText/acme");
        assert_eq!(plan.body.as_deref(), Some(r#"{"number":"1","text":"hi"}"#));
        assert_eq!(plan.request_id.as_deref(), Some("r1"));
        let get = super::plan(
            &table,
            &acme,
            "group/fetchAllGroups",
            serde_json::json!({"a/b": "c&d", "n": 1}),
        )
        .unwrap();
        assert_eq!(
            get.path_and_query,
            "/group/fetchAllGroups/acme?a%2Fb=c%26d&n=1"
        );
        assert_eq!(get.body, None);
        let refused = |event: &str, argument: Value| {
            super::plan(&table, &acme, event, argument)
                .unwrap_err()
                .status()
        };
        assert_eq!(refused("nope", Value::Null), 404);
        assert_eq!(refused("message/sendText", Value::Null), 400);
        assert_eq!(
            refused("message/sendText", serde_json::json!({"requestId": 1})),
            400
        );
    }

    #[test]
    fn route_rules() {
        let bad = |method: &str, path: &str| {
            RouteSpec {
                method: method.into(),
                path: path.into(),
            }
            .validate()
            .is_err()
        };
        assert!(bad("POST", "/no/instance"));
        assert!(bad("POST", "relative/{instance}"));
        assert!(bad("TRACE", "/x/{instance}"));
        assert!(bad("POST", "/x/{instance}/{instance}"));
        assert!(!bad("post", "/x/{instance}"));
    }
}
