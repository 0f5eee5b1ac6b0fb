"""1. One charge at a time: `baseline --mode idle` against `wrk -c1`, interleaved."""

from __future__ import annotations

from lib.bench import Bench

NAME = "idle"


def run(bench: Bench) -> None:
    secs = bench.idle_secs
    bench.interleaved(
        "idle",
        lambda: bench.baseline("idle", "optimistic", 1, secs),
        lambda: bench.wrk(1, secs, hot=False),
        bench.rounds,
    )
