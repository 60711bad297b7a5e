#!/usr/bin/env bash
# Regenerates proto/envoy-services.desc: the FileDescriptorSet (with imports) of the Envoy
# services llm-ratelimit serves, for gRPC server reflection. Built from the .proto files
# the envoy-types crate ships, with protoc (Debian's protobuf-compiler). Run it after
# upgrading envoy-types; the output is committed so builds need no protoc.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v protoc >/dev/null || { echo "protoc missing: apt-get install protobuf-compiler" >&2; exit 1; }
version=$(cargo metadata --format-version 1 |
  python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "envoy-types"))')
root="$(dirname "$version")/proto"
protoc -I"$root/data-plane-api" -I"$root/googleapis" -I"$root/protoc-gen-validate" \
  -I"$root/xds" -I"$root/cel-spec/proto" -I"$root/opentelemetry-proto" -I"$root/client_model" \
  --include_imports --descriptor_set_out=proto/envoy-services.desc \
  envoy/service/auth/v3/external_auth.proto \
  envoy/service/ext_proc/v3/external_processor.proto \
  envoy/service/ratelimit/v3/rls.proto
echo "wrote proto/envoy-services.desc ($(wc -c < proto/envoy-services.desc) bytes)"
