//! The webhook URL after the configured path: `[/{path_token}][/{event-suffix}]`.

use subtle::ConstantTimeEq;

use super::config::Config;
use super::error::Error;

/// The parts of a webhook URL after the configured path.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct WebhookPath {
    pub(super) token: PathToken,
    /// The by-events suffix, e.g. `messages-upsert`.
    pub(super) suffix: Option<String>,
}

/// The path token segment of a webhook URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PathToken {
    /// No segment where a token belongs.
    Absent,
    /// The configured token (compared in constant time).
    Matched,
    /// A segment where the token belongs that is not the token.
    Wrong,
}

impl WebhookPath {
    pub(super) fn parse(config: &Config, path: &str) -> Result<Self, Error> {
        let rest = path
            .strip_prefix(config.path.as_str())
            .ok_or(Error::NotFound)?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return Err(Error::NotFound);
        }
        // A URL configured with a trailing '/' gives `//suffix`: empty segments are ignored.
        let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let token = config.path_token.as_ref().map(|t| t.expose().as_bytes());
        let is_token =
            |segment: &str| token.is_some_and(|t| bool::from(t.ct_eq(segment.as_bytes())));
        match segments.as_slice() {
            [] => Ok(Self {
                token: PathToken::Absent,
                suffix: None,
            }),
            [one] if is_token(one) => Ok(Self {
                token: PathToken::Matched,
                suffix: None,
            }),
            [one] => Ok(Self {
                token: PathToken::Absent,
                suffix: Some((*one).to_owned()),
            }),
            [first, second] => Ok(Self {
                token: if is_token(first) {
                    PathToken::Matched
                } else {
                    PathToken::Wrong
                },
                suffix: Some((*second).to_owned()),
            }),
            _ => Err(Error::NotFound),
        }
    }
}
