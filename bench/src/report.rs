//! Run with: used by `loadgen` (its JSON summaries) and `loadgen table <results.jsonl>` (the
//! comparison table of `bench/run.sh`).
//!
//! Latency is recorded in microseconds into HDR histograms (3 significant digits) and
//! reported in milliseconds.

use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Microseconds from 1 µs to one hour, 3 significant digits; larger values are clamped.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Histograms split into shards, so thousands of client tasks seldom wait on one lock.
pub struct Shards {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Shards {
    pub fn new(count: usize) -> Self {
        Self {
            shards: (0..count.max(1)).map(|_| Mutex::new(histogram())).collect(),
        }
    }

    /// Records `micros` in the shard of `key` (a client index).
    pub fn record(&self, key: usize, micros: u64) {
        let shard = &self.shards[key % self.shards.len()];
        shard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(micros);
    }

    pub fn merged(&self) -> Histogram<u64> {
        let mut all = histogram();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            all.add(&*shard).expect("same bounds");
        }
        all
    }
}

/// `{"count", "p50", "p90", "p99", "max"}`, in milliseconds (`null` when empty).
pub fn percentiles_ms(histogram: &Histogram<u64>) -> Value {
    if histogram.is_empty() {
        return json!({"count": 0, "p50": null, "p90": null, "p99": null, "max": null});
    }
    let ms = |micros: u64| micros as f64 / 1000.0;
    json!({
        "count": histogram.len(),
        "p50": ms(histogram.value_at_quantile(0.50)),
        "p90": ms(histogram.value_at_quantile(0.90)),
        "p99": ms(histogram.value_at_quantile(0.99)),
        "max": ms(histogram.max()),
    })
}

/// `p50 1.234 ms, p90 ..., p99 ..., max ...` for the human lines.
pub fn percentiles_line(histogram: &Histogram<u64>) -> String {
    if histogram.is_empty() {
        return "no samples".to_owned();
    }
    let ms = |micros: u64| micros as f64 / 1000.0;
    format!(
        "p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} samples)",
        ms(histogram.value_at_quantile(0.50)),
        ms(histogram.value_at_quantile(0.90)),
        ms(histogram.value_at_quantile(0.99)),
        ms(histogram.max()),
        histogram.len()
    )
}

/// One row of the table: where the number sits in a JSON summary.
struct Metric {
    label: &'static str,
    pointer: &'static str,
    scale: f64,
    decimals: usize,
}

const fn metric(label: &'static str, pointer: &'static str, decimals: usize) -> Metric {
    Metric {
        label,
        pointer,
        scale: 1.0,
        decimals,
    }
}

const MIB: f64 = 1.0 / 1024.0;

const FANOUT: &[Metric] = &[
    metric("connected", "/clients/connected", 0),
    metric("connect p99 ms", "/connect_ms/p99", 3),
    metric("webhooks accepted/s", "/webhooks/accepted_per_s", 0),
    metric("deliveries/s", "/deliveries/per_s", 0),
    metric("lost deliveries", "/deliveries/lost", 0),
    metric("latency p50 ms", "/latency_ms/p50", 3),
    metric("latency p90 ms", "/latency_ms/p90", 3),
    metric("latency p99 ms", "/latency_ms/p99", 3),
    metric("latency max ms", "/latency_ms/max", 3),
    metric(
        "server CPU ms/1k deliveries",
        "/server_stats/cpu_ms_per_1k",
        2,
    ),
    Metric {
        label: "server RSS peak MiB",
        pointer: "/server_stats/rss_peak_kib",
        scale: MIB,
        decimals: 1,
    },
    metric("loadgen CPU %", "/loadgen/cpu_percent", 0),
];

const IDLE: &[Metric] = &[
    metric("connected", "/clients/connected", 0),
    metric(
        "server RSS bytes/connection",
        "/server_stats/rss_bytes_per_connection",
        0,
    ),
    metric("connect p50 ms", "/connect_ms/p50", 3),
    metric("connect p99 ms", "/connect_ms/p99", 3),
    metric("connect max ms", "/connect_ms/max", 3),
    Metric {
        label: "server RSS after MiB",
        pointer: "/server_stats/rss_after_kib",
        scale: MIB,
        decimals: 1,
    },
];

const EMIT_REST: &[Metric] = &[
    metric("calls/s", "/calls/per_s", 0),
    metric("failed calls", "/calls/failed", 0),
    metric("ack p50 ms", "/ack_ms/p50", 3),
    metric("ack p99 ms", "/ack_ms/p99", 3),
    metric("added p50 ms", "/added_ms/p50", 3),
    metric("added p99 ms", "/added_ms/p99", 3),
    metric("server CPU ms/1k calls", "/server_stats/cpu_ms_per_1k", 2),
];

/// The servers compared, in column order.
pub const SERVERS: [&str; 3] = ["ours", "peer", "floor"];

/// The comparison table: one row per scenario and metric, a column per server, and the
/// ratios ours/peer and ours/floor. `results` are JSON summaries carrying `scenario` and
/// `server` labels (or `{"scenario", "server", "error"}` for a run that failed).
pub fn table(results: &[Value]) -> String {
    let mut scenarios: Vec<&str> = Vec::new();
    for result in results {
        if let Some(name) = result["scenario"].as_str()
            && !scenarios.contains(&name)
        {
            scenarios.push(name);
        }
    }
    // As wide as the longest scenario name (fanout-500-recovering), at least 14.
    let w = scenarios.iter().map(|s| s.len()).max().unwrap_or(0).max(14);
    let mut out = format!(
        "{:<w$} {:<28} {:>11} {:>11} {:>11} {:>10} {:>10}\n",
        "scenario", "metric", "ours", "peer", "floor", "ours/peer", "ours/floor"
    );
    // Runs repeated (`REPEAT` in run.sh): the table shows medians, and this their spread.
    let mut spread = String::new();
    for scenario in scenarios {
        // Every successful run of a scenario and server; else its last failure or skip.
        let runs = |server: &str| -> Vec<&Value> {
            results
                .iter()
                .filter(|r| r["scenario"] == scenario && r["server"] == server)
                .filter(|r| r.get("mode").is_some())
                .collect()
        };
        let last = |server: &str| {
            results
                .iter()
                .rev()
                .find(|r| r["scenario"] == scenario && r["server"] == server)
        };
        let all_runs: Vec<Vec<&Value>> = SERVERS.iter().map(|server| runs(server)).collect();
        let columns: Vec<Option<&Value>> = SERVERS.iter().map(|server| last(server)).collect();
        let mode = all_runs
            .iter()
            .flatten()
            .find_map(|r| r["mode"].as_str())
            .unwrap_or("");
        let metrics = match mode {
            "fanout" => FANOUT,
            "idle" => IDLE,
            "emit-rest" => EMIT_REST,
            _ => {
                let cells: Vec<&str> = columns.iter().map(|c| cell_state(*c)).collect();
                out.push_str(&format!(
                    "{:<w$} {:<28} {:>11} {:>11} {:>11}\n",
                    scenario, "(no result)", cells[0], cells[1], cells[2]
                ));
                continue;
            }
        };
        for metric in metrics {
            let samples: Vec<Vec<f64>> = all_runs
                .iter()
                .map(|runs| {
                    runs.iter()
                        .filter_map(|r| r.pointer(metric.pointer).and_then(Value::as_f64))
                        .map(|v| v * metric.scale)
                        .collect()
                })
                .collect();
            let values: Vec<Option<f64>> = samples.iter().map(|s| median(s)).collect();
            let shown: Vec<String> = values
                .iter()
                .zip(&columns)
                .map(|(value, column)| match value {
                    Some(v) => format!("{v:.prec$}", prec = metric.decimals),
                    None => cell_state(*column).to_owned(),
                })
                .collect();
            let ratio = |other: Option<f64>| match (values[0], other) {
                (Some(ours), Some(other)) if other != 0.0 => format!("{:.2}", ours / other),
                _ => "-".to_owned(),
            };
            out.push_str(&format!(
                "{:<w$} {:<28} {:>11} {:>11} {:>11} {:>10} {:>10}\n",
                scenario,
                metric.label,
                shown[0],
                shown[1],
                shown[2],
                ratio(values[1]),
                ratio(values[2])
            ));
            if samples.iter().any(|s| s.len() > 1) {
                let ranges: Vec<String> =
                    samples.iter().map(|s| range(s, metric.decimals)).collect();
                spread.push_str(&format!(
                    "{:<w$} {:<28} {:>19} {:>19} {:>19}\n",
                    scenario, metric.label, ranges[0], ranges[1], ranges[2]
                ));
            }
        }
    }
    out.push_str(
        "ratios are plain quotients: above 1 means ours is higher \
         (better for rates, worse for latency, CPU and memory)\n",
    );
    if !spread.is_empty() {
        out.push_str(&format!(
            "\nrepeated runs: the table shows medians; their min-max (runs)\n\
             {:<w$} {:<28} {:>19} {:>19} {:>19}\n{spread}",
            "scenario", "metric", "ours", "peer", "floor"
        ));
    }
    out
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// `min-max (n)`, or the one value, or `-`.
fn range(values: &[f64], decimals: usize) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match values.len() {
        0 => "-".to_owned(),
        1 => format!("{min:.decimals$}"),
        n => format!("{min:.decimals$}-{max:.decimals$} ({n})"),
    }
}

fn cell_state(result: Option<&Value>) -> &'static str {
    match result {
        None => "-",
        Some(r) if r.get("error").is_some() => "failed",
        Some(r) if r.get("skipped").is_some() => "skipped",
        Some(_) => "-",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_in_milliseconds() {
        let mut h = histogram();
        for micros in 1..=1000 {
            h.record(micros).unwrap();
        }
        let p = percentiles_ms(&h);
        assert_eq!(p["count"], 1000);
        assert_eq!(p["p50"], 0.5);
        assert_eq!(p["max"], 1.0);
        assert_eq!(percentiles_ms(&histogram())["p50"], Value::Null);
    }

    #[test]
    fn shards_merge() {
        let shards = Shards::new(4);
        for key in 0..10 {
            shards.record(key, 100);
        }
        assert_eq!(shards.merged().len(), 10);
    }

    #[test]
    fn table_has_ratios_and_marks_missing_servers() {
        let results = vec![
            json!({"scenario": "s1", "server": "ours", "mode": "fanout",
                   "deliveries": {"per_s": 2000.0, "lost": 0}, "latency_ms": {"p50": 1.0}}),
            json!({"scenario": "s1", "server": "floor", "mode": "fanout",
                   "deliveries": {"per_s": 4000.0, "lost": 0}, "latency_ms": {"p50": 0.5}}),
            json!({"scenario": "s1", "server": "peer", "error": "exit 1"}),
        ];
        let table = table(&results);
        let row = |label: &str| {
            table
                .lines()
                .find(|l| l.contains(label))
                .unwrap()
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            row("deliveries/s")[2..],
            ["2000", "failed", "4000", "-", "0.50"]
        );
        assert_eq!(
            row("latency p50")[4..],
            ["1.000", "failed", "0.500", "-", "2.00"]
        );
    }
}
