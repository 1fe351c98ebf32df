//! The server's RSS and CPU time sampled at a fixed period for a whole soak (a time series,
//! not only a peak), and the flatness verdict on it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use evo_bench::procfs::Proc;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// One reading: seconds since the series started, `VmRSS`, cumulative CPU (utime + stime).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub t_s: f64,
    pub rss_kib: u64,
    pub cpu_ms: f64,
}

/// Samples in the background until dropped or [`Series::stop`]ped.
pub struct Series {
    samples: Arc<Mutex<Vec<Sample>>>,
    task: JoinHandle<()>,
}

impl Series {
    /// Starts at `start` (t = 0), one sample per `period`, the first at once.
    pub fn start(pid: u32, period: Duration, start: Instant) -> Result<Self, String> {
        let process = Proc::new(pid).map_err(|err| format!("--pid {pid}: {err}"))?;
        let samples = Arc::new(Mutex::new(Vec::new()));
        let sink = samples.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(start, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let at = tick.tick().await;
                // A process that is gone ends the series (the verdict then sees the gap).
                let (Ok(rss_kib), Ok(cpu_ms)) = (process.rss_kib(), process.cpu_ms()) else {
                    return;
                };
                let t_s = at.duration_since(start).as_secs_f64();
                sink.lock().unwrap().push(Sample {
                    t_s,
                    rss_kib,
                    cpu_ms,
                });
            }
        });
        Ok(Self { samples, task })
    }

    /// Stops sampling and returns the series.
    pub fn stop(self) -> Vec<Sample> {
        self.task.abort();
        self.samples.lock().unwrap().clone()
    }
}

/// "RSS flat after warm-up": the mean of the last 20 % of the samples taken between
/// `warmup_s` and `end_s` against the mean of all of them, within `tolerance` (0.10 = ±10 %).
#[derive(Debug, Clone, PartialEq)]
pub struct Flatness {
    pub samples: usize,
    pub mean_after_warmup_kib: f64,
    pub mean_last_kib: f64,
    pub min_kib: u64,
    pub max_kib: u64,
    /// `mean_last / mean_after_warmup`.
    pub ratio: f64,
    pub flat: bool,
}

pub fn flatness(series: &[Sample], warmup_s: f64, end_s: f64, tolerance: f64) -> Flatness {
    let after: Vec<u64> = series
        .iter()
        .filter(|s| s.t_s >= warmup_s && s.t_s <= end_s)
        .map(|s| s.rss_kib)
        .collect();
    let mean = |v: &[u64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<u64>() as f64 / v.len() as f64
        }
    };
    let last_count = (after.len() / 5).max(1).min(after.len());
    let mean_after = mean(&after);
    let mean_last = mean(&after[after.len() - last_count..]);
    let ratio = mean_last / mean_after;
    Flatness {
        samples: after.len(),
        mean_after_warmup_kib: mean_after,
        mean_last_kib: mean_last,
        min_kib: after.iter().copied().min().unwrap_or(0),
        max_kib: after.iter().copied().max().unwrap_or(0),
        ratio,
        // Too few samples to judge is a failure, not a pass (NaN compares false).
        flat: after.len() >= 5 && (ratio - 1.0).abs() <= tolerance,
    }
}

impl Flatness {
    pub fn json(&self) -> Value {
        json!({
            "samples_after_warmup": self.samples,
            "mean_after_warmup_kib": self.mean_after_warmup_kib,
            "mean_last_20pct_kib": self.mean_last_kib,
            "min_kib": self.min_kib,
            "max_kib": self.max_kib,
            "ratio": self.ratio,
            "flat": self.flat,
        })
    }
}

/// `label,t_s,rss_kib,cpu_ms` lines, the input of the `chart` binary.
pub fn csv_lines(label: &str, series: &[Sample]) -> String {
    series
        .iter()
        .map(|s| format!("{label},{:.3},{},{:.0}\n", s.t_s, s.rss_kib, s.cpu_ms))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(values: &[u64]) -> Vec<Sample> {
        values
            .iter()
            .enumerate()
            .map(|(i, &rss_kib)| Sample {
                t_s: i as f64,
                rss_kib,
                cpu_ms: 0.0,
            })
            .collect()
    }

    #[test]
    fn flat_after_warmup_ignores_the_ramp() {
        // Ramp for 3 s, then flat around 100.
        let s = series(&[10, 50, 90, 100, 102, 98, 100, 101, 99, 100, 100]);
        let f = flatness(&s, 3.0, 10.0, 0.10);
        assert_eq!(f.samples, 8);
        assert!(f.flat, "{f:?}");
        assert_eq!((f.min_kib, f.max_kib), (98, 102));
    }

    #[test]
    fn growth_after_warmup_is_not_flat() {
        let s = series(&[100, 100, 110, 120, 130, 140, 150, 160, 170, 180, 190]);
        let f = flatness(&s, 1.0, 10.0, 0.10);
        assert!(!f.flat, "{f:?}");
        assert!(f.ratio > 1.1);
    }

    #[test]
    fn too_few_samples_is_not_a_pass() {
        let f = flatness(&series(&[100, 100]), 0.0, 10.0, 0.10);
        assert!(!f.flat);
        assert!(!flatness(&[], 0.0, 10.0, 0.10).flat);
    }

    #[test]
    fn csv_rows() {
        let s = series(&[1024]);
        assert_eq!(csv_lines("memory", &s), "memory,0.000,1024,0\n");
    }
}
