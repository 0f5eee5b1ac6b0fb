"""SIGKILL of a Redis Cluster primary under load with LOCK_ON_REDIS_DOWN=degrade.

The lock runs on a 6-node cluster (scripts/redis-cluster.sh: 3 primaries, 3 replicas,
`cluster-node-timeout` 1 s). The primary killed is the one holding the lock keys of most of
the load's users; its replica takes over without whatever had not replicated yet, so a lock
held at the kill can be held twice for a moment. The version guard must keep every balance
exact all the same: the suite's common checks (audit clean, every acknowledged operation
applied once, balances = acknowledged effects) are the point of the scenario.
"""

from __future__ import annotations

import asyncio
import collections

from lib.checks import lock_tries, metric
from lib.common import USERS
from lib.driver import Scenario, Spec

KILL_AT = 6
# How long the failover may take before the scenario says it did not happen.
FAILOVER_TIMEOUT = 20


def lock_key(sc: Scenario, user: int) -> str:
    """The user's lock key on a cluster (redis-lock's KeyLayout): `{prefix}{balance:user:N}`."""
    return f"{sc.env['REDIS_KEY_PREFIX']}{{balance:user:{user}}}"


async def fault_kill_primary(sc: Scenario) -> None:
    cluster = sc.cluster
    assert cluster is not None
    owners = collections.Counter()
    users_of: dict[int, list[int]] = collections.defaultdict(list)
    for user in range(1, USERS + 1):
        port = await asyncio.to_thread(cluster.primary_of, await asyncio.to_thread(cluster.keyslot, lock_key(sc, user)))
        owners[port] += 1
        users_of[port].append(user)
    primary, _ = owners.most_common(1)[0]
    replica = await asyncio.to_thread(cluster.replica_of, primary)
    sc.cluster_fault = {"primary": primary, "replica": replica, "users": users_of[primary]}
    await sc.at(KILL_AT)
    t = sc.now()
    await asyncio.to_thread(cluster.kill9, primary)
    sc.event(f"primary start: SIGKILL of the primary on {primary} (the lock keys of users {users_of[primary]}); "
             f"its replica is on {replica}", t)
    end = t + FAILOVER_TIMEOUT
    while sc.now() < end:
        if await asyncio.to_thread(cluster.promoted, primary, replica):
            sc.cluster_fault["promoted_after"] = round(sc.now() - t, 2)
            sc.event(f"primary end: the replica on {replica} is a primary, cluster_state ok, "
                     f"{sc.now() - t:.1f} s after the kill (the killed node stays down)")
            return
        await asyncio.sleep(0.1)
    sc.event(f"primary end: no promotion of {replica} within {FAILOVER_TIMEOUT} s")


def evidence_failover(sc: Scenario) -> tuple[float, float]:
    """The kill and the promotion happened; returns the kill's and the promotion's load time."""
    f = getattr(sc, "cluster_fault", {})
    start, end = sc.window("primary")
    promoted = f.get("promoted_after")
    sc.evidence.append((
        "a Redis Cluster primary killed by SIGKILL and its replica promoted", promoted is not None,
        f"primary on {f.get('primary')} (lock keys of users {f.get('users')}) killed at {start:.1f} s; the "
        f"replica on {f.get('replica')} promoted after {promoted} s; balance_lock_lease_lost_total="
        f"{metric(sc, 'balance_lock_lease_lost_total'):g}, balance_lock_redis_errors_total="
        f"{metric(sc, 'balance_lock_redis_errors_total'):g}, optimistic conflicts="
        f"{metric(sc, 'balance_optimistic_conflicts_total'):g}"))
    after = [t for t in lock_tries(sc) if t["t"] > end + 2 and t["status"] == 200 and not t["replayed"]]
    sc.evidence.append(("balance changes applied again after the failover", bool(after),
                        f"{len(after)} fresh 200s from 2 s after the promotion on"))
    return start, end


def evidence_degrade(sc: Scenario) -> None:
    start, _ = evidence_failover(sc)
    fresh = [t for t in lock_tries(sc) if t["t"] >= start and t["status"] == 200 and not t["replayed"]]
    deg = metric(sc, "balance_lock_degraded_total")
    sc.evidence.append(("balance changes ran under the database guards alone while the lock was unreachable "
                        "(degrade)", deg > 0,
                        f"balance_lock_degraded_total={deg:g}; {len(fresh)} fresh 200s from the kill on"))


SPEC = Spec("redis-cluster-kill-degrade",
            f"lock on a 6-node Redis Cluster: SIGKILL of the primary holding most users' lock keys at {KILL_AT} s, "
            "its replica promoted (node timeout 1 s), the node left down; LOCK_ON_REDIS_DOWN=degrade",
            "the replica promoted; changes ran under the database guards during the failover "
            "(balance_lock_degraded_total > 0) and through the lock again after it",
            fault_kill_primary, evidence_degrade, redis_cluster=True)
