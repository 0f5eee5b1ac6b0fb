# The everyday commands. `just --list` shows them.

# Run the service on 127.0.0.1:8080 with the in-memory store (users 1..100 seeded with 100000).
run *ARGS:
    cargo run --release -- {{ARGS}}

# Every test of the workspace, with a closing count of passed, failed and skipped (the
# README's test command; arguments go to `cargo test --workspace`).
test *ARGS:
    bash scripts/test.sh {{ARGS}}

# Format check and clippy with warnings as errors, as CI does.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# What CI runs.
ci:
    bash .ci/run

fmt:
    cargo fmt --all

# The benchmark: the service against the database's own ceiling, written to docs/benchmarks.md
# (`just bench --quick` for a short development run; `--help` lists the options).
bench *ARGS:
    python3 bench/run.py {{ARGS}}

# The fault suite: every scenario of docs/reliability.md (needs root; builds the release binary;
# `just chaos --list`, `just chaos --only mariadb-kill`, `just chaos --update-doc`).
chaos *ARGS:
    python3 chaos/run.py {{ARGS}}

# A 6-node Redis Cluster on loopback ports 7000-7005 (3 primaries, 3 replicas): `up` prints
# its REDIS_URL, `down` stops it by its pids; `status`, `url` (REDIS_CLUSTER_PORT moves it).
redis-cluster CMD:
    bash scripts/redis-cluster.sh {{CMD}}

# A 3-node MariaDB Galera cluster on loopback (needs root): `just galera up` prints the
# TEST_GALERA_URLS line for the opt-in Galera tests; `just galera status`, `just galera down`.
galera *ARGS:
    python3 chaos/galera.py {{ARGS}}

# The opt-in Galera tests (HTTP conformance and multi-primary conflicts) against the cluster
# of `just galera up`.
test-galera *ARGS:
    TEST_GALERA_URLS="$(python3 chaos/galera.py urls)" cargo test -p app -- --ignored galera {{ARGS}}

# One Galera node alone vs the 3-node cluster with one instance per node, spread and hot user
# (needs root, wrk and a release build; `--rounds`, `--secs`).
bench-galera *ARGS:
    python3 bench/galera.py {{ARGS}}

# The lock on one Redis vs on a 6-node Redis Cluster, side by side (wrk and a release build;
# `--runs`, `--secs`, `--conns`).
bench-redis-cluster *ARGS:
    python3 bench/redis_cluster.py {{ARGS}}

# Instances 1 -> 2 -> 3 of the service on one MariaDB and one Redis, the database alone beside
# them (wrk and a release build with the baseline: `cargo build --release -p app -p bench`;
# `--rounds`, `--secs`, `--instances 1,2,3`).
bench-instances *ARGS:
    python3 bench/instances.py {{ARGS}}

# Group commit off, per user and across users, side by side with the database alone, spread and
# hot user (wrk and a release build with the baseline; `--rounds`, `--secs`, `--conns`).
bench-group-commit *ARGS:
    python3 bench/group_commit.py {{ARGS}}
