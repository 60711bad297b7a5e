# syntax=docker/dockerfile:1
# One image with the three binaries: llm-ratelimit (the sidecar), mock-upstream (the demo's
# OpenAI stand-in) and llm-loadtest (the demo's load and audit Job). See docs/kubernetes.md.
#
#   docker build -t llm-ratelimit:0.1.0 .        (or: podman build ...)
#
# Stage 1 builds the dependencies alone, from the manifests and the lock file with stub
# sources, so that layer is reused until Cargo.toml or Cargo.lock changes; stage 2 builds
# the workspace on top of it; the runtime stage is Debian slim with only the binaries and
# CA certificates (rediss:// and TLS upstreams), running as an unprivileged user.

ARG RUST_VERSION=1
FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
# The dependency layer: the workspace's manifests with empty targets.
COPY Cargo.toml Cargo.lock ./
COPY loadtest/Cargo.toml loadtest/
RUN mkdir -p src/bin loadtest/src benches examples \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > src/bin/mock-upstream.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/engine.rs \
    && echo 'fn main() {}' > examples/memory_store.rs \
    && echo 'fn main() {}' > loadtest/src/main.rs \
    && cargo build --release --locked --workspace --bins \
    && rm -rf src loadtest/src benches examples \
       target/release/deps/llm_ratelimit-* target/release/deps/libllm_ratelimit-* \
       target/release/deps/mock_upstream-* target/release/deps/llm_loadtest-* \
       target/release/.fingerprint/llm-ratelimit-* target/release/.fingerprint/llm-loadtest-*
# The workspace itself. The release profile keeps line tables for profiling; the image
# needs only the symbols (backtraces), so the debug sections are stripped.
COPY src src
COPY lua lua
COPY proto proto
COPY loadtest/src loadtest/src
COPY benches benches
COPY examples examples
RUN cargo build --release --locked --workspace --bins \
    && mkdir /out \
    && cp target/release/llm-ratelimit target/release/mock-upstream target/release/llm-loadtest /out/ \
    && strip --strip-debug /out/*

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 llm \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin llm
COPY --from=build /out/ /usr/local/bin/
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080 8081 9000
ENTRYPOINT ["/usr/local/bin/llm-ratelimit"]
CMD ["serve", "--config", "/etc/llm-ratelimit/keys/keys.yaml", "--http-addr", "0.0.0.0:8080", "--grpc-addr", "0.0.0.0:8081"]
