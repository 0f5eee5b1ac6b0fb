"""5c. k6 mixed.js at half its time scale (a tenth with --quick)."""

from __future__ import annotations

from lib.bench import Bench

NAME = "mixed"


def run(bench: Bench) -> None:
    scale = "0.1" if bench.quick else "0.5"
    bench.measure("mixed", "k6", "k6 mixed.js",
                  lambda: bench.k6("mixed.js", {"TIME_SCALE": scale}, 120 * float(scale) + 300))
