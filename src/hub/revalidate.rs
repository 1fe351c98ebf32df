//! Revocation of instance-token sockets: their keys are re-checked with Evolution once per
//! token TTL, bypassing the cache, so a rotated or deleted token goes within one TTL.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use socketioxide::extract::SocketRef;

use super::Hub;
use super::handlers::revoke;
use super::session::Session;
use crate::auth::{self, Principal};
use crate::telemetry::names;

/// Token lookups the revalidator has in flight at once.
const REVALIDATE_CONCURRENCY: usize = 16;

impl Hub {
    /// Re-checks with Evolution, every `period` (the token TTL), the key of each socket that
    /// joined with an instance token, bypassing the cache, and disconnects the ones no
    /// longer accepted for their namespace: a rotated or deleted token goes within one
    /// period. Each distinct key is asked once per round, a few at a time. While Evolution
    /// cannot answer, a socket is kept until its key has gone unverified for
    /// `token_unverified_grace_secs`. Runs until aborted.
    pub fn revalidate(&self, period: Duration) -> impl Future<Output = ()> + Send + 'static {
        use futures_util::StreamExt as _;
        let hub = self.clone();
        async move {
            let mut tick = tokio::time::interval(period.max(Duration::from_secs(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            // Key → when Evolution last accepted it; only keys of connected sockets.
            let mut verified: HashMap<String, std::time::Instant> = HashMap::new();
            loop {
                // The tick's own instant: rounds are exactly `period` apart, so the grace
                // comparison below does not depend on how long the lookups took.
                let now = tick.tick().await.into_std();
                let strays = hub.shared.rooms.all_strays();
                let sockets: Vec<(SocketRef, Arc<Session>)> = hub
                    .io
                    .nsps()
                    .into_iter()
                    .flat_map(|ns| ns.sockets())
                    .chain(strays)
                    .filter_map(|socket| {
                        let session = socket.extensions.get::<Arc<Session>>()?;
                        session.principal.is_token().then_some((socket, session))
                    })
                    .collect();
                let keys: HashSet<String> = sockets
                    .iter()
                    .filter_map(|(_, session)| {
                        Some(session.caller.key.as_ref()?.expose().to_owned())
                    })
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
                    // Token sockets always have a key; only they are in `sockets`.
                    let Some(key) = session.caller.key.as_ref().map(|key| key.expose()) else {
                        continue;
                    };
                    let still = match answers.get(key) {
                        Some(Ok(principal)) => {
                            verified.insert(key.to_owned(), now);
                            principal.may_join(socket.ns())
                        }
                        Some(Err(auth::Error::Invalid | auth::Error::KeyRequired)) => false,
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
        }
    }
}
