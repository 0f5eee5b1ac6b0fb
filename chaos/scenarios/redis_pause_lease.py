"""Leases expiring while their holders' transactions still run (Redis paused, rows held)."""

from __future__ import annotations

import asyncio
import signal

from lib.checks import lock_tries, metric
from lib.driver import Scenario, Spec


async def fault_pause_redis(sc: Scenario) -> None:
    """Transactions of users 1-2 are held on their row locks (a separate connection has
    them FOR UPDATE) while Redis is stopped past the lease: their leases expire in Redis
    while their transactions still run, and other instances take the same users' locks."""
    assert sc.redis is not None
    db = sc.suite.db
    await sc.at(5)
    holder = await asyncio.create_subprocess_exec(
        *db.client(sc.dbname), "-e",
        "start transaction; select id from users where id in (1,2) for update; select sleep(5.2); commit;",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    sc.event("rowlock start: users 1-2 locked FOR UPDATE by a separate connection for 5.2 s")
    await sc.at(5.5)
    sc.redis.signal(signal.SIGSTOP)
    sc.event(f"pause start: SIGSTOP redis-server for 3.5 s (lease {sc.spec.lock_lease_ms} ms)")
    await sc.at(9.0)
    sc.redis.signal(signal.SIGCONT)
    sc.event("pause end: SIGCONT redis-server")
    await holder.wait()
    sc.event(f"rowlock end: row locks released (exit {holder.returncode})")


def evidence_pause(sc: Scenario) -> None:
    lost = metric(sc, "balance_lock_lease_lost_total")
    errs = metric(sc, "balance_lock_redis_errors_total")
    start, end = sc.window("rowlock")
    p0, p1 = sc.window("pause")
    held = [t for t in lock_tries(sc) if t["user"] <= 2 and t["t"] < p0 and t["t"] + t["dur"] > p1
            and t["status"] == 200]
    deg = metric(sc, "balance_lock_degraded_total")
    sc.evidence.append(("a lease expired while its holder's transaction was still running",
                        lost > 0 and len(held) > 0,
                        f"balance_lock_lease_lost_total={lost:g}; {len(held)} changes of users 1-2 began before "
                        f"the pause and committed after it"))
    sc.evidence.append(("requests met the paused Redis (degraded, database guard alone)", deg > 0,
                        f"balance_lock_degraded_total={deg:g}; redis errors={errs:g}; "
                        f"optimistic conflicts={metric(sc, 'balance_optimistic_conflicts_total'):g}"))


SPEC = Spec("redis-pause-lease",
            "users 1-2 held FOR UPDATE by another connection 5-10.2 s; SIGSTOP of redis-server 5.5-9 s "
            "(lease 2000 ms, wait 5000 ms)",
            "leases expired while their holders' transactions ran (balance_lock_lease_lost_total > 0)",
            fault_pause_redis, evidence_pause, duration=22, lock_wait_ms=5000, lock_lease_ms=2000)
