"""Group commit (issue #15): SIGKILL of an instance in the middle of batched commits.

Many clients on a few hot users make each user's requests queue behind the commit that is
running, so the service writes them in batches (GROUP_COMMIT=on); spread users share the
load. Before each kill the killed instance's `balance_batch_size` must show that batches
really formed (at least MIN_MULTI batches of more than one request in the second
before): without the metric the scenario fails, it cannot
pass on a binary that does not batch. After the load, every key that got a definitive
answer is checked against its stored record and sent once more: the replay must be the
same status and bytes, marked `Idempotent-Replayed: true`. The books, the balances and
"every acknowledged key applied exactly once" are the common checks (lib/checks.py).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from lib.checks import all_tries, instance_metrics
from lib.common import STORED_REFUSALS, USERS
from lib.driver import ENTRY_KIND, Op, Scenario, Spec, is_final

HOT = [USERS + 1, USERS + 2, USERS + 3]  # users of their own: the mixed load keeps to 1..USERS
SPREAD = list(range(USERS + 4, USERS + 24))
HOT_SHARE = 0.75
HOT_START = 20_000  # the hot users' balance once drained: their uses (up to 8000) then overdraw
CLIENTS = 48
DURATION = 22
KILLS = [(5, 7, 0), (11, 13, 1), (17, 19, 0)]  # (kill, restart) times and the instance: A, B, A
MIN_MULTI = 5  # batches of more than one request in the second before a kill: batches were forming
REPLAY_CONCURRENCY = 32


def gc_op(sc: Scenario) -> Op:
    """A hot user's charge or use (half each: near its low balance some uses are refused), or
    a spread user's charge, use, or use far above any balance (a stored refusal)."""
    rng = sc.rng
    if rng.random() < HOT_SHARE:
        user = rng.choice(HOT)
        if rng.random() < 0.5:
            return sc.new_op(user, "charge", rng.randint(1, 5000), group="gc:hot")
        return sc.new_op(user, "use", rng.randint(1, 8000), group="gc:hot")
    user = rng.choice(SPREAD)
    r = rng.random()
    if r < 0.45:
        return sc.new_op(user, "charge", rng.randint(1, 5000), group="gc:spread")
    if r < 0.95:
        return sc.new_op(user, "use", rng.randint(1, 3000), group="gc:spread")
    return sc.new_op(user, "use", 900_000_000, group="gc:spread")


async def client(sc: Scenario, i: int) -> None:
    """One operation after the other until the load time is up; each retried with its key
    and body (lib.driver) through the other instance in turn until it has an answer."""
    home = i % len(sc.instances)

    def pick(n: int) -> Any:
        return sc.instances[(home + n) % len(sc.instances)]

    while time.monotonic() < sc.stop_at:
        await sc.run_op(gc_op(sc), pick)


def batch_stats(samples: list[tuple[str, str, float]] | None) -> dict[str, Any] | None:
    """`balance_batch_size` (summed over any labels) and `balance_batches_total`; None when
    the histogram is absent. `multi`: batches of more than one request, when 1 is a bucket
    bound."""
    if samples is None:
        return None
    got: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for name, labels, value in samples:
        if name in ("balance_batch_size_sum", "balance_batch_size_count", "balance_batches_total"):
            got[name] = got.get(name, 0.0) + value
        elif name == "balance_batch_size_bucket":
            m = re.search(r'le="([^"]+)"', labels)
            if m:
                le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
                buckets[le] = buckets.get(le, 0.0) + value
    if "balance_batch_size_count" not in got:
        return None
    count, total = got["balance_batch_size_count"], got.get("balance_batch_size_sum", 0.0)
    return {"count": count, "sum": total, "mean": total / count if count else 0.0,
            "batches_total": got.get("balance_batches_total"),
            "multi": count - buckets[1.0] if 1.0 in buckets else None}


def recent_multi(st: dict[str, Any], before: dict[str, Any] | None) -> float:
    """Batches of more than one request since `before` (all of them without it); 0 when the
    histogram has no bucket at 1."""
    if st["multi"] is None:
        return 0.0
    return st["multi"] - (before["multi"] or 0.0 if before is not None else 0.0)


def describe(st: dict[str, Any] | None, before: dict[str, Any] | None) -> str:
    if st is None:
        return "balance_batch_size absent"
    out = (f"{st['count']:.0f} batches carried {st['sum']:.0f} requests (mean {st['mean']:.2f}"
           + (f", {st['multi']:.0f} of more than one" if st["multi"] is not None else "") + ")")
    if before is not None and st["count"] > before["count"]:
        d = st["count"] - before["count"]
        out += f", in the second before: {d:.0f} batches, mean {(st['sum'] - before['sum']) / d:.2f}"
        out += f", {recent_multi(st, before):.0f} of more than one"
    return out


async def replay_all(sc: Scenario) -> dict[int, dict[str, Any]]:
    """Every load key with a definitive answer sent once more, the same key and body; a try
    that is not final (a 503, a cut connection) is sent again, up to 5 times."""
    ops = [op for op in sc.ops if op.group.startswith("gc:") and definitive(op)]
    sem = asyncio.Semaphore(REPLAY_CONCURRENCY)
    out: dict[int, dict[str, Any]] = {}

    async def one(j: int, op: Op) -> None:
        async with sem:
            for n in range(5):
                t = await sc.send(op, sc.instances[(j + n) % len(sc.instances)], 100 + n)
                if is_final(t):
                    break
                await asyncio.sleep(0.2 * (n + 1))
        out[op.id] = t

    await asyncio.gather(*(one(j, op) for j, op in enumerate(ops)))
    sc.http.close_all()
    return out


def definitive(op: Op) -> bool:
    """A 2xx or a stored refusal: what the client may rely on."""
    return op.final is not None and (200 <= op.final["status"] < 300 or op.final["code"] in STORED_REFUSALS)


async def fault(sc: Scenario) -> None:
    sc.gc_kills = []
    sc.gc_replays = {}
    # The hot users' balances down to HOT_START first, so that their uses overdraw.
    drains = [sc.new_op(u, "use", sc.initial[u] - HOT_START, group="gc:drain") for u in HOT]
    await asyncio.gather(*(sc.run_op(op, sc.any_instance) for op in drains))
    sc.event(f"hot users {HOT} drained to {HOT_START}: "
             + ", ".join(str(op.final and op.final["status"]) for op in drains))
    clients = [asyncio.create_task(client(sc, i)) for i in range(CLIENTS)]
    try:
        for n, (kill_at, restart_at, i) in enumerate(KILLS):
            inst = sc.instances[i]
            await sc.at(kill_at - 1)
            before = batch_stats(await instance_metrics(sc, inst))
            await sc.at(kill_at)
            samples = await instance_metrics(sc, inst)
            t = sc.now()
            pid = inst.proc.pid
            rc = await asyncio.to_thread(inst.kill9)
            st = batch_stats(samples)
            sc.gc_kills.append({"n": n, "inst": inst.name, "t": t, "rc": rc, "scraped": samples is not None,
                                "stats": st, "before": before})
            sc.event(f"kill-{n} start: SIGKILL instance {inst.name} (pid {pid}) under the batched load, exit {rc}; "
                     f"its /metrics just before: {describe(st, before) if samples is not None else 'no answer'}", t)
            await sc.at(restart_at)
            await asyncio.to_thread(inst.start)
            await asyncio.to_thread(inst.wait_ready)
            sc.event(f"kill-{n} end: instance {inst.name} restarted on port {inst.port} and ready")
    finally:
        await asyncio.gather(*clients)
    sc.event(f"{CLIENTS} group-commit clients finished; replaying every key with a definitive answer")
    sc.gc_replays = await replay_all(sc)
    sc.event(f"{len(sc.gc_replays)} keys replayed")


def summary(problems: list[str]) -> str:
    return "; ".join(problems[:8]) + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else "")


def evidence(sc: Scenario) -> None:
    kills = getattr(sc, "gc_kills", [])
    if len(kills) != len(KILLS):
        sc.evidence.append(("every kill happened", False, f"{len(kills)} of {len(KILLS)}"))
    # Batches formed: on the killed instance, just before each kill.
    problems, details = [], []
    for k in kills:
        st = k["stats"]
        if not k["scraped"]:
            problems.append(f"kill {k['n'] + 1}: {k['inst']}'s /metrics did not answer")
        elif st is None:
            problems.append(f"kill {k['n'] + 1}: balance_batch_size is absent from {k['inst']}'s /metrics: this "
                            "binary has no group commit (issue #15), or does not export its batch sizes")
        elif recent_multi(st, k["before"]) < MIN_MULTI:
            problems.append(f"kill {k['n'] + 1}: {k['inst']}: {describe(st, k['before'])}, fewer than {MIN_MULTI} "
                            "batches of more than one request in the second before")
        details.append(f"kill {k['n'] + 1} ({k['inst']}): {describe(st, k['before'])}")
    sc.evidence.append((f"batches formed before every kill (at least {MIN_MULTI} batches of more than one request "
                        "on the killed instance in the second before)", bool(kills) and not problems, "; ".join(problems or details)))

    tries = all_tries(sc)
    for k in kills:
        start, end = sc.window(f"kill-{k['n']}")
        name = k["inst"]
        cut = [t for t in tries if t["inst"] == name and t["t"] <= start <= t["t"] + t["dur"] + 0.05 and t["err"]]
        served = [t for t in tries if t["inst"] == name and t["t"] > end and t["status"] == 200]
        sc.evidence.append((f"kill {k['n'] + 1} of {name}: SIGKILL cut requests in flight, served after restart",
                            k["rc"] == -9 and bool(cut) and bool(served),
                            f"exit {k['rc']}, {len(cut)} requests cut mid-flight, {len(served)} 200s after the restart"))

    # Each definitive answer is its stored record; a 200 has one ledger entry, a refusal none.
    ops = [op for op in sc.ops if op.group.startswith("gc:")]
    acked = [op for op in ops if definitive(op)]
    records = {(int(u), k): (int(s), bytes.fromhex(b)) for u, k, s, b in sc.db.sql(
        "select user_id, idempotency_key, response_status, hex(response_body) from idempotency_records "
        f"where idempotency_key like '{sc.spec.name}-%'", sc.dbname)}
    wrong = []
    applied = refused = hot_refused = 0
    for op in acked:
        rec = records.get((op.user, op.key))
        entries = sc.ledger.get((op.user, op.key), [])
        ok200 = 200 <= op.final["status"] < 300
        if rec is None:
            wrong.append(f"user {op.user} key {op.key}: answered {op.final['status']}, no stored record")
        elif rec != (op.final["status"], op.final["body"].encode()):
            wrong.append(f"user {op.user} key {op.key}: answered {op.final['status']} {op.final['body'][:120]!r}, "
                         f"stored {rec[0]} {rec[1][:120]!r}")
        if ok200 and [e[:2] for e in entries] != [(ENTRY_KIND[op.kind], op.amount)]:
            wrong.append(f"user {op.user} key {op.key}: {op.kind} {op.amount} answered 200, ledger {entries}")
        if not ok200 and entries:
            wrong.append(f"user {op.user} key {op.key}: refused {op.final['code']}, ledger {entries}")
        applied += ok200
        refused += not ok200
        hot_refused += (not ok200) and op.user in HOT
    unanswered = [op for op in ops if not definitive(op)]
    wrong += [f"user {op.user} key {op.key}: no definitive answer "
              f"({op.final['status'] if op.final else [t['status'] or t['err'] for t in op.tries][-3:]})"
              for op in unanswered]
    if not hot_refused:
        wrong.append("no hot user's use was refused: the load did not overdraw")
    sc.evidence.append(("every load key answered definitively; each answer is its stored record; "
                        "a 200 has one ledger entry of its kind and amount, a refusal none", not wrong,
                        summary(wrong) or f"{len(acked)} keys: {applied} applied, {refused} refused and stored "
                        f"({hot_refused} of them hot users' uses near their balance)"))

    # The replay of each: the same status and bytes, marked replayed.
    replays = getattr(sc, "gc_replays", {})
    bad = []
    for op in acked:
        t = replays.get(op.id)
        if t is None:
            bad.append(f"{op.key}: not replayed")
        elif (t["status"], t["body"]) != (op.final["status"], op.final["body"]) or not t["replayed"]:
            bad.append(f"{op.key}: first {op.final['status']} {op.final['body'][:100]!r}, replay {t['status'] or t['err']} "
                       f"{t['body'][:100]!r} replayed={t['replayed']}")
    sc.evidence.append(("the replay of every load key: its first answer's status and bytes, Idempotent-Replayed: true",
                        bool(acked) and not bad, summary(bad) or f"{len(replays)} replays identical"))

    sc.counts.update({
        "gc clients": CLIENTS, "gc keys": len(ops), "gc applied": applied, "gc refused": refused,
        "gc retries": sum(len(op.tries) - 1 for op in ops),
        "gc replayed after a failed try": sum(1 for op in ops if op.final and op.final["replayed"]
                                              and any(t["err"] or (t["status"] or 0) >= 500 for t in op.tries)),
        "gc batch mean before kills": ", ".join(f"{k['stats']['mean']:.2f}" if k["stats"] else "absent"
                                                for k in kills),
    })


SPEC = Spec("group-commit-kill9",
            f"GROUP_COMMIT=on; {CLIENTS} clients, {HOT_SHARE:.0%} of their charges and uses on {len(HOT)} hot users "
            f"(drained to {HOT_START} first, so uses overdraw) and the rest on {len(SPREAD)} spread users, each "
            "request with its own key; SIGKILL of A at 5 s, B at 11 s, A at 17 s, each restarted 2 s later; "
            "4 mixed-load clients beside",
            f"batches formed on the killed instance before each kill (at least {MIN_MULTI} of more than one request in "
            "the second before; absent: FAIL); each kill cut requests in flight and the instance served after restart; every load key "
            "answered definitively, each answer its stored record (a 200 with one ledger entry, a refusal none), "
            "and its replay the same status and bytes with Idempotent-Replayed: true",
            fault, evidence, duration=DURATION, workers=4, seed_users=USERS + 24,
            env={"GROUP_COMMIT": "on"})
