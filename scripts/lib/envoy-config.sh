# Sourced by scripts/cluster.sh and scripts/bench-envoy.sh: envoy/envoy.yaml for other
# ports, and optionally without the limiter's filters.

# envoy_config LISTENER GRPC UPSTREAM ADMIN [FIRST_FILTER_DROPPED]: envoy/envoy.yaml with
# node 0's four ports replaced (as tests/envoy.rs does). With FIRST_FILTER_DROPPED
# (`ext_authz` or `ext_proc`), every HTTP filter from that one up to the router is left
# out: `ext_authz` gives Envoy with only the router, `ext_proc` Envoy with admission only.
# Expects ROOT to be the repository.
envoy_config() {
  local listener=$1 grpc=$2 upstream=$3 admin=$4 strip='/^$/d'
  [ -n "${5:-}" ] &&
    strip="/- name: envoy.filters.http.$5\$/,/- name: envoy.filters.http.router/{/- name: envoy.filters.http.router/!d}"
  # Through placeholders, so that a new port equal to one of the old ones is not replaced
  # again.
  sed -e 's/port_value: 10000\b/port_value: @LISTENER@/' \
    -e 's/port_value: 10100\b/port_value: @GRPC@/' \
    -e 's/port_value: 10300\b/port_value: @UPSTREAM@/' \
    -e 's/port_value: 10500\b/port_value: @ADMIN@/' \
    -e "s/@LISTENER@/$listener/; s/@GRPC@/$grpc/; s/@UPSTREAM@/$upstream/; s/@ADMIN@/$admin/" \
    -e "$strip" "$ROOT/envoy/envoy.yaml"
}
