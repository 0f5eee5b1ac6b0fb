"""5b. k6 payment-process.js at a third of its time scale (a tenth with --quick)."""

from __future__ import annotations

from lib.bench import Bench

NAME = "payment"


def run(bench: Bench) -> None:
    scale = "0.1" if bench.quick else "0.33"
    bench.measure("payment-process", "k6", "k6 payment-process.js",
                  lambda: bench.k6("payment-process.js", {"TIME_SCALE": scale}, 210 * float(scale) + 300))
