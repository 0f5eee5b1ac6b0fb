"""SIGKILL of the suite's MariaDB under load, restarted on its datadir."""

from __future__ import annotations

import asyncio

from lib.checks import all_tries
from lib.driver import Scenario, Spec


async def fault_kill_mariadb(sc: Scenario) -> None:
    db = sc.suite.db
    await sc.at(6)
    t = sc.now()
    rc = await asyncio.to_thread(db.kill9)
    sc.event(f"mariadb start: SIGKILL mariadbd, exit {rc}", t)
    await sc.at(10)
    await asyncio.to_thread(db.start)
    sc.event("mariadb end: mariadbd restarted on the same datadir (crash recovery done)")
    sc.db_exit = rc


def evidence_kill_mariadb(sc: Scenario) -> None:
    start, end = sc.window("mariadb")
    # Judged by when a try was *answered*: a request sent during the outage waits for a
    # connection (the pool's acquire timeout, 3 s) and may well be served once mariadbd is
    # back, while the 503s are the answers that came during the outage, whenever their
    # requests were sent. (Counting by send time made the check depend on how the
    # clients' requests happened to line up with the kill.)
    answered = [t for t in all_tries(sc) if start <= t["t"] + t["dur"] <= end + 1.0]
    bad = [t for t in answered if t["status"] == 503 or t["err"]]
    after = [t for t in all_tries(sc) if t["t"] > end + 5 and t["status"] == 200]
    sc.evidence.append(("mariadbd killed by SIGKILL", getattr(sc, "db_exit", None) == -9, f"exit {getattr(sc, 'db_exit', None)}"))
    sc.evidence.append(("503s while the database was down, 200s after",
                        bool(bad) and bool(after),
                        f"{len(bad)} of {len(answered)} tries answered during the outage failed; {len(after)} 200s later"))


SPEC = Spec("mariadb-kill",
            "SIGKILL of mariadbd at 6 s, restarted on the same datadir at 10 s (InnoDB crash recovery)",
            "503s during the outage, 200s after; the pools reconnected",
            fault_kill_mariadb, evidence_kill_mariadb, duration=26)
