"""3. Hot user: 32 connections on user 1, `baseline --mode hot --lock for-update` against
`wrk -c32 HOT_USER=1`, interleaved; then the optimistic collapse (the version guard alone,
no lock) the Redis lock avoids."""

from __future__ import annotations

from lib.bench import Bench

NAME = "hot"


def run(bench: Bench) -> None:
    c, secs = bench.connections, bench.secs
    bench.interleaved(
        "hot",
        lambda: bench.baseline("hot", "for-update", c, secs),
        lambda: bench.wrk(c, secs, hot=True),
        bench.rounds,
    )
    bench.measure("hot", "variant", "baseline optimistic, 32 connections",
                  lambda: bench.baseline("hot", "optimistic", c, secs))
    bench.measure("hot", "variant", "baseline optimistic, 128 connections",
                  lambda: bench.baseline("hot", "optimistic", 128, secs))
