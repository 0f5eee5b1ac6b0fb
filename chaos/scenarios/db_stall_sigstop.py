"""The database stalled by SIGSTOP past the lock's lease."""

from __future__ import annotations

import signal

from lib.driver import Scenario, Spec
from scenarios.db_stall_ftwrl import evidence_stall


async def fault_db_sigstop(sc: Scenario) -> None:
    db = sc.suite.db
    await sc.at(5)
    db.signal(signal.SIGSTOP)
    sc.event("stall start: SIGSTOP mariadbd for 5 s")
    await sc.at(10)
    db.signal(signal.SIGCONT)
    sc.event("stall end: SIGCONT mariadbd")


SPEC = Spec("db-stall-sigstop",
            "SIGSTOP of mariadbd 5-10 s (lease 2000 ms, wait 5000 ms)",
            "requests outlived the lease, leases were lost and the version guard held",
            fault_db_sigstop, evidence_stall, duration=22, lock_wait_ms=5000, lock_lease_ms=2000)
