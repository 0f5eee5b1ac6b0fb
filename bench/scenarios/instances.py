"""Instances 1 → 2 → 3 of the service on ONE MariaDB and one Redis, side by side in one run:
`just bench-instances` (or `python3 bench/instances.py`).

Creates a fresh database `bench_inst_<timestamp>` on the machine's MariaDB (127.0.0.1:3306),
migrates it, seeds users 1..100 with 100000, and starts as many `target/release/balance-service
serve` instances as the largest step (3 by default) on it and on the machine's Redis (a key
prefix of its own), each with its defaults (its own pool of `DB_MAX_CONNECTIONS`, 8 per
core, 16 to 64) but `AUDIT_INTERVAL_SECS=0`, so that no background audit lands in a run (the
audit runs once, at the end). Then, for each round:

  step n    the same load, 32 connections in all split over instances 1..n (32; 16, 16;
            11, 11, 10), one `wrk -t1` per instance with bench/wrk/charge.lua, all at once,
            spread over 100 users and on hot user 1; throughput summed, p99 the worst
            instance's; 2 s of unmeasured warm-up first;
  database  the database's own ceiling with the same 32 connections and the service's own
            statements (`target/release/baseline --mode spread`, and `--mode hot --lock
            for-update`), as `just bench` measures it.

The steps alternate within a round and run in reverse order every other round (1 2 3, 3 2
1, …), so that the tables' growth over the run does not favour one step. Around every run
it reads the CPU time of mariadbd, of each instance, of Redis and of the load clients
(/proc), the machine's busy time and the load average. It prints a markdown table of the
medians, writes everything as JSON to the work folder, and stops what it started (by pid),
drops the database and the Redis keys, failure or not.

Needs wrk and a release build (`cargo build --release -p app -p bench`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lib.common import (BASELINE_BIN, CLK_TCK, REDIS_URL, ROOT, SEED_BALANCE, SERVICE_BIN, USERS, db_url,
                        drop_redis_prefix, ensure_tools, free_port, log, machine_busy_ticks, run, sql)
from lib.meter import listener_pids, proc_ticks
from lib.scaling import clean_env, non200, split, wrk_cmd, wrk_side_by_side
from lib.service import Service

WARMUP_S = 2


class Cpu:
    """CPU seconds of mariadbd, each instance, Redis, this process's children (the load
    clients) and the whole machine, read from /proc before and after a run."""

    def __init__(self, instance_pids: list[int]) -> None:
        self.groups = {"mariadb": listener_pids(3306), "redis": listener_pids(6379)}
        self.instances = instance_pids

    def snapshot(self) -> dict:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy, total = machine_busy_ticks()
        return {
            "mariadb": sum(proc_ticks(p) for p in self.groups["mariadb"]) / CLK_TCK,
            "redis": sum(proc_ticks(p) for p in self.groups["redis"]) / CLK_TCK,
            "instances": [proc_ticks(p) / CLK_TCK for p in self.instances],
            "client": ru.ru_utime + ru.ru_stime,
            "busy": busy / CLK_TCK, "total": total / CLK_TCK, "t": time.monotonic(),
        }

    @staticmethod
    def delta(a: dict, b: dict) -> dict:
        """Shares of one core over the run (100 is one core, 200 the whole machine)."""
        wall = b["t"] - a["t"]
        pct = lambda x: round(100 * x / wall, 1)  # noqa: E731
        inst = [pct(y - x) for x, y in zip(a["instances"], b["instances"])]
        d = {"mariadb": pct(b["mariadb"] - a["mariadb"]), "redis": pct(b["redis"] - a["redis"]),
             "instances": round(sum(inst), 1), "per_instance": inst, "client": pct(b["client"] - a["client"]),
             "machine": round(100 * (os.cpu_count() or 2) * (b["busy"] - a["busy"]) / max(b["total"] - a["total"], 1e-9), 1)}
        d["other"] = round(max(0.0, d["machine"] - d["mariadb"] - d["redis"] - d["instances"] - d["client"]), 1)
        return d


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def baseline(db: str, mode: str, lock: str, conns: int, secs: int) -> dict:
    cmd = [str(BASELINE_BIN), "--database-url", db_url(db), "--mode", mode, "--lock", lock,
           "--connections", str(conns), "--duration", str(secs), "--warmup", str(WARMUP_S),
           "--users", str(USERS), "--json"]
    res = run(cmd, timeout=secs + WARMUP_S + 120)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    return {"rps": r["throughput_tps"], "p50_ms": r["latency_ms"]["p50"], "p99_ms": r["latency_ms"]["p99"],
            "statuses": {"errors": r["errors"] + r.get("exhausted", 0)} if r["errors"] + r.get("exhausted", 0) else {},
            "requests": r.get("committed", 0), "conflicts": r.get("conflicts")}


def med(values) -> float:
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds of every step (default 3)")
    p.add_argument("--secs", type=int, default=10, help="seconds per measured run (default 10)")
    p.add_argument("--conns", type=int, default=32, help="connections in all, split over the instances (default 32)")
    p.add_argument("--instances", default="1,2,3", help="the steps (default 1,2,3)")
    p.add_argument("--no-baseline", action="store_true", help="skip the database-alone runs")
    p.add_argument("--keep-db", action="store_true", help="don't drop the database")
    args = p.parse_args(argv)
    steps = [int(x) for x in args.instances.split(",") if x]
    if not steps or min(steps) < 1:
        print("--instances: a list of counts ≥ 1, e.g. 1,2,3", file=sys.stderr)
        return 2
    ensure_tools(k6=False)
    for b in (SERVICE_BIN, *(() if args.no_baseline else (BASELINE_BIN,))):
        if not b.exists():
            print(f"no {b}: cargo build --release -p app -p bench", file=sys.stderr)
            return 2

    stamp = dt.datetime.now(dt.timezone.utc)
    db = "bench_inst_" + stamp.strftime("%Y%m%d_%H%M%S")
    prefix = f"bench-inst:{stamp.strftime('%Y%m%d%H%M%S')}:{os.getpid()}:"
    work = Path(tempfile.mkdtemp(prefix="bench-instances-"))
    services: list[Service] = []
    results: dict[str, list[dict]] = {}
    load_before = loadavg()
    log(f"database {db}, redis prefix {prefix}, work folder {work}; load average {load_before}")
    sql(f"create database `{db}`")
    try:
        env = clean_env({"DATABASE_URL": db_url(db), "REDIS_URL": REDIS_URL, "REDIS_KEY_PREFIX": prefix,
                         "RUST_LOG": "warn", "LOG_FORMAT": "json", "MIGRATE_ON_START": "false", "SEED_USERS": "0",
                         "AUDIT_INTERVAL_SECS": "0"})
        run([str(SERVICE_BIN), "migrate"], env=env, timeout=300)
        run([str(SERVICE_BIN), "seed", "--users", str(USERS), "--balance", str(SEED_BALANCE)], env=env, timeout=300)
        for i in range(max(steps)):
            svc = Service(dict(env, BIND_ADDR=f"127.0.0.1:{free_port()}"), work / f"instance-{i + 1}.log")
            svc.start()
            services.append(svc)
        ports = [int(s.env["BIND_ADDR"].rsplit(":", 1)[1]) for s in services]
        cpu = Cpu([s.proc.pid for s in services])
        log(f"{len(services)} instances on ports {ports} (pids {cpu.instances}); mariadbd pids "
            f"{cpu.groups['mariadb']}, redis pids {cpu.groups['redis']}")
        n = 0

        def measure(key: str, fn) -> dict:
            for s in services:
                if not s.alive():
                    raise RuntimeError(f"an instance died:\n{s.log_tail()}")
            la0, c0 = loadavg(), cpu.snapshot()
            res = fn()
            res["cpu"] = Cpu.delta(c0, cpu.snapshot())
            res["loadavg"] = [la0, loadavg()]
            results.setdefault(key, []).append(res)
            c = res["cpu"]
            log(f"{key:22} {res['rps']:7.0f}/s p50 {res['p50_ms']:7.2f} p99 {res['p99_ms']:7.2f} ms "
                f"non-200 {non200([res])}; CPU % mariadbd {c['mariadb']:.0f} instances {c['instances']:.0f} "
                f"redis {c['redis']:.0f} client {c['client']:.0f} other {c['other']:.0f} "
                f"machine {c['machine']:.0f}; load {res['loadavg'][1]}")
            return res

        for rnd in range(1, args.rounds + 1):
            order = steps if rnd % 2 else list(reversed(steps))
            for k in order:
                for hot in (False, True):
                    n += 1
                    conns = split(args.conns, k)
                    run_id = f"{stamp.strftime('%H%M%S')}-{n}"
                    wrk_side_by_side(ports[:k], conns, WARMUP_S, hot, run_id + "w")  # warm-up, unmeasured
                    measure(f"{k} {'hot' if hot else 'spread'}",
                            lambda: wrk_side_by_side(ports[:k], conns, args.secs, hot, run_id))
            if not args.no_baseline:
                measure("database spread", lambda: baseline(db, "spread", "optimistic", args.conns, args.secs))
                measure("database hot", lambda: baseline(db, "hot", "for-update", args.conns, args.secs))

        r = run([str(SERVICE_BIN), "audit"], env=env, timeout=600, check=False)
        audit = r.returncode
        log(f"balance-service audit: exit {audit}")
        load_after = loadavg()
        print()
        print("| configuration | load | req/s (median) | vs 1 instance | p50 ms | p99 ms | non-200 | "
              "CPU mariadbd | CPU instances | CPU Redis | CPU wrk | CPU other | machine busy | load average |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for load in ("spread", "hot"):
            one = results.get(f"{steps[0]} {load}")
            keys = [f"{k} {load}" for k in steps] + ([] if args.no_baseline else [f"database {load}"])
            for key in keys:
                rs = results[key]
                rps = med(r["rps"] for r in rs)
                ratio = f"{rps / med(r['rps'] for r in one):.2f}×" if one and not key.startswith("database") else "–"
                name = "database alone (baseline)" if key.startswith("database") else \
                    f"{key.split()[0]} instance{'s' if key.split()[0] != '1' else ''}"
                c = lambda f: f"{med(r['cpu'][f] for r in rs):.0f}%"  # noqa: E731
                print(f"| {name} | {load} | {rps:.0f} | {ratio} | {med(r['p50_ms'] for r in rs):.1f} | "
                      f"{med(r['p99_ms'] for r in rs):.1f} | {non200(rs)} | {c('mariadb')} | "
                      f"{c('instances') if not key.startswith('database') else '–'} | {c('redis')} | {c('client')} | "
                      f"{c('other')} | {c('machine')} | {', '.join(r['loadavg'][1].split()[0] for r in rs)} |")
        print()
        print(f"{args.rounds} rounds, {args.secs} s per run, {args.conns} connections in all; load average "
              f"{load_before} before, {load_after} after; audit exit {audit}; command: "
              f"{shlex.join(['python3', 'bench/instances.py', *(argv if argv is not None else sys.argv[1:])])}")
        print("wrk per instance: USERS=100 (or HOT_USER=1) " + shlex.join(wrk_cmd(0, 11, args.secs)).replace(
            str(ROOT) + "/", "").replace("127.0.0.1:0", "127.0.0.1:PORT").replace("-c11", "-cN"))
        (work / "results.json").write_text(json.dumps(
            {"results": results, "audit": audit, "loadavg": [load_before, load_after], "args": vars(args)}, indent=1))
        log(f"results in {work / 'results.json'}")
        return 0 if audit == 0 else 1
    finally:
        for s in services:
            s.stop()
        if not args.keep_db:
            try:
                sql(f"drop database if exists `{db}`", timeout=600)
            except Exception as e:  # noqa: BLE001 - report and go on tearing down
                log(f"could not drop {db}: {e}")
        drop_redis_prefix(prefix)
