//! The server under test and this process, watched through `/proc`: CPU time between two
//! marks, RSS now and its peak sampled in the background, and their JSON and human forms.

use std::time::Duration;

use evo_bench::procfs::{PeakRss, Proc};
use serde_json::{Value, json};
use tokio::time::Instant;

/// The server's process, if `--pid` was given, and this process.
pub struct Watch {
    server: Option<Proc>,
    me: Option<Proc>,
}

/// CPU readings at one instant.
#[derive(Clone, Copy)]
pub struct CpuMark {
    server_ms: Option<f64>,
    me_ms: Option<f64>,
    at: Instant,
}

impl Watch {
    pub fn new(pid: Option<u32>) -> Result<Self, String> {
        let server = pid
            .map(|pid| Proc::new(pid).map_err(|err| format!("--pid {pid}: {err}")))
            .transpose()?;
        Ok(Self {
            server,
            me: Proc::current().ok(),
        })
    }

    pub fn rss_kib(&self) -> Option<u64> {
        self.server.as_ref().and_then(|p| p.rss_kib().ok())
    }

    pub fn cpu(&self) -> CpuMark {
        CpuMark {
            server_ms: self.server.as_ref().and_then(|p| p.cpu_ms().ok()),
            me_ms: self.me.as_ref().and_then(|p| p.cpu_ms().ok()),
            at: Instant::now(),
        }
    }

    pub fn peak(&self) -> Option<PeakRss> {
        self.server
            .as_ref()
            .map(|p| p.sample_peak_rss(Duration::from_millis(100)))
    }

    /// `{"pid", "cpu_ms", "cpu_ms_per_1k", "rss_*_kib", "hwm_kib"}`; nulls without `--pid`.
    pub fn server_json(
        &self,
        from: CpuMark,
        to: CpuMark,
        per_1k_of: u64,
        rss: [Option<u64>; 3],
    ) -> Value {
        let cpu_ms = from.server_ms.zip(to.server_ms).map(|(a, b)| b - a);
        let per_1k = cpu_ms
            .filter(|_| per_1k_of > 0)
            .map(|ms| ms * 1000.0 / per_1k_of as f64);
        json!({
            "pid": self.server.as_ref().map(Proc::pid),
            "cpu_ms": cpu_ms,
            "cpu_ms_per_1k": per_1k,
            "rss_before_kib": rss[0],
            "rss_after_kib": rss[1],
            "rss_peak_kib": rss[2],
            "hwm_kib": self.server.as_ref().and_then(|p| p.hwm_kib().ok()),
        })
    }

    /// This process's CPU use over the interval, in % of one core.
    pub fn loadgen_json(from: CpuMark, to: CpuMark) -> Value {
        let wall_ms = to.at.duration_since(from.at).as_secs_f64() * 1000.0;
        let cpu_ms = from.me_ms.zip(to.me_ms).map(|(a, b)| b - a);
        json!({
            "cpu_ms": cpu_ms,
            "cpu_percent": cpu_ms.filter(|_| wall_ms > 0.0).map(|ms| ms * 100.0 / wall_ms),
        })
    }
}

pub fn print_server(server: &Value, per: &str) {
    if server["pid"].is_null() {
        println!("server: not watched (no --pid)");
        return;
    }
    let mib = |key: &str| server[key].as_f64().map_or(f64::NAN, |kib| kib / 1024.0);
    println!(
        "server: CPU {:.0} ms ({:.2} ms per 1,000 {per}); RSS before {:.1} MiB, after {:.1} MiB, peak {:.1} MiB (VmHWM {:.1} MiB)",
        server["cpu_ms"].as_f64().unwrap_or(f64::NAN),
        server["cpu_ms_per_1k"].as_f64().unwrap_or(f64::NAN),
        mib("rss_before_kib"),
        mib("rss_after_kib"),
        mib("rss_peak_kib"),
        mib("hwm_kib"),
    );
}
