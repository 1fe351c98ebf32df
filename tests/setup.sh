#!/usr/bin/env bash
# Installs the real clients the integration tests drive: the official socket.io-client
# (tests/js/node_modules, from package-lock.json) and python-socketio (tests/py/.venv, from
# requirements.txt). Idempotent; needs node/npm and python3 (with venv) on PATH.
set -euo pipefail
cd "$(dirname "$0")"

npm ci --prefix js --no-audit --no-fund --loglevel=error

if [ ! -x py/.venv/bin/python ]; then
  python3 -m venv py/.venv
fi
py/.venv/bin/pip install --quiet --disable-pip-version-check -r py/requirements.txt
