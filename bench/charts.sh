#!/usr/bin/env bash
# Run with: bench/charts.sh bench/results/<run>/results.jsonl [more results.jsonl ...]
#
# Draws the run.sh charts into bench/charts/ (SVG, plus the points as CSV): RSS against idle
# websocket connections (the idle-* scenarios) and server CPU per delivery against the
# webhook rate (fanout-500, rate-*, fanout-max), one line per server, medians of repeated
# runs. Uses the `chart` binary from $CARGO_TARGET_DIR (default target), building it if absent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
[ $# -ge 1 ] || { echo "usage: bench/charts.sh RESULTS.jsonl..." >&2; exit 64; }
chart=${CARGO_TARGET_DIR:-target}/release/chart
[ -x "$chart" ] || cargo build --release -p evo-bench --bin chart
out=${CHARTS_DIR:-bench/charts}
mkdir -p "$out"
"$chart" --kind rss --title "Server RSS against idle websocket connections" \
  --out "$out/rss-vs-connections.svg" --csv "$out/rss-vs-connections.csv" "$@"
"$chart" --kind cpu --title "Server CPU per delivery against webhook rate" \
  --out "$out/cpu-vs-rate.svg" --csv "$out/cpu-vs-rate.csv" "$@"
