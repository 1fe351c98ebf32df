//! `WEBSOCKET_ALLOWED_HOSTS`: addresses whose clients join without a key, as Evolution's own
//! socket.io lets them (its Manager connects to `/` without one).
//!
//! Off by default. A listed address (an IP or a CIDR) may join every namespace, `/`
//! included, without a key, and read every instance's events; its emits are refused, since
//! the sidecar forwards an emit with the client's own key. `*` (any address) is accepted
//! only with `SIDECAR_ALLOW_ANY_HOST=true`. The address is the TCP peer's, or, when the peer
//! is in `SIDECAR_TRUSTED_PROXIES`, the client's from `X-Forwarded-For` (the guard decides
//! it, as for the rate limit).

use std::net::IpAddr;

use ipnet::IpNet;

use crate::setting;

/// Whose keyless clients are admitted.
#[derive(Debug, Clone, Default)]
pub enum AllowedHosts {
    #[default]
    None,
    /// `*` with `SIDECAR_ALLOW_ANY_HOST=true`.
    Any,
    Listed(Vec<IpNet>),
}

impl AllowedHosts {
    pub fn parse(items: &[String], allow_any: bool) -> Result<Self, setting::Error> {
        let items: Vec<String> = items
            .iter()
            .map(|item| item.trim().to_owned())
            .filter(|item| !item.is_empty())
            .collect();
        if items.iter().any(|item| item == "*") {
            if !allow_any {
                return Err(setting::invalid(
                    "auth.allowed_hosts",
                    &"*",
                    "lets anyone who reaches the port read every instance's events without a key; \
                     set SIDECAR_ALLOW_ANY_HOST=true (auth.allow_any_host) to mean it, or list addresses",
                ));
            }
            return Ok(AllowedHosts::Any);
        }
        if items.is_empty() {
            return Ok(AllowedHosts::None);
        }
        setting::cidr_list("auth.allowed_hosts", &items).map(AllowedHosts::Listed)
    }

    /// Whether a keyless client at `client` is admitted. An IPv4 client seen as an
    /// IPv4-mapped IPv6 address (a dual-stack listener) is the IPv4 one.
    pub fn admits(&self, client: Option<IpAddr>) -> bool {
        match (self, client) {
            (AllowedHosts::None, _) | (_, None) => false,
            (AllowedHosts::Any, Some(_)) => true,
            (AllowedHosts::Listed(nets), Some(ip)) => {
                let canonical = ip.to_canonical();
                nets.iter()
                    .any(|net| net.contains(&ip) || net.contains(&canonical))
            }
        }
    }

    /// Says at start what is open, loudly: it is a hole by design.
    pub fn announce(&self) {
        match self {
            AllowedHosts::None => {}
            AllowedHosts::Any => tracing::warn!(
                "WEBSOCKET_ALLOWED_HOSTS=* with SIDECAR_ALLOW_ANY_HOST=true: ANY client may join \
                 every namespace without a key and read every instance's events"
            ),
            AllowedHosts::Listed(nets) => tracing::warn!(
                allowed_hosts = %nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                "WEBSOCKET_ALLOWED_HOSTS: clients from these addresses join every namespace \
                 without a key and read every instance's events (behind a proxy, list the proxy \
                 in SIDECAR_TRUSTED_PROXIES, or every client is the proxy)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn off_by_default_and_when_empty() {
        assert!(!AllowedHosts::default().admits(ip("127.0.0.1")));
        let empty = AllowedHosts::parse(&[" ".into()], false).unwrap();
        assert!(!empty.admits(ip("127.0.0.1")));
    }

    #[test]
    fn listed_addresses_and_cidrs() {
        let hosts =
            AllowedHosts::parse(&["127.0.0.1".into(), "10.1.0.0/16".into()], false).unwrap();
        assert!(hosts.admits(ip("127.0.0.1")));
        assert!(hosts.admits(ip("::ffff:127.0.0.1")), "IPv4-mapped");
        assert!(hosts.admits(ip("10.1.200.3")));
        assert!(!hosts.admits(ip("10.2.0.1")));
        assert!(!hosts.admits(None), "no address known: not admitted");
        assert!(AllowedHosts::parse(&["localhost".into()], false).is_err());
    }

    #[test]
    fn any_host_needs_the_second_setting() {
        let err = AllowedHosts::parse(&["*".into()], false).unwrap_err();
        assert!(err.to_string().contains("SIDECAR_ALLOW_ANY_HOST"), "{err}");
        let any = AllowedHosts::parse(&["*".into()], true).unwrap();
        assert!(any.admits(ip("203.0.113.9")));
    }
}
