//! Per-instance activity: when each instance last sent an event, how many a minute, its
//! last known connection state, and the alert when one whose state is `open` falls silent.
//!
//! Users of Evolution 2.3.6–2.3.7 report webhooks that stop until Evolution is restarted;
//! the sidecar is the one place that sees it. Every event that reaches this replica's
//! sockets (taken here or read from the shared Redis stream, so every replica agrees) and
//! every webhook filtered out by `SIDECAR_EVENTS` is recorded by `bus`; an instance's
//! deletion forgets it. With `SIDECAR_SILENCE_ALERT_SECS`, [`Activity::watch`] warns once
//! when an instance whose last `connection.update` said `open` has sent nothing for that
//! long, sets `evo_instance_silent{instance}` to 1 (back to 0 when it speaks), and, with a
//! global key, asks Evolution `GET /instance/connectionState/{instance}` to tell a quiet
//! instance from a broken webhook in the log line.
//!
//! Bounded: at most [`MAX_INSTANCES`] instances are tracked (past it the one silent the
//! longest is dropped), and at most [`MAX_SILENT_LABELS`] instance label values ever get an
//! `evo_instance_silent` series (the rest are only logged and counted in
//! `evo_instances_silent`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, EventName, InstanceName};
use crate::license;
use crate::setting::{self, Secret};
use crate::telemetry::names;
use crate::upstream;

/// The most instances tracked at once.
pub const MAX_INSTANCES: usize = 10_000;
/// The most instance label values `evo_instance_silent` ever gets.
pub const MAX_SILENT_LABELS: usize = 1_000;
/// Events per minute are counted in this many buckets of [`BUCKET`].
const BUCKETS: usize = 6;
const BUCKET: Duration = Duration::from_secs(10);
/// The longest the connection-state probe waits for Evolution.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many probes per check, so a mass silence (Evolution itself down) costs a
/// bounded number of calls; the rest are logged without one.
const PROBES_PER_CHECK: usize = 16;

/// Settings of silence detection.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Warn when an instance whose state is `open` sends nothing for this long; 0: off.
    pub silence_alert_secs: u64,
}

/// The last known state of an instance's WhatsApp connection, from `connection.update`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionState {
    Open,
    Connecting,
    Close,
    Other,
}

impl ConnectionState {
    fn parse(state: &str) -> Self {
        match state {
            "open" => ConnectionState::Open,
            "connecting" => ConnectionState::Connecting,
            "close" => ConnectionState::Close,
            _ => ConnectionState::Other,
        }
    }
}

struct Record {
    last_at: Instant,
    last_wall: SystemTime,
    last_event: EventName,
    /// (bucket number since [`Activity::epoch`], events in it).
    buckets: [(u64, u32); BUCKETS],
    state: Option<ConnectionState>,
    /// Since when it is known silent (alerted).
    silent_since: Option<Instant>,
}

/// One instance, as `GET /_sidecar/instances` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceActivity {
    pub instance: String,
    /// Milliseconds since the Unix epoch.
    pub last_event_at_ms: u64,
    pub last_event_secs_ago: u64,
    pub last_event: String,
    pub events_per_minute: u32,
    pub state: Option<ConnectionState>,
    pub silent: bool,
    pub clients: usize,
}

/// What `GET /_sidecar/instances` reads: the activity, and the hub's client count per
/// instance (a function, so this module needs nothing of the hub).
#[derive(Clone)]
pub struct InstancesView {
    pub activity: Arc<Activity>,
    pub clients: Arc<dyn Fn(&InstanceName) -> usize + Send + Sync>,
}

/// `GET /_sidecar/instances` (global key): every tracked instance, most recently active
/// first.
pub async fn instances(
    axum::extract::State(view): axum::extract::State<InstancesView>,
) -> axum::Json<serde_json::Value> {
    let rows = view.activity.snapshot(&*view.clients);
    axum::Json(serde_json::json!({
        "silence_alert_secs": view.activity.silence_after().map(|after| after.as_secs()),
        "max_instances": MAX_INSTANCES,
        "instances": rows,
    }))
}

/// Asks Evolution what state an instance is in, with the global key.
struct Probe {
    http: reqwest::Client,
    base_url: String,
    key: Secret,
}

pub struct Activity {
    records: Mutex<HashMap<InstanceName, Record>>,
    silence_after: Option<Duration>,
    probe: Option<Probe>,
    /// Instances that have an `evo_instance_silent` series.
    labelled: Mutex<HashSet<InstanceName>>,
    epoch: Instant,
}

impl Activity {
    pub fn new(
        config: &Config,
        upstream_url: &str,
        global_key: Option<&Secret>,
    ) -> Result<Self, setting::Error> {
        let silence_after =
            (config.silence_alert_secs > 0).then(|| Duration::from_secs(config.silence_alert_secs));
        let probe = match (silence_after, global_key) {
            (Some(_), Some(key)) if !key.expose().is_empty() => Some(Probe {
                http: reqwest::Client::builder()
                    .no_proxy()
                    .timeout(PROBE_TIMEOUT)
                    .build()
                    .map_err(|err| setting::Error::startup(format!("http client: {err}")))?,
                base_url: upstream_url.trim_end_matches('/').to_owned(),
                key: key.clone(),
            }),
            _ => None,
        };
        if let Some(after) = silence_after {
            tracing::info!(
                after_secs = after.as_secs(),
                probe = probe.is_some(),
                "silence alerts on: an instance whose state is open and that sends nothing this long is warned about once"
            );
        }
        Ok(Self {
            records: Mutex::new(HashMap::new()),
            silence_after,
            probe,
            labelled: Mutex::new(HashSet::new()),
            epoch: Instant::now(),
        })
    }

    fn bucket(&self, at: Instant) -> u64 {
        (at.duration_since(self.epoch).as_secs()) / BUCKET.as_secs()
    }

    /// Records one event of its instance.
    pub fn record(&self, envelope: &Envelope) {
        let now = Instant::now();
        let bucket = self.bucket(now);
        let state = (envelope.event.as_str() == "connection.update")
            .then(|| connection_state(envelope.payload.get()))
            .flatten();
        let resumed = {
            let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            if !records.contains_key(&envelope.instance) && records.len() >= MAX_INSTANCES {
                evict_quietest(&mut records);
            }
            let record = records
                .entry(envelope.instance.clone())
                .or_insert_with(|| Record {
                    last_at: now,
                    last_wall: SystemTime::now(),
                    last_event: envelope.event.clone(),
                    buckets: [(0, 0); BUCKETS],
                    state: None,
                    silent_since: None,
                });
            record.last_at = now;
            record.last_wall = SystemTime::now();
            // An `EventName` clone is a reference count, not a copy of the name.
            record.last_event = envelope.event.clone();
            let slot = &mut record.buckets[(bucket % BUCKETS as u64) as usize];
            if slot.0 != bucket {
                *slot = (bucket, 0);
            }
            slot.1 = slot.1.saturating_add(1);
            if state.is_some() {
                record.state = state;
            }
            record.silent_since.take()
        };
        if let Some(since) = resumed {
            tracing::info!(
                instance = %envelope.instance,
                silent_secs = since.elapsed().as_secs() + self.silence_after.map_or(0, |d| d.as_secs()),
                "instance sends events again"
            );
            self.set_silent(&envelope.instance, false);
        }
    }

    /// Forgets a deleted instance.
    pub fn forget(&self, instance: &InstanceName) {
        let was_silent = {
            let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            records
                .remove(instance)
                .is_some_and(|record| record.silent_since.is_some())
        };
        if was_silent {
            self.set_silent(instance, false);
        }
    }

    /// Every tracked instance, most recently active first; `clients` counts an instance's
    /// connected sockets (the hub's).
    pub fn snapshot(&self, clients: &dyn Fn(&InstanceName) -> usize) -> Vec<InstanceActivity> {
        let now = Instant::now();
        let bucket = self.bucket(now);
        let mut rows: Vec<(Instant, InstanceActivity)> = {
            let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            records
                .iter()
                .map(|(name, record)| {
                    let per_minute = record
                        .buckets
                        .iter()
                        .filter(|(n, _)| bucket.saturating_sub(*n) < BUCKETS as u64)
                        .map(|(_, count)| *count)
                        .sum();
                    let row = InstanceActivity {
                        instance: name.as_str().to_owned(),
                        last_event_at_ms: record
                            .last_wall
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |since| since.as_millis() as u64),
                        last_event_secs_ago: now.duration_since(record.last_at).as_secs(),
                        last_event: record.last_event.as_str().to_owned(),
                        events_per_minute: per_minute,
                        state: record.state,
                        silent: record.silent_since.is_some(),
                        clients: 0,
                    };
                    (record.last_at, row)
                })
                .collect()
        };
        rows.sort_by_key(|row| std::cmp::Reverse(row.0));
        rows.into_iter()
            .map(|(_, mut row)| {
                if let Ok(name) = InstanceName::parse(&row.instance) {
                    row.clients = clients(&name);
                }
                row
            })
            .collect()
    }

    pub fn silence_after(&self) -> Option<Duration> {
        self.silence_after
    }

    /// Checks for silent instances until dropped; returns at once when alerts are off.
    pub async fn watch(self: Arc<Self>) {
        let Some(after) = self.silence_after else {
            return;
        };
        let period = (after / 10).clamp(Duration::from_secs(1), Duration::from_secs(30));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.check(after).await;
        }
    }

    /// Marks and reports the instances that just fell silent.
    async fn check(&self, after: Duration) {
        let now = Instant::now();
        let fallen: Vec<(InstanceName, Duration, EventName)> = {
            let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
            records
                .iter_mut()
                .filter(|(_, record)| {
                    record.state == Some(ConnectionState::Open)
                        && record.silent_since.is_none()
                        && now.duration_since(record.last_at) >= after
                })
                .map(|(name, record)| {
                    record.silent_since = Some(now);
                    let quiet = now.duration_since(record.last_at);
                    (name.clone(), quiet, record.last_event.clone())
                })
                .collect()
        };
        for (i, (instance, quiet, last_event)) in fallen.iter().enumerate() {
            self.set_silent(instance, true);
            let evolution = match &self.probe {
                Some(probe) if i < PROBES_PER_CHECK => probe.state(instance).await,
                Some(_) => "not asked (too many silent at once)".to_owned(),
                None => "not asked (no AUTHENTICATION_API_KEY)".to_owned(),
            };
            tracing::warn!(
                instance = %instance,
                silent_secs = quiet.as_secs(),
                last_event = %last_event,
                evolution = %evolution,
                "instance is open but has sent no event for SIDECAR_SILENCE_ALERT_SECS: \
                 Evolution's webhooks may have stopped (restarting Evolution is the known fix); \
                 warned once until it sends again"
            );
        }
        metrics::gauge!(names::INSTANCES_SILENT).set(self.silent_count() as f64);
    }

    fn silent_count(&self) -> usize {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        records
            .values()
            .filter(|record| record.silent_since.is_some())
            .count()
    }

    /// Sets `evo_instance_silent{instance}`, for at most [`MAX_SILENT_LABELS`] instances.
    fn set_silent(&self, instance: &InstanceName, silent: bool) {
        let labelled = {
            let mut labelled = self.labelled.lock().unwrap_or_else(|e| e.into_inner());
            if labelled.contains(instance) {
                true
            } else if silent && labelled.len() < MAX_SILENT_LABELS {
                labelled.insert(instance.clone())
            } else {
                false
            }
        };
        if labelled {
            metrics::gauge!(names::INSTANCE_SILENT, "instance" => instance.as_str().to_owned())
                .set(if silent { 1.0 } else { 0.0 });
        }
        if !silent {
            metrics::gauge!(names::INSTANCES_SILENT).set(self.silent_count() as f64);
        }
    }
}

impl Probe {
    /// What Evolution says of the instance's state, for the log line.
    async fn state(&self, instance: &InstanceName) -> String {
        #[derive(Deserialize)]
        struct Answer {
            instance: Option<Inner>,
        }
        #[derive(Deserialize)]
        struct Inner {
            state: Option<String>,
        }
        let route = upstream::Route {
            method: http::Method::GET,
            template: "/instance/connectionState/{instance}".to_owned(),
        };
        let url = format!("{}{}", self.base_url, route.path_for(instance));
        let answer = async {
            let response = self
                .http
                .get(&url)
                .header("apikey", self.key.expose())
                .send()
                .await
                .map_err(|err| format!("unreachable ({err})"))?;
            // A state is tiny: only the head of the answer is read.
            let (status, body) = license::head(response).await;
            if license::is_gate_answer(status, &body) {
                return Err("Evolution is not activated (503 LICENSE_REQUIRED)".to_owned());
            }
            if !(200..300).contains(&status) {
                return Err(format!("answered {status}"));
            }
            let answer: Answer = serde_json::from_slice(&body)
                .map_err(|_| "answered something else than a state".to_owned())?;
            Ok(answer.instance.and_then(|inner| inner.state))
        };
        match answer.await {
            Ok(Some(state)) if state == "open" => {
                "connectionState is open: the instance is up, so its webhooks look broken"
                    .to_owned()
            }
            Ok(Some(state)) => format!(
                "connectionState is {state}: the instance is not connected (its connection.update did not arrive)"
            ),
            Ok(None) => "connectionState without a state".to_owned(),
            Err(why) => format!("connectionState not known: {why}"),
        }
    }
}

/// `data.state` of a `connection.update` argument, without decoding the rest.
fn connection_state(argument: &str) -> Option<ConnectionState> {
    #[derive(Deserialize)]
    struct Argument<'a> {
        #[serde(borrow)]
        data: Option<Data<'a>>,
    }
    #[derive(Deserialize)]
    struct Data<'a> {
        #[serde(borrow)]
        state: Option<std::borrow::Cow<'a, str>>,
    }
    let argument: Argument = serde_json::from_str(argument).ok()?;
    Some(ConnectionState::parse(&argument.data?.state?))
}

/// Drops the instance that has been quiet the longest, to make room.
fn evict_quietest(records: &mut HashMap<InstanceName, Record>) {
    let quietest = records
        .iter()
        .min_by_key(|(_, record)| record.last_at)
        .map(|(name, _)| name.clone());
    if let Some(name) = quietest {
        records.remove(&name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event: &str, instance: &str, data: serde_json::Value) -> Envelope {
        let body = serde_json::json!({"event": event, "instance": instance, "data": data});
        Envelope::from_webhook(&serde_json::to_vec(&body).unwrap()).unwrap()
    }

    fn activity(silence_secs: u64) -> Activity {
        let config = Config {
            silence_alert_secs: silence_secs,
        };
        Activity::new(&config, "http://127.0.0.1:9", None).unwrap()
    }

    #[test]
    fn records_last_event_rate_and_state() {
        let activity = activity(0);
        activity.record(&event(
            "connection.update",
            "acme",
            serde_json::json!({"state": "open"}),
        ));
        for _ in 0..3 {
            activity.record(&event("messages.upsert", "acme", serde_json::json!({})));
        }
        activity.record(&event("call", "other", serde_json::json!({})));
        let rows = activity.snapshot(&|name| if name.as_str() == "acme" { 2 } else { 0 });
        let acme = rows.iter().find(|row| row.instance == "acme").unwrap();
        assert_eq!(acme.events_per_minute, 4);
        assert_eq!(acme.last_event, "messages.upsert");
        assert_eq!(acme.state, Some(ConnectionState::Open));
        assert_eq!(acme.clients, 2);
        assert!(!acme.silent);
        assert_eq!(rows.len(), 2);
        activity.forget(&InstanceName::parse("other").unwrap());
        assert_eq!(activity.snapshot(&|_| 0).len(), 1);
    }

    #[test]
    fn connection_state_from_the_argument() {
        assert_eq!(
            connection_state(
                r#"{"event":"connection.update","data":{"instance":"a","state":"close","statusReason":401}}"#
            ),
            Some(ConnectionState::Close)
        );
        assert_eq!(connection_state(r#"{"data":{}}"#), None);
        assert_eq!(connection_state(r#"not json"#), None);
    }

    #[tokio::test]
    async fn an_open_instance_falls_silent_once_and_speaks_again() {
        let activity = activity(1);
        activity.record(&event(
            "connection.update",
            "acme",
            serde_json::json!({"state": "open"}),
        ));
        activity.record(&event(
            "connection.update",
            "closed",
            serde_json::json!({"state": "close"}),
        ));
        activity.check(Duration::from_secs(1)).await;
        assert!(
            activity.snapshot(&|_| 0).iter().all(|row| !row.silent),
            "not yet"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        activity.check(Duration::from_secs(1)).await;
        let silent: Vec<String> = activity
            .snapshot(&|_| 0)
            .into_iter()
            .filter(|row| row.silent)
            .map(|row| row.instance)
            .collect();
        assert_eq!(silent, ["acme"], "only the open one");
        activity.record(&event("messages.upsert", "acme", serde_json::json!({})));
        assert!(activity.snapshot(&|_| 0).iter().all(|row| !row.silent));
    }

    #[test]
    fn tracked_instances_are_bounded() {
        let activity = activity(0);
        for n in 0..MAX_INSTANCES + 10 {
            activity.record(&event("call", &format!("i{n}"), serde_json::json!({})));
        }
        let rows = activity.snapshot(&|_| 0);
        assert_eq!(rows.len(), MAX_INSTANCES);
        assert!(
            rows.iter()
                .any(|row| row.instance == format!("i{}", MAX_INSTANCES + 9))
        );
    }
}
