#!/usr/bin/env bash
# A 6-node Redis Cluster on loopback (3 primaries, 3 replicas) for people and the fault suite.
#
#   scripts/redis-cluster.sh up       start it, print its REDIS_URL
#   scripts/redis-cluster.sh down     stop it (by the pids it wrote) and delete its files
#   scripts/redis-cluster.sh status   CLUSTER INFO and CLUSTER NODES of its first node
#   scripts/redis-cluster.sh url      print its REDIS_URL
#
# REDIS_CLUSTER_PORT (default 7000): the first node's port; the others follow it, and each
# node's cluster bus is its port + 10000. REDIS_CLUSTER_DIR (default
# ${TMPDIR:-/tmp}/balance-redis-cluster-<port>): data, logs and pid files. Nodes are
# stopped by the pids in that directory only, never by name: other people's redis-servers
# on the machine are left alone.
set -euo pipefail

base="${REDIS_CLUSTER_PORT:-7000}"
dir="${REDIS_CLUSTER_DIR:-${TMPDIR:-/tmp}/balance-redis-cluster-$base}"
ports=()
for i in 0 1 2 3 4 5; do ports+=("$((base + i))"); done

url() {
  local rest=()
  for port in "${ports[@]:1}"; do rest+=("node=127.0.0.1:$port"); done
  local IFS='&'
  echo "redis-cluster://127.0.0.1:${ports[0]}?${rest[*]}"
}

cli() { redis-cli -h 127.0.0.1 -p "$1" "${@:2}"; }

up() {
  if [ -d "$dir" ]; then
    echo "$dir exists: the cluster is up already, or run '$0 down' first" >&2
    exit 1
  fi
  mkdir -p "$dir"
  for port in "${ports[@]}"; do
    if cli "$port" ping >/dev/null 2>&1; then
      echo "port $port is taken; set REDIS_CLUSTER_PORT to another first port" >&2
      exit 1
    fi
    mkdir -p "$dir/$port"
    # The short node timeout makes a killed primary's replica take over in about 2 s.
    redis-server --port "$port" --bind 127.0.0.1 --daemonize yes \
      --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 1000 \
      --save "" --appendonly no --repl-diskless-sync-delay 0 \
      --dir "$dir/$port" --pidfile "$dir/$port.pid" --logfile "$dir/$port.log"
  done
  for port in "${ports[@]}"; do
    for _ in $(seq 1 100); do
      cli "$port" ping >/dev/null 2>&1 && break
      sleep 0.1
    done
  done
  local addresses=()
  for port in "${ports[@]}"; do addresses+=("127.0.0.1:$port"); done
  redis-cli --cluster create "${addresses[@]}" --cluster-replicas 1 --cluster-yes >"$dir/create.log"
  for _ in $(seq 1 300); do
    local ok=1
    for port in "${ports[@]}"; do
      cli "$port" cluster info | grep -q '^cluster_state:ok' || ok=0
      cli "$port" info replication | grep -q '^role:master\|^master_link_status:up' || ok=0
    done
    if [ "$ok" = 1 ]; then
      echo "REDIS_URL=$(url)"
      return 0
    fi
    sleep 0.1
  done
  echo "the cluster did not come up within 30 s; see $dir/*.log" >&2
  exit 1
}

down() {
  [ -d "$dir" ] || return 0
  for port in "${ports[@]}"; do
    if [ -f "$dir/$port.pid" ]; then
      kill "$(cat "$dir/$port.pid")" 2>/dev/null || true
    fi
  done
  for port in "${ports[@]}"; do
    for _ in $(seq 1 50); do
      cli "$port" ping >/dev/null 2>&1 || break
      sleep 0.1
    done
  done
  rm -rf "$dir"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) cli "${ports[0]}" cluster info; cli "${ports[0]}" cluster nodes ;;
  url) url ;;
  *) echo "usage: $0 up|down|status|url" >&2; exit 2 ;;
esac
