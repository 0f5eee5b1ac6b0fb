"""2. Spread: 32 connections over 100 users, `baseline --mode spread` against `wrk -c32`,
interleaved; then the variants that measure, on the database alone, what the service adds
or could add per charge."""

from __future__ import annotations

from lib.bench import Bench
from lib.service import service_pool_size

NAME = "spread"


def run(bench: Bench) -> None:
    c, secs = bench.connections, bench.secs
    bench.interleaved(
        "spread",
        lambda: bench.baseline("spread", "optimistic", c, secs),
        lambda: bench.wrk(c, secs, hot=False),
        bench.rounds,
    )
    # What the service adds to the database's work per charge, measured alone.
    bench.measure("spread", "variant", "baseline + key lookup",
                  lambda: bench.baseline("spread", "optimistic", c, secs, ["--key-lookup"]))
    bench.measure("spread", "variant", "baseline with a ping per acquire",
                  lambda: bench.baseline("spread", "optimistic", c, secs, ["--ping"]))
    pool = bench.args.db_max_connections or service_pool_size()
    if pool != c:
        bench.measure("spread", "variant", f"baseline at {pool} connections (the service's pool)",
                      lambda: bench.baseline("spread", "optimistic", pool, secs))
