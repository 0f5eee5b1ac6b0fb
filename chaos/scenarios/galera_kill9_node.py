"""SIGKILL of one Galera node under load: its instance goes unready and answers 503, the
clients go on through the instances on the other nodes, and the node rejoins by IST."""

from __future__ import annotations

import asyncio
import time

from lib.checks import all_tries
from lib.driver import Scenario, Spec

KILL_AT, RESTART_AT = 6, 14


async def probe_ready(sc: Scenario, inst_index: int, until: float) -> list[str]:
    """The instance's /health/ready answers, one after another, until load time `until`."""
    inst = sc.instances[inst_index]
    seen = []
    while sc.now() < until:
        res = await sc.http.request(inst.host, inst.port, "GET", "/health/ready", timeout=6)
        seen.append(str(res["status"] or res["err"]))
        await asyncio.sleep(0.5)
    return seen


async def fault_kill_node(sc: Scenario) -> None:
    assert sc.suite.galera is not None
    node = sc.suite.galera.nodes[2]
    await sc.at(KILL_AT)
    t = sc.now()
    pid = node.pid
    rc = await asyncio.to_thread(node.kill9)
    sc.event(f"node start: SIGKILL mariadbd of galera {node.name} (pid {pid}, instance C's node), exit {rc}", t)
    sc.node_exit = rc
    sc.ready_during = await probe_ready(sc, 2, RESTART_AT)
    sc.event(f"instance C /health/ready while its node was down: {sc.ready_during}")
    await sc.at(RESTART_AT)
    started = time.monotonic()
    sc.event(f"down end: restarting galera {node.name}")
    position = await asyncio.to_thread(node.restart)
    sc.event(f"node3 recovered its position {position} from InnoDB (mariadbd --wsrep-recover) and started")
    await asyncio.to_thread(node.wait_synced, 180, len(sc.suite.galera.nodes))
    sc.joined_by = node.joined_by()
    sc.event(f"node end: galera {node.name} Synced in a cluster of 3, {time.monotonic() - started:.1f} s after "
             f"the restart began (state transfer: {sc.joined_by})")


def evidence_kill_node(sc: Scenario) -> None:
    start, end = sc.window("node")
    # While the node was down: from the kill to the restart (once it runs again, C may
    # serve before the rejoin is noticed here).
    down_end = next((t for t, e in sc.events if e.startswith("down end")), end)
    tries = all_tries(sc)
    on_c = [t for t in tries if t["inst"] == "C" and start + 0.5 <= t["t"] and t["t"] + t["dur"] < down_end]
    c_503 = [t for t in on_c if t["status"] == 503]
    c_ok = [t for t in on_c if t["status"] == 200 and not t["replayed"]]
    others_ok = [t for t in tries if t["inst"] != "C" and start <= t["t"] < down_end and t["status"] == 200
                 and not t["replayed"]]
    moved = [op for op in sc.ops if op.final and op.final["status"] == 200 and op.final["inst"] != "C"
             and any(t["inst"] == "C" and (t["status"] == 503 or t["err"]) for t in op.tries)]
    after = [t for t in tries if t["inst"] == "C" and t["t"] > end and t["status"] == 200]
    ready = getattr(sc, "ready_during", [])
    sc.evidence.append(("galera node3 killed by SIGKILL", getattr(sc, "node_exit", None) == -9,
                        f"exit {getattr(sc, 'node_exit', None)}"))
    sc.evidence.append(("instance C unready while its node was down", "503" in ready,
                        f"/health/ready answers {ready}"))
    sc.evidence.append(("instance C answered 503 (no change applied) while its node was down",
                        bool(c_503) and not c_ok,
                        f"{len(c_503)} 503s and {len(c_ok)} fresh 200s of {len(on_c)} tries on C"))
    sc.evidence.append(("clients moved to A and B, which kept applying changes",
                        bool(others_ok) and bool(moved),
                        f"{len(others_ok)} fresh 200s on A and B during the outage; {len(moved)} operations "
                        "refused by C ended 200 through A or B"))
    sc.evidence.append(("node3 rejoined by IST and C served again", getattr(sc, "joined_by", "?").startswith("IST")
                        and bool(after),
                        f"state transfer {getattr(sc, 'joined_by', '?')}; {len(after)} 200s on C after the rejoin"))


SPEC = Spec("galera-kill9-node",
            f"Galera, one instance per node (A, B, C on node1-3): SIGKILL of node3's mariadbd at {KILL_AT} s, "
            f"restarted at {RESTART_AT} s (it rejoins the cluster)",
            "C unready and 503 while node3 was down; clients went on through A and B; node3 rejoined by IST; "
            "the books checked on every node",
            fault_kill_node, evidence_kill_node, duration=26, host_instances=3, galera=True)
