"""6. The coupon rush (issue #13): k6 coupon-rush.js, 1,000 users at the same instant on one
coupon of 100, each retrying its own key until 200 or 422, against `coupon-baseline` (the
same write, the user coupon and the guarded count, on the database alone with every
connection on one coupon), interleaved B S B S B; after each rush, the same 1,000 users
again with fresh keys on the sold-out coupon (MODE=late ONLY_ISSUE=1: nothing but issue
requests) with MariaDB's statement counters read just before and just after, and over an
idle window as long, for the noise. The target: refusals after the sell-out do not move
the counter (the admission gate answers them).

The counters are the server's global ones (`show global status`: this MariaDB has no
performance_schema to count one database's statements), so anything else the server runs
in those seconds counts too: the idle window beside each reading shows how much that was.
Each reading itself is one statement (`show global status`), subtracted.

    python3 bench/run.py --only coupon-rush            # alone (with --quick: one round)
"""

from __future__ import annotations

import time

from lib.bench import Bench
from lib.common import SEED_BALANCE, SERVICE_BIN, log, sql
from lib.common import run as run_cmd
from lib.service import service_pool_size

NAME = "coupon-rush"
RUSH_USERS = 1000
STOCK = 100
STATUS = ("Questions", "Com_stmt_execute", "Com_select", "Com_insert", "Com_update", "Com_commit", "Com_rollback",
          "Com_begin")


def statements() -> dict[str, int]:
    """The server's statement counters now (one `show global status`, itself a Question)."""
    names = ", ".join(f"'{n}'" for n in STATUS)
    out = sql(f"show global status where Variable_name in ({names})")
    got = {name: int(value) for name, value in (line.split("\t") for line in out.splitlines())}
    return {n: got.get(n, 0) for n in STATUS}


def minus(after: dict[str, int], before: dict[str, int], overhead: dict[str, int]) -> dict[str, int]:
    return {n: after[n] - before[n] - overhead.get(n, 0) for n in STATUS}


def calibrate() -> dict[str, int]:
    """What one reading adds to the counters (the smallest of three back-to-back pairs)."""
    pairs = []
    for _ in range(3):
        a = statements()
        b = statements()
        pairs.append({n: b[n] - a[n] for n in STATUS})
    return min(pairs, key=lambda d: d["Questions"])


def rush_env() -> dict:
    return {"VUS": str(RUSH_USERS), "STOCK": str(STOCK), "K6_NO_USAGE_REPORT": "true"}


def late(bench: Bench, coupon: int, overhead: dict[str, int]) -> dict:
    """The refusals after the sell-out, the statement counters read around them, then an
    idle window of the same length (what the server did without them)."""
    env = dict(rush_env(), MODE="late", COUPON_ID=str(coupon), ONLY_ISSUE="1")
    s0, t0 = statements(), time.time()
    report = bench.k6("coupon-rush.js", env, 600)
    s1, t1 = statements(), time.time()
    report["command"] = report["command"].replace(f"COUPON_ID={coupon}", "COUPON_ID=<the rush's coupon>")
    time.sleep(max(0.0, t1 - t0))
    s2 = statements()
    report["statements"] = minus(s1, s0, overhead)
    report["idle_statements"] = minus(s2, s1, overhead)
    report["statements_window_s"] = round(t1 - t0, 2)
    return report


def run(bench: Bench) -> None:
    env = bench.service_env()
    res = run_seed(env)
    log(f"coupon-rush: {res}")
    overhead = calibrate()
    log(f"coupon-rush: one reading of the statement counters adds {overhead}")
    c, secs = bench.connections, bench.secs
    users = str(RUSH_USERS)

    def baseline():
        return bench.coupon_baseline(c, secs, RUSH_USERS)

    for i in range(bench.rounds):
        bench.measure("coupon-rush", "baseline", f"coupon baseline #{i + 1}", baseline)
        rush = bench.measure("coupon-rush", "k6", f"k6 coupon-rush.js #{i + 1}",
                             lambda: bench.k6("coupon-rush.js", rush_env(), 600))
        coupon = rush["result"].get("values", {}).get("rush_coupon_id")
        if isinstance(coupon, (int, float)) and coupon > 0:
            bench.measure("coupon-rush", "late", f"refusals after the sell-out #{i + 1}",
                          lambda: late(bench, int(coupon), overhead))
        else:
            log("coupon-rush: the rush reported no coupon id; no sold-out phase this round")
    bench.measure("coupon-rush", "baseline", f"coupon baseline #{bench.rounds + 1}", baseline)

    # What else the write could be, on the database alone.
    pool = bench.args.db_max_connections or service_pool_size()
    if pool != c:
        bench.measure("coupon-rush", "variant", f"coupon baseline at {pool} connections (the service's pool)",
                      lambda: bench.coupon_baseline(pool, secs, RUSH_USERS))
    bench.measure("coupon-rush", "variant", "coupon baseline, the count first (row lock held over the insert)",
                  lambda: bench.coupon_baseline(c, secs, RUSH_USERS, ["--order", "count-first"]))
    bench.measure("coupon-rush", "variant", "coupon baseline, the service's whole step (user version, key record)",
                  lambda: bench.coupon_baseline(c, secs, RUSH_USERS, ["--step", "service"]))
    # A rush on the database alone, no gate: each coupon of 100 asked by 1,000 users, so 9 in
    # 10 issues are sold-out refusals the database answers (BEGIN, an update that matches
    # nothing, ROLLBACK).
    bench.measure("coupon-rush", "variant", f"coupon baseline, no gate: stock {STOCK} for {users} users",
                  lambda: bench.coupon_baseline(c, secs, RUSH_USERS, ["--stock", str(STOCK)]))


def run_seed(env: dict) -> str:
    """Users 1..1000 (the bench seeded 1..100): each rush VU is a user of its own."""
    res = run_cmd([str(SERVICE_BIN), "seed", "--users", str(RUSH_USERS), "--balance", str(SEED_BALANCE)], env=env,
              timeout=300)
    return (res.stdout or "").strip()
