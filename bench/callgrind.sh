#!/usr/bin/env bash
# Run with: bench/callgrind.sh            (instructions per delivery: ours and the floor)
#      or:  SERVERS=ours OURS_BIN=/path/to/other/evo-realtime bench/callgrind.sh
#
# CPU per delivery as instruction counts, which do not move when other work shares the
# machine (timings do). Each server runs under `valgrind --tool=callgrind` twice: 100
# clients on one namespace, WEBHOOKS_PER_S (20) webhooks/s for SHORT (5) and for LONG (15)
# seconds. Instructions per delivery = (instructions of the long run - of the short run) /
# (deliveries of the long run - of the short run): start-up, connecting and shutdown cancel
# out. The long run's profile is kept for callgrind_annotate. Build first:
# cargo build --release -p evo-realtime -p evo-bench.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin_dir=${CARGO_TARGET_DIR:-target}/release
loadgen=$bin_dir/loadgen
rate=${WEBHOOKS_PER_S:-20}
short=${SHORT:-5}
long=${LONG:-15}
out=${OUT:-bench/results/$(date +%Y%m%d-%H%M%S)-callgrind}
mkdir -p "$out"

# run SERVER SECONDS: instructions and deliveries of one run, as "instructions deliveries".
run() {
  local server=$1 seconds=$2 url hook pid
  case $server in
    ours)
      url=http://127.0.0.1:8096 hook=/_sidecar/webhook
      env AUTHENTICATION_API_KEY=bench-secret SIDECAR_LISTEN=127.0.0.1:8096 \
        SIDECAR_HANDSHAKE_RATE_PER_IP=0 SIDECAR_MAX_TCP_CONNECTIONS_PER_IP=0 NO_COLOR=1 \
        valgrind --tool=callgrind --callgrind-out-file="$out/$server-$seconds.out" \
        "${OURS_BIN:-$bin_dir/evo-realtime}" >"$out/$server-$seconds.log" 2>&1 &
      ;;
    floor)
      url=http://127.0.0.1:8098 hook=/webhook
      valgrind --tool=callgrind --callgrind-out-file="$out/$server-$seconds.out" \
        "$bin_dir/floor" --listen 127.0.0.1:8098 >"$out/$server-$seconds.log" 2>&1 &
      ;;
  esac
  pid=$!
  "$loadgen" wait --url "$url" --timeout 120 >/dev/null
  "$loadgen" fanout --url "$url" --apikey bench-secret --webhook-path "$hook" \
    --clients 100 --instances 1 --rate "$rate" --conns 1 --duration "$seconds" --drain 20 \
    --connect-concurrency 20 >"$out/$server-$seconds.loadgen.txt"
  # SIGTERM: evo-realtime drains and exits; the floor has no handler, and callgrind still
  # writes its profile when a signal ends the program.
  kill -TERM "$pid"
  wait "$pid" || true
  local instructions deliveries
  instructions=$(sed -n 's/^summary: \([0-9]*\).*/\1/p' "$out/$server-$seconds.out")
  # quanta (under governor and the metrics exporter) calibrates its clock at start-up for a
  # stretch of time, not of work: under valgrind that is 10-16 M instructions, different in
  # every run, which would not cancel out below. Count without it.
  local calibration
  calibration=$(callgrind_annotate --inclusive=yes "$out/$server-$seconds.out" 2>/dev/null |
    awk '/quanta::Calibration::calibrate/ { gsub(",", "", $1); print $1; exit }')
  instructions=$((instructions - ${calibration:-0}))
  deliveries=$(tail -1 "$out/$server-$seconds.loadgen.txt" |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["deliveries"]["delivered"], d["deliveries"]["lost"])')
  echo "$instructions $deliveries"
}

for server in ${SERVERS:-ours floor}; do
  read -r i_short d_short lost_short <<<"$(run "$server" "$short")"
  read -r i_long d_long lost_long <<<"$(run "$server" "$long")"
  per=$(python3 -c "print(round(($i_long - $i_short) / ($d_long - $d_short)))")
  echo "$server: $per instructions per delivery (runs: $i_short instr / $d_short deliveries, $i_long / $d_long; lost $lost_short, $lost_long)" |
    tee -a "$out/summary.txt"
done
echo "profiles in $out (callgrind_annotate --inclusive=yes $out/ours-$long.out)"
