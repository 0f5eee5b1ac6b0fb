# syntax=docker/dockerfile:1
#
# balance-service: built with Rust on Debian bookworm, run on debian:bookworm-slim.
#
#   docker build -t balance-service .
#   docker run --rm --init -p 8080:8080 balance-service
#       in-memory store and in-process lock: one instance, nothing persisted
#   docker compose up --build
#       with MySQL and Redis (docker-compose.yml, docs/operations.md)
#
# Needs BuildKit (the default builder since Docker 23).

# ---------------------------------------------------------------------------------------
# planner: the workspace's manifests alone. This stage re-runs on every source change,
# but its output only changes when a Cargo.toml, Cargo.lock or build.rs changes, so the
# dependency layer below stays cached while only .rs files or migrations change. New
# crates under crates/ are picked up without editing this file.
# ---------------------------------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS planner
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates crates
RUN find crates -type f ! -name Cargo.toml ! -name build.rs -delete \
 && find crates -depth -type d -empty -delete

# ---------------------------------------------------------------------------------------
# builder
# ---------------------------------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS builder
# Nothing to install: the slim image already has gcc and libc6-dev (rustc links through
# cc), which is all ring's C and assembly need. No OpenSSL anywhere: sqlx uses rustls with
# ring (tls-rustls-ring-webpki), and the Redis client (fred) is built without TLS.
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0
WORKDIR /src

# 1. Every dependency of the app, compiled against empty stand-ins of the workspace's own
#    crates (an empty lib.rs each, and an empty main for the binary). Cargo needs every
#    member's manifest and a target for each to load the workspace.
COPY --from=planner /src/ ./
RUN for manifest in crates/*/Cargo.toml; do \
        dir="$(dirname "$manifest")"; mkdir -p "$dir/src" && : > "$dir/src/lib.rs"; \
    done \
 && echo 'fn main() {}' > crates/app/src/main.rs \
 && cargo build --release --locked -p app \
 && rm -rf crates/*/src

# 2. The real sources. `migrations/` must be here before the build: sqlx::migrate! in
#    crates/mysql-repo embeds the SQL files into the binary at compile time.
#    COPY keeps the files' own modification times, which are older than the stand-ins'
#    build above, so cargo would take the stand-ins for up to date and ship the empty
#    main: touching every source makes the workspace's crates (only those) rebuild.
COPY crates crates
COPY migrations migrations
RUN find crates -name '*.rs' -exec touch {} + \
 && cargo build --release --locked -p app \
 && cp target/release/balance-service /usr/local/bin/balance-service \
 && /usr/local/bin/balance-service --version | grep -q '^balance-service '

# ---------------------------------------------------------------------------------------
# runtime
# ---------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
# ca-certificates for any TLS the operator turns on (e.g. ssl-mode=verify-ca with a
# public CA). The rustls build carries its own webpki roots, so this is belt and braces.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 balance \
 && useradd --system --uid 10001 --gid balance --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin balance
COPY --from=builder /usr/local/bin/balance-service /usr/local/bin/balance-service

USER 10001:10001
# Listen on every interface inside the container (the binary's own default is loopback).
ENV BIND_ADDR=0.0.0.0:8080
EXPOSE 8080

# No HEALTHCHECK: the slim image has no curl or wget, and the binary has no probe
# subcommand. Let the orchestrator probe over HTTP: GET /health/live (the process is up)
# and GET /health/ready (200 when every required dependency answers, else 503); see
# docs/operations.md.

# SIGTERM (docker stop) and SIGINT start a graceful shutdown: no new connections,
# requests in flight get SHUTDOWN_TIMEOUT_SECS (30 s) to finish. Give the container more
# than that before SIGKILL (`docker stop -t 40`, compose `stop_grace_period`).
# The binary installs its signal handlers only once it is serving; run it with an init
# (`docker run --init`, compose `init: true`) so that a signal during start-up
# (migrations, seeding) still stops it: as PID 1 with no handler it would ignore SIGTERM.
STOPSIGNAL SIGTERM
ENTRYPOINT ["balance-service"]
CMD ["serve"]
