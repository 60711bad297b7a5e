#!/usr/bin/env bash
# Small requests beside 1 MiB bodies: the p99 of small admissions on one sidecar over gRPC
# (ext_authz Check, no Envoy), alone and while ~1 MiB chat bodies arrive on the same node.
# The figures of docs/performance.md, "Back-pressure". Starts its own Redis and limiter on
# 127.0.0.1 (base port 17000) and stops them by pid.
#
#   scripts/bench-pressure.sh [--secs S] [--rate R] [--big-rate R] [--big-tokens N]
#                             [--limiter PATH] [--loadtest PATH]
#
# Defaults: 20 s runs, small requests at 500/s (100 prompt tokens), big ones at 4/s
# (235,000 prompt tokens: a 1.04 MB body), release binaries from target/release.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=20 RATE=500 BIG_RATE=4 BIG_TOKENS=235000 BASE=17000
LIMITER=target/release/llm-ratelimit LOADTEST=target/release/llm-loadtest
while (($#)); do
  case $1 in
  --secs) SECS=${2:?}; shift 2 ;;
  --rate) RATE=${2:?}; shift 2 ;;
  --big-rate) BIG_RATE=${2:?}; shift 2 ;;
  --big-tokens) BIG_TOKENS=${2:?}; shift 2 ;;
  --limiter) LIMITER=${2:?}; shift 2 ;;
  --loadtest) LOADTEST=${2:?}; shift 2 ;;
  -h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "bench-pressure: unknown option $1" >&2; exit 2 ;;
  esac
done
WORK=$(mktemp -d)
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap 'stop; rm -rf "$WORK"' EXIT
cat >"$WORK/keys.yaml" <<'YAML'
max_body_bytes: 2097152
keys:
  - name: small
    key: sk-bench-small
    rpm: 100000000
    input_tpm: 100000000000
    output_tpm: 100000000000
  - name: big
    key: sk-bench-big
    rpm: 100000000
    input_tpm: 100000000000
    output_tpm: 100000000000
YAML
redis-server --port $((BASE + 400)) --bind 127.0.0.1 --save "" --appendonly no >/dev/null & pids+=($!)
"$LIMITER" serve --config "$WORK/keys.yaml" --redis-url redis://127.0.0.1:$((BASE + 400)) \
  --grpc-addr 127.0.0.1:$((BASE + 100)) --http-addr 127.0.0.1:$((BASE + 200)) >"$WORK/limiter.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do curl -sf http://127.0.0.1:$((BASE + 200))/readyz >/dev/null && break; sleep 0.1; done

small() { # $1: json file
  "$LOADTEST" grpc --target 127.0.0.1:$((BASE + 100)) --api authz --key sk-bench-small \
    --rate "$RATE" --duration "${SECS}s" --prompt-tokens 100 --max-tokens 32 --seed 1 --json "$1" >/dev/null
}
big() {
  "$LOADTEST" grpc --target 127.0.0.1:$((BASE + 100)) --api authz --key sk-bench-big \
    --rate "$BIG_RATE" --duration "${SECS}s" --prompt-tokens "$BIG_TOKENS" --max-tokens 32 --seed 2 \
    --timeout 30s --json "$1" >/dev/null
}
small "$WORK/alone.json"
big "$WORK/big.json" & bigpid=$!
small "$WORK/mixed.json"
wait "$bigpid"
python3 - "$WORK" "$RATE" "$BIG_RATE" "$BIG_TOKENS" <<'PY'
import json, sys
work, rate, big_rate, big_tokens = sys.argv[1:]
def row(name, f):
    s = json.load(open(f"{work}/{f}.json"))
    l, n = s["latency_ms"], s["requests"]
    print(f"| {name} | {n['total']:,} | {n['ok']:,} | "
          f"{l['p50']:.2f} | {l['p99']:.2f} | {l['p999']:.2f} | {l['max']:.2f} |")
print("| run | requests | ok | p50 ms | p99 ms | p99.9 ms | max ms |")
print("|---|---:|---:|---:|---:|---:|---:|")
row(f"small ({rate}/s) alone", "alone")
row(f"small ({rate}/s) beside big bodies", "mixed")
row(f"big ({big_rate}/s, {big_tokens} prompt tokens)", "big")
PY
