//! `loadgen table`: prints the comparison table of a results file written with `--json-out`
//! (`run.sh` does at the end of a run).

use clap::Args;
use evo_bench::report;
use serde_json::Value;

#[derive(Args)]
pub struct TableArgs {
    /// A file of JSON summaries, one per line (`--json-out`).
    results: std::path::PathBuf,
}

pub fn table(args: TableArgs) -> i32 {
    let text = match std::fs::read_to_string(&args.results) {
        Ok(text) => text,
        Err(err) => {
            eprintln!("loadgen table: {}: {err}", args.results.display());
            return 1;
        }
    };
    let results: Vec<Value> = text
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    print!("{}", report::table(&results));
    0
}
