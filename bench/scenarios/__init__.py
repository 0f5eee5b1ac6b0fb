"""The scenarios of `just bench`, one module each, in the order they run.

Each module has `NAME` (what `--only` selects) and `run(bench)`, which measures its runs
through the `lib.bench.Bench` it is given; the report (lib/report.py) reads them back by
their scenario names. Add one by adding a module and its name here.

The scaling benchmarks (`galera`, `redis_cluster`, `instances`) are modules here too, but
each starts servers of its own and prints its own table: they run through their own
entry points (bench/galera.py, bench/redis_cluster.py, bench/instances.py), not in
`just bench`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

MODULES = ["idle", "spread", "hot", "balance_charge", "k6_hot_user", "payment_process", "mixed", "coupon_rush"]


def all_scenarios() -> list[ModuleType]:
    return [importlib.import_module(f"scenarios.{m}") for m in MODULES]
