"""SIGKILL of the service instances in turn, each restarted on its port."""

from __future__ import annotations

import asyncio

from lib.checks import all_tries
from lib.driver import Scenario, Spec


KILLS = [(4, 6), (9, 11), (14, 16), (19, 21)]  # (kill, restart) times, A and B in turn


async def fault_kill_instances(sc: Scenario) -> None:
    for n, (kill_at, restart_at) in enumerate(KILLS):
        inst = sc.instances[n % 2]
        await sc.at(kill_at)
        t = sc.now()
        rc = await asyncio.to_thread(inst.kill9)
        sc.event(f"kill-{n} start: SIGKILL instance {inst.name} (pid {inst.proc.pid}), exit {rc}", t)
        await sc.at(restart_at)
        await asyncio.to_thread(inst.start)
        await asyncio.to_thread(inst.wait_ready)
        sc.event(f"kill-{n} end: instance {inst.name} restarted on port {inst.port} and ready")


def evidence_kill_instances(sc: Scenario) -> None:
    for inst in sc.instances[:2]:
        sc.evidence.append((f"instance {inst.name} killed by SIGKILL twice", inst.exits == [-9, -9],
                            f"exit codes {inst.exits}"))
    for n, _ in enumerate(KILLS):
        name = sc.instances[n % 2].name
        start, end = sc.window(f"kill-{n}")
        refused = [t for t in all_tries(sc) if t["inst"] == name and start <= t["t"] < end and t["err"]]
        served = [t for t in all_tries(sc) if t["inst"] == name and t["t"] > end and t["status"] == 200]
        cut = [t for t in all_tries(sc) if t["inst"] == name and t["t"] <= start <= t["t"] + t["dur"] + 0.05
               and t["err"]]
        sc.evidence.append((f"kill {n + 1} of {name}: refused while dead, served after restart",
                            bool(refused) and bool(served),
                            f"{len(cut)} requests cut mid-flight, {len(refused)} tries failed while dead, "
                            f"{len(served)} 200s after the restart"))


SPEC = Spec("kill9-instance",
            "SIGKILL of instance A at 4 s, B at 9 s, A at 14 s, B at 19 s, each restarted on its port 2 s later",
            "each kill cut requests in flight, the dead instance refused, it served again after restart",
            fault_kill_instances, evidence_kill_instances, duration=26)
