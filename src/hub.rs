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
use serde_json::value::RawValue;
use socketioxide::extract::{AckSender, Event, SocketRef, State, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::layer::SocketIoLayer;
use socketioxide::socket::DisconnectReason;
use socketioxide::{SocketIo, TransportType};

use crate::auth::{self, Authenticator, Principal};
use crate::cluster::Cluster;
use crate::dedupe::Dedupe;
use crate::envelope::{self, Envelope, InstanceName};
use crate::replay;
use crate::server;
use crate::setting::{self, Secret, comma_list};
use crate::sio_request;
use crate::telemetry::{NamespaceLabels, names};
use crate::upstream::{self, Upstream};
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
    pub fn validate(&self) -> Result<(), setting::Error> {
        if let Some(bad) = self.events.iter().find(|e| !envelope::is_filter_name(e)) {
            return Err(setting::invalid(
                "hub.events",
                &self.events.join(","),
                format!("{bad:?} is not an UPPER_SNAKE event name such as MESSAGES_UPSERT"),
            ));
        }
        for (key, secs) in [
            ("hub.ping_interval_secs", self.ping_interval_secs),
            ("hub.ping_timeout_secs", self.ping_timeout_secs),
        ] {
            if secs == 0 {
                return Err(setting::invalid(key, &0, "must be positive"));
            }
        }
        if self.socket_buffer == 0 {
            return Err(setting::invalid(
                "hub.socket_buffer",
                &0,
                "must be positive",
            ));
        }
        if self.max_emit_bytes < 1024 {
            return Err(setting::invalid(
                "hub.max_emit_bytes",
                &self.max_emit_bytes,
                "must be at least 1024",
            ));
        }
        for origin in &self.cors_origin {
            if origin != "*" && http::HeaderValue::from_str(origin).is_err() {
                return Err(setting::invalid(
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
    /// Emits being forwarded now (calls and bytes), bounded by `upstream`.
    pub in_flight: Arc<upstream::Budget>,
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
    /// CONNECTs being admitted per namespace, so a refusal removes only a namespace
    /// nobody is joining.
    admissions: Admissions,
    /// Polling sessions ended for too many refused CONNECTs (the guard refuses them).
    closed_sessions: Arc<sio_request::ClosedSessions>,
}

/// CONNECTs in the connect middleware now, per namespace.
struct Admissions {
    io: std::sync::OnceLock<SocketIo>,
    running: Mutex<HashMap<String, usize>>,
}

impl Admissions {
    fn begin(&self, namespace: &str) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        *running.entry(namespace.to_owned()).or_default() += 1;
    }

    /// Ends one admission. A refused CONNECT removes its namespace again when no socket is
    /// in it and no other CONNECT to it is being admitted: socketioxide creates a dynamic
    /// namespace before the middleware runs, and would keep it forever.
    fn end(&self, namespace: &str, refused: bool, socket: &SocketRef) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let others = match running.get_mut(namespace) {
            Some(count) if *count > 1 => {
                *count -= 1;
                true
            }
            _ => {
                running.remove(namespace);
                false
            }
        };
        if !refused || others || namespace == "/" {
            return;
        }
        let Some(io) = self.io.get() else { return };
        let empty = io
            .of(namespace)
            .is_some_and(|ns| ns.sockets().iter().all(|s| s.id == socket.id));
        if empty {
            // Under the lock, so no admission of this namespace starts meanwhile.
            io.delete_ns(namespace);
        }
    }

    /// Removes namespaces with no socket and no CONNECT being admitted (what a race
    /// between a refusal and a socketioxide-internal creation may leave).
    fn sweep(&self) -> usize {
        let Some(io) = self.io.get() else { return 0 };
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = 0;
        for ns in io.nsps() {
            let path = ns.ns_path().to_owned();
            if path != "/" && !running.contains_key(&path) && ns.sockets().is_empty() {
                io.delete_ns(&path);
                removed += 1;
            }
        }
        removed
    }
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
    ) -> Result<(SocketIoLayer, Hub), setting::Error> {
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
            admissions: Admissions {
                io: std::sync::OnceLock::new(),
                running: Mutex::new(HashMap::new()),
            },
            // Past the heartbeat, engineioxide has dropped the session anyway.
            closed_sessions: Arc::new(sio_request::ClosedSessions::new(
                Duration::from_secs(config.ping_interval_secs + config.ping_timeout_secs)
                    .max(CONNECT_TIMEOUT),
            )),
        });
        let (layer, io) = SocketIo::builder()
            .max_buffer_size(config.socket_buffer)
            .max_payload(config.max_emit_bytes)
            .ping_interval(Duration::from_secs(config.ping_interval_secs))
            .ping_timeout(Duration::from_secs(config.ping_timeout_secs))
            .ws_max_message_size(usize::try_from(config.max_emit_bytes).unwrap_or(usize::MAX))
            // Client frames are small (pongs, emits); 4 KiB per idle socket adds up.
            .ws_read_buffer_size(WS_READ_BUFFER)
            // A session that joins no namespace within this is closed (socketioxide's
            // default is 45 s): it bounds what anonymous handshakes can hold.
            .connect_timeout(CONNECT_TIMEOUT)
            .with_state(shared.clone())
            .build_layer();
        let _ = shared.admissions.io.set(io.clone());

        // `/{instance}` does not match `/`: the global namespace is its own.
        io.ns("/", on_connect.with(authorize));
        io.dyn_ns("/{instance}", on_connect.with(authorize))
            .map_err(|err| setting::Error::startup(format!("socket.io namespace: {err}")))?;

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
        // Deletions always pass `SIDECAR_EVENTS`: the hub must see them to forget the
        // instance (on every replica, so they travel like any event).
        if let Some(allowed) = &self.allowed_events
            && !allowed.contains(&envelope.event.upper_snake())
            && !is_deletion(envelope.event.as_str())
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
        if is_deletion(envelope.event.as_str()) {
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
        let strays: Vec<SocketRef> = {
            let strays = self.shared.strays.lock().unwrap_or_else(|e| e.into_inner());
            strays.get(namespace).cloned().unwrap_or_default()
        };
        let sockets = self
            .io
            .of(namespace)
            .map(|ns| ns.sockets())
            .unwrap_or_default();
        {
            for socket in sockets.into_iter().chain(strays) {
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
                let strays: Vec<SocketRef> = {
                    let strays = hub.shared.strays.lock().unwrap_or_else(|e| e.into_inner());
                    strays.values().flatten().cloned().collect()
                };
                let sockets: Vec<(SocketRef, Session)> = hub
                    .io
                    .nsps()
                    .into_iter()
                    .flat_map(|ns| ns.sockets())
                    .chain(strays)
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
                        Some(Err(auth::Error::Unavailable(_) | auth::Error::RateLimited))
                        | None => {
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

    /// Removes namespaces that have no socket, every [`NAMESPACE_SWEEP`], until aborted.
    pub fn spawn_namespace_sweeper(&self) -> tokio::task::JoinHandle<()> {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(NAMESPACE_SWEEP);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let removed = shared.admissions.sweep();
                if removed > 0 {
                    tracing::debug!(removed, "removed namespaces without sockets");
                }
            }
        })
    }

    /// Namespaces socketioxide holds now (`/` included).
    pub fn namespace_count(&self) -> usize {
        self.io.nsps().len()
    }

    /// Disconnects every socket (shutdown).
    pub async fn close(&self) {
        self.io.close().await;
    }

    /// Sessions the hub ended, for the guard to refuse.
    pub fn closed_sessions(&self) -> Arc<sio_request::ClosedSessions> {
        self.shared.closed_sessions.clone()
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
    #[error("auth payload is larger than {MAX_AUTH_BYTES} bytes")]
    AuthTooLarge,
    #[error("auth payload must be a JSON object")]
    BadAuth,
    #[error("invalid event filter {0:?}")]
    BadFilter(String),
    #[error("an event filter lists at most {MAX_FILTER_EVENTS} events")]
    FilterTooLong,
    #[error("offset must be a string")]
    BadOffset,
}

impl ConnectError {
    fn reason(&self) -> &'static str {
        match self {
            ConnectError::BadNamespace => "bad_namespace",
            ConnectError::Auth(err) => err.reason(),
            ConnectError::Forbidden(_) => "forbidden_namespace",
            ConnectError::AuthTooLarge => "auth_too_large",
            ConnectError::BadAuth => "bad_auth",
            ConnectError::BadFilter(_) | ConnectError::FilterTooLong => "bad_filter",
            ConnectError::BadOffset => "bad_offset",
        }
    }
}

/// The largest CONNECT `auth` payload: a key, a filter of every event and an offset fit
/// many times over. Far below the emit limit, and checked before the payload is parsed.
pub const MAX_AUTH_BYTES: usize = 8 * 1024;

/// The most events one filter may list (Evolution has about 30).
pub const MAX_FILTER_EVENTS: usize = 64;

/// Refused CONNECTs one Engine.IO session may make before its transport is closed.
pub const MAX_REFUSED_CONNECTS: u32 = 4;

/// Connect middleware: who is this socket, and may it join this namespace?
///
/// A refused CONNECT leaves nothing behind: socketioxide creates a dynamic namespace
/// before its middleware runs, so a refusal removes the namespace again when nobody is in
/// it and no other CONNECT to it is being admitted.
async fn authorize(
    socket: SocketRef,
    auth_payload: TryData<Box<RawValue>>,
    state: State<Arc<Shared>>,
) -> Result<(), ConnectError> {
    let shared = state.0.clone();
    let namespace = socket.ns().to_owned();
    shared.admissions.begin(&namespace);
    let result = admit(&socket, auth_payload, state).await;
    let refused = result.is_err();
    shared.admissions.end(&namespace, refused, &socket);
    if let Err(err) = &result {
        metrics::counter!(names::HANDSHAKE_REJECTIONS, "reason" => err.reason()).increment(1);
        if let Some(session) = socket.req_parts().extensions.get::<Arc<EngineSession>>()
            && session.refused.fetch_add(1, Ordering::Relaxed) + 1 >= MAX_REFUSED_CONNECTS
        {
            tracing::debug!(sid = %socket.id, "too many refused CONNECTs: closing the transport");
            metrics::counter!(names::HANDSHAKE_REJECTIONS, "reason" => "too_many_refusals")
                .increment(1);
            session.close();
            if socket.transport_type() == TransportType::Polling {
                // A polling transport is many requests: refuse the session's next ones.
                shared.closed_sessions.close(&socket.id.to_string());
            }
        }
    }
    result
}

/// Authenticates first, then reads what the client asked for: nothing proportional to
/// the payload runs for an anonymous peer beyond one bounded scan.
async fn admit(
    socket: &SocketRef,
    TryData(auth_payload): TryData<Box<RawValue>>,
    State(shared): State<Arc<Shared>>,
) -> Result<(), ConnectError> {
    let namespace = socket.ns().to_owned();
    let instance = if namespace == "/" {
        None
    } else {
        Some(InstanceName::from_namespace(&namespace).ok_or(ConnectError::BadNamespace)?)
    };
    let auth_payload = auth_payload.ok();
    let request = ConnectRequest::parse(socket.req_parts(), auth_payload.as_deref())?;
    let key = request.key().ok_or(auth::Error::Invalid)?;
    let budget = auth::Budget::of(&socket.req_parts().extensions);
    let principal = shared.auth.resolve(&key, &budget).await?;
    if !principal.may_join(&namespace) {
        tracing::debug!(ns = %namespace, principal = %principal.label(), "namespace refused");
        return Err(ConnectError::Forbidden(namespace));
    }
    let options = request.options()?;
    socket.extensions.insert(Session {
        principal,
        key: Secret::new(key),
        instance,
        filter: options.filter.into(),
        in_flight: Arc::new(upstream::Budget::default()),
        resume: options.resume,
        snapshot: options.snapshot,
        gone: Arc::new(tokio::sync::Notify::new()),
    });
    Ok(())
}

/// Per Engine.IO session, in its handshake request's extensions as an `Arc` (engineioxide
/// keeps them for the session): refused CONNECTs so far, and how to close the session's
/// transport.
pub struct EngineSession {
    refused: std::sync::atomic::AtomicU32,
    close: Option<Box<dyn Fn() + Send + Sync>>,
}

impl EngineSession {
    /// `close` ends the session's transport (its TCP connection); `None` where the request
    /// came from no listener of ours (in-process tests).
    pub fn new(close: Option<Box<dyn Fn() + Send + Sync>>) -> Self {
        Self {
            refused: std::sync::atomic::AtomicU32::new(0),
            close,
        }
    }

    fn close(&self) {
        if let Some(close) = &self.close {
            close();
        }
    }
}

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
            None => None,
            Some(Ok(None)) => Some(String::new()),
            Some(Ok(Some(offset))) => Some(offset),
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
    /// `auth.offset`: `Some("")` from now on, `Some(offset)` to resume.
    pub resume: Option<String>,
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
        // The socket's namespace is not the registered one (socketioxide's creation race,
        // or a refusal that removed it meanwhile): revocation and broadcasts would not see
        // it. Where the transport can be closed, the client reconnects into the live one.
        if socket.transport_type() == TransportType::Websocket
            && let Some(session) = socket.req_parts().extensions.get::<Arc<EngineSession>>()
            && session.close.is_some()
        {
            tracing::warn!(sid = %socket.id, ns = socket.ns(), "namespace creation race: closing the transport so the client reconnects");
            session.close();
            return;
        }
        tracing::warn!(sid = %socket.id, ns = socket.ns(), "namespace creation race: delivering to this socket directly");
        let mut strays = shared.strays.lock().unwrap_or_else(|e| e.into_inner());
        // `connected` turns false before the disconnect handler runs: a socket that left
        // before this point is not kept (its handler may already have cleaned up).
        if socket.connected() {
            strays
                .entry(socket.ns().to_owned())
                .or_default()
                .push(socket.clone());
        }
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
/// The argument stays raw JSON: Evolution gets the fields as the client wrote them.
async fn on_emit(
    socket: SocketRef,
    Event(event): Event,
    TryData(argument): TryData<FirstArgument>,
    ack: AckSender,
    State(shared): State<Arc<Shared>>,
) {
    let Some(session) = socket.extensions.get::<Session>() else {
        return;
    };
    let caller = upstream::Caller {
        instance: session.instance.as_ref(),
        key: session.key.expose(),
        budget: &session.in_flight,
    };
    // No argument at all is allowed for GET routes.
    let reply = shared
        .upstream
        .forward(&caller, &event, argument.ok().and_then(|a| a.0).as_deref())
        .await;
    if let Err(err) = ack.send(&reply) {
        tracing::debug!(sid = %socket.id, error = %err, "ack not delivered");
    }
}

/// An emit's first argument, raw. Read as a tuple so socketioxide hands over the
/// arguments after the event name (a bare `Box<RawValue>` would capture the whole packet
/// array); further arguments are skipped unparsed.
struct FirstArgument(Option<Box<RawValue>>);

impl<'de> Deserialize<'de> for FirstArgument {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Arguments;
        impl<'de> serde::de::Visitor<'de> for Arguments {
            type Value = FirstArgument;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("emit arguments")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let first = seq.next_element::<Box<RawValue>>()?;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(FirstArgument(first))
            }
        }
        deserializer.deserialize_tuple(usize::MAX, Arguments)
    }
}

/// Disconnects a socket whose access ended, with a logged reason and a metric.
fn revoke(socket: &SocketRef, reason: &'static str) {
    tracing::info!(sid = %socket.id, ns = socket.ns(), reason, "revoking socket");
    metrics::counter!(names::REVOCATIONS, "reason" => reason).increment(1);
    let _ = socket.clone().disconnect();
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
    Ok(filter)
}

/// Token lookups the revalidator has in flight at once.
const REVALIDATE_CONCURRENCY: usize = 16;

/// Whether an event says the instance is gone (Evolution sends either name).
fn is_deletion(event: &str) -> bool {
    matches!(event, "instance.delete" | "remove.instance")
}

/// How long a locally delivered fingerprint is remembered against a late stream entry.
const LOCAL_ONLY_MEMORY: Duration = Duration::from_secs(3600);

/// Engine.IO's websocket read buffer per socket (socketioxide's default is 4 KiB).
const WS_READ_BUFFER: usize = 1024;

/// How long an Engine.IO session may stay without a namespace before it is closed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often namespaces without sockets are removed.
pub const NAMESPACE_SWEEP: Duration = Duration::from_secs(30);

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
    if sio_request::is_handshake(&parts.uri) {
        let close = parts
            .extensions
            .get::<server::ConnectionCloser>()
            .cloned()
            .map(|closer| Box::new(move || closer.close()) as Box<dyn Fn() + Send + Sync>);
        parts.extensions.insert(Arc::new(EngineSession::new(close)));
    }
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
