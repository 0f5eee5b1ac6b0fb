"""Storms of simultaneous sends of one key through both instances."""

from __future__ import annotations

import asyncio
import collections
import time
import uuid

from lib.driver import Scenario, Spec


async def fault_storms(sc: Scenario) -> None:
    """50 sends of one key at once, half through each instance; same body, then 50 different
    bodies under one key; for charges, uses and payments."""
    await sc.at(2)
    plans = [("charge", True), ("charge", False), ("use", True), ("use", False), ("payment", True),
             ("payment", False)] * 2
    sc.storms = []
    for i, (kind, same) in enumerate(plans):
        user = 1 + i % 2
        key = f"{sc.spec.name}-storm{i}-{kind}-{'same' if same else 'diff'}-{uuid.uuid4().hex[:8]}"
        group = f"storm{i}:{kind}:{'same' if same else 'diff'}"
        ops = []
        for j in range(50):
            if kind == "payment":
                order, amount = sc.storm_orders[user][0] if same else sc.storm_orders[user][j]
                ops.append(sc.new_op(user, "payment", amount, order, group=group, key=key))
            else:
                ops.append(sc.new_op(user, kind, 777 if same else 100 + j, group=group, key=key))
        if kind == "payment":
            used = 1 if same else 50
            for _ in range(used):
                sc.storm_orders[user].popleft()
        barrier = asyncio.Event()
        sc.connected = 0
        tasks = [asyncio.create_task(sc.run_op(op, (lambda n, j=j: sc.instances[(j + n) % 2]), barrier))
                 for j, op in enumerate(ops)]
        end = time.monotonic() + 5
        while sc.connected < len(ops) and time.monotonic() < end:
            await asyncio.sleep(0.005)
        barrier.set()
        sc.event(f"{group}: 50 sends of one key released at once ({sc.connected} connected)")
        await asyncio.gather(*tasks)
        sc.storms.append((group, key, user, kind, same, ops))
        await asyncio.sleep(0.5)


def evidence_storms(sc: Scenario) -> None:
    ledger = sc.ledger
    for group, key, user, kind, same, ops in getattr(sc, "storms", []):
        entries = ledger.get((user, key), [])
        first = collections.Counter(
            f"{op.tries[0]['status'] or op.tries[0]['err']}{'/' + op.tries[0]['code'] if op.tries[0]['code'] else ''}"
            for op in ops)
        finals = [op.final for op in ops]
        problems = []
        if any(f is None for f in finals):
            problems.append(f"{sum(f is None for f in finals)} senders without a final answer")
        oks = [op for op in ops if op.final and op.final["status"] == 200]
        fresh = [t for op in ops for t in op.tries if t["status"] == 200 and not t["replayed"]]
        if len(entries) != 1:
            problems.append(f"{len(entries)} ledger entries")
        if len(fresh) != 1:
            problems.append(f"{len(fresh)} non-replayed 200s")
        allowed_first = {"200", "409/IDEMPOTENCY_KEY_IN_USE", "503/LOCK_TIMEOUT"} | (
            set() if same else {"422/IDEMPOTENCY_KEY_REUSED"})
        if set(first) - allowed_first:
            problems.append(f"unexpected first answers {sorted(set(first) - allowed_first)}")
        if same:
            if len(oks) != len(ops):
                problems.append(f"{len(ops) - len(oks)} senders did not end on 200")
            if len({op.final["body"] for op in oks}) > 1:
                problems.append("the 200 bodies differ")
        else:
            reused = [op for op in ops if op.final and op.final["status"] == 422
                      and op.final["code"] == "IDEMPOTENCY_KEY_REUSED"]
            if len(oks) != 1 or len(reused) != len(ops) - 1:
                problems.append(f"{len(oks)} ended on 200 and {len(reused)} on 422 REUSED")
            elif entries:
                win = oks[0]
                if kind == "payment":
                    paid = [o for o, st in sc.order_status.items() if st[2] == key]
                    if paid != [win.order]:
                        problems.append(f"orders paid with the key {paid}, winner's order {win.order}")
                    losers = [op.order for op in ops if op is not win and sc.order_status[op.order][0] != "PENDING"]
                    if losers:
                        problems.append(f"losers' orders not PENDING: {losers[:5]}")
                elif entries[0][1] != win.amount:
                    problems.append(f"ledger amount {entries[0][1]} but the 200 was for {win.amount}")
        sc.evidence.append((f"{group}: one applied, answers converge", not problems,
                            "; ".join(problems) or f"first answers {dict(first)}; {len(oks)} ended on 200"))


SPEC = Spec("duplicate-storm",
            "12 storms of 50 simultaneous sends of one key, 25 through each instance: charge, use and payment, "
            "with the same body and with 50 different amounts/orders; 6 background clients",
            "same body: one ledger entry, every sender ends on the identical 200; different bodies: one applied "
            "(the 200's amount/order), the other 49 end on 422 IDEMPOTENCY_KEY_REUSED",
            fault_storms, evidence_storms, duration=12, storms=True, workers=6)
