#!/usr/bin/env bash
# Run with: bench/run.sh   (all scenarios, ours vs peer vs floor, ~15 min on a quiet machine)
#      or:  SMOKE=1 bench/run.sh   (5-second fanout against evo-realtime only, and the same
#                                    through RabbitMQ if rabbitmq-server is installed; fails on
#                                    any loss)
#
# Builds evo-realtime and evo-bench in release mode, then for each scenario starts each server
# afresh (evo-realtime = ours, the Node socket.io peer = peer, bench's floor server = floor),
# pinned to one core, runs the load generator pinned to another, stops the server, and at the
# end prints one table with ratio columns (ours/peer, ours/floor). Results (one JSON summary
# per run, server logs, load generator output, the table) go to bench/results/<time>/.
#
# Environment:
#   SMOKE=1              the CI smoke run described above
#   SERVERS="ours peer floor"    which servers to run (the peer is skipped if absent)
#   SCENARIOS="fanout-500 ..."   which scenarios to run (names below)
#   DURATION=10          seconds of sending per fanout/emit scenario (scale-*: 30)
#   REPEAT=1             runs per scenario and server, servers alternating within a round;
#                        the table shows medians and, below it, the min-max spread
#   SERVER_CPU=0 LOADGEN_CPU=1   cores for taskset; PIN=0 turns pinning off
#   BUILD=0              skip the cargo build
#   OURS_BIN=path        run another evo-realtime build as "ours" (before/after comparisons)
#   OURS_ENV="K=V ..."   extra environment for ours (a setting tried against the default)
#   CARGO_TARGET_DIR=... where cargo builds and the binaries are run from (default: target)
#   PEER_DIR=...         the Node peer (default: ../shared/peers/node-socketio)
#   AMQP_PORT=5692       the RabbitMQ the amqp-* scenarios start (never the system's 5672);
#                        it also takes the next two ports (epmd, distribution)
#   OURS_PORT=8093 PEER_PORT=8091 FLOOR_PORT=8095 UPSTREAM=127.0.0.1:8099   the servers' ports
#
# The amqp-* scenarios publish the same bodies to RabbitMQ as Evolution does (topic exchange,
# routing key = event) instead of POSTing them; evo-realtime consumes them with
# SIDECAR_AMQP_URL. They run on ours only, against a rabbitmq-server this script starts on its
# own ports, node name and data directory (in $out_dir), and stops at the end.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

APIKEY=bench-secret
# Overridable, so that two runs on one machine (two worktrees) do not meet on a port.
OURS_PORT=${OURS_PORT:-8093}
PEER_PORT=${PEER_PORT:-8091}
FLOOR_PORT=${FLOOR_PORT:-8095}
UPSTREAM=${UPSTREAM:-127.0.0.1:8099} # the fake Evolution API that `loadgen emit-rest` serves
DURATION=${DURATION:-10}
# fanout-500-recovering runs on ours only (~20 s more), so it stays in the default list.
# rate-* with fanout-500 and fanout-max give CPU per delivery against the webhook rate;
# idle-* the RSS against connections (bench/charts.sh draws both).
ALL_SCENARIOS="fanout-500 amqp-500 fanout-500-recovering fanout-max amqp-max latency-1k latency-1k-c1 latency-1k-c16 rate-100 rate-250 rate-1000 rate-1500 idle-1k idle-5k idle-10k idle-25k idle-50k idle-poll-5k idle-poll-10k payload-16k scale-9k scale-10k scale-50k emit-rest"
AMQP_PORT=${AMQP_PORT:-5692}
AMQP_URL="amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f"
rabbitmq_server=/usr/lib/rabbitmq/bin/rabbitmq-server

if [ "${SMOKE:-0}" = 1 ]; then
  SERVERS=${SERVERS:-ours}
  if [ -x "$rabbitmq_server" ]; then
    SCENARIOS=${SCENARIOS:-smoke amqp-smoke}
  else
    SCENARIOS=${SCENARIOS:-smoke}
  fi
  PIN=${PIN:-0}
else
  SERVERS=${SERVERS:-ours peer floor}
  SCENARIOS=${SCENARIOS:-$ALL_SCENARIOS}
fi

say() { printf 'run.sh: %s\n' "$*" >&2; }

# --- build ---------------------------------------------------------------------------------
if [ "${BUILD:-1}" = 1 ]; then
  say "building release binaries"
  cargo build --release -p evo-realtime -p evo-bench
fi
# Cargo builds into $CARGO_TARGET_DIR when it is set (relative to the root, like cargo here).
bin_dir=${CARGO_TARGET_DIR:-target}/release
loadgen=$bin_dir/loadgen

# --- the Node peer -------------------------------------------------------------------------
peer_dir=${PEER_DIR:-$root/../shared/peers/node-socketio}
if [[ " $SERVERS " == *" peer "* ]]; then
  if [ ! -x "$peer_dir/run.sh" ]; then
    say "no Node peer at $peer_dir (../shared/peers is absent in a plain clone): skipping the peer"
    SERVERS=${SERVERS//peer/}
  elif ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    say "node or npm not on PATH: skipping the Node peer"
    SERVERS=${SERVERS//peer/}
  fi
fi

# --- limits and pinning --------------------------------------------------------------------
# 50,000 sockets need 50,000 descriptors in the server and the load generator each (the
# sidecar twice that: it caps open connections at (ulimit -n - 64) / 2, as each may also
# hold an upstream one). Raising the hard limit needs CAP_SYS_RESOURCE; without it, the
# scenarios that do not fit are recorded as skipped with the reason (`fits` below).
ulimit -Hn 1048576 2>/dev/null || true
ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 65536 2>/dev/null || true
fd_limit=$(ulimit -n)
[ "$fd_limit" = unlimited ] && fd_limit=1048576
say "open files: $fd_limit"
uptime >&2
pin_server=()
pin_loadgen=()
if [ "${PIN:-1}" = 1 ]; then
  if command -v taskset >/dev/null && [ "$(nproc --all)" -ge 2 ]; then
    pin_server=(taskset -c "${SERVER_CPU:-0}")
    pin_loadgen=(taskset -c "${LOADGEN_CPU:-1}")
    say "server on core ${SERVER_CPU:-0}, load generator on core ${LOADGEN_CPU:-1}"
  else
    say "taskset or a second core missing: not pinning"
  fi
fi

# --- output --------------------------------------------------------------------------------
out_dir=bench/results/$(date +%Y%m%d-%H%M%S)
if [ "${SMOKE:-0}" = 1 ]; then out_dir=$out_dir-smoke; fi
mkdir -p "$out_dir"
results=$out_dir/results.jsonl
: >"$results"

# --- servers -------------------------------------------------------------------------------
server_pid=
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

# --- the broker of the amqp-* scenarios ------------------------------------------------------
broker_pgid=
stop_broker() {
  [ -n "$broker_pgid" ] || return 0
  kill -KILL -- "-$broker_pgid" 2>/dev/null || true
  broker_pgid=
}
# start_broker: a rabbitmq-server of its own (ports, node name, epmd, cookie, data in
# $out_dir/rabbitmq), in a process group of its own so that stop_broker takes all of it.
start_broker() {
  [ -z "$broker_pgid" ] || return 0
  if [ ! -x "$rabbitmq_server" ]; then
    say "rabbitmq-server is not installed (apt-get install rabbitmq-server)"
    return 1
  fi
  local dir=$root/$out_dir/rabbitmq
  mkdir -p "$dir/mnesia" "$dir/log" "$dir/home"
  echo '[].' >"$dir/enabled_plugins"
  : >"$dir/rabbitmq.conf"
  : >"$dir/env.conf"
  printf 'evobench%s' "$AMQP_PORT" >"$dir/home/.erlang.cookie"
  chmod 400 "$dir/home/.erlang.cookie"
  local epmd_port=$((AMQP_PORT + 1)) dist_port=$((AMQP_PORT + 2))
  local started=$(date +%s.%N)
  setsid env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME="$dir/home" LANG=C.UTF-8 \
    ERL_EPMD_PORT=$epmd_port RABBITMQ_NODENAME="evo-bench-$AMQP_PORT@localhost" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=$AMQP_PORT RABBITMQ_DIST_PORT=$dist_port \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq" RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
    RABBITMQ_CONF_ENV_FILE="$dir/env.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_PID_FILE="$dir/pid" \
    sh -c "epmd -port $epmd_port & exec $rabbitmq_server" >"$dir/server.log" 2>&1 &
  broker_pgid=$!
  # The AMQP listener opens last, once the broker is ready.
  "$loadgen" wait --url "http://127.0.0.1:$AMQP_PORT" --pid "$broker_pgid" --timeout 120
  say "rabbitmq-server on port $AMQP_PORT started in $(echo "$(date +%s.%N) - $started" | bc) s"
}
trap 'stop_server; stop_broker' EXIT

# start_server NAME LOG: starts it in the background; sets server_pid, url, hook.
start_server() {
  local name=$1 log=$2
  case $name in
    ours)
      url=http://127.0.0.1:$OURS_PORT hook=/_sidecar/webhook
      # Every benchmark client comes from 127.0.0.1: lift the per-IP handshake limit (20/s
      # by default), or most of them get 429, and the per-IP connection cap (256).
      # shellcheck disable=SC2086 # OURS_ENV is a list of K=V words on purpose
      env AUTHENTICATION_API_KEY=$APIKEY SIDECAR_LISTEN=127.0.0.1:$OURS_PORT \
        SIDECAR_UPSTREAM_URL=http://$UPSTREAM SIDECAR_HANDSHAKE_RATE_PER_IP=0 \
        SIDECAR_MAX_TCP_CONNECTIONS_PER_IP=0 \
        SIDECAR_SHUTDOWN_GRACE_SECS=2 NO_COLOR=1 ${OURS_ENV:-} "${amqp_env[@]}" \
        "${pin_server[@]}" "${OURS_BIN:-$bin_dir/evo-realtime}" >"$log" 2>&1 &
      ;;
    peer)
      url=http://127.0.0.1:$PEER_PORT hook=/webhook
      env PORT=$PEER_PORT APIKEY=$APIKEY "${pin_server[@]}" "$peer_dir/run.sh" >"$log" 2>&1 &
      ;;
    floor)
      url=http://127.0.0.1:$FLOOR_PORT hook=/webhook
      "${pin_server[@]}" "$bin_dir/floor" --listen 127.0.0.1:$FLOOR_PORT >"$log" 2>&1 &
      ;;
    *) say "unknown server $name"; return 1 ;;
  esac
  server_pid=$!
  # The peer's first start runs npm install: allow for it.
  "$loadgen" wait --url "$url" --pid "$server_pid" --timeout 180
}

# --- scenarios -----------------------------------------------------------------------------
# scenario_args NAME: the load generator's arguments (without --url, --pid, ...).
scenario_args() {
  case $1 in
    smoke) echo "fanout --clients 50 --instances 2 --rate 200 --conns 2 --duration 5 --drain 5 --strict" ;;
    amqp-smoke) echo "fanout --clients 50 --instances 2 --rate 200 --conns 2 --duration 5 --drain 5 --strict --amqp-url $AMQP_URL" ;;
    # The webhook scenarios above, with the same bodies published to RabbitMQ instead.
    amqp-500) echo "fanout --clients 1000 --instances 10 --rate 500 --conns 4 --duration $DURATION --amqp-url $AMQP_URL" ;;
    # The broker takes publishes faster than one ordered consumer drains them: give the
    # backlog time to drain, or queued events would be counted as lost.
    amqp-max) echo "fanout --clients 1000 --instances 10 --rate 0 --conns 8 --duration $DURATION --drain 60 --amqp-url $AMQP_URL" ;;
    fanout-500) echo "fanout --clients 1000 --instances 10 --rate 500 --conns 4 --duration $DURATION" ;;
    # Clients opt in to recovery: evo-realtime then encodes each event once per socket.
    fanout-500-recovering) echo "fanout --clients 1000 --instances 10 --rate 500 --conns 4 --duration $DURATION --recovering" ;;
    fanout-max) echo "fanout --clients 1000 --instances 10 --rate 0 --conns 8 --duration $DURATION" ;;
    latency-1k) echo "fanout --clients 100 --instances 1 --rate 1000 --conns 4 --duration $DURATION" ;;
    # The p99 scenario with webhooks over one keep-alive connection, and over 16.
    latency-1k-c1) echo "fanout --clients 100 --instances 1 --rate 1000 --conns 1 --duration $DURATION" ;;
    latency-1k-c16) echo "fanout --clients 100 --instances 1 --rate 1000 --conns 16 --duration $DURATION" ;;
    # fanout-500 at other rates: CPU per delivery against the webhook rate.
    rate-*) echo "fanout --clients 1000 --instances 10 --rate ${1#rate-} --conns 4 --duration $DURATION" ;;
    idle-1k) echo "idle --clients 1000 --instances 10" ;;
    idle-5k) echo "idle --clients 5000 --instances 10" ;;
    idle-10k) echo "idle --clients 10000 --instances 10" ;;
    idle-25k) echo "idle --clients 25000 --instances 10 --source-addrs 2" ;;
    idle-50k) echo "idle --clients 50000 --instances 10 --source-addrs 4" ;;
    idle-poll-5k) echo "idle --clients 5000 --instances 10 --transport polling" ;;
    idle-poll-10k) echo "idle --clients 10000 --instances 10 --transport polling" ;;
    payload-16k) echo "fanout --clients 1000 --instances 10 --rate 200 --payload 16384 --conns 4 --duration $DURATION" ;;
    scale-10k) echo "fanout --clients 10000 --instances 100 --rate 100 --conns 4 --duration 30 --drain 20" ;;
    # What fits evo-realtime's connection cap under a 20,000-descriptor limit ((20,000 - 64) / 2,
    # webhook connections included).
    scale-9k) echo "fanout --clients 9000 --instances 100 --rate 100 --conns 4 --duration 30 --drain 20" ;;
    # 50,000 idle sockets, each getting its instance's webhooks: 100/s over 100 instances.
    scale-50k) echo "fanout --clients 50000 --instances 100 --rate 100 --conns 4 --duration 30 --drain 20 --source-addrs 4" ;;
    emit-rest) echo "emit-rest --clients 10 --instances 1 --duration $DURATION --upstream-listen $UPSTREAM" ;;
    *) return 1 ;;
  esac
}

# skip SCENARIO SERVER: why this server does not run this scenario (nothing if it does).
skip() {
  case $1-$2 in
    emit-rest-peer | emit-rest-floor) echo "no client emits" ;; # only ours forwards emits
    fanout-500-recovering-peer | fanout-500-recovering-floor) echo "no recovery" ;;
    idle-poll-*-floor) echo "websocket only" ;;
    amqp-*-peer | amqp-*-floor) echo "no amqp ingest" ;; # only ours consumes RabbitMQ
  esac
}

# fits ARGS SERVER: why the descriptor limit cannot hold the scenario (nothing if it can).
fits() {
  local clients need
  clients=$(sed -n 's/.*--clients \([0-9]*\).*/\1/p' <<<"$1")
  need=$((clients + 256))
  # The sidecar admits (limit - 64) / 2 connections (see above).
  [ "$2" = ours ] && need=$((2 * clients + 64))
  if [ "$fd_limit" -lt "$need" ]; then
    echo "descriptor limit $fd_limit < $need needed (raise the hard limit: ulimit -Hn, CAP_SYS_RESOURCE)"
  fi
}

failures=0
for scenario in $SCENARIOS; do
  if ! args=$(scenario_args "$scenario"); then
    say "unknown scenario $scenario (known: smoke $ALL_SCENARIOS)"
    exit 64
  fi
  for round in $(seq "${REPEAT:-1}"); do
  for server in $SERVERS; do
    reason=$(skip "$scenario" "$server")
    # ours at exactly its fitted cap still runs: the table shows how many connected.
    [ -z "$reason" ] && [[ $scenario != *-10k ]] && reason=$(fits "$args" "$server")
    if [ -n "$reason" ]; then
      say "== $scenario on $server: skipped ($reason)"
      echo "{\"scenario\":\"$scenario\",\"server\":\"$server\",\"skipped\":\"$reason\"}" >>"$results"
      continue
    fi
    amqp_env=()
    if [[ $scenario == amqp-* ]]; then
      if ! start_broker; then
        echo "{\"scenario\":\"$scenario\",\"server\":\"$server\",\"error\":\"no broker\"}" >>"$results"
        failures=$((failures + 1))
        continue
      fi
      amqp_env=(SIDECAR_AMQP_URL="$AMQP_URL")
    fi
    say "== $scenario on $server (round $round; load $(cut -d' ' -f1-3 /proc/loadavg))"
    log=$out_dir/$scenario-$server-$round
    if ! start_server "$server" "$log.server.log"; then
      echo "{\"scenario\":\"$scenario\",\"server\":\"$server\",\"error\":\"server did not start\"}" >>"$results"
      failures=$((failures + 1))
      stop_server
      continue
    fi
    hook_args=()
    [[ $args == fanout* ]] && hook_args=(--webhook-path "$hook")
    lines_before=$(wc -l <"$results")
    set +e
    # shellcheck disable=SC2086 # $args is a word list on purpose
    "${pin_loadgen[@]}" "$loadgen" $args "${hook_args[@]}" --url "$url" --apikey "$APIKEY" \
      --pid "$server_pid" --scenario "$scenario" --server "$server" --json-out "$results" \
      | tee "$log.loadgen.txt"
    status=${PIPESTATUS[0]}
    set -e
    if [ "$status" != 0 ]; then
      failures=$((failures + 1))
      say "$scenario on $server: load generator exited $status"
      if [ "$(wc -l <"$results")" = "$lines_before" ]; then
        echo "{\"scenario\":\"$scenario\",\"server\":\"$server\",\"error\":\"exit $status\"}" >>"$results"
      fi
    fi
    stop_server
  done
  done
done

echo
"$loadgen" table "$results" | tee "$out_dir/table.txt"
say "results in $out_dir"
if [ "$failures" != 0 ]; then
  say "$failures run(s) failed"
  exit 1
fi
