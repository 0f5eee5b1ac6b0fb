#!/usr/bin/env python3
"""One Galera node alone against the 3-node cluster with one instance per node, side by side
in one run: `just bench-galera` (or `python3 bench/galera.py`).

Starts a cluster of its own (chaos/galera.py, ports from 27306 up, datadirs under a temp
folder), a database migrated and seeded through node 1 (users 1..100 with 100000), and one
`balance-service` per node on the machine's Redis (a key prefix of its own). Then, for each
round, the same wrk load (bench/wrk/charge.lua, 32 connections in all, spread over 100
users and on hot user 1):

  single   nodes 2 and 3 shut down cleanly (node 1 alone, a primary component of one),
           all 32 connections on instance A (node 1);
  cluster  nodes 2 and 3 started again (they rejoin by IST), 11 connections on each of
           instance A, B and C (node 1, 2, 3), the three wrk runs at once, their
           throughput summed.

The two configurations alternate (single, cluster, single, …) and the medians of the
rounds are reported, with the certification failures and brute-force aborts the cluster
counted. After the last round the books are audited through every node. Results go to
stdout and, as JSON, to the work folder. Everything it started is killed by pid at the end.

Needs root, wrk, a release build (`cargo build --release -p app`) and the Redis on 6379.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "chaos"))

from galera import GaleraCluster, free_base  # noqa: E402

BIN = ROOT / "target" / "release" / "balance-service"
WRK_SCRIPT = ROOT / "bench" / "wrk" / "charge.lua"
USERS, SEED_BALANCE = 100, 100_000
CONNECTIONS = 32

LIVE: list[subprocess.Popen] = []


def spawn(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log_path, "ab") as out:
        p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             start_new_session=True)
    LIVE.append(p)
    return p


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_status(port: int, path: str) -> int | None:
    import http.client
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", path)
        return c.getresponse().status
    except OSError:
        return None


def wait_ready(port: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if http_status(port, "/health/ready") == 200:
            return
        time.sleep(0.2)
    raise RuntimeError(f"instance on {port} not ready after {timeout}s")


def wrk(port: int, conns: int, secs: int, hot: bool, run_id: str) -> subprocess.Popen:
    env = dict(os.environ, RUN_ID=run_id)
    env.pop("HOT_USER", None)
    if hot:
        env["HOT_USER"] = "1"
    else:
        env["USERS"] = str(USERS)
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--timeout", "15s", "--latency", "-s", str(WRK_SCRIPT),
           f"http://127.0.0.1:{port}"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wrk_result(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=300)
    line = next((l for l in out.splitlines() if l.startswith("JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no JSON line:\n{out}\n{err}")
    res = json.loads(line[5:])
    res["rps"], res["p50_ms"], res["p99_ms"] = res["throughput_rps"], res["latency_ms"]["p50"], res["latency_ms"]["p99"]
    errors = sum(res["socket_errors"].values())
    if errors:
        res["statuses"]["socket errors"] = errors
    return res


def conflicts(cluster: GaleraCluster, nodes: int) -> int:
    total = 0
    for node in cluster.nodes[:nodes]:
        st = dict(node.sql("show global status where variable_name in "
                           "('wsrep_local_cert_failures', 'wsrep_local_bf_aborts')"))
        total += sum(int(v) for v in st.values())
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds of each configuration (default 3)")
    p.add_argument("--secs", type=int, default=15, help="seconds per wrk run (default 15)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 2
    if not BIN.exists():
        print(f"no {BIN}: cargo build --release -p app", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-galera-"))
    os.chmod(work, 0o755)
    cluster = GaleraCluster(work / "galera", free_base(27306), spawn=lambda a, l: spawn(a, l), log=log)
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
            spawn([str(BIN), "serve"], work / f"instance-{'ABC'[i]}.log",
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
                res = wrk_result(wrk(ports[0], CONNECTIONS, args.secs, hot, f"{stamp}-{n}"))
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
                per = CONNECTIONS // 3
                procs = [wrk(port, per, args.secs, hot, f"{stamp}-{n}-{i}") for i, port in enumerate(ports)]
                parts = [wrk_result(proc) for proc in procs]
                statuses: dict[str, int] = {}
                for part in parts:
                    for k, v in part["statuses"].items():
                        statuses[k] = statuses.get(k, 0) + v
                res = {"rps": sum(x["rps"] for x in parts), "p99_ms": max(x["p99_ms"] for x in parts),
                       "p50_ms": statistics.median(x["p50_ms"] for x in parts), "statuses": statuses,
                       "conflicts": conflicts(cluster, 3) - before, "parts": parts}
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
                non200 = sum(v for r in runs for k, v in r["statuses"].items() if k != "200")
                print(f"| {conf} | {load} | {statistics.median(r['rps'] for r in runs):.0f} | "
                      f"{statistics.median(r['p99_ms'] for r in runs):.1f} | {non200} | "
                      f"{sum(r.get('conflicts', 0) for r in runs) if conf == 'cluster' else '-'} |")
        print(f"\nrounds {args.rounds}, {args.secs} s per run, {CONNECTIONS} connections; "
              f"command: {shlex.join(['python3', 'bench/galera.py', *sys.argv[1:]])}")
        (work / "results.json").write_text(json.dumps({"results": results, "audits": audits}, indent=1))
        return 0 if all(rc == 0 for _, rc in audits) else 1
    finally:
        for proc in LIVE:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in LIVE:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        import shutil
        shutil.rmtree(work / "galera", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
