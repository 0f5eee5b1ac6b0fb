#!/usr/bin/env python3
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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICE_BIN = ROOT / "target" / "release" / "balance-service"
WRK_SCRIPT = ROOT / "bench" / "wrk" / "charge.lua"
CLUSTER = ROOT / "scripts" / "redis-cluster.sh"
CLUSTER_PORT = "7100"


def ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "/health/ready", timeout=2) as res:
            return res.status == 200
    except (urllib.error.URLError, OSError):
        return False


def mysql(sql: str) -> None:
    subprocess.run(["mysql", "-uroot", "-h127.0.0.1", "-e", sql], check=True)


def wrk(port: int, conns: int, secs: int, hot: bool, run_id: str) -> tuple[dict, str]:
    env = dict(os.environ, RUN_ID=run_id)
    env.pop("HOT_USER", None)
    if hot:
        env["HOT_USER"] = "1"
    else:
        env["USERS"] = "100"
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--timeout", "15s", "--latency", "-s", str(WRK_SCRIPT), f"http://127.0.0.1:{port}"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=secs + 60, check=True)
    line = next(l for l in res.stdout.splitlines() if l.startswith("JSON "))
    shown = ("HOT_USER=1 " if hot else "USERS=100 ") + " ".join(cmd).replace(str(ROOT) + "/", "")
    return json.loads(line[5:]), shown


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--secs", type=int, default=10)
    parser.add_argument("--conns", type=int, default=32)
    args = parser.parse_args()

    stamp = time.strftime("%Y%m%d%H%M%S")
    db = f"bench_rc_{stamp}"
    cluster_env = dict(os.environ, REDIS_CLUSTER_PORT=CLUSTER_PORT)
    services: list[subprocess.Popen] = []
    mysql(f"create database {db}")
    try:
        out = subprocess.run(["bash", str(CLUSTER), "up"], env=cluster_env, capture_output=True, text=True, check=True).stdout
        cluster_url = next(l for l in out.splitlines() if l.startswith("REDIS_URL=")).split("=", 1)[1]
        base_env = dict(os.environ, DATABASE_URL=f"mysql://root@127.0.0.1:3306/{db}", RUST_LOG="warn", LOG_FORMAT="json")
        subprocess.run([str(SERVICE_BIN), "migrate"], env=base_env, check=True, capture_output=True)
        subprocess.run([str(SERVICE_BIN), "seed", "--users", "100", "--balance", "100000"], env=base_env, check=True, capture_output=True)
        targets = {"one Redis": (18181, "redis://127.0.0.1:6379"), "Redis Cluster": (18182, cluster_url)}
        for name, (port, url) in targets.items():
            env = dict(base_env, BIND_ADDR=f"127.0.0.1:{port}", REDIS_URL=url, REDIS_KEY_PREFIX=f"bench-rc-{stamp}:", MIGRATE_ON_START="false")
            services.append(subprocess.Popen([str(SERVICE_BIN), "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for name, (port, _) in targets.items():
            deadline = time.time() + 60
            while not ready(f"http://127.0.0.1:{port}"):
                if time.time() > deadline:
                    raise RuntimeError(f"{name}: the service did not get ready")
                time.sleep(0.2)

        results: dict[tuple[str, str], list[dict]] = {}
        commands: dict[str, str] = {}
        n = 0
        for _ in range(args.runs):
            for name, (port, _) in targets.items():
                for scenario, hot in (("spread", False), ("hot user", True)):
                    n += 1
                    report, shown = wrk(port, args.conns, args.secs, hot, f"{stamp}-{n}")
                    results.setdefault((scenario, name), []).append(report)
                    commands[scenario] = shown
                    print(f"{scenario:8} {name:13} {report['throughput_rps']:8.1f}/s p50 {report['latency_ms']['p50']:7.2f} ms "
                          f"p99 {report['latency_ms']['p99']:7.2f} ms non-200 {report['non200']}", flush=True)

        print()
        print(f"| scenario | lock on | charges/s | p50 ms | p99 ms | non-200 (all runs) |")
        print("|---|---|---|---|---|---|")
        for (scenario, name), reports in results.items():
            med = lambda f: statistics.median(f(r) for r in reports)
            print(f"| {scenario} | {name} | {med(lambda r: r['throughput_rps']):.0f} | {med(lambda r: r['latency_ms']['p50']):.1f} "
                  f"| {med(lambda r: r['latency_ms']['p99']):.1f} | {sum(r['non200'] for r in reports)} |")
        print()
        for scenario, shown in commands.items():
            print(f"    {shown}")
    finally:
        for proc in services:
            proc.terminate()
        for proc in services:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        subprocess.run(["bash", str(CLUSTER), "down"], env=cluster_env, check=False)
        mysql(f"drop database if exists {db}")


if __name__ == "__main__":
    main()
