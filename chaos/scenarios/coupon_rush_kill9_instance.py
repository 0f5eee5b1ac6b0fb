"""A coupon rush through two instances; SIGKILL of each in turn mid-rush, restarted."""

from __future__ import annotations

import asyncio

from lib.driver import Scenario, Spec
from lib.rush import RUSH_USERS, SEED_USERS, STOCK, SWEEP_USERS, WAVE_AT, WAVES, Rush, rush_evidence, rush_with

# (wave, instance): A dies in wave 1, B in wave 3, each once a third of the wave's stock is
# acknowledged, each restarted on its port 2 s later.
KILLS = [(1, 0), (3, 1)]
ACKED_AT_KILL = STOCK // 3


async def strike(sc: Scenario, rush: Rush) -> None:
    for n, (wave, i) in enumerate(KILLS):
        inst = sc.instances[i]
        acked = await rush.when_acked(wave, ACKED_AT_KILL)
        t = sc.now()
        rc = await asyncio.to_thread(inst.kill9)
        sc.event(f"kill-{n} start: SIGKILL instance {inst.name} (pid {inst.proc.pid}) in rush wave {wave} "
                 f"with {acked} of {STOCK} units acknowledged, exit {rc}", t)
        sc.kills = getattr(sc, "kills", []) + [(n, inst.name, t, wave)]
        await asyncio.sleep(2)
        await asyncio.to_thread(inst.start)
        await asyncio.to_thread(inst.wait_ready)
        sc.event(f"kill-{n} end: instance {inst.name} restarted on port {inst.port} and ready")


def evidence(sc: Scenario) -> None:
    rush_evidence(sc)
    rush: Rush | None = getattr(sc, "rush", None)
    for n, name, t, wave in getattr(sc, "kills", []):
        inst = next(i for i in sc.instances if i.name == name)
        in_flight, cut = rush.around(name, t) if rush else (0, 0)
        sc.evidence.append((f"kill {n + 1}: instance {name} SIGKILLed mid-rush (wave {wave}) with rush requests "
                            "in flight, cut", -9 in inst.exits and cut > 0,
                            f"exit codes {inst.exits}; {in_flight} rush requests in flight through {name} at the kill, "
                            f"{cut} of them cut"))
    if len(getattr(sc, "kills", [])) != len(KILLS):
        sc.evidence.append(("every kill happened", False, f"{len(getattr(sc, 'kills', []))} of {len(KILLS)}"))


SPEC = Spec("coupon-rush-kill9-instance",
            f"a coupon rush through instances A and B: {WAVES} coupons of {STOCK}, each rushed by users "
            f"1..{RUSH_USERS} at once (waves at {', '.join(f'{w:g}' for w in WAVE_AT)} s), each client retrying its "
            f"own key until an answer; SIGKILL of A in wave 1 and of B in wave 3 once {ACKED_AT_KILL} units of the "
            f"wave are acknowledged, each restarted 2 s later; then {SWEEP_USERS} fresh users ask every coupon; "
            "4 mixed-load clients beside",
            "every coupon: issued_quantity = its rows <= its stock, no user twice, every 200 a client got is its row "
            "and every row a client's 200, every client answered (200 or 422 COUPON_SOLD_OUT), byte-identical "
            "answers per key, no stock lost (each coupon ends sold out exactly); each kill cut rush requests "
            "in flight",
            lambda sc: rush_with(sc, lambda rush: strike(sc, rush)), evidence, duration=20, workers=4,
            seed_users=SEED_USERS)
