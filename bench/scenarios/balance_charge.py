"""4. k6 balance-charge.js, the original's full profile (6.5 min, up to 1000 VUs; a tenth
of it with --quick), against the service; then the same profile, as long, against the
trivial server (lib/trivial.py): the load client's floor of the same run."""

from __future__ import annotations

from lib.bench import Bench
from lib.trivial import floor

NAME = "charge"
SCRIPT = "balance-charge.js"


def run(bench: Bench) -> None:
    scale = "0.1" if bench.quick else "1"
    timeout = 390 * float(scale) + 300
    bench.measure("balance-charge", "k6", "k6 balance-charge.js",
                  lambda: bench.k6(SCRIPT, {"TIME_SCALE": scale}, timeout))
    floor(bench, "balance-charge-floor", "k6 balance-charge.js against the trivial server", SCRIPT,
          {"TIME_SCALE": scale}, timeout)
