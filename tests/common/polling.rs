//! A polling Engine.IO session by hand, for what the official client will not do: send
//! and never poll, or race two first CONNECTs.

use super::app::{TestApp, http};
use super::wait::{PATIENCE, eventually_value};

/// An Engine.IO polling session driven by hand: it sends, and polls only when asked.
pub struct PollingSession {
    url: String,
}

impl PollingSession {
    pub async fn open(app: &TestApp) -> Self {
        let base = app.url("/socket.io/?EIO=4&transport=polling");
        let open = http()
            .get(&base)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let handshake: serde_json::Value =
            serde_json::from_str(open.trim_start_matches('0')).expect("an OPEN packet");
        let sid = handshake["sid"].as_str().expect("a sid").to_owned();
        Self {
            url: format!("{base}&sid={sid}"),
        }
    }

    pub async fn send(&self, packet: &str) {
        let response = http()
            .post(&self.url)
            .header("content-type", "text/plain;charset=UTF-8")
            .body(packet.to_owned())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{packet}");
    }
}

impl PollingSession {
    /// Polls until the packets received so far contain `needle`; returns them all.
    pub async fn poll_until(&self, needle: &str) -> String {
        let mut received = String::new();
        eventually_value(&format!("a poll brings {needle}"), PATIENCE, async || {
            let response = http().get(&self.url).send().await.unwrap();
            assert_eq!(response.status(), 200);
            let body = response.text().await.unwrap();
            // Answer the heartbeat, as a client does.
            if body.split('\u{1e}').any(|packet| packet == "2") {
                self.send("3").await;
            }
            received.push_str(&body);
            received.push('\u{1e}');
            if received.contains(needle) {
                Ok(received.clone())
            } else {
                Err(received.clone())
            }
        })
        .await
    }

    /// Closes the session (Engine.IO CLOSE).
    pub async fn close(&self) {
        let _ = http().post(&self.url).body("1").send().await;
    }
}
