#!/usr/bin/env bash
# Installs everything the README's test command (`cargo test --locked --workspace`) needs
# besides Rust:
# - tools, with apt as root when missing: Node.js and npm (the official socket.io-client
#   runs under node), Python 3 with venv (python-socketio), redis-server and rabbitmq-server
#   (the Redis and RabbitMQ tests start their own on free ports; the package's own broker
#   service, if apt starts one, is left alone);
# - the real clients: socket.io-client into tests/js/node_modules (from package-lock.json)
#   and python-socketio into the venv tests/py/.venv (from requirements.txt).
# Idempotent. Not as root, a missing tool is named with the package that provides it.
set -euo pipefail
cd "$(dirname "$0")"

missing=()
{ command -v node >/dev/null && command -v npm >/dev/null; } || missing+=(nodejs npm)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3 python3-venv)
command -v redis-server >/dev/null || missing+=(redis-server)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "setup.sh: missing tools; install them first (Debian: apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "setup.sh: installing ${missing[*]} (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

npm ci --prefix js --no-audit --no-fund --loglevel=error

if [ ! -x py/.venv/bin/python ]; then
  python3 -m venv py/.venv
fi
py/.venv/bin/pip install --quiet --disable-pip-version-check -r py/requirements.txt
