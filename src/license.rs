//! Evolution 2.4's license gate, as the sidecar sees it from outside.
//!
//! Until its license is activated, Evolution 2.4 answers every business REST route with
//! `503 {"error":"service not activated","code":"LICENSE_REQUIRED",...}` while its webhooks
//! and socket.io keep flowing, and `GET /license/status` (never gated) says
//! `{"status":"inactive"}`. 2.3.x has no such route (404). The sidecar passes that 503
//! through untouched (emit acks, the proxy) and only needs to recognize it: to report it in
//! readiness and to tell a client why its instance token cannot be checked.

/// The route that says whether Evolution is activated, relative to its base URL.
pub const STATUS_PATH: &str = "license/status";

/// The most of an answer read to recognize it: Evolution's gate answer is about 400 bytes.
pub const ANSWER_BYTES: usize = 4096;

/// An answer's status and at most the first [`ANSWER_BYTES`] (or so) of its body: enough to
/// recognize Evolution's license answers (or any other small answer, such as an instance's
/// connection state), and never an unbounded read.
pub async fn head(mut response: reqwest::Response) -> (u16, Vec<u8>) {
    let status = response.status().as_u16();
    let mut body = Vec::new();
    while body.len() < ANSWER_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    (status, body)
}

/// Whether an answer is Evolution's license gate (503 with `code: "LICENSE_REQUIRED"`).
pub fn is_gate_answer(status: u16, body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Gate<'a> {
        #[serde(borrow)]
        code: Option<&'a str>,
    }
    status == 503
        && serde_json::from_slice::<Gate>(body)
            .is_ok_and(|gate| gate.code == Some("LICENSE_REQUIRED"))
}

/// Whether a `GET /license/status` answer says the license is not active. Anything else
/// (2.3.x's 404, an active license, an unexpected body) is not "inactive".
pub fn says_inactive(status: u16, body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Status<'a> {
        #[serde(borrow)]
        status: Option<&'a str>,
    }
    status == 200
        && serde_json::from_slice::<Status>(body)
            .is_ok_and(|answer| answer.status == Some("inactive"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_the_gate_and_nothing_else() {
        let gate = br#"{"error":"service not activated","code":"LICENSE_REQUIRED","register_url":"http://x/manager/login"}"#;
        assert!(is_gate_answer(503, gate));
        assert!(!is_gate_answer(500, gate));
        assert!(!is_gate_answer(503, br#"{"code":"OTHER"}"#));
        assert!(!is_gate_answer(503, b"Service Unavailable"));
    }

    #[test]
    fn status_answers() {
        assert!(says_inactive(
            200,
            br#"{"status":"inactive","instance_id":"i"}"#
        ));
        assert!(!says_inactive(
            200,
            br#"{"status":"active","instance_id":"i"}"#
        ));
        assert!(!says_inactive(404, b"Cannot GET /license/status"));
        assert!(!says_inactive(200, b"<html>"));
    }
}
