//! Run with: used by `loadgen --pid <server pid>` (`cargo run --release -p evo-bench --bin loadgen -- --help`).
//!
//! CPU time and memory of a process from `/proc/<pid>/stat` and `/proc/<pid>/status` (Linux).
//! CPU time is `utime + stime` of all the process's threads, in clock ticks converted with
//! `sysconf(_SC_CLK_TCK)` (100 on usual kernels: 10 ms resolution).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A process to watch.
#[derive(Debug, Clone)]
pub struct Proc {
    pid: u32,
    ms_per_tick: f64,
}

impl Proc {
    /// Fails when `/proc/<pid>` cannot be read (no such process, not Linux).
    pub fn new(pid: u32) -> io::Result<Self> {
        let proc = Self {
            pid,
            ms_per_tick: 1000.0 / clock_ticks_per_second() as f64,
        };
        proc.cpu_ms()?;
        Ok(proc)
    }

    /// This process (the load generator), to show whether it was the bottleneck.
    pub fn current() -> io::Result<Self> {
        Self::new(std::process::id())
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// User plus system CPU time since the process started, in milliseconds.
    pub fn cpu_ms(&self) -> io::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))?;
        let ticks = cpu_ticks(&stat).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc/<pid>/stat")
        })?;
        Ok(ticks as f64 * self.ms_per_tick)
    }

    /// Resident set size now (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> io::Result<u64> {
        self.status_kib("VmRSS:")
    }

    /// The highest resident set size since the process started (`VmHWM`), in KiB.
    pub fn hwm_kib(&self) -> io::Result<u64> {
        self.status_kib("VmHWM:")
    }

    fn status_kib(&self, key: &str) -> io::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        status_field_kib(&status, key)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no {key}")))
    }

    /// Samples `VmRSS` every `period` and keeps the highest value (KiB) until the returned
    /// guard is dropped.
    pub fn sample_peak_rss(&self, period: Duration) -> PeakRss {
        let peak = Arc::new(AtomicU64::new(self.rss_kib().unwrap_or(0)));
        let task = {
            let peak = peak.clone();
            let proc = self.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                loop {
                    tick.tick().await;
                    match proc.rss_kib() {
                        Ok(kib) => {
                            peak.fetch_max(kib, Ordering::Relaxed);
                        }
                        Err(_) => return,
                    }
                }
            })
        };
        PeakRss { peak, task }
    }
}

/// The running peak of a [`Proc::sample_peak_rss`]; sampling stops when dropped.
pub struct PeakRss {
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl PeakRss {
    /// The highest `VmRSS` seen so far, in KiB.
    pub fn kib(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `sysconf(_SC_CLK_TCK)`, or 100 if it cannot tell.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// `utime + stime` from the text of `/proc/<pid>/stat`. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted from the last `)`: field 3 (state) is the
/// first one after it, utime is field 14 and stime field 15.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn status_field_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_ticks_after_the_command_name() {
        let stat =
            "1234 (tokio (rt) x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0 100 0 0";
        assert_eq!(cpu_ticks(stat), Some(325));
    }

    #[test]
    fn reads_status_fields() {
        let status = "Name:\tx\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(status_field_kib(status, "VmRSS:"), Some(10240));
        assert_eq!(status_field_kib(status, "VmHWM:"), Some(20480));
        assert_eq!(status_field_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn watches_this_process() {
        let me = Proc::current().unwrap();
        assert!(me.rss_kib().unwrap() > 0);
        assert!(me.hwm_kib().unwrap() > 0);
        assert!(me.cpu_ms().unwrap() >= 0.0);
    }
}
