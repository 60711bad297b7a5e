# shellcheck shell=bash
# What bench-envoy.sh and bench-nginx.sh measure around one wrk run: CPU ticks of a
# process and of the machine, CPU µs per request of each part, and wrk's summary line.

# CPU ticks (user + system) of one process, 0 once it is gone.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# CPU ticks the whole machine spent busy.
busy() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
hz=$(getconf CLK_TCK)

# cpu_per_request WRK_OUTPUT PROXY LIMITER REDIS MOCK TOTAL (tick deltas over the run):
# prints CPU µs per request of the proxy, the limiter, Redis, the mock, everything else
# on the machine (wrk, mostly) and the total.
cpu_per_request() {
  local n
  n=$(awk '/requests in/ {print $1}' "$1")
  python3 - "$n" "$hz" "$2" "$3" "$4" "$5" "$6" <<'PY'
import sys
n, hz = int(sys.argv[1]), int(sys.argv[2])
proxy, limiter, redis, mock, total = (int(x) for x in sys.argv[3:8])
us = lambda t: f"{t * 1e6 / hz / max(n, 1):.0f}"
print(us(proxy), us(limiter), us(redis), us(mock), us(total - proxy - limiter - redis - mock), us(total))
PY
}

# wrk_summary WRK_OUTPUT: "req/s p50 p99 non-2xx".
wrk_summary() {
  local rps p50 p99 non2xx
  rps=$(awk '/^Requests\/sec/ {print $2}' "$1")
  p50=$(awk '$1 == "50%" {print $2}' "$1")
  p99=$(awk '$1 == "99%" {print $2}' "$1")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$1")
  echo "$rps ${p50} ${p99} ${non2xx:-0}"
}
