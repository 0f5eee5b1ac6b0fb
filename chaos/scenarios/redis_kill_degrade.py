"""SIGKILL of Redis under load with LOCK_ON_REDIS_DOWN=degrade."""

from __future__ import annotations

import asyncio

from lib.checks import lock_tries, metric
from lib.driver import Scenario, Spec


async def fault_kill_redis(sc: Scenario, down: tuple[float, float]) -> None:
    assert sc.redis is not None
    await sc.at(down[0])
    t = sc.now()
    rc = await asyncio.to_thread(sc.redis.kill9)
    sc.event(f"redis start: SIGKILL redis-server, exit {rc}", t)
    await sc.at(down[1])
    await asyncio.to_thread(sc.redis.start)
    sc.event("redis end: redis-server restarted on the same port (empty)")


def evidence_redis_degrade(sc: Scenario) -> None:
    start, end = sc.window("redis")
    fresh = [t for t in lock_tries(sc) if start + 1 <= t["t"] and t["t"] + t["dur"] < end
             and t["status"] == 200 and not t["replayed"]]
    deg = metric(sc, "balance_lock_degraded_total")
    sc.evidence.append(("balance changes kept going while Redis was down (degrade)", len(fresh) > 0 and deg > 0,
                        f"{len(fresh)} fresh 200s inside the outage; balance_lock_degraded_total={deg:g}"))


SPEC = Spec("redis-kill-degrade",
            "SIGKILL of redis-server at 5 s, restarted empty at 15 s; LOCK_ON_REDIS_DOWN=degrade",
            "balance changes kept being applied during the outage (database guard alone)",
            lambda sc: fault_kill_redis(sc, (5, 15)), evidence_redis_degrade)
