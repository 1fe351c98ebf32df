//! The socket.io side: namespaces, who may join them, per-client filters, and emitting.
//!
//! Every valid instance has a namespace `/<instance>` (created on the first CONNECT, at
//! any time), and `/` carries every instance's events when global events are on.
//! [`Hub::publish`] serializes an event once and hands the same packet to every socket
//! of the namespace through one broadcast to two rooms: [`ALL_ROOM`] (clients without a
//! filter) and `E:<UPPER_SNAKE>` (clients that asked for that event).
//!
//! Namespace permission is the connect middleware [`authorize`]: a refused namespace
//! gets a CONNECT_ERROR there, while the client's other namespaces keep working. A
//! socket's emits go to `upstream` ([`on_emit`]). This module knows nothing of HTTP
//! ingest.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use socketioxide::extract::{AckSender, Event, SocketRef, State, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::layer::SocketIoLayer;
use socketioxide::socket::DisconnectReason;
use socketioxide::{SocketIo, TransportType};

use crate::auth::{self, Authenticator, Principal};
use crate::cluster::Cluster;
use crate::config::{self, Secret, comma_list};
use crate::dedupe::Dedupe;
use crate::envelope::{self, Envelope, InstanceName};
use crate::replay;
use crate::telemetry::{NamespaceLabels, names};
use crate::upstream::Upstream;
use socketioxide::BroadcastError;

/// Settings of the socket.io side.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Also emit every instance's events on `/` (global key only).
    pub global_events: bool,
    /// UPPER_SNAKE events to emit; empty means all.
    #[serde(with = "comma_list")]
    pub events: Vec<String>,
    /// Allowed CORS origins for the socket.io endpoint; `*` means any.
    #[serde(with = "comma_list")]
    pub cors_origin: Vec<String>,
    /// Packets queued per socket before it counts as a slow consumer and misses events.
    pub socket_buffer: usize,
    /// The largest packet a client may send (socketioxide's default of 100 kB is too
    /// small for base64 media); a larger one closes that client's connection.
    pub max_emit_bytes: u64,
    /// Engine.IO heartbeat: a client that answers no ping within interval + timeout (a
    /// dead peer, or one that stopped reading) is disconnected. Node's defaults.
    pub ping_interval_secs: u64,
    pub ping_timeout_secs: u64,
    /// While Evolution cannot say whether a connected socket's instance token is still
    /// valid, the socket is kept until its key has gone unverified this long.
    pub token_unverified_grace_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            global_events: false,
            events: Vec::new(),
            cors_origin: vec!["*".to_owned()],
            socket_buffer: 4096,
            max_emit_bytes: 16 * 1024 * 1024,
            ping_interval_secs: 25,
            ping_timeout_secs: 20,
            token_unverified_grace_secs: 300,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), config::Error> {
        if let Some(bad) = self.events.iter().find(|e| !envelope::is_filter_name(e)) {
            return Err(config::invalid(
                "hub.events",
                &self.events.join(","),
                format!("{bad:?} is not an UPPER_SNAKE event name such as MESSAGES_UPSERT"),
            ));
        }
        if self.socket_buffer == 0 {
            return Err(config::invalid("hub.socket_buffer", &0, "must be positive"));
        }
        if self.max_emit_bytes < 1024 {
            return Err(config::invalid(
                "hub.max_emit_bytes",
                &self.max_emit_bytes,
                "must be at least 1024",
            ));
        }
        for origin in &self.cors_origin {
            if origin != "*" && http::HeaderValue::from_str(origin).is_err() {
                return Err(config::invalid(
                    "hub.cors_origin",
                    &self.cors_origin.join(","),
                    format!("{origin:?} is not a valid origin"),
                ));
            }
        }
        Ok(())
    }
}

mod delivery;

/// The room of sockets that receive every event.
pub const ALL_ROOM: &str = "*";

/// The room of sockets that asked for one event (`E:MESSAGES_UPSERT`).
fn event_room(upper_snake: &str) -> String {
    format!("E:{upper_snake}")
}

/// What a connected socket is: stored in its extensions by [`authorize`].
#[derive(Clone)]
pub struct Session {
    pub principal: Principal,
    /// The key it connected with: forwarded on its emits, never the global key.
    pub key: Secret,
    /// `None` on `/`.
    pub instance: Option<InstanceName>,
    /// UPPER_SNAKE events it wants; empty means all.
    pub filter: Arc<[String]>,
    /// Emits being forwarded now, bounded by `upstream.max_in_flight`.
    pub in_flight: Arc<AtomicUsize>,
    /// `Some` when the client opted in to recovery: the last offset it saw, `""` for "from
    /// now on". Such sockets get trailing offsets and are served by `delivery`, not rooms.
    pub resume: Option<String>,
    /// Send the instance's state (last `connection.update`, fresh `qrcode.updated`) on join.
    pub snapshot: bool,
    /// Signalled on disconnect, to stop this socket's delivery task.
    pub gone: Arc<tokio::sync::Notify>,
}

impl Session {
    /// Whether this socket wants an event (UPPER_SNAKE).
    pub fn wants(&self, upper_snake: &str) -> bool {
        self.filter.is_empty() || self.filter.iter().any(|e| e == upper_snake)
    }

    /// The state events this socket gets on join: none without `snapshot`, else the
    /// namespace's retained state that its filter wants. Call it under the log's gate.
    fn join_state(&self, log: &replay::NamespaceLog) -> Vec<Arc<replay::Entry>> {
        if !self.snapshot {
            return Vec::new();
        }
        let mut state = log.state();
        state.retain(|entry| self.wants(&entry.upper_snake));
        state
    }
}

/// State shared by every socket handler.
struct Shared {
    auth: Arc<Authenticator>,
    connected: Arc<AtomicUsize>,
    replay: Arc<replay::Store>,
    upstream: Arc<Upstream>,
    /// Sockets whose namespace lost a creation race inside socketioxide (two first
    /// CONNECTs to a new namespace at once): broadcasts miss them, so they get events
    /// one by one. Normally empty.
    strays: Mutex<HashMap<String, Vec<SocketRef>>>,
    /// Sockets per namespace and room, so a publish knows its delivery count
    /// without listing sockets.
    members: Mutex<HashMap<String, RoomCounts>>,
    namespace_labels: NamespaceLabels,
}

#[derive(Default)]
struct RoomCounts {
    /// Sockets in [`ALL_ROOM`].
    all: usize,
    /// Sockets per filtered event (UPPER_SNAKE).
    by_event: HashMap<String, usize>,
}

impl Shared {
    fn count(&self, namespace: &str, session: &Session, delta: isize) {
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        let counts = members.entry(namespace.to_owned()).or_default();
        let apply = |n: &mut usize| *n = n.saturating_add_signed(delta);
        if session.filter.is_empty() {
            apply(&mut counts.all);
        } else {
            for event in session.filter.iter() {
                apply(counts.by_event.entry(event.clone()).or_default());
            }
            counts.by_event.retain(|_, n| *n > 0);
        }
        if counts.all == 0 && counts.by_event.is_empty() {
            members.remove(namespace);
        }
    }

    fn audience(&self, namespace: &str, upper_snake: &str) -> usize {
        let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        members.get(namespace).map_or(0, |counts| {
            counts.all + counts.by_event.get(upper_snake).copied().unwrap_or(0)
        })
    }
}

/// A handle to the socket.io server. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    io: SocketIo,
    shared: Arc<Shared>,
    /// `None` means every event is emitted.
    allowed_events: Option<Arc<HashSet<String>>>,
    global_events: bool,
    /// With Redis, events go through the shared stream and come back to every replica.
    cluster: Option<Arc<Cluster>>,
    /// Sockets connected now, for the connection cap (`guard`).
    connected: Arc<AtomicUsize>,
    /// Fingerprints of accepted webhooks (memory mode, or while Redis is unreachable).
    dedupe: Arc<Dedupe>,
    dedupe_window: Duration,
    /// Fingerprints delivered here only because Redis failed: if the append did land after
    /// all, the stream reader skips it instead of delivering it twice.
    local_only: Arc<Mutex<HashMap<u128, std::time::Instant>>>,
    /// How long a token socket is kept while Evolution cannot verify its key.
    unverified_grace: Duration,
}

/// What became of a published webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Retained and handed over for delivery.
    Fresh,
    /// A retry of an event already accepted within the dedupe window: nothing emitted.
    Duplicate,
}

impl Hub {
    /// Builds the socket.io layer and its hub. Binds nothing.
    pub fn build(
        config: &Config,
        auth: Arc<Authenticator>,
        upstream: Arc<Upstream>,
        replay: Arc<replay::Store>,
        cluster: Option<Arc<Cluster>>,
        dedupe_window: Duration,
    ) -> Result<(SocketIoLayer, Hub), config::Error> {
        config.validate()?;
        let connected = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(Shared {
            auth,
            connected: connected.clone(),
            replay,
            upstream,
            strays: Mutex::new(HashMap::new()),
            members: Mutex::new(HashMap::new()),
            namespace_labels: NamespaceLabels::default(),
        });
        let (layer, io) = SocketIo::builder()
            .max_buffer_size(config.socket_buffer)
            .max_payload(config.max_emit_bytes)
            .ping_interval(Duration::from_secs(config.ping_interval_secs.max(1)))
            .ping_timeout(Duration::from_secs(config.ping_timeout_secs.max(1)))
            .ws_max_message_size(usize::try_from(config.max_emit_bytes).unwrap_or(usize::MAX))
            // Client frames are small (pongs, emits); 4 KiB per idle socket adds up.
            .ws_read_buffer_size(WS_READ_BUFFER)
            .with_state(shared.clone())
            .build_layer();

        // `/{instance}` does not match `/`: the global namespace is its own.
        io.ns("/", on_connect.with(authorize));
        io.dyn_ns("/{instance}", on_connect.with(authorize))
            .map_err(|err| config::Error::new(format!("socket.io namespace: {err}")))?;

        let allowed_events = (!config.events.is_empty())
            .then(|| Arc::new(config.events.iter().cloned().collect::<HashSet<_>>()));
        Ok((
            layer,
            Hub {
                io,
                shared,
                allowed_events,
                global_events: config.global_events,
                cluster,
                connected,
                dedupe: Arc::new(Dedupe::new(dedupe_window)),
                dedupe_window,
                local_only: Arc::new(Mutex::new(HashMap::new())),
                unverified_grace: Duration::from_secs(config.token_unverified_grace_secs),
            },
        ))
    }

    /// Publishes one event. When this returns, the event is retained: in the shared Redis
    /// stream (every replica, this one included, delivers it as it reads the stream), or,
    /// in memory mode or while Redis is unreachable, in this replica's log, delivered here.
    ///
    /// With a `fingerprint`, a body already accepted within the dedupe window is a
    /// `Duplicate`; in Redis mode the check and the append are one atomic script, so a
    /// crash between them cannot turn a retry into a loss.
    pub async fn publish(&self, envelope: &Envelope, fingerprint: Option<u128>) -> Published {
        if let Some(allowed) = &self.allowed_events
            && !allowed.contains(&envelope.event.upper_snake())
        {
            return Published::Fresh;
        }
        if let Some(cluster) = &self.cluster {
            let dedupe = fingerprint.map(|print| (print, self.dedupe_window));
            match cluster.append(envelope, dedupe).await {
                Ok(Some(_)) => return Published::Fresh,
                Ok(None) => return Published::Duplicate,
                Err(err) => tracing::debug!(error = %err, "publishing locally"),
            }
        }
        if let Some(print) = fingerprint {
            if self.dedupe.seen(print) {
                return Published::Duplicate;
            }
            if self.cluster.is_some() {
                let mut local_only = self.local_only.lock().unwrap_or_else(|e| e.into_inner());
                let now = std::time::Instant::now();
                local_only.retain(|_, at| now.duration_since(*at) < LOCAL_ONLY_MEMORY);
                local_only.insert(print, now);
            }
        }
        self.deliver(envelope, 0).await;
        Published::Fresh
    }

    /// Emits one event to its instance's namespace (and `/` with global events on), as
    /// sequence number `seq` (0: the next one).
    ///
    /// The payload is encoded once per namespace; a slow socket whose queue is full
    /// misses the event (counted) and never delays the others or the webhook.
    async fn deliver(&self, envelope: &Envelope, seq: u64) {
        let upper = envelope.event.upper_snake();
        let rooms = [ALL_ROOM.to_owned(), event_room(&upper)];
        let namespace = envelope.instance.namespace();
        self.emit_to(&namespace, &rooms, &upper, envelope, seq)
            .await;
        if matches!(
            envelope.event.as_str(),
            "instance.delete" | "remove.instance"
        ) {
            self.forget_instance(&envelope.instance, &namespace).await;
        }
        if self.global_events {
            self.emit_to("/", &rooms, &upper, envelope, seq).await;
        }
    }

    /// The instance is gone, and so is what its tokens may see: the event was delivered
    /// first (the disconnect queues behind it). Cached answers listing it go, so its tokens'
    /// next CONNECT asks Evolution; its token sockets are disconnected (global-key sockets
    /// stay); its retained events and state go, so whoever re-creates the name starts
    /// empty (offsets from before read as a gap, `recovered: false`).
    async fn forget_instance(&self, instance: &InstanceName, namespace: &str) {
        let forgotten = self.shared.auth.invalidate_instance(instance);
        if let Some(operators) = self.io.of(namespace) {
            for socket in operators.sockets() {
                let token = socket
                    .extensions
                    .get::<Session>()
                    .is_some_and(|session| session.principal != Principal::Global);
                if token {
                    revoke(&socket, "instance deleted");
                }
            }
        }
        let log = self.shared.replay.log(namespace);
        {
            let _gate = log.gate.lock().await;
            log.forget();
        }
        metrics::gauge!(names::RETAINED_BYTES).set(self.shared.replay.total_bytes() as f64);
        tracing::info!(
            instance = %instance,
            cached_keys = forgotten,
            "instance deleted: retained events and cached keys forgotten"
        );
    }

    /// Retains the event in `namespace`'s log, then broadcasts it to the rooms of sockets
    /// that did not opt in to recovery (opted-in ones read the log: `delivery`).
    async fn emit_to(
        &self,
        namespace: &str,
        rooms: &[String; 2],
        upper: &str,
        envelope: &Envelope,
        seq: u64,
    ) {
        let log = self.shared.replay.log(namespace);
        // Append and broadcast under the gate: a socket being brought up to date sees the
        // event either in its state or live, never both and never neither.
        let _gate = log.gate.lock().await;
        log.append_at(envelope, seq);
        metrics::gauge!(names::RETAINED_BYTES).set(self.shared.replay.total_bytes() as f64);

        let scope = if namespace == "/" {
            "global"
        } else {
            "instance"
        };
        metrics::counter!(names::EVENTS_EMITTED, "scope" => scope).increment(1);
        let audience = self.shared.audience(namespace, upper);
        if audience == 0 {
            return;
        }
        let event = envelope.event.as_str();
        let payload: &serde_json::value::RawValue = &envelope.payload;
        let mut dropped = 0;
        if let Some(operators) = self.io.of(namespace)
            && let Err(err) = operators.to(rooms.clone()).emit(event, payload).await
        {
            dropped = match &err {
                BroadcastError::Socket(failures) => failures.len(),
                _ => audience,
            };
            tracing::warn!(ns = namespace, event, dropped, error = %err, "slow consumers missed an event");
        }
        metrics::counter!(names::DELIVERIES).increment(audience.saturating_sub(dropped) as u64);
        if dropped > 0 {
            metrics::counter!(names::DELIVERY_DROPS).increment(dropped as u64);
        }
        let strays: Vec<SocketRef> = {
            let strays = self.shared.strays.lock().unwrap_or_else(|e| e.into_inner());
            strays.get(namespace).cloned().unwrap_or_default()
        };
        for socket in strays {
            let member = socket
                .rooms()
                .iter()
                .any(|room| rooms.iter().any(|r| r == room));
            if member && let Err(err) = socket.emit(event, payload) {
                tracing::warn!(ns = namespace, sid = %socket.id, error = %err, "socket missed an event");
            }
        }
    }

    /// Follows the shared Redis stream and delivers what it reads, until aborted (the app
    /// does at shutdown). Adopts the cluster's epoch once Redis answers; retries meanwhile.
    pub fn spawn_cluster_reader(&self) -> Option<tokio::task::JoinHandle<()>> {
        let cluster = self.cluster.clone()?;
        let hub = self.clone();
        Some(tokio::spawn(async move {
            let mut after = cluster.start_id();
            let mut epoch_adopted = false;
            loop {
                if !epoch_adopted {
                    match cluster.epoch(&hub.shared.replay.epoch()).await {
                        Ok(epoch) => {
                            hub.shared.replay.set_epoch(epoch);
                            epoch_adopted = true;
                        }
                        Err(_) => {
                            tokio::time::sleep(RECONNECT_PAUSE).await;
                            continue;
                        }
                    }
                }
                match cluster.read(&after).await {
                    Ok(deliveries) => {
                        for delivery in deliveries {
                            let delivered_here = delivery.fingerprint.is_some_and(|print| {
                                let mut local_only =
                                    hub.local_only.lock().unwrap_or_else(|e| e.into_inner());
                                local_only.remove(&print).is_some()
                            });
                            if !delivered_here {
                                hub.deliver(&delivery.envelope, delivery.seq).await;
                            }
                            after = delivery.id;
                        }
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, "redis stream read failed");
                        // Redis may come back empty: check the epoch again first.
                        epoch_adopted = false;
                        tokio::time::sleep(RECONNECT_PAUSE).await;
                    }
                }
            }
        }))
    }

    /// Re-checks with Evolution, every `period` (the token TTL), the key of each socket that
    /// joined with an instance token, bypassing the cache, and disconnects the ones no
    /// longer accepted for their namespace: a rotated or deleted token goes within one
    /// period. Each distinct key is asked once per round, a few at a time. While Evolution
    /// cannot answer, a socket is kept until its key has gone unverified for
    /// `token_unverified_grace_secs`. Runs until aborted.
    pub fn spawn_revalidator(&self, period: Duration) -> tokio::task::JoinHandle<()> {
        use futures_util::StreamExt as _;
        let hub = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period.max(Duration::from_secs(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            // Key → when Evolution last accepted it; only keys of connected sockets.
            let mut verified: HashMap<String, std::time::Instant> = HashMap::new();
            loop {
                // The tick's own instant: rounds are exactly `period` apart, so the grace
                // comparison below does not depend on how long the lookups took.
                let now = tick.tick().await.into_std();
                let sockets: Vec<(SocketRef, Session)> = hub
                    .io
                    .nsps()
                    .into_iter()
                    .flat_map(|ns| ns.sockets())
                    .filter_map(|socket| {
                        let session = socket.extensions.get::<Session>()?;
                        (session.principal != Principal::Global).then_some((socket, session))
                    })
                    .collect();
                let keys: HashSet<String> = sockets
                    .iter()
                    .map(|(_, session)| session.key.expose().to_owned())
                    .collect();
                let auth = hub.shared.auth.clone();
                let answers: HashMap<String, Result<Principal, auth::Error>> =
                    futures_util::stream::iter(keys)
                        .map(|key| {
                            let auth = auth.clone();
                            async move {
                                let answer = auth.resolve_fresh(&key).await;
                                (key, answer)
                            }
                        })
                        .buffer_unordered(REVALIDATE_CONCURRENCY)
                        .collect()
                        .await;
                verified.retain(|key, _| answers.contains_key(key));
                let mut unverified = 0usize;
                for (socket, session) in &sockets {
                    let key = session.key.expose();
                    let still = match answers.get(key) {
                        Some(Ok(principal)) => {
                            verified.insert(key.to_owned(), now);
                            principal.may_join(socket.ns())
                        }
                        Some(Err(auth::Error::Invalid)) => false,
                        Some(Err(auth::Error::Unavailable(_))) | None => {
                            // First seen unverified: it was verified when it connected,
                            // at most one round ago.
                            let since = *verified.entry(key.to_owned()).or_insert(now);
                            if now.duration_since(since) + period < hub.unverified_grace {
                                unverified += 1;
                                true
                            } else {
                                revoke(socket, "token unverifiable upstream");
                                continue;
                            }
                        }
                    };
                    if !still {
                        revoke(socket, "token no longer accepted upstream");
                    }
                }
                let failures = answers
                    .values()
                    .filter(|answer| matches!(answer, Err(auth::Error::Unavailable(_))))
                    .count();
                metrics::counter!(names::REVALIDATION_FAILURES).increment(failures as u64);
                metrics::gauge!(names::UNVERIFIED_SOCKETS).set(unverified as f64);
            }
        })
    }

    /// Disconnects every socket (shutdown).
    pub async fn close(&self) {
        self.io.close().await;
    }

    /// The live count of connected sockets, shared with the connection cap.
    pub fn connected(&self) -> Arc<AtomicUsize> {
        self.connected.clone()
    }

    /// Connected sockets on this node, across namespaces.
    pub fn socket_count(&self) -> usize {
        self.io
            .nsps()
            .into_iter()
            .map(|ns| ns.sockets().len())
            .sum()
    }
}

// === Socket handlers ===

/// Why a namespace CONNECT is refused: sent to the client as its CONNECT_ERROR message.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid namespace")]
    BadNamespace,
    #[error("{0}")]
    Auth(#[from] auth::Error),
    #[error("this api key may not join namespace {0}")]
    Forbidden(String),
    #[error("invalid event filter {0:?}")]
    BadFilter(String),
    #[error("offset must be a string")]
    BadOffset,
}

impl ConnectError {
    fn reason(&self) -> &'static str {
        match self {
            ConnectError::BadNamespace => "bad_namespace",
            ConnectError::Auth(err) => err.reason(),
            ConnectError::Forbidden(_) => "forbidden_namespace",
            ConnectError::BadFilter(_) => "bad_filter",
            ConnectError::BadOffset => "bad_offset",
        }
    }
}

/// Connect middleware: who is this socket, and may it join this namespace?
async fn authorize(
    socket: SocketRef,
    auth_payload: TryData<Value>,
    state: State<Arc<Shared>>,
) -> Result<(), ConnectError> {
    let result = admit(&socket, auth_payload, state).await;
    if let Err(err) = &result {
        metrics::counter!(names::HANDSHAKE_REJECTIONS, "reason" => err.reason()).increment(1);
    }
    result
}

async fn admit(
    socket: &SocketRef,
    TryData(auth_payload): TryData<Value>,
    State(shared): State<Arc<Shared>>,
) -> Result<(), ConnectError> {
    let namespace = socket.ns().to_owned();
    let instance = if namespace == "/" {
        None
    } else {
        Some(InstanceName::from_namespace(&namespace).ok_or(ConnectError::BadNamespace)?)
    };
    let options = ClientOptions::parse(socket.req_parts(), auth_payload.ok().as_ref())?;
    let key = options.key.ok_or(auth::Error::Invalid)?;
    let principal = shared.auth.resolve(&key).await?;
    if !principal.may_join(&namespace) {
        tracing::debug!(ns = %namespace, principal = %principal.label(), "namespace refused");
        return Err(ConnectError::Forbidden(namespace));
    }
    socket.extensions.insert(Session {
        principal,
        key: Secret::new(key),
        instance,
        filter: options.filter.into(),
        in_flight: Arc::new(AtomicUsize::new(0)),
        resume: options.resume,
        snapshot: options.snapshot,
        gone: Arc::new(tokio::sync::Notify::new()),
    });
    Ok(())
}

/// What a client asks for at CONNECT, from its handshake request and its `auth` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// `?apikey=`, else the `apikey` header, else `auth.apikey`.
    pub key: Option<String>,
    /// UPPER_SNAKE events; empty means all.
    pub filter: Vec<String>,
    /// `auth.offset`: `Some("")` from now on, `Some(offset)` to resume.
    pub resume: Option<String>,
    /// `auth.snapshot`.
    pub snapshot: bool,
}

impl ClientOptions {
    /// Pure, so it can be fuzzed: any request and payload give options or a refusal.
    pub fn parse(
        parts: &http::request::Parts,
        payload: Option<&Value>,
    ) -> Result<Self, ConnectError> {
        let field = |name: &str| payload.and_then(|p| p.get(name));
        let key = auth::key_from_request(parts).or_else(|| string_field(payload, "apikey"));
        let filter = parse_filter(parts, payload)?;
        let resume = match field("offset") {
            None => None,
            Some(Value::Null) => Some(String::new()),
            Some(Value::String(offset)) => Some(offset.clone()),
            Some(_) => return Err(ConnectError::BadOffset),
        };
        Ok(Self {
            key,
            filter,
            resume,
            snapshot: field("snapshot").and_then(Value::as_bool).unwrap_or(false),
        })
    }
}

/// A socket joined: route its emits upstream, then bring it up to date and subscribe it.
async fn on_connect(socket: SocketRef, io: SocketIo, State(shared): State<Arc<Shared>>) {
    let Some(session) = socket.extensions.get::<Session>() else {
        // Unreachable: `authorize` runs first. Refuse rather than serve unauthenticated.
        let _ = socket.disconnect();
        return;
    };
    socket.on_fallback(on_emit);
    socket.on_disconnect(on_disconnect);
    shared.connected.fetch_add(1, Ordering::Relaxed);
    metrics::gauge!(names::SOCKETS).increment(1.0);
    let label = shared.namespace_labels.label(socket.ns());
    metrics::gauge!(names::SOCKETS_BY_NAMESPACE, "namespace" => label).increment(1.0);
    tracing::debug!(
        sid = %socket.id,
        ns = socket.ns(),
        principal = %session.principal.label(),
        websocket = socket.transport_type() == TransportType::Websocket,
        opted_in = session.resume.is_some(),
        "socket connected"
    );

    let log = shared.replay.log(socket.ns());
    if session.resume.is_some() {
        let epoch = shared.replay.epoch();
        tokio::spawn(delivery::run(socket.clone(), session, log, epoch));
        return;
    }

    // Counted before joining, so a concurrent publish never undercounts its audience.
    shared.count(socket.ns(), &session, 1);
    {
        let _gate = log.gate.lock().await;
        for entry in session.join_state(&log) {
            let _ = socket.emit(entry.event.as_str(), &*entry.payload);
        }
        if session.filter.is_empty() {
            socket.join(ALL_ROOM);
        } else {
            socket.join(
                session
                    .filter
                    .iter()
                    .map(|e| event_room(e))
                    .collect::<Vec<_>>(),
            );
        }
    }

    let registered = io
        .of(socket.ns())
        .and_then(|ns| ns.get_socket(socket.id))
        .is_some();
    if !registered {
        tracing::warn!(sid = %socket.id, ns = socket.ns(), "namespace creation race: delivering to this socket directly");
        let mut strays = shared.strays.lock().unwrap_or_else(|e| e.into_inner());
        strays
            .entry(socket.ns().to_owned())
            .or_default()
            .push(socket.clone());
    }
}

async fn on_disconnect(
    socket: SocketRef,
    reason: DisconnectReason,
    State(shared): State<Arc<Shared>>,
) {
    if matches!(reason, DisconnectReason::HeartbeatTimeout) {
        // A dead peer, or one that stopped reading (its queue is bounded by socket_buffer).
        tracing::info!(sid = %socket.id, ns = socket.ns(), "socket answered no ping: disconnected");
    } else {
        tracing::debug!(sid = %socket.id, ns = socket.ns(), ?reason, "socket disconnected");
    }
    if let Some(session) = socket.extensions.get::<Session>() {
        session.gone.notify_one();
        shared.connected.fetch_sub(1, Ordering::Relaxed);
        if session.resume.is_none() {
            shared.count(socket.ns(), &session, -1);
        }
        metrics::gauge!(names::SOCKETS).decrement(1.0);
        let label = shared.namespace_labels.label(socket.ns());
        metrics::gauge!(names::SOCKETS_BY_NAMESPACE, "namespace" => label).decrement(1.0);
        metrics::counter!(names::SOCKET_DISCONNECTS, "reason" => format!("{reason:?}"))
            .increment(1);
    }
    let mut strays = shared.strays.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(list) = strays.get_mut(socket.ns()) {
        list.retain(|s| s.id != socket.id);
        if list.is_empty() {
            strays.remove(socket.ns());
        }
    }
}

/// A client emit: forwarded to the upstream REST API, always answered through the ack.
async fn on_emit(
    socket: SocketRef,
    Event(event): Event,
    TryData(argument): TryData<Value>,
    ack: AckSender,
    State(shared): State<Arc<Shared>>,
) {
    let Some(session) = socket.extensions.get::<Session>() else {
        return;
    };
    // No argument at all (allowed for GET routes) reads as null.
    let argument = argument.unwrap_or(Value::Null);
    let reply = shared.upstream.forward(&session, &event, argument).await;
    if let Err(err) = ack.send(&reply) {
        tracing::debug!(sid = %socket.id, error = %err, "ack not delivered");
    }
}

/// Disconnects a socket whose access ended, with a logged reason and a metric.
fn revoke(socket: &SocketRef, reason: &'static str) {
    tracing::info!(sid = %socket.id, ns = socket.ns(), reason, "revoking socket");
    metrics::counter!(names::REVOCATIONS, "reason" => reason).increment(1);
    let _ = socket.clone().disconnect();
}

fn string_field(payload: Option<&Value>, name: &str) -> Option<String> {
    payload?.get(name)?.as_str().map(str::to_owned)
}

/// The event filter: `auth.events` (string or list) first, then the `events` query
/// parameter. Dotted or UPPER_SNAKE names are accepted; anything else is refused.
fn parse_filter(
    parts: &http::request::Parts,
    payload: Option<&Value>,
) -> Result<Vec<String>, ConnectError> {
    let names: Vec<String> = match payload.and_then(|p| p.get("events")) {
        Some(Value::String(text)) => text.split(',').map(str::to_owned).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| ConnectError::BadFilter(item.to_string()))
            })
            .collect::<Result<_, _>>()?,
        Some(Value::Null) | None => auth::query_param(parts.uri.query().unwrap_or(""), "events")
            .map(|text| text.split(',').map(str::to_owned).collect())
            .unwrap_or_default(),
        Some(other) => return Err(ConnectError::BadFilter(other.to_string())),
    };
    let mut filter = Vec::new();
    for name in names {
        let name = name.trim();
        if name.is_empty() {
            continue;
        }
        let upper = envelope::upper_snake(name);
        if !envelope::is_filter_name(&upper) {
            return Err(ConnectError::BadFilter(name.to_owned()));
        }
        if !filter.contains(&upper) {
            filter.push(upper);
        }
    }
    Ok(filter)
}

/// Token lookups the revalidator has in flight at once.
const REVALIDATE_CONCURRENCY: usize = 16;

/// How long a locally delivered fingerprint is remembered against a late stream entry.
const LOCAL_ONLY_MEMORY: Duration = Duration::from_secs(3600);

/// Engine.IO's websocket read buffer per socket (socketioxide's default is 4 KiB).
const WS_READ_BUFFER: usize = 1024;

/// The pause before the stream reader tries Redis again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);

/// How long shutdown waits for socket.io to close its sockets.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Gives a socket.io request's URI and header values their own small allocations.
///
/// hyper parses a request head without copying: the URI and every header value are slices
/// of the connection's read buffer (8 to 16 KiB). engineioxide keeps the handshake's
/// request parts for the whole session, so each idle socket would pin that buffer for its
/// lifetime (measured with heaptrack: 16.4 KiB of 35 KiB per connection). Copying a few
/// hundred bytes here frees it when the upgrade completes.
pub async fn detach_head(request: axum::extract::Request) -> axum::extract::Request {
    let (mut parts, body) = request.into_parts();
    if let Ok(uri) = http::Uri::from_maybe_shared(bytes::Bytes::from(parts.uri.to_string())) {
        parts.uri = uri;
    }
    let mut headers = http::HeaderMap::with_capacity(parts.headers.len());
    for (name, value) in &parts.headers {
        // `from_bytes` copies; the bytes came from a valid value, so it cannot fail.
        if let Ok(mut copy) = http::HeaderValue::from_bytes(value.as_bytes()) {
            copy.set_sensitive(value.is_sensitive());
            headers.append(name.clone(), copy);
        }
    }
    parts.headers = headers;
    axum::extract::Request::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// True if `bytes` lies inside `buffer`'s allocation.
    fn inside(buffer: &bytes::Bytes, bytes: &[u8]) -> bool {
        let range = buffer.as_ptr_range();
        range.contains(&bytes.as_ptr())
    }

    #[tokio::test]
    async fn detached_head_shares_nothing_with_the_read_buffer() {
        // As hyper builds it: the URI and the values are slices of one read buffer.
        let buffer = bytes::Bytes::from_static(b"/socket.io/?EIO=4&transport=websocket secret-key");
        let uri = http::Uri::from_maybe_shared(buffer.slice(0..37)).expect("uri");
        let key = http::HeaderValue::from_maybe_shared(buffer.slice(38..)).expect("value");
        assert!(
            inside(&buffer, key.as_bytes()),
            "the fixture must share the buffer"
        );
        let mut request = axum::extract::Request::builder()
            .uri(uri)
            .header("apikey", key)
            .header("x-custom", "a")
            .header("x-custom", "b")
            .body(axum::body::Body::empty())
            .expect("request");
        request
            .headers_mut()
            .get_mut("apikey")
            .expect("apikey")
            .set_sensitive(true);

        let request = detach_head(request).await;

        assert_eq!(request.uri(), "/socket.io/?EIO=4&transport=websocket");
        assert!(!inside(&buffer, request.uri().path().as_bytes()));
        let key = &request.headers()["apikey"];
        assert_eq!(key, "secret-key");
        assert!(key.is_sensitive());
        assert!(!inside(&buffer, key.as_bytes()));
        let custom: Vec<_> = request.headers().get_all("x-custom").iter().collect();
        assert_eq!(custom, ["a", "b"]);
    }
}
