"""SIGKILL of a Redis Cluster primary under load with LOCK_ON_REDIS_DOWN=fail."""

from __future__ import annotations

from lib.checks import lock_tries, metric
from lib.driver import Scenario, Spec
from scenarios.redis_cluster_kill_degrade import KILL_AT, evidence_failover, fault_kill_primary


def evidence_fail(sc: Scenario) -> None:
    start, _ = evidence_failover(sc)
    refused = [t for t in lock_tries(sc) if t["t"] >= start and t["status"] == 503
               and t["code"] == "SERVICE_UNAVAILABLE"]
    una = metric(sc, "balance_lock_unavailable_total")
    deg = metric(sc, "balance_lock_degraded_total")
    sc.evidence.append(("503 SERVICE_UNAVAILABLE while the lock was unreachable (fail)", bool(refused) and una > 0,
                        f"{len(refused)} tries refused from the kill on; balance_lock_unavailable_total={una:g}"))
    sc.evidence.append(("no balance change ran without the lock (fail)", deg == 0,
                        f"balance_lock_degraded_total={deg:g}"))


SPEC = Spec("redis-cluster-kill-fail",
            f"lock on a 6-node Redis Cluster: SIGKILL of the primary holding most users' lock keys at {KILL_AT} s, "
            "its replica promoted (node timeout 1 s), the node left down; LOCK_ON_REDIS_DOWN=fail",
            "the replica promoted; 503 SERVICE_UNAVAILABLE during the failover and no change without the lock "
            "(balance_lock_degraded_total = 0); changes through the lock again after it",
            fault_kill_primary, evidence_fail, mode="fail", redis_cluster=True)
