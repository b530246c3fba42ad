# moat container image.
#   docker build -t moat .
#   docker run --rm -p 27017:27017 -p 9911:9911 -v "$PWD/config:/etc/moat:ro" moat
# The config (and the certificates it names) are expected read-only at /etc/moat;
# the image ships none. In the config, admin_listen must be "0.0.0.0:9911" (not
# 127.0.0.1) for probes and Prometheus to reach it from outside the container.

# ---- build ------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
# protoc and the well-known .proto files: etcd-client's build script needs them.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
# Dependencies first, so that a source change does not refetch them.
COPY Cargo.toml Cargo.lock ./
RUN cargo fetch --locked
COPY src ./src
COPY benches ./benches
# The dist profile: fat LTO, one codegen unit (README "Build profiles").
RUN cargo build --profile dist --locked --bin moat \
 && install -m 0755 target/dist/moat /usr/local/bin/moat

# ---- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: the optional AWS security-group resolver talks HTTPS.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 moat \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin moat \
 && mkdir -p /etc/moat
COPY --from=build /usr/local/bin/moat /usr/local/bin/moat
USER 10001:10001
# 27017: MongoDB clients; 9911: /metrics, /healthz, /readyz
EXPOSE 27017 9911
# SIGTERM: stop accepting, drain up to shutdown_grace, exit 0 (give docker stop -t > shutdown_grace).
STOPSIGNAL SIGTERM
ENTRYPOINT ["moat", "run", "-c", "/etc/moat/moat.toml"]
