//! Delivery to sockets that opted in to recovery (an `offset` in their `auth`).
//!
//! Each such socket has one task that owns its cursor into the namespace's retained log:
//! it sends the state on join (if asked), then `sidecar.recovery` and the missed events,
//! then live events, all read from the log in sequence order. One reader per socket means
//! the hand-over from replay to live can neither skip nor repeat an event, whatever is
//! published meanwhile. Opted-in events carry their offset as a trailing argument.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use socketioxide::extract::SocketRef;
use socketioxide::{SendError, SocketError};

use super::session::{Resume, Session};
use crate::replay::{Entry, NamespaceLog, Offset};
use crate::telemetry::{self, names};

/// How long a socket may leave its queue full before it is disconnected as a slow consumer.
const SLOW_CONSUMER_PATIENCE: Duration = Duration::from_secs(10);
/// How long a resume waits for this replica to catch up with the client's offset.
const LAG_PATIENCE: Duration = Duration::from_secs(2);
/// Events read from the log at a time.
const BATCH: usize = 256;

/// A socket that cannot take more: closed, or too slow for too long.
struct Gone;

/// Runs until the socket disconnects. `epoch` is the log's current epoch.
pub(super) async fn run(
    socket: SocketRef,
    session: Arc<Session>,
    log: Arc<NamespaceLog>,
    epoch: String,
) {
    let offset = match &session.resume {
        Resume::After(offset) => offset.clone(),
        Resume::FromNow | Resume::No => String::new(),
    };
    let mut head = log.subscribe();

    // A replica still behind the shared stream may not have reached the client's offset:
    // give it a moment rather than answer recovered: false and replay everything.
    if let Some(Offset {
        epoch: offset_epoch,
        seq,
    }) = Offset::parse(&offset)
        && offset_epoch == epoch
        && seq > log.head()
    {
        let _ = tokio::time::timeout(LAG_PATIENCE, head.wait_for(|head| *head >= seq)).await;
    }

    // Under the gate no event is appended: the state, the replay set and the cursor agree.
    // Nothing is sent under it (a socket whose queue is full would hold every webhook of
    // the namespace): this task alone sends to this socket, so sending afterwards keeps the
    // order state, recovery, replay, live.
    let (state, mut cursor, replay) = {
        let _gate = log.gate.lock().await;
        let state = session.join_state(&log);
        head.borrow_and_update();
        let replay = (!offset.is_empty()).then(|| {
            let resume = log.resume(&epoch, &offset);
            (resume.recovered, log.read_after(resume.after, usize::MAX).0)
        });
        (state, log.head(), replay)
    };
    for entry in &state {
        // State is not part of the sequence: it carries no offset.
        if send(&socket, entry.event.as_str(), &*entry.payload)
            .await
            .is_err()
        {
            return;
        }
    }

    if let Some((recovered, missed)) = replay {
        let missed: Vec<Arc<Entry>> = missed
            .into_iter()
            .filter(|e| session.wants(e.event.upper_snake()))
            .collect();
        let to = missed.last().map_or(offset.clone(), |e| e.offset.clone());
        let announcement = serde_json::json!({
            "recovered": recovered,
            "replayed": missed.len(),
            "from": offset,
            "to": to,
        });
        metrics::counter!(names::RECOVERIES, "recovered" => recovered.to_string()).increment(1);
        metrics::counter!(names::REPLAYED).increment(missed.len() as u64);
        if send(&socket, "sidecar.recovery", &announcement)
            .await
            .is_err()
        {
            return;
        }
        for entry in &missed {
            if send_entry(&socket, entry).await.is_err() {
                return;
            }
        }
    }

    loop {
        head.borrow_and_update();
        let (batch, gap) = log.read_after(cursor, BATCH);
        if batch.is_empty() {
            tokio::select! {
                changed = head.changed() => if changed.is_err() { return },
                () = session.gone.notified() => return,
            }
            continue;
        }
        if gap {
            // Retention moved past this socket's cursor: it cannot keep up. It recovers
            // what is still retained when it reconnects (recovered: false).
            tracing::warn!(sid = %socket.id, ns = socket.ns(), "slow consumer fell behind retention: disconnecting");
            metrics::counter!(names::SLOW_CONSUMER_DISCONNECTS).increment(1);
            let _ = socket.clone().disconnect();
            return;
        }
        for entry in &batch {
            cursor = entry.seq;
            if session.wants(entry.event.upper_snake()) && send_entry(&socket, entry).await.is_err()
            {
                return;
            }
        }
    }
}

async fn send_entry(socket: &SocketRef, entry: &Entry) -> Result<(), Gone> {
    send(
        socket,
        entry.event.as_str(),
        &(&*entry.payload, entry.offset.as_str()),
    )
    .await?;
    telemetry::meters().deliveries.increment(1);
    Ok(())
}

/// Emits, waiting while the socket's queue is full; a socket that stays full for
/// [`SLOW_CONSUMER_PATIENCE`] is disconnected.
async fn send<T: Serialize + ?Sized>(
    socket: &SocketRef,
    event: &str,
    data: &T,
) -> Result<(), Gone> {
    let mut waited_since: Option<Instant> = None;
    loop {
        match socket.emit(event, data) {
            Ok(()) => return Ok(()),
            Err(SendError::Socket(SocketError::InternalChannelFull)) => {
                let since = *waited_since.get_or_insert_with(Instant::now);
                if since.elapsed() > SLOW_CONSUMER_PATIENCE {
                    tracing::warn!(sid = %socket.id, ns = socket.ns(), "slow consumer: disconnecting");
                    metrics::counter!(names::SLOW_CONSUMER_DISCONNECTS).increment(1);
                    let _ = socket.clone().disconnect();
                    return Err(Gone);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(_) => return Err(Gone),
        }
    }
}
