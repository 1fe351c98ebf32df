#!/usr/bin/env bash
# Run with: bench/soak.sh   (memory mode, then Redis mode with a Redis restart: 2 x 10 min)
#      or:  DURATION=60 CLIENTS=200 bench/soak.sh   (a short check of the same thing)
#
# Builds release binaries, then per mode starts evo-realtime afresh and runs `loadgen soak`:
# CLIENTS clients opted in to recovery over INSTANCES namespaces, each dropping its connection
# every 5-30 s and resuming from its last offset, while RATE webhooks/s arrive for DURATION s;
# the server's RSS is sampled throughout. Redis mode runs its own redis-server (a free port
# above 6379, its own temp dir, no persistence), and DURATION/2 s into the run kills it and
# starts it again, empty, on the same port REDIS_DOWN s later.
#
# Verdict per mode (loadgen's exit status): RSS flat after warm-up (the mean of the last 20 %
# of the samples within ±10 % of the mean after warm-up), 0 events lost by any client, every
# webhook answered 200. Exits non-zero if a mode failed. Results: bench/results/<time>-soak/
# (results.jsonl with the RSS series, rss.csv, logs) and the chart soak-rss.svg there.
#
# Environment:
#   DURATION=600 CLIENTS=1000 RATE=200 INSTANCES=10   the load
#   MODES="memory redis"   which modes to run
#   WARMUP=DURATION/4      seconds after the first webhook before RSS must be flat
#   RETAIN=DURATION/5      the sidecar's replay age and dedupe window (see below)
#   REDIS_DOWN=5           seconds Redis stays down in Redis mode
#   REDIS_RESTART=0        Redis mode without the restart (to tell its effects apart)
#   SOAK_PORT=8097         the sidecar's port
#   BUILD=0                skip the cargo build; CARGO_TARGET_DIR is honoured
#   CHART=path.svg         also write the chart there (e.g. bench/charts/soak-rss.svg)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

DURATION=${DURATION:-600}
CLIENTS=${CLIENTS:-1000}
RATE=${RATE:-200}
INSTANCES=${INSTANCES:-10}
MODES=${MODES:-memory redis}
WARMUP=${WARMUP:-$((DURATION / 4))}
# Time-bounded state (retained events, dedupe fingerprints) grows for as long as its window
# by design: with the defaults (600 s, 1,200 s) a 10-minute soak would never see it level
# off. Windows shorter than the warm-up fill before RSS is judged, so growth after that is
# a leak, not retention.
RETAIN=${RETAIN:-$((DURATION / 5 > 10 ? DURATION / 5 : 10))}
REDIS_DOWN=${REDIS_DOWN:-5}
SOAK_PORT=${SOAK_PORT:-8097}
APIKEY=soak-secret

say() { printf 'soak.sh: %s\n' "$*" >&2; }

if [ "${BUILD:-1}" = 1 ]; then
  say "building release binaries"
  cargo build --release -p evo-realtime -p evo-bench
fi
bin_dir=${CARGO_TARGET_DIR:-target}/release
loadgen=$bin_dir/loadgen

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

out_dir=bench/results/$(date +%Y%m%d-%H%M%S)-soak
mkdir -p "$out_dir"
results=$out_dir/results.jsonl
: >"$results"

server_pid=
redis_dir=
stop_server() {
  [ -n "$server_pid" ] || return 0
  kill -TERM "$server_pid" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=
}
stop_redis() {
  [ -n "$redis_dir" ] || return 0
  if [ -f "$redis_dir/redis.pid" ]; then
    kill -TERM "$(cat "$redis_dir/redis.pid")" 2>/dev/null || true
  fi
  sleep 0.5
  rm -rf "$redis_dir"
  redis_dir=
}
cleanup() {
  stop_server
  stop_redis
}
trap cleanup EXIT

# The first port above 6379 nothing listens on (never 6379: that may be someone's Redis).
free_port() {
  local port
  for port in $(seq 6380 6480); do
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  return 1
}

# redis_cmd PORT DIR: starts redis-server daemonized, no persistence, pid in DIR/redis.pid.
redis_cmd() {
  echo "redis-server --port $1 --bind 127.0.0.1 --dir $2 --save '' --appendonly no" \
    "--daemonize yes --pidfile $2/redis.pid --logfile $2/redis.log"
}

# A shell command that kills the Redis of DIR, waits for it to exit, waits REDIS_DOWN s and
# starts it again on the same port: run by loadgen at DURATION/2.
restart_cmd() {
  local port=$1 dir=$2
  echo "pid=\$(cat $dir/redis.pid); kill -KILL \$pid;" \
    "while kill -0 \$pid 2>/dev/null; do sleep 0.05; done; rm -f $dir/redis.pid;" \
    "sleep $REDIS_DOWN; $(redis_cmd "$port" "$dir");" \
    "for i in \$(seq 100); do redis-cli -p $port ping 2>/dev/null | grep -q PONG && exit 0; sleep 0.1; done; exit 1"
}

failures=0
for mode in $MODES; do
  say "== $mode mode: $CLIENTS clients, $RATE webhooks/s, $DURATION s"
  redis_env=()
  restart_args=()
  if [ "$mode" = redis ]; then
    command -v redis-server >/dev/null || { say "redis-server not on PATH"; exit 1; }
    redis_port=$(free_port) || { say "no free port for redis-server"; exit 1; }
    redis_dir=$(mktemp -d /tmp/evo-soak-redis.XXXXXX)
    eval "$(redis_cmd "$redis_port" "$redis_dir")"
    for _ in $(seq 100); do
      redis-cli -p "$redis_port" ping 2>/dev/null | grep -q PONG && break
      sleep 0.1
    done
    say "redis-server on 127.0.0.1:$redis_port ($redis_dir)"
    redis_env=(SIDECAR_REDIS_URL=redis://127.0.0.1:$redis_port)
    [ "${REDIS_RESTART:-1}" = 1 ] && restart_args=(--at "$((DURATION / 2))" --run "$(restart_cmd "$redis_port" "$redis_dir")"
      --run-label "redis restart")
  elif [ "$mode" != memory ]; then
    say "unknown mode $mode (memory, redis)"
    exit 64
  fi

  # Every client comes from 127.0.0.1: lift the per-IP limits. The upstream need not answer
  # (the global key needs no lookups).
  env AUTHENTICATION_API_KEY=$APIKEY SIDECAR_LISTEN=127.0.0.1:$SOAK_PORT \
    SIDECAR_UPSTREAM_URL=http://127.0.0.1:9 SIDECAR_HANDSHAKE_RATE_PER_IP=0 \
    SIDECAR_MAX_TCP_CONNECTIONS_PER_IP=0 SIDECAR_SHUTDOWN_GRACE_SECS=2 \
    SIDECAR_REPLAY_MAX_AGE_SECS=$RETAIN SIDECAR_DEDUPE_WINDOW_SECS=$RETAIN \
    "${redis_env[@]}" NO_COLOR=1 \
    "$bin_dir/evo-realtime" >"$out_dir/$mode.server.log" 2>&1 &
  server_pid=$!
  "$loadgen" wait --url "http://127.0.0.1:$SOAK_PORT" --pid "$server_pid" --timeout 60

  set +e
  "$loadgen" soak --url "http://127.0.0.1:$SOAK_PORT" --apikey "$APIKEY" --pid "$server_pid" \
    --clients "$CLIENTS" --instances "$INSTANCES" --rate "$RATE" --duration "$DURATION" \
    --warmup "$WARMUP" "${restart_args[@]}" --rss-csv "$out_dir/rss.csv" \
    --scenario "soak-$mode" --server "$mode" --json-out "$results" --strict \
    | tee "$out_dir/$mode.loadgen.txt"
  status=${PIPESTATUS[0]}
  set -e
  if [ "$status" != 0 ]; then
    failures=$((failures + 1))
    say "$mode mode: FAILED (loadgen exit $status)"
  fi
  stop_server
  if [ -n "$redis_dir" ]; then cp "$redis_dir"/redis.log "$out_dir/redis.log" 2>/dev/null || true; fi
  stop_redis
done

"$bin_dir/chart" --out "$out_dir/soak-rss.svg" \
  --title "evo-realtime soak: $CLIENTS clients, $RATE webhooks/s, $DURATION s" "$results" || true
if [ -n "${CHART:-}" ]; then cp "$out_dir/soak-rss.svg" "$CHART"; fi
say "results in $out_dir"
if [ "$failures" != 0 ]; then
  say "$failures mode(s) failed"
  exit 1
fi
