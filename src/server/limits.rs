//! The TCP connection caps: in total (fitted to the descriptor limit) and per client.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::peer::{self, TrustedProxies};
use crate::setting;
use crate::telemetry::names;

/// Settings of the public (and metrics) listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Open TCP connections at most, websockets included; 0 means no cap (the descriptor
    /// limit still applies).
    pub max_tcp_connections: usize,
    /// Open TCP connections per client address (IPv6 per /64); 0 means no cap. Peers in
    /// `SIDECAR_TRUSTED_PROXIES` are exempt: they carry many clients.
    pub max_tcp_connections_per_ip: usize,
    /// How long a connection may take to send a request head, counted from when it starts
    /// waiting for one: also the idle timeout of a kept-alive connection.
    pub header_timeout_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_tcp_connections: 10_000,
            max_tcp_connections_per_ip: 256,
            header_timeout_secs: 10,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<(), setting::Error> {
        if self.header_timeout_secs == 0 {
            return Err(setting::invalid(
                "server.header_timeout_secs",
                &0,
                "must be positive",
            ));
        }
        Ok(())
    }
}

/// Descriptors kept out of the connection cap: upstream calls, Redis, listeners, logs.
const RESERVED_FDS: u64 = 64;

/// Counts open connections, in total and per client.
pub struct Limits {
    max: usize,
    per_ip: usize,
    trusted: TrustedProxies,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

/// Why a connection was closed unserved (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Total,
    PerIp,
}

impl Refusal {
    pub(super) fn label(self) -> &'static str {
        match self {
            Refusal::Total => "max_tcp_connections",
            Refusal::PerIp => "max_tcp_connections_per_ip",
        }
    }
}

impl Limits {
    pub fn new(config: &Config, trusted: TrustedProxies) -> Self {
        Self {
            max: config.max_tcp_connections,
            per_ip: config.max_tcp_connections_per_ip,
            trusted,
            open: Mutex::new(Open::default()),
        }
    }

    /// The same limits with the total cap lowered to fit `fd_limit` descriptors: each
    /// connection may hold a second one (its proxied upstream request).
    pub(super) fn fitted(&self, fd_limit: Option<u64>) -> Self {
        let mut max = self.max;
        if let Some(limit) = fd_limit {
            let fits = usize::try_from(limit.saturating_sub(RESERVED_FDS) / 2)
                .unwrap_or(usize::MAX)
                .max(1);
            if max == 0 || max > fits {
                tracing::warn!(
                    configured = self.max,
                    effective = fits,
                    fd_limit = limit,
                    "SIDECAR_MAX_TCP_CONNECTIONS lowered to fit the descriptor limit (raise `ulimit -n`)"
                );
                max = fits;
            }
        }
        Self {
            max,
            per_ip: self.per_ip,
            trusted: self.trusted.clone(),
            open: Mutex::new(Open::default()),
        }
    }

    /// Counts a new connection from `peer`, or says which cap it is over.
    pub fn acquire(self: &Arc<Self>, peer: IpAddr) -> Result<Permit, Refusal> {
        let client = (self.per_ip > 0 && !self.trusted.contains(peer)).then(|| peer::bucket(peer));
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if self.max > 0 && open.total >= self.max {
            return Err(Refusal::Total);
        }
        if let Some(client) = client {
            let count = open.by_client.entry(client).or_insert(0);
            if *count >= self.per_ip {
                return Err(Refusal::PerIp);
            }
            *count += 1;
        }
        open.total += 1;
        metrics::gauge!(names::TCP_CONNECTIONS).set(open.total as f64);
        Ok(Permit {
            limits: self.clone(),
            client,
        })
    }

    /// Connections counted now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).total
    }

    fn release(&self, client: Option<IpAddr>) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(client) = client
            && let Some(count) = open.by_client.get_mut(&client)
        {
            *count -= 1;
            if *count == 0 {
                open.by_client.remove(&client);
            }
        }
        metrics::gauge!(names::TCP_CONNECTIONS).set(open.total as f64);
    }
}

/// One counted connection; dropping it (with the socket) releases the count.
pub struct Permit {
    limits: Arc<Limits>,
    client: Option<IpAddr>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limits.release(self.client);
    }
}

/// The soft `RLIMIT_NOFILE` of this process, where the OS tells (Linux `/proc`).
pub(super) fn fd_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_ip: usize, trusted: &[&str]) -> Arc<Limits> {
        let trusted: Vec<String> = trusted.iter().map(|s| (*s).to_owned()).collect();
        Arc::new(Limits::new(
            &Config {
                max_tcp_connections: max,
                max_tcp_connections_per_ip: per_ip,
                ..Config::default()
            },
            TrustedProxies::parse(&trusted).unwrap(),
        ))
    }

    #[test]
    fn caps_count_and_release() {
        let limits = limits(3, 2, &["10.0.0.1"]);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let a6: IpAddr = "2001:db8::1".parse().unwrap();
        let a6_other: IpAddr = "2001:db8::2".parse().unwrap();
        let first = limits.acquire(a).unwrap();
        let _second = limits.acquire(a).unwrap();
        assert_eq!(limits.acquire(a).err(), Some(Refusal::PerIp));
        drop(first);
        let _third = limits.acquire(a).unwrap();
        let _v6 = limits.acquire(a6).unwrap();
        assert_eq!(limits.acquire(a6_other).err(), Some(Refusal::Total));
        assert_eq!(limits.open(), 3);
    }

    #[test]
    fn trusted_proxies_skip_the_per_ip_cap() {
        let limits = limits(0, 1, &["10.0.0.1"]);
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<Permit> = (0..5).map(|_| limits.acquire(proxy).unwrap()).collect();
        assert_eq!(limits.open(), 5);
        drop(held);
        assert_eq!(limits.open(), 0);
        assert!(limits.open.lock().unwrap().by_client.is_empty());
    }

    #[test]
    fn the_cap_fits_the_descriptor_limit() {
        let limits = limits(10_000, 0, &[]);
        assert_eq!(
            limits.fitted(Some(512)).max,
            (512 - RESERVED_FDS as usize) / 2
        );
        assert_eq!(limits.fitted(Some(1 << 20)).max, 10_000);
        assert_eq!(limits.fitted(None).max, 10_000);
    }
}
