"""One Galera node alone against the 3-node cluster with one instance per node, side by side
in one run: `just bench-galera` (or `python3 bench/galera.py`).

Starts a cluster of its own (chaos/galera.py, ports from 27306 up, datadirs under a temp
folder), a database migrated and seeded through node 1 (users 1..100 with 100000), and one
`balance-service` per node on the machine's Redis (a key prefix of its own). Then, for each
round, the same wrk load (bench/wrk/charge.lua, 32 connections in all, spread over 100
users and on hot user 1):

  single   nodes 2 and 3 shut down cleanly (node 1 alone, a primary component of one),
           all 32 connections on instance A (node 1);
  cluster  nodes 2 and 3 started again (they rejoin by IST), the 32 connections split
           11, 11, 10 over instance A, B and C (node 1, 2, 3), the three wrk runs at
           once, their throughput summed (until this module moved here it was 10 on
           each, 30 in all: the figures of 2026-12-01 in docs/scaling.md were measured so).

The two configurations alternate (single, cluster, single, …) and the medians of the
rounds are reported, with the certification failures and brute-force aborts the cluster
counted. After the last round the books are audited through every node. Results go to
stdout and, as JSON, to the work folder. Everything it started is killed by pid at the end.

Run by bench/galera.py. Needs root, wrk, a release build (`cargo build --release -p app`) and the Redis on 6379.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from lib.common import ROOT, SEED_BALANCE, SERVICE_BIN, USERS, free_port, log
from lib.scaling import Procs, non200, split, wait_ready, wrk_result, wrk_side_by_side, wrk_start


def _chaos_galera():
    """chaos/galera.py, the harness (`just galera`), loaded from its file: chaos/ and bench/
    each have a `lib` package, so it is not put on sys.path."""
    spec = importlib.util.spec_from_file_location("chaos_galera", ROOT / "chaos" / "galera.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["chaos_galera"] = module
    spec.loader.exec_module(module)
    return module


_galera = _chaos_galera()
GaleraCluster, free_base = _galera.GaleraCluster, _galera.free_base
BIN = SERVICE_BIN
CONNECTIONS = 32
PROCS = Procs()


def conflicts(cluster: GaleraCluster, nodes: int) -> int:
    total = 0
    for node in cluster.nodes[:nodes]:
        st = dict(node.sql("show global status where variable_name in "
                           "('wsrep_local_cert_failures', 'wsrep_local_bf_aborts')"))
        total += sum(int(v) for v in st.values())
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds of each configuration (default 3)")
    p.add_argument("--secs", type=int, default=15, help="seconds per wrk run (default 15)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    if not BIN.exists():
        print(f"no {BIN}: cargo build --release -p app", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-galera-"))
    os.chmod(work, 0o755)
    cluster = GaleraCluster(work / "galera", free_base(27306), spawn=PROCS.spawn, log=log)
    stamp = uuid.uuid4().hex[:8]
    results: dict[str, dict[str, list[dict]]] = {"single": {"spread": [], "hot": []},
                                                 "cluster": {"spread": [], "hot": []}}
    try:
        cluster.up()
        db = f"bench_{stamp}"
        cluster.nodes[0].sql(f"create database {db}")
        env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
        env.update({"DATABASE_URL": cluster.nodes[0].url(db), "REDIS_URL": args.redis_url,
                    "REDIS_KEY_PREFIX": f"bench-galera-{stamp}:", "RUST_LOG": "warn", "LOG_FORMAT": "json",
                    "MIGRATE_ON_START": "false", "SEED_USERS": "0"})
        for cmd in (["migrate"], ["seed", "--users", str(USERS), "--balance", str(SEED_BALANCE)]):
            r = subprocess.run([str(BIN), *cmd], env=env, capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise RuntimeError(f"{cmd[0]} failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
        ports = []
        for i, node in enumerate(cluster.nodes):
            port = free_port()
            PROCS.spawn([str(BIN), "serve"], work / f"instance-{'ABC'[i]}.log",
                        dict(env, DATABASE_URL=node.url(db), BIND_ADDR=f"127.0.0.1:{port}"))
            ports.append(port)
        for port in ports:
            wait_ready(port)
        log(f"instances A, B, C on ports {ports}, one per node; work folder {work}")
        n = 0
        for rnd in range(1, args.rounds + 1):
            # Node 1 alone: the others leave cleanly, so it keeps a primary component of one.
            for node in cluster.nodes[1:]:
                node.leave()
            cluster.nodes[0].wait_synced(60, size=1)
            for hot in (False, True):
                n += 1
                res = wrk_result(wrk_start(ports[0], CONNECTIONS, args.secs, hot, f"{stamp}-{n}"))
                results["single"]["hot" if hot else "spread"].append(res)
                log(f"round {rnd} single  {'hot   ' if hot else 'spread'}: {res['rps']:.0f} req/s, "
                    f"p99 {res['p99_ms']:.1f} ms, statuses {res['statuses']}")
            for node in cluster.nodes[1:]:
                node.restart()
                node.wait_synced(180, size=None)
            for node in cluster.nodes:
                node.wait_synced(60, size=3)
            for port in ports:
                wait_ready(port)
            for hot in (False, True):
                n += 1
                before = conflicts(cluster, 3)
                res = wrk_side_by_side(ports, split(CONNECTIONS, len(ports)), args.secs, hot, f"{stamp}-{n}")
                res["conflicts"] = conflicts(cluster, 3) - before
                statuses = res["statuses"]
                results["cluster"]["hot" if hot else "spread"].append(res)
                log(f"round {rnd} cluster {'hot   ' if hot else 'spread'}: {res['rps']:.0f} req/s, "
                    f"p99 {res['p99_ms']:.1f} ms (worst instance), statuses {statuses}, "
                    f"certification failures + BF aborts {res['conflicts']}")
        audits = []
        for node in cluster.nodes:
            node.sql("set session wsrep_sync_wait = 1; select count(*) from users", db)
            r = subprocess.run([str(BIN), "audit"], env=dict(env, DATABASE_URL=node.url(db)), capture_output=True,
                               text=True, timeout=600)
            audits.append((node.name, r.returncode))
        log(f"audit through every node (exit codes): {audits}")
        print()
        print("| configuration | load | req/s (median) | p99 ms (median) | non-200 | conflicts |")
        print("|---|---|---|---|---|---|")
        for conf in ("single", "cluster"):
            for load in ("spread", "hot"):
                runs = results[conf][load]
                print(f"| {conf} | {load} | {statistics.median(r['rps'] for r in runs):.0f} | "
                      f"{statistics.median(r['p99_ms'] for r in runs):.1f} | {non200(runs)} | "
                      f"{sum(r.get('conflicts', 0) for r in runs) if conf == 'cluster' else '-'} |")
        print(f"\nrounds {args.rounds}, {args.secs} s per run, {CONNECTIONS} connections; "
              f"command: {shlex.join(['python3', 'bench/galera.py', *sys.argv[1:]])}")
        (work / "results.json").write_text(json.dumps({"results": results, "audits": audits}, indent=1))
        return 0 if all(rc == 0 for _, rc in audits) else 1
    finally:
        PROCS.kill_all()
        shutil.rmtree(work / "galera", ignore_errors=True)


