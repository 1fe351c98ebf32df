#!/usr/bin/env bash
# Run with: bench/heaptrack.sh            (5,000 idle websocket connections, the breakdown)
#      or:  CLIENTS=10000 TRANSPORT=polling bench/heaptrack.sh
#
# Where an idle connection's memory goes, per connection and by owner. Runs evo-realtime
# (OURS_BIN, default $CARGO_TARGET_DIR/release/evo-realtime) under heaptrack twice, with no
# client and with CLIENTS idle clients from `loadgen idle`, kills it with SIGKILL once they
# settled (so everything still allocated counts as "leaked": a snapshot of live memory),
# and prints the difference per connection, split by which crate asked for the memory
# (bench/heaptrack_breakdown.py). Build first: cargo build --release -p evo-realtime -p evo-bench.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin_dir=${CARGO_TARGET_DIR:-target}/release
ours=${OURS_BIN:-$bin_dir/evo-realtime}
loadgen=$bin_dir/loadgen
clients=${CLIENTS:-5000}
transport=${TRANSPORT:-websocket}
port=${PORT:-8094}
out=${OUT:-bench/results/$(date +%Y%m%d-%H%M%S)-heaptrack}
mkdir -p "$out"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# snapshot N: heaptrack data with N idle clients connected, in $out/N.zst
snapshot() {
  local n=$1
  env AUTHENTICATION_API_KEY=bench-secret SIDECAR_LISTEN=127.0.0.1:$port \
    SIDECAR_HANDSHAKE_RATE_PER_IP=0 SIDECAR_MAX_TCP_CONNECTIONS_PER_IP=0 NO_COLOR=1 \
    heaptrack -o "$out/$n" "$ours" >"$out/$n.log" 2>&1 &
  local tracer=$!
  local pid=
  for _ in $(seq 100); do
    # heaptrack's children: its interpreter and the program; the program runs our binary.
    for child in $(pgrep -P "$tracer" || true); do
      [ "$(readlink -f "/proc/$child/exe" 2>/dev/null)" = "$(readlink -f "$ours")" ] && pid=$child
    done
    [ -n "$pid" ] && break
    sleep 0.1
  done
  [ -n "$pid" ] || { echo "heaptrack.sh: no process under heaptrack" >&2; exit 1; }
  "$loadgen" wait --url "http://127.0.0.1:$port" --timeout 60 >/dev/null
  if [ "$n" -gt 0 ]; then
    "$loadgen" idle --url "http://127.0.0.1:$port" --apikey bench-secret --pid "$pid" \
      --clients "$n" --transport "$transport" --settle 3 --hold 60 >"$out/$n.loadgen.txt" &
    local gen=$!
    # Kill while the clients are still connected (loadgen holds them after its measurement).
    while kill -0 "$gen" 2>/dev/null && ! grep -q 'holding connections' "$out/$n.loadgen.txt"; do
      sleep 0.2
    done
  else
    sleep 3
  fi
  kill -KILL "$pid"
  wait "$tracer" || true
  if [ "$n" -gt 0 ]; then
    kill "$gen" 2>/dev/null || true
    wait "$gen" || true
  fi
  return 0
}

snapshot 0
snapshot "$clients"
for n in 0 "$clients"; do
  heaptrack_print -f "$out/$n.zst" --flamegraph-cost-type leaked -F "$out/$n.stacks" \
    >"$out/$n.txt" 2>/dev/null
done
grep -h "server RSS per connection" "$out/$clients.loadgen.txt" || true
python3 bench/heaptrack_breakdown.py "$out/0.stacks" "$out/$clients.stacks" "$clients" \
  | tee "$out/breakdown.txt"
echo "heaptrack data in $out"
