//! Who is on the other end of a TCP connection: the trusted-proxy list and the per-client
//! key (IPv6 per /64). A leaf shared by `server` (connection caps) and `proxy`
//! (`X-Forwarded-*`), so neither depends on `guard`.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;

use crate::setting;

/// The client's address as the guard decided it at the handshake (the peer, or the
/// `X-Forwarded-For` hop behind trusted proxies): in the handshake request's extensions,
/// which the socket's request parts keep for the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// Peers whose forwarding headers are believed (`SIDECAR_TRUSTED_PROXIES`).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses `10.0.0.0/8` or a bare address per item (`guard.trusted_proxies`).
    pub fn parse(items: &[String]) -> Result<Self, setting::Error> {
        setting::cidr_list("guard.trusted_proxies", items).map(Self)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// The key a client is counted under: its IPv4 address, or its IPv6 /64 (one host usually
/// owns the whole prefix, so per-address counting would not bound it).
pub fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(bucket(ip("192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(bucket(ip("2001:db8::1")), bucket(ip("2001:db8::ffff")));
        assert_ne!(bucket(ip("2001:db8::1")), bucket(ip("2001:db8:0:1::1")));
        assert_eq!(bucket(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }

    #[test]
    fn trusted() {
        let list = TrustedProxies::parse(&["10.0.0.0/8".into(), "192.0.2.7".into()]).unwrap();
        assert!(list.contains("10.1.2.3".parse().unwrap()));
        assert!(list.contains("192.0.2.7".parse().unwrap()));
        assert!(!list.contains("192.0.2.8".parse().unwrap()));
        assert!(TrustedProxies::parse(&["nope".into()]).is_err());
    }
}
