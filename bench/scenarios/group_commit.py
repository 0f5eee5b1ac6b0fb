"""Group commit side by side (`just bench-group-commit`): the same service binary with
`GROUP_COMMIT=false`, `true` (a queue per user, the default) and `true` with
`GROUP_COMMIT_ACROSS_USERS=true`, against the database alone, on one MariaDB and one Redis.

For each load (spread: 32 connections over users 1..100; hot: 32 connections on user 1) and
each round: the database baseline (spread: optimistic; hot: `SELECT … FOR UPDATE`), then the
service in each mode, started fresh, 2 s of unmeasured warm-up, then `--secs` measured with
wrk (bench/wrk/charge.lua). Prints a markdown table of the medians, the ratio to the database
of the same round and the mean requests per batch (`balance_batch_size`), and audits the books
at the end (`balance-service audit`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from lib.common import (BASELINE_BIN, REDIS_URL, SEED_BALANCE, SERVICE_BIN, USERS, db_url, drop_redis_prefix,
                        ensure_tools, free_port, log, run, sql)
from lib.scaling import clean_env, non200, wrk_side_by_side
from lib.service import Service

WARMUP_S = 2
MODES = {
    "off": {"GROUP_COMMIT": "false"},
    "per user": {"GROUP_COMMIT": "true", "GROUP_COMMIT_ACROSS_USERS": "false"},
    "across users": {"GROUP_COMMIT": "true", "GROUP_COMMIT_ACROSS_USERS": "true"},
}


def baseline(db: str, hot: bool, conns: int, secs: int) -> float:
    cmd = [str(BASELINE_BIN), "--database-url", db_url(db), "--mode", "hot" if hot else "spread",
           "--lock", "for-update" if hot else "optimistic", "--connections", str(conns),
           "--duration", str(secs), "--warmup", str(WARMUP_S), "--users", str(USERS), "--json"]
    res = run(cmd, timeout=secs + WARMUP_S + 120)
    return float(json.loads(res.stdout.strip().splitlines()[-1])["throughput_tps"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--secs", type=int, default=10, help="seconds per measured run (default 10)")
    p.add_argument("--conns", type=int, default=32, help="connections (default 32)")
    args = p.parse_args(argv)
    ensure_tools(k6=False)
    for b in (SERVICE_BIN, BASELINE_BIN):
        if not b.exists():
            print(f"no {b}: cargo build --release -p app -p bench", file=sys.stderr)
            return 2
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d_%H%M%S")
    db, prefix = f"bench_gc_{stamp}", f"bench-gc:{stamp}:{os.getpid()}:"
    work = Path(tempfile.mkdtemp(prefix="bench-gc-"))
    sql(f"create database `{db}`")
    rows: dict[tuple[str, str], list[tuple[float, float, float | None]]] = {}
    try:
        env = clean_env({"DATABASE_URL": db_url(db), "REDIS_URL": REDIS_URL, "REDIS_KEY_PREFIX": prefix,
                         "RUST_LOG": "warn", "LOG_FORMAT": "json", "MIGRATE_ON_START": "false", "SEED_USERS": "0",
                         "AUDIT_INTERVAL_SECS": "0"})
        run([str(SERVICE_BIN), "migrate"], env=env, timeout=300)
        run([str(SERVICE_BIN), "seed", "--users", str(USERS), "--balance", str(SEED_BALANCE)], env=env, timeout=300)
        for rnd in range(args.rounds):
            for load, hot in (("spread", False), ("hot", True)):
                base = baseline(db, hot, args.conns, args.secs)
                log(f"round {rnd + 1} {load}: database {base:.0f}/s")
                rows.setdefault((load, "database"), []).append((base, 1.0, None))
                for mode, extra in MODES.items():
                    port = free_port()
                    svc = Service(dict(env, BIND_ADDR=f"127.0.0.1:{port}", **extra), work / f"{load}-{mode}.log")
                    svc.start()
                    try:
                        run_id = f"gc{rnd}{load[0]}{mode[0]}"
                        wrk_side_by_side([port], [args.conns], WARMUP_S, hot, run_id + "w")
                        before = svc.metrics()
                        r = wrk_side_by_side([port], [args.conns], args.secs, hot, run_id)
                        after = svc.metrics()
                    finally:
                        svc.stop()
                    n = after.get("balance_batch_size_count", 0) - before.get("balance_batch_size_count", 0)
                    size = (after.get("balance_batch_size_sum", 0) - before.get("balance_batch_size_sum", 0)) / n \
                        if n else None
                    bad = non200([r])
                    log(f"round {rnd + 1} {load} {mode}: {r['rps']:.0f}/s p99 {r['p99_ms']:.1f} ms, "
                        f"batch {size if size is None else round(size, 1)}, non-200 {bad}")
                    rows.setdefault((load, mode), []).append((r["rps"], r["rps"] / base, size))
        audit = run([str(SERVICE_BIN), "audit"], env=env, timeout=600, check=False)
        print(f"\naudit: exit {audit.returncode}: {audit.stdout.strip().splitlines()[-1] if audit.stdout else ''}\n")
        print(f"{args.rounds} rounds of {args.secs} s, {args.conns} connections; medians\n")
        print("| load | mode | charges/s | / database (same round) | requests per batch |")
        print("|---|---|---:|---:|---:|")
        for (load, mode), runs in rows.items():
            sizes = [s for _, _, s in runs if s is not None]
            size = f"{statistics.median(sizes):.1f}" if sizes else "–"
            rps = statistics.median(x for x, _, _ in runs)
            ratio = 100 * statistics.median(r for _, r, _ in runs)
            print(f"| {load} | {mode} | {rps:,.0f} | {ratio:.0f}% | {size} |")
        return 0
    finally:
        try:
            sql(f"drop database if exists `{db}`", timeout=600)
        except Exception as e:  # noqa: BLE001
            log(f"could not drop {db}: {e}")
        drop_redis_prefix(prefix)
