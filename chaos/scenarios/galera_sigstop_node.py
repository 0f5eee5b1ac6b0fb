"""SIGSTOP of one Galera node under load: the cluster waits for the stopped member (its
writes need every member's acknowledgement) until it is declared gone and evicted; what
the service answers meanwhile is recorded, and nothing may be lost."""

from __future__ import annotations

import asyncio
import signal
import time

from lib.checks import all_tries
from lib.driver import Scenario, Spec

STOP_AT, CONT_AT = 6, 16


async def fault_stop_node(sc: Scenario) -> None:
    assert sc.suite.galera is not None
    node = sc.suite.galera.nodes[2]
    await sc.at(STOP_AT)
    offset = node.log_size()
    node.signal(signal.SIGSTOP)
    sc.event(f"stop start: SIGSTOP mariadbd of galera {node.name} (instance C's node)")
    await sc.at(CONT_AT)
    node.signal(signal.SIGCONT)
    sc.event(f"stop end: SIGCONT galera {node.name}")
    started = time.monotonic()
    await asyncio.to_thread(node.wait_rejoined, sc.suite.galera.nodes[0])
    sc.joined_by = node.joined_by(since=offset)
    sc.event(f"rejoin: galera {node.name} Synced in node1's view of 3 {time.monotonic() - started:.1f} s after SIGCONT "
             f"(state transfer: {sc.joined_by})")


def evidence_stop_node(sc: Scenario) -> None:
    start, end = sc.window("stop")
    tries = all_tries(sc)
    ab = [t for t in tries if t["inst"] != "C" and t["t"] < end and t["t"] + t["dur"] > start]
    # How long A and B waited: the longest try that was in flight when the node stopped.
    stalled = [t for t in ab if t["t"] <= start + 0.2 and t["t"] + t["dur"] > start + 1]
    longest = max((t["dur"] for t in ab), default=0.0)
    ab_ok = [t for t in ab if t["status"] == 200 and not t["replayed"]]
    # A and B serving again before the node came back: the cluster went on without it.
    resumed = [t for t in ab_ok if t["t"] > start + 1 and t["t"] + t["dur"] < end]
    on_c = [t for t in tries if t["inst"] == "C" and t["t"] < end and t["t"] + t["dur"] > start]
    c_codes: dict[str, int] = {}
    for t in on_c:
        k = str(t["status"] or t["err"])
        c_codes[k] = c_codes.get(k, 0) + 1
    ab_503 = sum(1 for t in ab if t["status"] == 503)
    after_c = [t for t in tries if t["inst"] == "C" and t["t"] > end + 1 and t["status"] == 200]
    sc.evidence.append(("A and B stalled when node3 stopped, then went on without it",
                        bool(stalled) and bool(resumed),
                        f"{len(stalled)} tries on A/B in flight at the stop took > 1 s (longest try {longest:.1f} s); "
                        f"{len(resumed)} fresh 200s on A/B while node3 was stopped; {ab_503} 503s on A/B"))
    sc.evidence.append(("what C answered while its node was stopped (recorded)", True,
                        f"tries on C by answer: {c_codes}"))
    sc.evidence.append(("node3 rejoined after SIGCONT and C served again", bool(after_c),
                        f"state transfer {getattr(sc, 'joined_by', '?')}; {len(after_c)} 200s on C afterwards"))


SPEC = Spec("galera-sigstop-node",
            f"Galera, one instance per node: SIGSTOP of node3's mariadbd {STOP_AT}-{CONT_AT} s "
            "(evs.suspect_timeout 3 s, inactive_timeout 6 s)",
            "the others stalled until node3 was evicted, then went on; what each instance answered is recorded; "
            "node3 rejoined; the books checked on every node",
            fault_stop_node, evidence_stop_node, duration=28, host_instances=3, galera=True)
