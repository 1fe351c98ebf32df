#!/usr/bin/env bash
# The inspector's browser test: headless Chromium drives /_sidecar/inspector on the real binary
# (target/debug/evo-realtime) against a fake Evolution API written in the test.
# Installs what it needs on a fresh Debian machine (as root): chromium (apt) and playwright-core
# (npm, which downloads no browser). Screenshots land in artifacts/.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v chromium >/dev/null; then
  echo "browser test: installing chromium"
  apt-get update -qq
  # No recommends (they bring daemons such as avahi and cups); a font for readable screenshots.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    chromium fonts-dejavu-core >/dev/null
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "browser test: installing Node.js and npm"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
npm ci --prefix tests/browser --no-audit --no-fund --silent

# Build the binary when it is missing or older than the sources it embeds.
bin=target/debug/evo-realtime
if [ ! -x "$bin" ] || [ -n "$(find src Cargo.toml Cargo.lock -newer "$bin" -print -quit)" ]; then
  cargo build --locked --bin evo-realtime
fi

echo "browser test: $(chromium --version 2>/dev/null | head -n1), node $(node --version)"
mkdir -p artifacts
exec node --test --test-reporter=spec tests/browser/
