"""4. k6 balance-charge.js, the original's full profile (6.5 min, up to 1000 VUs; a tenth
of it with --quick)."""

from __future__ import annotations

from lib.bench import Bench

NAME = "charge"


def run(bench: Bench) -> None:
    scale = "0.1" if bench.quick else "1"
    bench.measure("balance-charge", "k6", "k6 balance-charge.js",
                  lambda: bench.k6("balance-charge.js", {"TIME_SCALE": scale}, 390 * float(scale) + 300))
