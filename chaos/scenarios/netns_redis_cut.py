"""One instance, in a network namespace of its own, cut off from Redis only (degrade)."""

from __future__ import annotations

import asyncio

from lib.common import HOST_IP
from lib.checks import lock_tries, metric
from lib.driver import Scenario, Spec


async def fault_netns_cut(sc: Scenario) -> None:
    assert sc.redis is not None
    ns = sc.suite.netns
    await sc.at(5)
    await asyncio.to_thread(ns.cut, sc.redis.port)
    sc.event(f"cut start: instance N cut off from Redis {HOST_IP}:{sc.redis.port} ({ns.cut_method}), database still reachable")
    await sc.at(17)
    await asyncio.to_thread(ns.restore, sc.redis.port)
    sc.event("cut end: Redis reachable again from the namespace")


def evidence_netns(sc: Scenario) -> None:
    start, end = sc.window("cut")
    n_ok = [t for t in lock_tries(sc) if t["inst"] == "N" and start + 1 <= t["t"] and t["t"] + t["dur"] < end
            and t["status"] == 200 and not t["replayed"]]
    n_503 = [t for t in lock_tries(sc) if t["inst"] == "N" and start + 1 <= t["t"] and t["t"] + t["dur"] < end
             and t["status"] == 503]
    deg = {i.name: metric(sc, "balance_lock_degraded_total", i.name) for i in sc.instances}
    una = {i.name: metric(sc, "balance_lock_unavailable_total", i.name) for i in sc.instances}
    others_ok = all(deg[i.name] == 0 and una[i.name] == 0 for i in sc.instances if i.name != "N")
    if sc.spec.mode == "degrade":
        ok = deg["N"] > 0 and len(n_ok) > 0 and others_ok
        what = f"instance N degraded ({len(n_ok)} fresh 200s while cut); degraded={deg}, unavailable={una}"
        sc.evidence.append(("only the cut-off instance lost Redis, and it kept applying changes", ok, what))
    else:
        ok = una["N"] > 0 and len(n_503) > 0 and not n_ok and others_ok
        what = (f"instance N: {len(n_503)} 503s and {len(n_ok)} fresh 200s while cut; "
                f"degraded={deg}, unavailable={una}")
        sc.evidence.append(("only the cut-off instance lost Redis, and it refused changes", ok, what))


SPEC = Spec("netns-redis-cut",
            "instance N in its own network namespace (veth 10.213.77.2/30) cut off from Redis only, 5-17 s, "
            "by a DROP rule in the namespace; A and B on 127.0.0.1 keep Redis; degrade",
            "N ran on the database guard alone (degraded > 0) while A and B kept the lock (degraded = 0)",
            fault_netns_cut, evidence_netns, host_instances=2, netns=True)
