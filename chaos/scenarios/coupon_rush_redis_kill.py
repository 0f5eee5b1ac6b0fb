"""A coupon rush through two instances; SIGKILL of Redis (the admission gate) mid-rush,
restarted empty; LOCK_ON_REDIS_DOWN=degrade."""

from __future__ import annotations

import asyncio

from lib.checks import metric
from lib.driver import Scenario, Spec
from lib.rush import RUSH_USERS, SEED_USERS, STOCK, SWEEP_USERS, WAVE_AT, WAVES, Rush, rush_evidence, rush_with

WAVE = 1  # Redis dies in wave 1, once a third of its units are committed
AT_LEAST = STOCK // 3  # units committed when the fault strikes
DOWN_S = 4.0  # and comes back (empty) 4 s later, after wave 2 was rushed without it


async def strike(sc: Scenario, rush: Rush) -> None:
    assert sc.redis is not None
    hit = await rush.strike_when(WAVE, AT_LEAST, sc.redis.kill9)
    t = rush.load_time(hit.wall)
    sc.event(f"redis start: SIGKILL redis-server in rush wave {WAVE} with {hit.before} of {STOCK} units committed "
             f"({hit.after} just after), exit {hit.result}", t)
    sc.redis_killed = hit
    await sc.at(t + DOWN_S)
    await asyncio.to_thread(sc.redis.start)
    sc.event("redis end: redis-server restarted on the same port (empty)")


def evidence(sc: Scenario) -> None:
    rush_evidence(sc)
    rush: Rush | None = getattr(sc, "rush", None)
    killed = getattr(sc, "redis_killed", None)
    if rush is None or killed is None:
        sc.evidence.append(("redis-server SIGKILLed mid-rush", False, "no kill"))
        return
    sc.evidence.append(("redis-server SIGKILLed mid-rush (while the wave's units were being issued)",
                        killed.result == -9 and AT_LEAST <= killed.before < STOCK,
                        f"exit {killed.result}; {killed.before} of {STOCK} units of wave {WAVE} committed at most 2 ms "
                        f"before the kill, {killed.after} just after"))
    start, end = sc.window("redis")
    issued_down = [x for op in rush.ops for x in op.tries if start + 0.5 <= x["t"] and x["t"] + x["dur"] < end
                   and x["status"] == 200 and not x["replayed"]]
    bypassed = metric(sc, "coupon_gate_bypassed_total")
    rebuilt = metric(sc, "coupon_gate_rebuilds_total")
    sc.evidence.append(("issues went on under the database guard alone while Redis was down (degrade)",
                        len(issued_down) > 0 and bypassed > 0,
                        f"{len(issued_down)} fresh 200s inside the outage; coupon_gate_bypassed_total={bypassed:g}"))
    sc.evidence.append(("the gate was rebuilt from the database after Redis came back", rebuilt > 0,
                        f"coupon_gate_rebuilds_total={rebuilt:g} (both instances, since their start)"))


SPEC = Spec("coupon-rush-redis-kill",
            f"a coupon rush through instances A and B: {WAVES} coupons of {STOCK}, each rushed by users "
            f"1..{RUSH_USERS} at once (waves at {', '.join(f'{w:g}' for w in WAVE_AT)} s), each client retrying its "
            f"own key until an answer; SIGKILL of redis-server (the admission gate and the locks) once a third of "
            f"wave {WAVE}'s units are committed (issued_quantity polled), restarted empty {DOWN_S:g} s later; "
            f"LOCK_ON_REDIS_DOWN=degrade; then {SWEEP_USERS} fresh users ask every coupon; 4 mixed-load clients beside",
            "every coupon: issued_quantity = its rows <= its stock, no user twice, every 200 a client got is its row "
            "and every row a client's 200, every client answered, byte-identical answers per key, no stock lost "
            "(each coupon ends sold out exactly); the kill landed while the wave's units were being issued; issues "
            "went on during the outage (database guard alone) and the gate was rebuilt after it",
            lambda sc: rush_with(sc, lambda rush: strike(sc, rush)), evidence, duration=20, workers=4,
            seed_users=SEED_USERS)
