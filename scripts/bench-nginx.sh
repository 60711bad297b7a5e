#!/usr/bin/env bash
# Throughput of one node through Nginx with the full llm-ratelimit wiring (nginx/), beside
# Nginx in front of the same upstream with no limiter, in the same run on this machine, as
# scripts/bench-envoy.sh does for Envoy. Starts its own Redis, mock upstream, limiter and
# three Nginx (base port 21000): no limiter, admission only (no settlement), the full
# wiring, each with 2 workers; runs bounded wrk loads, prints Markdown tables, and stops
# everything it started.
#   scripts/bench-nginx.sh [seconds per run, default 15]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
secs=${1:-15}
P=21000
run=$(mktemp -d)
chmod 755 "$run"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$run"
}
trap cleanup EXIT

cargo build --release --bins -q
# shellcheck source=scripts/lib/install.sh
. scripts/lib/install.sh
need_apt redis-server=redis-server wrk=wrk curl=curl
need_nginx
# shellcheck source=scripts/lib/nginx-config.sh
. scripts/lib/nginx-config.sh

cat > "$run/keys.yaml" <<'KEYS'
keys:
  - name: bench
    key: sk-bench
    rpm: 100000000
    input_tpm: 100000000000
    output_tpm: 100000000000
KEYS

redis-server --port $((P+400)) --bind 127.0.0.1 --save "" --appendonly no >/dev/null & pids+=($!); redis_pid=$!
target/release/mock-upstream --addr 127.0.0.1:$((P+300)) >/dev/null 2>&1 & pids+=($!); mock_pid=$!
target/release/llm-ratelimit serve --config "$run/keys.yaml" --redis-url redis://127.0.0.1:$((P+400)) \
  --grpc-addr 127.0.0.1:$((P+100)) --http-addr 127.0.0.1:$((P+200)) >"$run/limiter.log" 2>&1 & pids+=($!); limiter_pid=$!
# start VARIANT LISTENER STATUS: an Nginx with 2 workers (SIGTERM to the master ends them).
start() {
  nginx_prefix "$run/$1" "$2" $((P+200)) $((P+300)) "$3" "${1/full/}"
  sed -i 's/^worker_processes 1;/worker_processes 2;/' "$run/$1/nginx.conf"
  "$NGINX" -p "$run/$1" -c nginx.conf -e "$run/$1/logs/error.log" -g "daemon off; pid $run/$1/nginx.pid;" & pids+=($!)
}
start bare $((P+1)) $((P+501)); bare_pid=${pids[-1]}
start access $((P+2)) $((P+502)); access_pid=${pids[-1]}
start full $P $((P+500)); full_pid=${pids[-1]}
for url in http://127.0.0.1:$((P+200))/readyz http://127.0.0.1:$((P+500))/ready http://127.0.0.1:$((P+501))/ready http://127.0.0.1:$((P+502))/ready; do
  for _ in $(seq 200); do curl -sf "$url" >/dev/null && break; sleep 0.1; done
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
# CPU time (user + system, in clock ticks) of a process and its children... Nginx's
# workers are the master's children, still running: they are summed by parent pid.
tree_ticks() {
  local total sum=0 c
  total=$(ticks "$1")
  for c in $(pgrep -P "$1"); do sum=$((sum + $(ticks "$c"))); done
  echo $((total + sum))
}
measure() { # name port nginx-master-pid
  local before_l before_r before_m before_n before_all
  before_l=$(ticks "$limiter_pid"); before_r=$(ticks "$redis_pid"); before_m=$(ticks "$mock_pid")
  before_n=$(tree_ticks "$3"); before_all=$(busy)
  wrk -t2 -c32 -d"${secs}s" --latency -s "$run/post.lua" "http://127.0.0.1:$2/v1/chat/completions" > "$run/$1.txt"
  cpu_per_request "$run/$1.txt" "$(($(tree_ticks "$3") - before_n))" "$(($(ticks "$limiter_pid") - before_l))" \
    "$(($(ticks "$redis_pid") - before_r))" "$(($(ticks "$mock_pid") - before_m))" "$(($(busy) - before_all))" \
    > "$run/$1.cpu"
  wrk_summary "$run/$1.txt"
}
read -r bare_rps bare_p50 bare_p99 bare_bad < <(measure bare $((P+1)) "$bare_pid")
read -r access_rps access_p50 access_p99 access_bad < <(measure access $((P+2)) "$access_pid")
read -r full_rps full_p50 full_p99 full_bad < <(measure full $P "$full_pid")
ratio=$(python3 -c "print(f'{$full_rps / $bare_rps:.2f}')")
cat <<MD
| path (one node, Nginx 2 workers) | req/s | p50 | p99 | non-2xx |
|---|---:|---:|---:|---:|
| Nginx → mock upstream, no limiter | $bare_rps | $bare_p50 | $bare_p99 | $bare_bad |
| Nginx + admission only (/v1/check: tokens, one Redis call; no settlement) | $access_rps | $access_p50 | $access_p99 | $access_bad |
| Nginx + admission + settlement (/v1/report) → mock upstream: the full wiring | $full_rps | $full_p50 | $full_p99 | $full_bad |
| ratio full / no limiter | **$ratio** | | | |

command: \`scripts/bench-nginx.sh $secs\` (wrk -t2 -c32 -d${secs}s --latency, $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ))

CPU time per request, µs (user + system from /proc, over the same runs; Nginx is its master
and workers; "rest" is the machine's other busy time, mostly wrk; all on $(nproc) cores):

| path | Nginx | limiter | Redis | mock upstream | rest (wrk) | total |
|---|---:|---:|---:|---:|---:|---:|
| no limiter | $(tr ' ' '|' < "$run/bare.cpu" | sed 's/|/ | /g') |
| admission only | $(tr ' ' '|' < "$run/access.cpu" | sed 's/|/ | /g') |
| full wiring | $(tr ' ' '|' < "$run/full.cpu" | sed 's/|/ | /g') |
MD
