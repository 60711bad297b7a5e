# Sourced by scripts/cluster.sh and scripts/bench-nginx.sh: nginx/nginx.conf for other
# ports, optionally without the limiter, and a prefix directory to run it from.

# nginx_config LISTENER LIMITER_HTTP UPSTREAM STATUS [VARIANT]: nginx/nginx.conf with node
# 0's four ports replaced (as tests/nginx.rs does). VARIANT `bare` leaves out every
# llm_ratelimit phase (Nginx → upstream only, the raw path forwarded); `access` keeps
# admission and drops settlement (no body copy, no report). Expects ROOT to be the
# repository.
nginx_config() {
  local listener=$1 limiter=$2 upstream=$3 status=$4 drop='/^$/d'
  case ${5:-} in
  bare) drop='/\(access\|header_filter\|body_filter\|log\)_by_lua_block/d; s|proxy_pass http://llm_api\$llm_ratelimit_uri;|proxy_pass http://llm_api;|' ;;
  access) drop='/body_filter_by_lua_block/d; /log_by_lua_block/d' ;;
  esac
  # Through placeholders, so that a new port equal to one of the old ones is not replaced
  # again.
  sed -e 's/127\.0\.0\.1:10000\b/@LISTENER@/g' \
    -e 's/127\.0\.0\.1:10200\b/@LIMITER@/g' \
    -e 's/127\.0\.0\.1:10300\b/@UPSTREAM@/g' \
    -e 's/127\.0\.0\.1:10500\b/@STATUS@/g' \
    -e "s/@LISTENER@/127.0.0.1:$listener/g; s/@LIMITER@/127.0.0.1:$limiter/g" \
    -e "s/@UPSTREAM@/127.0.0.1:$upstream/g; s/@STATUS@/127.0.0.1:$status/g" \
    -e "$drop" "$ROOT/nginx/nginx.conf"
}

# nginx_prefix DIR LISTENER LIMITER_HTTP UPSTREAM STATUS [VARIANT]: DIR made a prefix for
# `nginx -p DIR -c nginx.conf`: the config, the Lua module, logs/. World-readable, so that
# the workers of a root master (which run as an unprivileged user) reach their temp dirs.
nginx_prefix() {
  local dir=$1
  shift
  mkdir -p "$dir/logs"
  chmod 755 "$dir"
  nginx_config "$@" >"$dir/nginx.conf"
  cp "$ROOT/nginx/llm_ratelimit.lua" "$dir/"
}

# NGINX: the nginx binary (/usr/sbin is not on every non-root PATH).
NGINX=${NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}
