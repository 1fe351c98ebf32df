//! What a socket.io HTTP request says about itself, read one way for every layer.
//!
//! The admission guard, the handshake key check and the hub must agree on whether a
//! request opens a session: if one of them took `?sid` (no value) for an existing session
//! while engineioxide, which looks for a valid `sid=` value, opens a new one, that request
//! would skip the rate limit, the connection cap and the key check. So [`session_id`]
//! reads the query exactly as engineioxide 0.17 does (the first `sid=` parameter, not
//! decoded, 16 URL-safe base64 characters), and everything else is a handshake.
//!
//! It knows nothing of the other modules but the `expiring` map.

use crate::expiring::ExpiringMap;

/// An Engine.IO session id as engineioxide accepts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionId<'a>(&'a str);

impl<'a> SessionId<'a> {
    pub fn as_str(&self) -> &'a str {
        self.0
    }
}

/// The session a request belongs to, or `None` when it is a handshake (a new session).
///
/// A `sid=` value that engineioxide cannot parse is refused by engineioxide itself (no
/// session is opened), so treating it as a handshake here only makes it pay admission.
pub fn session_id(query: &str) -> Option<SessionId<'_>> {
    let value = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("sid="))?;
    let valid = value.len() == 16
        && value
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-');
    valid.then_some(SessionId(value))
}

/// Whether a socket.io request opens a new session (see [`session_id`]).
pub fn is_handshake(uri: &http::Uri) -> bool {
    session_id(uri.query().unwrap_or("")).is_none()
}

/// One decoded query parameter (`+` is a space, percent-escapes are decoded).
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| {
            percent_encoding::percent_decode_str(&value.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// The key of a handshake request: `?apikey=` first, then the `apikey` header
/// (Evolution's order). `None` when neither is present: the namespace CONNECT's
/// `auth.apikey` is judged later.
pub fn key_from_request(parts: &http::request::Parts) -> Option<String> {
    query_param(parts.uri.query().unwrap_or(""), "apikey").or_else(|| {
        parts
            .headers
            .get("apikey")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    })
}

/// What the hub knows of Engine.IO sessions that the guard, which sees every request,
/// must act on:
/// - sessions the sidecar ended from outside engineioxide (too many refused CONNECTs on a
///   polling session, whose transport is many requests): their later requests are refused,
///   so the session can do nothing more and engineioxide drops it when its heartbeat goes
///   unanswered. Bounded in entries; an entry expires after `ttl`.
/// - sessions the hub watches (the polling sessions of strays, whose end socketioxide
///   never reports): when each last made a request. Bounded in entries.
pub struct Sessions {
    ttl: std::time::Duration,
    /// Session id → nothing; each counts one "byte", so the bound is in entries.
    sids: std::sync::Mutex<ExpiringMap<String, ()>>,
    /// Watched session id → its last request.
    watched: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// How many are watched: the guard's per-request [`Sessions::seen`] takes no lock while
    /// none is (strays are rare).
    watching: std::sync::atomic::AtomicUsize,
}

/// The most sessions watched at once (strays are rare: a race of first CONNECTs).
pub const MAX_WATCHED_SESSIONS: usize = 4096;

/// The most ended sessions remembered at once (16-byte ids: about 2 MiB).
pub const MAX_CLOSED_SESSIONS: usize = 32_768;

impl Sessions {
    pub fn new(ttl: std::time::Duration) -> Self {
        Self {
            ttl,
            sids: std::sync::Mutex::new(ExpiringMap::new(MAX_CLOSED_SESSIONS)),
            watched: std::sync::Mutex::new(std::collections::HashMap::new()),
            watching: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Starts noting when `sid` makes requests; `false` when too many are watched.
    pub fn watch(&self, sid: &str) -> bool {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        if watched.len() >= MAX_WATCHED_SESSIONS && !watched.contains_key(sid) {
            return false;
        }
        watched.insert(sid.to_owned(), std::time::Instant::now());
        self.watching
            .store(watched.len(), std::sync::atomic::Ordering::Relaxed);
        true
    }

    pub fn unwatch(&self, sid: &str) {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        watched.remove(sid);
        self.watching
            .store(watched.len(), std::sync::atomic::Ordering::Relaxed);
    }

    /// A request of `sid` arrived (the guard calls it for every request with a session).
    pub fn seen(&self, sid: SessionId<'_>) {
        if self.watching.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            return;
        }
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = watched.get_mut(sid.as_str()) {
            *at = std::time::Instant::now();
        }
    }

    /// When a watched session last made a request.
    pub fn last_seen(&self, sid: &str) -> Option<std::time::Instant> {
        let watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        watched.get(sid).copied()
    }

    pub fn close(&self, sid: &str) {
        let now = std::time::Instant::now();
        let mut sids = self.sids.lock().unwrap_or_else(|e| e.into_inner());
        if sids.get(sid).is_none() {
            sids.insert(sid.to_owned(), (), 1, now);
        }
        sids.expire(self.ttl, now);
    }

    pub fn is_closed(&self, sid: SessionId<'_>) -> bool {
        let mut sids = self.sids.lock().unwrap_or_else(|e| e.into_inner());
        if sids.is_empty() {
            return false;
        }
        sids.expire(self.ttl, std::time::Instant::now());
        sids.get(sid.as_str()).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_valid_sid_value_is_an_existing_session() {
        let sid = "AAAAAAAAAAAAAAHs";
        let query = format!("EIO=4&transport=polling&sid={sid}");
        assert_eq!(session_id(&query).map(|s| s.as_str()), Some(sid));
        // What engineioxide opens a new session for: all handshakes.
        for query in [
            "EIO=4&transport=websocket",
            "EIO=4&transport=websocket&sid",
            "EIO=4&transport=websocket&sid=",
            "EIO=4&transport=polling&sid=short",
            "EIO=4&transport=polling&sid=AAAAAAAAAAAAAAH%",
            "EIO=4&transport=polling&xsid=AAAAAAAAAAAAAAHs",
            "EIO=4&transport=polling&sid[]=AAAAAAAAAAAAAAHs",
        ] {
            assert_eq!(session_id(query), None, "{query}");
        }
    }

    #[test]
    fn query_params_are_decoded() {
        assert_eq!(
            query_param("a=1&apikey=x%2By", "apikey").as_deref(),
            Some("x+y")
        );
        assert_eq!(query_param("apikey", "apikey").as_deref(), Some(""));
        assert_eq!(query_param("EIO=4&transport=polling", "sid"), None);
    }
}
