//! The end of a measuring mode: its one-line JSON summary printed (and appended to
//! `--json-out`), and the exit code.

use std::io::Write as _;

use serde_json::{Value, json};

use crate::common_args::Common;

/// A mode's JSON summary, and whether nothing was lost or failed (for `--strict`).
pub struct Summary {
    pub json: Value,
    pub healthy: bool,
}

/// The 1, 5 and 15 minute load averages from `/proc/loadavg`, as `uptime` shows them.
fn loadavg() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut fields = text.split_whitespace().map(str::parse::<f64>);
    Some([
        fields.next()?.ok()?,
        fields.next()?.ok()?,
        fields.next()?.ok()?,
    ])
}

/// Prints (and appends) the summary; returns the exit code.
pub fn finish(common: &Common, outcome: Result<Summary, String>) -> i32 {
    let (mut summary, healthy) = match outcome {
        Ok(Summary { json, healthy }) => (json, healthy),
        Err(err) => {
            eprintln!("loadgen: {err}");
            (json!({"error": err}), false)
        }
    };
    summary["scenario"] = json!(common.scenario);
    summary["server"] = json!(common.server);
    // The machine may be shared (builds, other benchmarks): every result says how busy it was.
    summary["loadavg"] = json!(loadavg());
    let line = summary.to_string();
    println!("{line}");
    if let Some(path) = &common.json_out {
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut file| writeln!(file, "{line}"));
        if let Err(err) = appended {
            eprintln!("loadgen: cannot append to {}: {err}", path.display());
            return 1;
        }
    }
    if summary.get("error").is_some() {
        1
    } else if common.strict && !healthy {
        eprintln!("loadgen: --strict: lost deliveries, failed clients or nothing accepted");
        2
    } else {
        0
    }
}
