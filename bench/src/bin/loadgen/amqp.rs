//! The RabbitMQ publisher of `fanout --amqp-url`: the same [`Plan`] (schedule, unique
//! bodies, counts) as the webhook sender, published the way Evolution publishes (topic
//! exchange, routing key = the event, no message properties) on K channels, each on its own
//! connection with publisher confirms. A message counts as accepted when the broker
//! confirms it (it is in the sidecar's queue); the confirm round trip is the analogue of the
//! webhook POST round trip, and latency runs from just before the publish to the client.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use evo_bench::now_ns;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::time::Instant;

use crate::webhooks::{Plan, set_bit};

/// How long connecting and declaring may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection and its confirming channel, with the exchange declared as Evolution does.
async fn open(url: &str, exchange: &str) -> Result<(Connection, Channel), String> {
    let open = async {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let options = ExchangeDeclareOptions {
            durable: true,
            auto_delete: false,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                options,
                FieldTable::default(),
            )
            .await?;
        Ok::<_, lapin::Error>((connection, channel))
    };
    match tokio::time::timeout(OPEN_TIMEOUT, open).await {
        Ok(Ok(opened)) => Ok(opened),
        Ok(Err(err)) => Err(format!("amqp: {err}")),
        Err(_) => Err("amqp: connect timed out".to_owned()),
    }
}

/// One channel's loop: claim the next slot, wait for its time (fixed rate), publish, wait
/// for the broker's confirm, count it; reconnect after an error.
pub async fn publish_amqp(plan: Arc<Plan>, url: String, exchange: String) {
    'connection: loop {
        if Instant::now() >= plan.end {
            return;
        }
        let (_connection, channel) = match open(&url, &exchange).await {
            Ok(opened) => opened,
            Err(err) => {
                plan.note_error(err);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        loop {
            let seq = plan.next.fetch_add(1, Ordering::Relaxed);
            if let Some(interval) = plan.interval {
                let due = plan.start + interval.mul_f64(seq as f64);
                if due >= plan.end {
                    return;
                }
                tokio::time::sleep_until(due).await;
                let lag = Instant::now().saturating_duration_since(due).as_micros() as u64;
                plan.max_lag_us.fetch_max(lag, Ordering::Relaxed);
            } else if Instant::now() >= plan.end {
                return;
            }
            let sent_ns = now_ns();
            let body = plan.body(seq, sent_ns);
            let published = channel
                .basic_publish(
                    exchange.as_str().into(),
                    plan.event.as_str().into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    BasicProperties::default(),
                )
                .await;
            let confirmed = match published {
                Ok(confirm) => confirm.await,
                Err(err) => Err(err),
            };
            let confirmation = match confirmed {
                Ok(confirmation) => confirmation,
                Err(err) => {
                    plan.note_error(format!("publish: {err}"));
                    continue 'connection;
                }
            };
            let done = now_ns();
            plan.post_us
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .saturating_record((done - sent_ns) / 1000);
            plan.last_response_ns.fetch_max(done, Ordering::Relaxed);
            match confirmation {
                Confirmation::Ack(_) => {
                    plan.accepted[(seq % plan.instances) as usize].fetch_add(1, Ordering::Relaxed);
                    if let Some(seqs) = &plan.accepted_seqs {
                        set_bit(&mut seqs.lock().unwrap_or_else(|e| e.into_inner()), seq);
                    }
                }
                // A nack (or no confirm mode) is a refusal; counted under "status" 0.
                _ => {
                    *plan
                        .rejected
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(0)
                        .or_default() += 1;
                }
            }
        }
    }
}
