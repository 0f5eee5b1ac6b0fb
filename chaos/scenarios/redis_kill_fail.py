"""SIGKILL of Redis under load with LOCK_ON_REDIS_DOWN=fail."""

from __future__ import annotations

from lib.checks import lock_tries, metric
from lib.driver import Scenario, Spec
from scenarios.redis_kill_degrade import fault_kill_redis


def evidence_redis_fail(sc: Scenario) -> None:
    start, end = sc.window("redis")
    inside = [t for t in lock_tries(sc) if start + 1 <= t["t"] and t["t"] + t["dur"] < end]
    unavailable = [t for t in inside if t["status"] == 503 and t["code"] == "SERVICE_UNAVAILABLE"]
    applied = [t for t in inside if t["status"] == 200 and not t["replayed"]]
    una = metric(sc, "balance_lock_unavailable_total")
    sc.evidence.append(("503 SERVICE_UNAVAILABLE while Redis was down (fail)", len(unavailable) > 0 and una > 0,
                        f"{len(unavailable)} of {len(inside)} tries; balance_lock_unavailable_total={una:g}"))
    sc.evidence.append(("no balance change applied without the lock (fail)", not applied,
                        f"{len(applied)} fresh 200s sent and answered inside the outage"
                        + (": " + ", ".join(t["key"] for t in applied[:5]) if applied else "")))


SPEC = Spec("redis-kill-fail",
            "SIGKILL of redis-server at 5 s, restarted empty at 13 s; LOCK_ON_REDIS_DOWN=fail",
            "503 SERVICE_UNAVAILABLE during the outage and no change applied without the lock; all completed after",
            lambda sc: fault_kill_redis(sc, (5, 13)), evidence_redis_fail, mode="fail")
