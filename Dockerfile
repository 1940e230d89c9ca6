# syntax=docker/dockerfile:1
# kiln's container images. Two targets from one build stage:
#   docker build --target cpu  -t kiln:0.1.0 .        # the default: CPU serving on a minimal Debian base
#   docker build --target cuda -t kiln:0.1.0-cuda .   # the same binary on NVIDIA's CUDA runtime base, for GPU nodes
# Both run as the unprivileged user 10001 and need no writable root filesystem (the chart mounts /tmp and the
# plan volumes). The entrypoint is `kiln`; the chart passes `serve ...` (or `compile ...` in its init container).

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# BuildKit caches the registry and the target directory across builds; the binary is copied out of the cache.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin kiln \
    && install -D -m 0755 target/release/kiln /out/kiln

FROM nvidia/cuda:12.9.1-runtime-ubuntu24.04 AS cuda
RUN groupadd --gid 10001 kiln && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin kiln
COPY --from=build /out/kiln /usr/local/bin/kiln
USER 10001:10001
EXPOSE 8000 9090
HEALTHCHECK NONE
ENTRYPOINT ["/usr/local/bin/kiln"]
CMD ["serve", "--help"]

# The last stage is what a plain `docker build .` produces: the CPU image.
FROM debian:bookworm-slim AS cpu
RUN groupadd --gid 10001 kiln && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin kiln
COPY --from=build /out/kiln /usr/local/bin/kiln
USER 10001:10001
EXPOSE 8000 9090
# Kubernetes probes /health and /ready (see charts/kiln); the image has no HTTP client to probe itself with.
HEALTHCHECK NONE
ENTRYPOINT ["/usr/local/bin/kiln"]
CMD ["serve", "--help"]
