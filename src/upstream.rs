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
use serde_json::value::RawValue;
use tokio::sync::OnceCell;

use crate::envelope::InstanceName;
use crate::expiring;
use crate::json_object;
use crate::setting;
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
    /// Argument bytes of the emits being forwarded, across all sockets, before 429.
    pub max_bytes_in_flight: u64,
    /// Argument bytes of the emits one socket may have in flight before 429.
    pub max_bytes_in_flight_per_socket: u64,
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
            max_bytes_in_flight: 256 * 1024 * 1024,
            max_bytes_in_flight_per_socket: 32 * 1024 * 1024,
            routes: BTreeMap::new(),
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), setting::Error> {
        let uri: http::Uri = self
            .url
            .parse()
            .map_err(|err| setting::invalid("upstream.url", &self.url, err))?;
        if !matches!(uri.scheme_str(), Some("http") | Some("https")) || uri.host().is_none() {
            return Err(setting::invalid(
                "upstream.url",
                &self.url,
                "must be an http:// or https:// URL with a host",
            ));
        }
        if uri.query().is_some() {
            return Err(setting::invalid(
                "upstream.url",
                &self.url,
                "must have no query",
            ));
        }
        if self.timeout_secs == 0 {
            return Err(setting::invalid(
                "upstream.timeout_secs",
                &0,
                "must be positive",
            ));
        }
        if self.connect_timeout_secs == 0 {
            return Err(setting::invalid(
                "upstream.connect_timeout_secs",
                &0,
                "must be positive",
            ));
        }
        if self.max_in_flight == 0 {
            return Err(setting::invalid(
                "upstream.max_in_flight",
                &0,
                "must be positive",
            ));
        }
        if self.max_bytes_in_flight_per_socket < 1024 * 1024 {
            return Err(setting::invalid(
                "upstream.max_bytes_in_flight_per_socket",
                &self.max_bytes_in_flight_per_socket,
                "must be at least 1 MiB",
            ));
        }
        if self.max_bytes_in_flight < self.max_bytes_in_flight_per_socket {
            return Err(setting::invalid(
                "upstream.max_bytes_in_flight",
                &self.max_bytes_in_flight,
                "must be at least upstream.max_bytes_in_flight_per_socket",
            ));
        }
        for (event, spec) in &self.routes {
            spec.validate().map_err(|why| {
                setting::Error::new(format!(
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
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum AckReply {
    /// Evolution's status and body, the body as Evolution wrote it (a string when it was
    /// not JSON).
    Upstream {
        status: u16,
        body: Box<RawValue>,
    },
    Error {
        status: u16,
        error: String,
    },
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

    /// The bytes this reply holds, for the requestId memory's bound.
    fn size(&self) -> usize {
        match self {
            AckReply::Upstream { body, .. } => body.get().len(),
            AckReply::Error { error, .. } => error.len(),
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

/// The most top-level fields an emit's argument may have (Evolution's bodies have a few).
pub const MAX_ARGUMENT_FIELDS: usize = 1024;

/// The longest `requestId` accepted (a UUID is 36 bytes).
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// Maps an emit to its REST call, for `instance` only. Pure, so it can be fuzzed: every
/// input gives a plan or the ack that refuses it.
///
/// The argument is read one level deep: `requestId` is taken out (and `message` renamed
/// `text` for the `send_message` alias); every other field goes to Evolution as the
/// client wrote it, in its order.
pub fn plan(
    routes: &RouteTable,
    instance: &InstanceName,
    event: &str,
    argument: Option<&RawValue>,
) -> Result<Plan, AckReply> {
    let Some(route) = routes.get(event) else {
        return Err(AckReply::error(404, format!("unknown event {event:?}")));
    };
    let is_get = route.method == http::Method::GET;
    let mut fields = match argument.map(RawValue::get) {
        None | Some("null") if is_get => Vec::new(),
        Some(text) => match json_object::entries(text, MAX_ARGUMENT_FIELDS) {
            Ok(fields) => fields,
            Err(_) => {
                return Err(AckReply::error(
                    400,
                    format!(
                        "argument must be a JSON object of at most {MAX_ARGUMENT_FIELDS} fields"
                    ),
                ));
            }
        },
        None => return Err(AckReply::error(400, "argument must be a JSON object")),
    };
    let mut request_id = None;
    let mut keep = Vec::with_capacity(fields.len());
    for (key, value) in fields.drain(..) {
        if key == "requestId" {
            let Ok(id) = serde_json::from_str::<String>(value.get()) else {
                return Err(AckReply::error(400, "requestId must be a string"));
            };
            if id.len() > MAX_REQUEST_ID_BYTES {
                return Err(AckReply::error(
                    400,
                    format!("requestId is longer than {MAX_REQUEST_ID_BYTES} bytes"),
                ));
            }
            request_id = Some(id);
        } else {
            keep.push((key, value));
        }
    }
    if event == SEND_MESSAGE_ALIAS && !keep.iter().any(|(key, _)| key == "text") {
        for (key, _) in keep.iter_mut() {
            if key == "message" {
                *key = "text".into();
                break;
            }
        }
    }
    let mut path_and_query = route.path_for(instance);
    let body = if is_get {
        let query: Vec<String> = keep
            .iter()
            .map(|(key, value)| {
                let value = serde_json::from_str::<String>(value.get())
                    .unwrap_or_else(|_| value.get().to_owned());
                format!("{}={}", encode_query(key), encode_query(&value))
            })
            .collect();
        if !query.is_empty() {
            path_and_query.push('?');
            path_and_query.push_str(&query.join("&"));
        }
        None
    } else {
        Some(json_object::write(
            keep.iter().map(|(key, value)| (key.as_ref(), *value)),
        ))
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
/// What the `requestId` memory may hold (keys and replies); the oldest go beyond it.
pub const MAX_REMEMBERED_BYTES: usize = 16 * 1024 * 1024;
/// A reply larger than this is not kept: a repeat gets its status and a note instead.
pub const MAX_REMEMBERED_REPLY_BYTES: usize = 64 * 1024;
/// Bytes counted per remembered entry besides its key and reply.
const REMEMBERED_OVERHEAD: usize = 192;

type MemoKey = (InstanceName, String, String);

/// A remembered answer: being called (empty) or known.
type Remembered = expiring::Slot<OnceCell<AckReply>>;

/// Answers by requestId, expired after [`IDEMPOTENCY_WINDOW`] and bounded by
/// [`MAX_REMEMBERED_BYTES`] ([`expiring::ExpiringMap`], as the key cache in `auth`).
struct Memo(expiring::ExpiringMap<MemoKey, OnceCell<AckReply>>);

impl Memo {
    fn new() -> Self {
        Self(expiring::ExpiringMap::new(MAX_REMEMBERED_BYTES))
    }

    /// The entry for `key`, made (its answer to come) if there is none.
    fn entry(&mut self, key: &MemoKey, now: Instant) -> Arc<Remembered> {
        self.0.expire(IDEMPOTENCY_WINDOW, now);
        if let Some(entry) = self.0.get(key) {
            return entry.clone();
        }
        let bytes = REMEMBERED_OVERHEAD + key.0.as_str().len() + key.1.len() + key.2.len();
        let entry = self.0.insert(key.clone(), OnceCell::new(), bytes, now);
        self.0.expire(IDEMPOTENCY_WINDOW, now);
        entry
    }

    fn forget(&mut self, key: &MemoKey, entry: &Arc<Remembered>) {
        self.0.remove_slot(key, entry);
    }

    /// Counts a reply's bytes, unless its entry was evicted meanwhile.
    fn account(&mut self, entry: &Remembered, extra: usize) {
        self.0.account(entry, extra);
    }
}

/// What a socket may have in flight towards Evolution: calls and argument bytes. The
/// hub's `Session` holds one per socket.
#[derive(Debug, Default)]
pub struct Budget {
    calls: AtomicUsize,
    bytes: AtomicUsize,
}

/// The caller of an emit: its instance (`None` on `/`), the key it connected with, and
/// its in-flight budget.
pub struct Caller<'a> {
    pub instance: Option<&'a InstanceName>,
    pub key: &'a str,
    pub budget: &'a Budget,
}

/// The REST client for emits.
pub struct Upstream {
    http: reqwest::Client,
    base_url: String,
    routes: RouteTable,
    max_in_flight: usize,
    max_bytes_per_socket: usize,
    max_bytes: usize,
    /// Argument bytes of the emits being forwarded now, across all sockets.
    bytes_in_flight: AtomicUsize,
    /// Keyed by instance, the caller's key and the requestId: one client's answer is
    /// never handed to another.
    remembered: Mutex<Memo>,
    /// Calls in flight across all sockets, for shutdown.
    active: Arc<AtomicUsize>,
    idle: Arc<tokio::sync::Notify>,
    draining: AtomicBool,
}

impl Upstream {
    pub fn new(config: &Config) -> Result<Self, setting::Error> {
        config.validate()?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(config.connect_timeout_secs))
            .timeout(Duration::from_secs(config.timeout_secs))
            .build()
            .map_err(|err| setting::Error::startup(format!("http client: {err}")))?;
        Ok(Self {
            http,
            base_url: config.base_url().to_owned(),
            routes: RouteTable::new(&config.routes),
            max_in_flight: config.max_in_flight,
            max_bytes_per_socket: usize::try_from(config.max_bytes_in_flight_per_socket)
                .unwrap_or(usize::MAX),
            max_bytes: usize::try_from(config.max_bytes_in_flight).unwrap_or(usize::MAX),
            bytes_in_flight: AtomicUsize::new(0),
            remembered: Mutex::new(Memo::new()),
            active: Arc::new(AtomicUsize::new(0)),
            idle: Arc::new(tokio::sync::Notify::new()),
            draining: AtomicBool::new(false),
        })
    }

    /// Forwards one emit of `caller`'s socket and says what to ack.
    pub async fn forward(
        &self,
        caller: &Caller<'_>,
        event: &str,
        argument: Option<&RawValue>,
    ) -> AckReply {
        let Some(instance) = caller.instance else {
            return AckReply::error(400, "emits on / have no instance: connect to /<instance>");
        };
        if self.draining.load(Ordering::Acquire) {
            return AckReply::error(503, "shutting down, retry later");
        }
        let _active = Active::enter(&self.active, &self.idle);
        let Some(_calls) = Permit::take(&caller.budget.calls, 1, self.max_in_flight) else {
            return AckReply::error(
                429,
                format!(
                    "more than {} calls in flight on this socket",
                    self.max_in_flight
                ),
            );
        };
        // Bytes are counted before the argument is read, so a flood of large emits is
        // refused without building their bodies.
        let size = argument.map_or(0, |raw| raw.get().len());
        let Some(_socket_bytes) =
            Permit::take(&caller.budget.bytes, size, self.max_bytes_per_socket)
        else {
            return AckReply::error(
                429,
                format!(
                    "more than {} bytes of emits in flight on this socket",
                    self.max_bytes_per_socket
                ),
            );
        };
        let Some(_bytes) = Permit::take(&self.bytes_in_flight, size, self.max_bytes) else {
            metrics::counter!(names::EMIT_BYTES_REFUSED).increment(1);
            return AckReply::error(429, "server has too many emit bytes in flight, retry later");
        };
        let plan = match plan(&self.routes, instance, event, argument) {
            Ok(plan) => plan,
            Err(reply) => return reply,
        };
        let Some(request_id) = plan.request_id.clone() else {
            return self.call(plan, instance, caller.key).await;
        };
        // A repeat of the same requestId waits for, then shares, the first answer.
        let key = (instance.clone(), caller.key.to_owned(), request_id);
        let remembered = {
            let mut memo = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
            memo.entry(&key, Instant::now())
        };
        // The memory keeps small replies whole; a large one goes whole to this caller
        // only, and a later repeat gets its status and a note.
        let mut ran = false;
        let mut whole = None;
        let (ran_ref, whole_ref) = (&mut ran, &mut whole);
        let kept = remembered
            .value
            .get_or_init(|| async move {
                *ran_ref = true;
                let reply = self.call(plan, instance, caller.key).await;
                if reply.size() <= MAX_REMEMBERED_REPLY_BYTES {
                    return reply;
                }
                let note = AckReply::error(
                    reply.status(),
                    format!(
                        "repeat of an answered requestId: its answer ({} bytes) is not kept",
                        reply.size()
                    ),
                );
                *whole_ref = Some(reply);
                note
            })
            .await
            .clone();
        let mut memo = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
        if kept.status() == 502 {
            // The request never reached the upstream: a retry may really try again.
            memo.forget(&key, &remembered);
        } else if ran {
            memo.account(&remembered, kept.size());
        }
        whole.unwrap_or(kept)
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

    /// `requestId`s remembered now and the bytes they count (tests, metrics).
    pub fn remembered_size(&self) -> (usize, usize) {
        let memo = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
        (memo.0.len(), memo.0.bytes())
    }

    async fn call(&self, plan: Plan, instance: &InstanceName, key: &str) -> AckReply {
        let url = format!("{}{}", self.base_url, plan.path_and_query);
        let mut request = self
            .http
            .request(plan.method.clone(), &url)
            .header("apikey", key);
        if let Some(body) = plan.body {
            request = request
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body);
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
        AckReply::Upstream {
            status,
            body: raw_body(&body),
        }
    }
}

/// Evolution's answer as it wrote it: JSON passes through byte for byte; anything else
/// becomes a JSON string of its text.
fn raw_body(body: &[u8]) -> Box<RawValue> {
    std::str::from_utf8(body)
        .ok()
        .and_then(|text| serde_json::from_str::<&RawValue>(text.trim()).ok())
        .map(RawValue::to_owned)
        .unwrap_or_else(|| {
            let text = serde_json::to_string(&String::from_utf8_lossy(body))
                .unwrap_or_else(|_| "null".to_owned());
            RawValue::from_string(text).unwrap_or_else(|_| null_raw())
        })
}

fn null_raw() -> Box<RawValue> {
    RawValue::from_string("null".to_owned()).expect("null is JSON")
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

/// `amount` counted against a limit until dropped (calls or bytes in flight).
struct Permit<'a>(&'a AtomicUsize, usize);

impl<'a> Permit<'a> {
    fn take(counter: &'a AtomicUsize, amount: usize, max: usize) -> Option<Self> {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                n.checked_add(amount).filter(|total| *total <= max)
            })
            .ok()
            .map(|_| Self(counter, amount))
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::AcqRel);
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
        let raw = |text: &str| RawValue::from_string(text.to_owned()).unwrap();
        let argument = raw(r#"{"number":"1","message":"hi","requestId":"r1","n":1e2}"#);
        let plan = plan(&table, &acme, "send_message", Some(&argument)).unwrap();
        assert_eq!(plan.method, http::Method::POST);
        assert_eq!(plan.path_and_query, "/message/sendText/acme");
        assert_eq!(
            plan.body.as_deref(),
            Some(r#"{"number":"1","text":"hi","n":1e2}"#),
            "the client's order and spelling"
        );
        assert_eq!(plan.request_id.as_deref(), Some("r1"));
        let argument = raw(r#"{"a/b": "c&d", "n": 1}"#);
        let get = super::plan(&table, &acme, "group/fetchAllGroups", Some(&argument)).unwrap();
        assert_eq!(
            get.path_and_query,
            "/group/fetchAllGroups/acme?a%2Fb=c%26d&n=1"
        );
        assert_eq!(get.body, None);
        let refused = |event: &str, argument: &str| {
            let argument = raw(argument);
            super::plan(&table, &acme, event, Some(&argument))
                .unwrap_err()
                .status()
        };
        assert_eq!(refused("nope", "null"), 404);
        assert_eq!(refused("message/sendText", "null"), 400);
        assert_eq!(refused("message/sendText", "[1]"), 400);
        assert_eq!(refused("message/sendText", r#"{"requestId": 1}"#), 400);
        let long = format!(
            r#"{{"requestId":"{}"}}"#,
            "r".repeat(MAX_REQUEST_ID_BYTES + 1)
        );
        assert_eq!(refused("message/sendText", &long), 400);
        let fits = format!(r#"{{"requestId":"{}"}}"#, "r".repeat(MAX_REQUEST_ID_BYTES));
        let fits = raw(&fits);
        assert!(super::plan(&table, &acme, "message/sendText", Some(&fits)).is_ok());
        assert!(super::plan(&table, &acme, "group/fetchAllGroups", None).is_ok());
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
