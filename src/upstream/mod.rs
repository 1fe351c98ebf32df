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

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::value::RawValue;

use crate::envelope::InstanceName;
use crate::setting::{self, Secret};
use crate::telemetry::names;

mod call;
mod config;
mod error;
mod limits;
mod memo;
mod plan;
mod routes;

pub use config::Config;
pub use error::{AckReply, Error};
pub use limits::Budget;
pub use memo::{MAX_REMEMBERED_BYTES, MAX_REMEMBERED_REPLY_BYTES};
pub use plan::{MAX_ARGUMENT_FIELDS, MAX_REQUEST_ID_BYTES, Plan, plan};
pub use routes::{Route, RouteSpec, RouteTable, default_events};

use limits::{Active, Permit};
use memo::Memo;

/// The caller of an emit, as the hub's `Session` holds it: its instance (`None` on `/`),
/// the key it connected with, and its in-flight budget.
pub struct Caller {
    pub instance: Option<InstanceName>,
    /// `None` for a client admitted without a key (`WEBSOCKET_ALLOWED_HOSTS`).
    pub key: Option<Secret>,
    pub budget: Budget,
}

impl Caller {
    pub fn new(instance: Option<InstanceName>, key: Option<Secret>) -> Self {
        Self {
            instance,
            key,
            budget: Budget::default(),
        }
    }
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
        caller: &Caller,
        event: &str,
        argument: Option<&RawValue>,
    ) -> AckReply {
        self.try_forward(caller, event, argument)
            .await
            .unwrap_or_else(AckReply::from)
    }

    async fn try_forward(
        &self,
        caller: &Caller,
        event: &str,
        argument: Option<&RawValue>,
    ) -> Result<AckReply, Error> {
        let Some(instance) = &caller.instance else {
            return Err(Error::NoInstance);
        };
        let Some(key) = &caller.key else {
            return Err(Error::NoKey);
        };
        if self.draining.load(Ordering::Acquire) {
            return Err(Error::Draining);
        }
        let _active = Active::enter(&self.active, &self.idle);
        let Some(_calls) = Permit::take(&caller.budget.calls, 1, self.max_in_flight) else {
            return Err(Error::TooManyCalls(self.max_in_flight));
        };
        // Bytes are counted before the argument is read, so a flood of large emits is
        // refused without building their bodies.
        let size = argument.map_or(0, |raw| raw.get().len());
        let Some(_socket_bytes) =
            Permit::take(&caller.budget.bytes, size, self.max_bytes_per_socket)
        else {
            return Err(Error::TooManySocketBytes(self.max_bytes_per_socket));
        };
        let Some(_bytes) = Permit::take(&self.bytes_in_flight, size, self.max_bytes) else {
            metrics::counter!(names::EMIT_BYTES_REFUSED).increment(1);
            return Err(Error::TooManyBytes);
        };
        let plan = plan(&self.routes, instance, event, argument)?;
        let key = key.expose();
        let Some(request_id) = plan.request_id.clone() else {
            return self.call(plan, instance, key).await;
        };
        // A repeat of the same requestId waits for, then shares, the first answer.
        let memo_key = (instance.clone(), key.to_owned(), request_id);
        let remembered = {
            let mut memo = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
            memo.entry(&memo_key, Instant::now())
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
                let reply = self.call(plan, instance, key).await?;
                if reply.size() <= MAX_REMEMBERED_REPLY_BYTES {
                    return Ok(reply);
                }
                let note = Error::AnswerNotKept {
                    status: reply.status(),
                    bytes: reply.size(),
                };
                *whole_ref = Some(reply);
                Err(note)
            })
            .await
            .clone();
        let mut memo = self.remembered.lock().unwrap_or_else(|e| e.into_inner());
        match &kept {
            // The request never reached the upstream: a retry may really try again.
            Err(Error::Unreachable) => memo.forget(&memo_key, &remembered),
            Ok(reply) if ran => memo.account(&remembered, reply.size()),
            _ => {}
        }
        match whole {
            Some(reply) => Ok(reply),
            None => kept,
        }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

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
