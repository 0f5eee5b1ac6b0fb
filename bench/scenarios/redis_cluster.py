"""The lock on one Redis against the lock on a Redis Cluster, side by side, one run.

Builds nothing: it uses target/release/balance-service (`cargo build --release`) and wrk.
Creates a fresh database `bench_rc_<timestamp>` on the local MariaDB, seeds users 1..100
with 100000, starts a 6-node Redis Cluster (scripts/redis-cluster.sh, first port 7100),
and two service instances on that database: one with REDIS_URL=redis://127.0.0.1:6379, one
with the cluster's URL (each its own key prefix). Then, RUNS times, the two alternate
(one Redis, cluster, one Redis, …): `wrk -t1 -c32` with bench/wrk/charge.lua on 100 users
(spread) and on user 1 (hot). Prints a markdown table of the medians and the commands,
then stops both instances and the cluster (by pid) and drops the database, failure or not.

    python3 bench/redis_cluster.py [--runs 3] [--secs 10] [--conns 32]

Run by bench/redis_cluster.py (`just bench-redis-cluster`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import time
from pathlib import Path

from lib.common import ROOT, SEED_BALANCE, SERVICE_BIN, USERS, db_url, drop_redis_prefix, free_port, log, sql
from lib.scaling import Procs, clean_env, wait_ready, wrk_cmd, wrk_result, wrk_start

CLUSTER = ROOT / "scripts" / "redis-cluster.sh"
CLUSTER_PORT = "7100"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--secs", type=int, default=10)
    parser.add_argument("--conns", type=int, default=32)
    args = parser.parse_args(argv)

    stamp = time.strftime("%Y%m%d%H%M%S")
    db = f"bench_rc_{stamp}"
    cluster_env = dict(os.environ, REDIS_CLUSTER_PORT=CLUSTER_PORT)
    procs = Procs()
    sql(f"create database {db}")
    try:
        out = subprocess.run(["bash", str(CLUSTER), "up"], env=cluster_env, capture_output=True, text=True,
                             check=True).stdout
        cluster_url = next(l for l in out.splitlines() if l.startswith("REDIS_URL=")).split("=", 1)[1]
        base_env = clean_env({"DATABASE_URL": db_url(db), "RUST_LOG": "warn", "LOG_FORMAT": "json"})
        subprocess.run([str(SERVICE_BIN), "migrate"], env=base_env, check=True, capture_output=True)
        subprocess.run([str(SERVICE_BIN), "seed", "--users", str(USERS), "--balance", str(SEED_BALANCE)],
                       env=base_env, check=True, capture_output=True)
        targets = {"one Redis": (free_port(), "redis://127.0.0.1:6379"), "Redis Cluster": (free_port(), cluster_url)}
        for name, (port, url) in targets.items():
            env = dict(base_env, BIND_ADDR=f"127.0.0.1:{port}", REDIS_URL=url, REDIS_KEY_PREFIX=f"bench-rc-{stamp}:",
                       MIGRATE_ON_START="false")
            procs.spawn([str(SERVICE_BIN), "serve"], Path(os.devnull), env)
        for name, (port, _) in targets.items():
            wait_ready(port, 60)

        results: dict[tuple[str, str], list[dict]] = {}
        commands: dict[str, str] = {}
        n = 0
        for _ in range(args.runs):
            for name, (port, _) in targets.items():
                for scenario, hot in (("spread", False), ("hot user", True)):
                    n += 1
                    report = wrk_result(wrk_start(port, args.conns, args.secs, hot, f"{stamp}-{n}"))
                    results.setdefault((scenario, name), []).append(report)
                    commands[scenario] = ("HOT_USER=1 " if hot else f"USERS={USERS} ") + shlex.join(
                        wrk_cmd(port, args.conns, args.secs)).replace(str(ROOT) + "/", "")
                    log(f"{scenario:8} {name:13} {report['throughput_rps']:8.1f}/s p50 {report['latency_ms']['p50']:7.2f} ms "
                        f"p99 {report['latency_ms']['p99']:7.2f} ms non-200 {report['non200']}")

        print()
        print("| scenario | lock on | charges/s | p50 ms | p99 ms | non-200 (all runs) |")
        print("|---|---|---|---|---|---|")
        for (scenario, name), reports in results.items():
            def med(f):
                return statistics.median(f(r) for r in reports)
            print(f"| {scenario} | {name} | {med(lambda r: r['throughput_rps']):.0f} | {med(lambda r: r['latency_ms']['p50']):.1f} "
                  f"| {med(lambda r: r['latency_ms']['p99']):.1f} | {sum(r['non200'] for r in reports)} |")
        print()
        for scenario, shown in commands.items():
            print(f"    {shown}")
        print(f"\nload average at the end: {open('/proc/loadavg').read().strip()}")
        return 0
    finally:
        for p in procs.live:
            procs.stop(p)
        procs.kill_all()
        subprocess.run(["bash", str(CLUSTER), "down"], env=cluster_env, check=False)
        sql(f"drop database if exists {db}")
        drop_redis_prefix(f"bench-rc-{stamp}:")
