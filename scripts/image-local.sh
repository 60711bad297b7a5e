#!/usr/bin/env bash
# Builds the root Dockerfile's image with podman where no registry can be reached (as on
# the machines this project is developed on), from Debian's packages only:
#
#   - `debian:bookworm-slim` is stood in for by a minimal Debian 12 made with debootstrap
#     (podman import), unless an image of that name is already present;
#   - `rust:local-slim-bookworm` by that Debian with gcc, and the Rust toolchain of this
#     machine mounted at /usr/local/rust during the build (RUST_VERSION=local);
#   - the crates come from crates.io, through this machine's cargo registry cache, mounted.
#
# Then it checks the image: its user is 10001, and the three binaries run in it as that
# user (`--help`), and `check-config` passes the demo's keys. podman builds with chroot
# isolation, because a container runtime may not be allowed here (crun refuses a hybrid
# cgroup hierarchy); so nothing is run with `podman run`.
#
#   scripts/image-local.sh [TAG]        (default llm-ratelimit:0.1.0)
#
# Takes a release build of the workspace inside the image (minutes on two cores).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/install.sh
. scripts/lib/install.sh
need_apt podman=podman debootstrap=debootstrap

tag=${1:-llm-ratelimit:0.1.0}
# podman's default open-file limit can be above this machine's hard limit.
limits=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096)
build=(podman build --isolation chroot --pull=never "${limits[@]}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! podman image exists docker.io/library/debian:bookworm-slim; then
  echo "== debian:bookworm-slim: a minimal Debian 12 from debootstrap"
  debootstrap --variant=minbase bookworm "$work/rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" ||
    { tail -20 "$work/debootstrap.log"; exit 1; }
  tar -C "$work/rootfs" -c . | podman import - docker.io/library/debian:bookworm-slim >/dev/null
  rm -rf "$work/rootfs"
fi

if ! podman image exists docker.io/library/rust:local-slim-bookworm; then
  echo "== rust:local-slim-bookworm: Debian 12 with gcc; the toolchain is mounted at build time"
  mkdir -p "$work/rust"
  cat >"$work/rust/Containerfile" <<'EOS'
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends gcc libc6-dev ca-certificates >/dev/null \
    && rm -rf /var/lib/apt/lists/*
ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
EOS
  "${build[@]}" -t docker.io/library/rust:local-slim-bookworm "$work/rust"
fi

echo "== $tag from ./Dockerfile"
sysroot=$(rustc --print sysroot)
registry=${CARGO_HOME:-$HOME/.cargo}/registry
mkdir -p "$registry"
"${build[@]}" --build-arg RUST_VERSION=local \
  -v "$sysroot:/usr/local/rust:ro" -v "$registry:/usr/local/cargo/registry" \
  -t "$tag" .

echo "== checking $tag"
user=$(podman image inspect "$tag" --format '{{.Config.User}}')
[ "$user" = "10001:10001" ] || { echo "image user is '$user', not 10001:10001"; exit 1; }
mkdir -p "$work/check"
cp k8s/base/keys.yaml "$work/check/keys.yaml"
cat >"$work/check/Containerfile" <<EOS
FROM $tag
COPY keys.yaml /tmp/keys.yaml
RUN ["/bin/sh", "-c", "test \"\$(id -u)\" = 10001 && llm-ratelimit --help >/dev/null && mock-upstream --help >/dev/null && llm-loadtest --help >/dev/null && llm-ratelimit check-config /tmp/keys.yaml"]
EOS
"${build[@]}" -t "$tag-check" "$work/check"
podman rmi "$tag-check" >/dev/null
podman image ls "$tag"
echo "== $tag built; runs as 10001; the three binaries start; the demo keys pass check-config"
