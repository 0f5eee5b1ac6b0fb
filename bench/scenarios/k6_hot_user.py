"""5a. k6 hot-user.js: 32 VUs on user 1."""

from __future__ import annotations

from lib.bench import Bench

NAME = "k6-hot"


def run(bench: Bench) -> None:
    d = "10s" if bench.quick else "30s"
    bench.measure("k6-hot-user", "k6", "k6 hot-user.js",
                  lambda: bench.k6("hot-user.js", {"VUS": "32", "DURATION": d, "HOT_USER": "1"}, 300))
