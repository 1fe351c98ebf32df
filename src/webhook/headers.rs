//! What Evolution 2.4's per-instance webhooks say about themselves in their headers.
//!
//! Since 2.4.0 a per-instance webhook carries `X-Instance-ID`, `X-Instance-Name`,
//! `X-Event-Type` (the dotted event), `X-Timestamp` (milliseconds since the epoch, set once
//! before Evolution's retry loop, so a retry repeats it) and
//! `User-Agent: EvolutionAPI-Webhook/<version>`. The global webhook and 2.3.x send none of
//! them, so none is ever required. When present, a name or event that contradicts the body
//! is refused (422): such a delivery is misrouted or forged, and emitting it would put an
//! event where its headers say it does not belong.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};

use super::Error;
use crate::envelope::Envelope;

pub const INSTANCE_ID: &str = "x-instance-id";
pub const INSTANCE_NAME: &str = "x-instance-name";
pub const EVENT_TYPE: &str = "x-event-type";
pub const TIMESTAMP: &str = "x-timestamp";
/// The `User-Agent` prefix of Evolution's per-instance webhooks.
const AGENT_PREFIX: &str = "EvolutionAPI-Webhook/";

/// The earliest Evolution retries a webhook: 5 s less its 20 % jitter. A delivery whose
/// `X-Timestamp` is at least this old is a retry (clocks in sync assumed; a skew shows as
/// retries counted where there were none, never as a refusal).
pub const RETRY_MIN_AGE: Duration = Duration::from_secs(4);

/// The most of a header value kept for the log: they are the sender's bytes.
const LOGGED_BYTES: usize = 64;

/// The 2.4 delivery headers, as sent (each optional and independent).
#[derive(Debug, Default)]
pub struct DeliveryHeaders {
    // Kept as sent (a `HeaderValue` clone shares the request's bytes): read for the checks,
    // and made printable only for a debug line that is on.
    instance_id: Option<HeaderValue>,
    instance_name: Option<HeaderValue>,
    event_type: Option<HeaderValue>,
    sent_at_ms: Option<u64>,
    user_agent: Option<HeaderValue>,
}

impl DeliveryHeaders {
    pub fn read(headers: &HeaderMap) -> Self {
        Self {
            instance_id: headers.get(INSTANCE_ID).cloned(),
            instance_name: headers.get(INSTANCE_NAME).cloned(),
            event_type: headers.get(EVENT_TYPE).cloned(),
            // Anything but a plain number is not Evolution's: ignored, like an absent one.
            sent_at_ms: headers
                .get(TIMESTAMP)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok()),
            user_agent: headers.get(http::header::USER_AGENT).cloned(),
        }
    }

    /// Refuses a delivery whose headers name another instance or event than its body.
    pub fn check(&self, envelope: &Envelope) -> Result<(), Error> {
        let contradiction = |header: &'static str, sent: &[u8], body: &str| Error::HeaderMismatch {
            header,
            sent: printable(sent),
            body: body.to_owned(),
        };
        if let Some(sent) = self.instance_name.as_ref().map(HeaderValue::as_bytes)
            && !same_text(sent, envelope.instance.as_str())
        {
            return Err(contradiction(
                "X-Instance-Name",
                sent,
                envelope.instance.as_str(),
            ));
        }
        if let Some(sent) = self.event_type.as_ref().map(HeaderValue::as_bytes)
            && !same_text(sent, envelope.event.as_str())
        {
            return Err(contradiction("X-Event-Type", sent, envelope.event.as_str()));
        }
        Ok(())
    }

    /// How long ago Evolution first tried this delivery, if it said so. A timestamp in the
    /// future (clock skew) counts as no age at all.
    pub fn age(&self, now: SystemTime) -> Option<Duration> {
        let sent = UNIX_EPOCH + Duration::from_millis(self.sent_at_ms?);
        Some(now.duration_since(sent).unwrap_or(Duration::ZERO))
    }

    /// `X-Instance-ID`, fit for a log line.
    pub fn instance_id(&self) -> Option<String> {
        self.instance_id.as_ref().map(|v| printable(v.as_bytes()))
    }

    /// Evolution's version from `User-Agent: EvolutionAPI-Webhook/<version>`, if it is one.
    pub fn agent_version(&self) -> Option<String> {
        let agent = self.user_agent.as_ref()?.to_str().ok()?;
        agent
            .strip_prefix(AGENT_PREFIX)
            .map(|v| printable(v.as_bytes()))
    }
}

/// Whether a header's bytes say `text`. Node (Evolution's axios) writes header values as
/// Latin-1, one byte per character, so `tê-ünï` arrives as 6 bytes, not as its UTF-8;
/// other senders write UTF-8. Either spelling of the same name is the same name.
fn same_text(header: &[u8], text: &str) -> bool {
    header == text.as_bytes()
        || (header.len() == text.chars().count()
            && header
                .iter()
                .zip(text.chars())
                .all(|(&b, c)| b as u32 == c as u32))
}

/// A header value fit for a log line and an error body: bounded, lossy UTF-8.
fn printable(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(LOGGED_BYTES)];
    String::from_utf8_lossy(cut).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, http::HeaderValue::from_bytes(value).unwrap());
        }
        map
    }

    fn envelope(event: &str, instance: &str) -> Envelope {
        let body = serde_json::json!({"event": event, "instance": instance, "data": {}});
        Envelope::from_webhook(&serde_json::to_vec(&body).unwrap()).unwrap()
    }

    #[test]
    fn absent_headers_check_nothing() {
        let sent = DeliveryHeaders::read(&HeaderMap::new());
        assert!(sent.check(&envelope("call", "acme")).is_ok());
        assert_eq!(sent.age(SystemTime::now()), None);
    }

    #[test]
    fn agreeing_headers_pass_in_utf8_and_latin1() {
        let latin1: Vec<u8> = "tê-ünï".chars().map(|c| c as u8).collect();
        for name in ["tê-ünï".as_bytes(), &latin1] {
            let sent = DeliveryHeaders::read(&headers(&[
                (INSTANCE_NAME, name),
                (EVENT_TYPE, b"messages.upsert"),
            ]));
            assert!(sent.check(&envelope("messages.upsert", "tê-ünï")).is_ok());
        }
    }

    #[test]
    fn contradicting_headers_are_refused() {
        let sent = DeliveryHeaders::read(&headers(&[(INSTANCE_NAME, b"other")]));
        let err = sent.check(&envelope("call", "acme")).unwrap_err();
        assert_eq!(err.status(), http::StatusCode::UNPROCESSABLE_ENTITY);
        assert!(err.to_string().contains("X-Instance-Name"), "{err}");
        // The kebab or UPPER_SNAKE form is not what Evolution sends.
        let sent = DeliveryHeaders::read(&headers(&[(EVENT_TYPE, b"MESSAGES_UPSERT")]));
        let err = sent
            .check(&envelope("messages.upsert", "acme"))
            .unwrap_err();
        assert!(err.to_string().contains("X-Event-Type"), "{err}");
    }

    #[test]
    fn age_from_the_timestamp() {
        let now = UNIX_EPOCH + Duration::from_millis(1_765_000_010_000);
        let sent = DeliveryHeaders::read(&headers(&[(TIMESTAMP, b"1765000000000")]));
        assert_eq!(sent.age(now), Some(Duration::from_secs(10)));
        let future = DeliveryHeaders::read(&headers(&[(TIMESTAMP, b"1765000020000")]));
        assert_eq!(future.age(now), Some(Duration::ZERO));
        let garbage = DeliveryHeaders::read(&headers(&[(TIMESTAMP, b"yesterday")]));
        assert_eq!(garbage.age(now), None);
    }

    #[test]
    fn agent_version_only_from_evolution() {
        let sent =
            DeliveryHeaders::read(&headers(&[("user-agent", b"EvolutionAPI-Webhook/2.4.0")]));
        assert_eq!(sent.agent_version().as_deref(), Some("2.4.0"));
        let other = DeliveryHeaders::read(&headers(&[("user-agent", b"axios/1.7")]));
        assert_eq!(other.agent_version(), None);
    }
}
