"""A coupon rush through two instances; SIGKILL of each in turn mid-rush, restarted."""

from __future__ import annotations

import asyncio

from lib.driver import Scenario, Spec
from lib.rush import RUSH_USERS, SEED_USERS, STOCK, SWEEP_USERS, WAVE_AT, WAVES, Rush, rush_evidence, rush_with

# (wave, instance): A dies in wave 1, B in wave 3, each once a third of the wave's units
# are committed, each restarted 2 s later.
KILLS = [(1, 0), (3, 1)]
AT_LEAST = STOCK // 3  # units committed when the fault strikes


async def strike(sc: Scenario, rush: Rush) -> None:
    sc.kills = []
    for n, (wave, i) in enumerate(KILLS):
        inst = sc.instances[i]
        hit = await rush.strike_when(wave, AT_LEAST, inst.kill9)
        t = rush.load_time(hit.wall)
        sc.event(f"kill-{n} start: SIGKILL instance {inst.name} in rush wave {wave} with {hit.before} of {STOCK} "
                 f"units committed ({hit.after} just after), exit {hit.result}", t)
        sc.kills.append((n, inst.name, t, hit, wave))
        await asyncio.sleep(2)
        await asyncio.to_thread(inst.start)
        await asyncio.to_thread(inst.wait_ready)
        sc.event(f"kill-{n} end: instance {inst.name} restarted on port {inst.port} and ready")


def evidence(sc: Scenario) -> None:
    rush_evidence(sc)
    rush: Rush | None = getattr(sc, "rush", None)
    kills = getattr(sc, "kills", [])
    if rush is None or len(kills) != len(KILLS):
        sc.evidence.append(("every kill happened", False, f"{len(kills)} of {len(KILLS)}"))
        return
    for n, name, t, hit, wave in kills:
        inst = next(i for i in sc.instances if i.name == name)
        cut = rush.cut(name, wave, t)
        sc.evidence.append((f"kill {n + 1}: instance {name} SIGKILLed mid-rush (wave {wave}: while its units were "
                            "being issued), requests in flight cut",
                            hit.result == -9 and AT_LEAST <= hit.before < STOCK and cut > 0,
                            f"exit {hit.result}; {hit.before} of {STOCK} units committed at most 2 ms before the kill, "
                            f"{hit.after} just after; {cut} of the wave's requests through {name} cut"))


SPEC = Spec("coupon-rush-kill9-instance",
            f"a coupon rush through instances A and B: {WAVES} coupons of {STOCK}, each rushed by users "
            f"1..{RUSH_USERS} at once (waves at {', '.join(f'{w:g}' for w in WAVE_AT)} s), each client retrying its "
            "own key until an answer; SIGKILL of A in wave 1 and of B in wave 3 once a third of the wave's units "
            f"are committed (issued_quantity polled), each restarted 2 s later; then {SWEEP_USERS} fresh users ask every coupon; "
            "4 mixed-load clients beside",
            "every coupon: issued_quantity = its rows <= its stock, no user twice, every 200 a client got is its row "
            "and every row a client's 200, every client answered (200 or 422 COUPON_SOLD_OUT), byte-identical "
            "answers per key, no stock lost (each coupon ends sold out exactly); each kill landed while the wave's "
            "units were being issued and cut requests in flight",
            lambda sc: rush_with(sc, lambda rush: strike(sc, rush)), evidence, duration=20, workers=4,
            seed_users=SEED_USERS)
