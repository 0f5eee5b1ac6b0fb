"""The database stalled by FLUSH TABLES WITH READ LOCK past the lock's lease."""

from __future__ import annotations

import asyncio
import time

from lib.common import sh
from lib.checks import all_tries, metric
from lib.driver import Scenario, Spec


async def fault_db_stall(sc: Scenario) -> None:
    db = sc.suite.db
    await sc.at(5)
    started = time.monotonic()
    sc.event("stall start: FLUSH TABLES WITH READ LOCK held for 5 s by a separate connection")
    r = await asyncio.to_thread(sh, db.client() + ["-e", "flush tables with read lock; select sleep(5); unlock tables;"],
                                False, 120)
    sc.event(f"stall end: UNLOCK TABLES after {time.monotonic() - started:.1f} s (exit {r.returncode})")


def evidence_stall(sc: Scenario) -> None:
    start, end = sc.window("stall")
    lease = sc.spec.lock_lease_ms / 1000
    slow = [t for t in all_tries(sc) if t["t"] <= start + 0.5 and t["t"] + t["dur"] >= end - 0.5
            and t["dur"] > lease]
    lost = metric(sc, "balance_lock_lease_lost_total")
    sc.evidence.append((f"requests outlived the lease ({sc.spec.lock_lease_ms} ms) during the stall",
                        len(slow) > 0 and lost > 0,
                        f"{len(slow)} tries spanned the stall; balance_lock_lease_lost_total={lost:g}; "
                        f"optimistic conflicts={metric(sc, 'balance_optimistic_conflicts_total'):g}"))


SPEC = Spec("db-stall-ftwrl",
            "FLUSH TABLES WITH READ LOCK held 5 s by another connection at 5 s (lease 2000 ms, wait 5000 ms)",
            "requests outlived the lease, leases were lost and the version guard held",
            fault_db_stall, evidence_stall, duration=22, lock_wait_ms=5000, lock_lease_ms=2000)
