"""A coupon rush under a fault: crowds of users on coupons of a small stock, through both
instances, while the scenario's fault strikes mid-rush; then the books of every coupon.

WAVES coupons of STOCK units are created at the start (open at once). Wave k at
WAVE_AT[k] s: users 1..RUSH_USERS, each with a key of its own, connect first and are
released together (a barrier), user u's first try through instance u % 2 and each retry
through the other one in turn; every client sends again with the same key on a transport
error, a 5xx or a 409 IDEMPOTENCY_KEY_IN_USE until it gets an answer (lib.driver's
`run_op`, the suite's retries). A fault strikes mid-wave (`strike_when`): a thread reads
the coupon's issued_quantity from the database every 2 ms from the wave's release on (one
mariadb client kept open) and runs the fault once it reaches a set share of the stock, so
neither the client's busy event loop nor the server's speed can make it miss the issuing;
the count read just before and just after the fault says where in the issuing it struck.
Once every client has its answer and a unit left pending by
the fault has outlived the gate's pending lifetime (LOCK_WAIT_MS + LOCK_LEASE_MS), SWEEP
fresh users (RUSH_USERS+1..) ask every coupon once more: whatever the rush left must still
be there to issue, so every coupon ends sold out exactly.

The rush's operations are kept apart from the mixed load's (`Scenario.ops`, which the
common checks reconcile against the ledger: an issue writes no ledger entry); `check`
judges them, and `save` writes every try to rush.jsonl beside requests.jsonl.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import subprocess
import threading
import time
import uuid
from typing import Any, Callable

from lib.common import INTERNALS, log
from lib.driver import Op, Scenario

RUSH_USERS = 400
SWEEP_USERS = 60
STOCK = 50
WAVES = 6
WAVE_AT = [2.0 + 3.0 * k for k in range(WAVES)]
DISCOUNT = 1000
# The users the suite seeds for a rush scenario (Spec.seed_users).
SEED_USERS = RUSH_USERS + SWEEP_USERS
# The refusals a rush client may end on: every user sends one key per coupon, after it opened.
RUSH_REFUSALS = {"COUPON_SOLD_OUT"}


@dataclasses.dataclass
class Strike:
    """A fault struck mid-wave: when (wall clock), the coupon's committed count read just
    before it (at most a poll, 2 ms, earlier) and just after it, and the fault's result."""
    wall: float
    before: int
    after: int
    result: Any


def answer(t: dict[str, Any]) -> str:
    return f"{t['status'] or t['err']}{'/' + t['code'] if t['code'] else ''}"


class Rush:
    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.coupons: list[int] = []
        self.waves: list[list[Op]] = [[] for _ in range(WAVES)]
        self.wave_tasks: list[list[asyncio.Task]] = [[] for _ in range(WAVES)]
        self.released_at: list[float | None] = [None] * WAVES  # wall clock (time.time())
        # Set when wave k is released: the strikes waiting for it start polling.
        self.go: list[threading.Event] = [threading.Event() for _ in range(WAVES)]
        self.sweep_ops: list[Op] = []
        self.tasks: list[asyncio.Task] = []
        self.seq = 0

    @property
    def ops(self) -> list[Op]:
        return [op for wave in self.waves for op in wave] + self.sweep_ops

    # -- the load ----------------------------------------------------------------------

    async def create_coupons(self) -> None:
        """The waves' coupons, through whichever instance answers (not keyed: created once
        each, before any fault)."""
        sc = self.sc
        for k in range(WAVES):
            body = json.dumps({"name": f"chaos {sc.spec.name} wave {k}", "discount": DISCOUNT,
                               "totalQuantity": STOCK, "validForDays": 30}).encode()
            for n in range(20):
                inst = sc.instances[n % len(sc.instances)]
                res = await sc.http.request(inst.host, inst.port, "POST", "/api/coupons", body)
                if res["status"] == 201:
                    self.coupons.append(int(json.loads(res["body"])["couponId"]))
                    break
                await asyncio.sleep(0.2)
            else:
                raise RuntimeError(f"creating a coupon: {res['status']} {res['err']} {res['body'][:300]!r}")
        sc.event(f"rush: {WAVES} coupons of {STOCK} created: {self.coupons}")

    def new_op(self, coupon: int, user: int, group: str) -> Op:
        self.seq += 1
        # Ids far from the mixed load's, so the two sets of records never mix.
        return Op(id=1_000_000 + self.seq, key=f"{self.sc.spec.name}-rush-{self.seq}-{uuid.uuid4().hex[:12]}",
                  user=user, kind="issue", amount=None, order=None, key_in=self.sc.rng.choice(["body", "header"]),
                  group=group, coupon=coupon)

    def pick(self, user: int):
        sc = self.sc
        return lambda n: sc.instances[(user + n) % len(sc.instances)]

    async def crowd(self, ops: list[Op], label: str, wave: int | None = None) -> list[asyncio.Task]:
        """Every op's client connected first, then all released at once (and wave's
        strikes started)."""
        sc = self.sc
        barrier = asyncio.Event()
        sc.connected = 0
        tasks = [asyncio.create_task(sc.run_op(op, self.pick(op.user), barrier)) for op in ops]
        end = time.monotonic() + 5
        # A client whose connection was refused (an instance down) has a try already and
        # retries on its own: only the others are waited for.
        while sc.connected + sum(1 for op in ops if op.tries) < len(ops) and time.monotonic() < end:
            await asyncio.sleep(0.005)
        barrier.set()
        if wave is not None:
            self.released_at[wave] = time.time()
            self.go[wave].set()
        sc.event(f"{label}: {len(ops)} issue requests released at once ({sc.connected} connected)")
        self.tasks += tasks
        return tasks

    async def run_waves(self) -> None:
        for k in range(WAVES):
            await self.sc.at(WAVE_AT[k])
            self.waves[k] = [self.new_op(self.coupons[k], u, f"rush:wave{k}") for u in range(1, RUSH_USERS + 1)]
            self.wave_tasks[k] = await self.crowd(self.waves[k], f"rush wave {k} (coupon {self.coupons[k]})", k)

    def _when(self, wave: int, at_least: int, fn: Callable[[], Any], timeout: float) -> Strike:
        """In a thread: waits for the wave's release, polls the coupon's count until it
        reaches `at_least` (or `timeout` s pass), runs `fn`, and reads the count again."""
        sc = self.sc
        proc = subprocess.Popen(sc.db.client() + ["--unbuffered", sc.dbname], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            self.go[wave].wait(timeout=60)
            query = f"select issued_quantity from coupons where id = {self.coupons[wave]};\n"
            end = time.monotonic() + timeout

            def count() -> int:
                proc.stdin.write(query)
                proc.stdin.flush()
                return int(proc.stdout.readline().strip() or 0)

            seen = 0
            while time.monotonic() < end:
                seen = count()
                if seen >= at_least:
                    break
                time.sleep(0.002)
            wall = time.time()
            result = fn()
            return Strike(wall, seen, count(), result)
        finally:
            proc.stdin.close()
            proc.wait(timeout=10)

    async def strike_when(self, wave: int, at_least: int, fn: Callable[[], Any], timeout: float = 5.0) -> Strike:
        """Runs `fn` once `at_least` units of the wave's coupon are committed (polled from a
        thread, from the wave's release on)."""
        return await asyncio.to_thread(self._when, wave, at_least, fn, timeout)

    def cut(self, inst_name: str, wave: int, at: float) -> int:
        """Wave tries through the instance sent before `at` (load time) that ended in a
        transport error: requests the fault cut."""
        return sum(1 for op in self.waves[wave] for t in op.tries if t["inst"] == inst_name and t["t"] <= at and t["err"])

    def load_time(self, wall: float) -> float:
        """A wall-clock instant as the scenario's load time (`Scenario.now`)."""
        return self.sc.now() - (time.time() - wall)

    async def finish(self) -> None:
        await asyncio.gather(*self.tasks)
        self.sc.event(f"rush: every client of the {WAVES} waves answered")

    async def sweep(self, after: float) -> None:
        """SWEEP fresh users on every coupon at once, once a unit pending at the fault is
        stale for the gate: what is left of the stock must be issued."""
        sc = self.sc
        await sc.at(after)
        for k, coupon in enumerate(self.coupons):
            ops = [self.new_op(coupon, u, f"rush:sweep{k}") for u in range(RUSH_USERS + 1, RUSH_USERS + SWEEP_USERS + 1)]
            self.sweep_ops += ops
            await asyncio.gather(*await self.crowd(ops, f"rush sweep of coupon {coupon}"))
        sc.event("rush sweep: every fresh user answered")

    # -- records and checks ------------------------------------------------------------

    def save(self) -> None:
        with open(self.sc.dir / "rush.jsonl", "w") as f:
            for op in self.ops:
                path, body, _ = op.request()
                for t in op.tries:
                    f.write(json.dumps(dict(t, group=op.group, path=path, request=body.decode(), coupon=op.coupon)) + "\n")

    def check(self) -> list[tuple[str, bool, str]]:
        """The books of every coupon of the rush, and every answer its clients got."""
        sc = self.sc
        out: list[tuple[str, bool, str]] = []

        def add(name: str, problems: list[str], ok_detail: str = "") -> None:
            detail = "; ".join(problems[:8]) + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else "")
            out.append((name, not problems, detail or ok_detail))

        if not self.coupons:
            add("rush: coupons created", ["no coupon was created"])
            return out
        ids = ", ".join(str(c) for c in self.coupons)
        books = {int(c): (int(t), int(i)) for c, t, i in sc.db.sql(
            f"select id, total_quantity, issued_quantity from coupons where id in ({ids})", sc.dbname)}
        rows = [(int(i), int(c), int(u), k) for i, c, u, k in sc.db.sql(
            f"select id, coupon_id, user_id, idempotency_key from user_coupons where coupon_id in ({ids})", sc.dbname)]
        per_coupon = collections.Counter(c for _, c, _, _ in rows)
        by_id = {i: (c, u, k) for i, c, u, k in rows}
        ops = self.ops
        by_key = {(op.user, op.key): op for op in ops}

        count_wrong = [f"coupon {c}: issued_quantity {books[c][1]}, {per_coupon[c]} rows, stock {books[c][0]}"
                       for c in self.coupons if c not in books or books[c][1] != per_coupon[c] or per_coupon[c] > books[c][0]]
        add("rush: every coupon's issued_quantity = its user_coupons rows <= its stock", count_wrong,
            f"{len(self.coupons)} coupons, {len(rows)} rows")
        twice = [f"coupon {c} user {u}: {n} rows" for (c, u), n in collections.Counter((c, u) for _, c, u, _ in rows).items()
                 if n > 1]
        add("rush: no user holds two of a coupon", twice)
        lost = [f"coupon {c}: {per_coupon[c]} of {books.get(c, (STOCK, 0))[0]} issued after the sweep" for c in self.coupons
                if per_coupon[c] != books.get(c, (STOCK, 0))[0]]
        add("rush: no stock lost (after the rush and a sweep by fresh users, every coupon sold out exactly)", lost,
            f"{len(self.coupons)} coupons of {STOCK}, all issued")

        # Every 200 a client got is its row; every row is a client's 200.
        not_row, unanswered, unexpected, body_diff, fresh2, leaks, bad5xx = [], [], [], [], [], [], []
        acked = 0
        for op in ops:
            if op.final is None:
                unanswered.append(f"user {op.user} coupon {op.coupon} key {op.key}: {[answer(t) for t in op.tries][-3:]}")
            finals = [t for t in op.tries if t["status"] is not None and t["status"] < 500
                      and not (t["status"] == 409 and t["code"] == "IDEMPOTENCY_KEY_IN_USE")]
            if len({(t["status"], t["body"]) for t in finals}) > 1:
                body_diff.append(f"key {op.key}: {[answer(t) for t in finals]}")
            if sum(1 for t in op.tries if t["status"] == 200 and not t["replayed"]) > 1:
                fresh2.append(f"key {op.key}")
            for t in op.tries:
                if t["status"] is not None and t["status"] >= 400 and INTERNALS.search(t["body"]):
                    leaks.append(f"{t['status']} {t['body'][:300]}")
                if (t["status"] or 0) >= 500 and (t["status"] != 503 or not t["retry_after"]
                                                  or not (t["content_type"] or "").startswith("application/problem+json")):
                    bad5xx.append(f"{t['status']} ct={t['content_type']} retry-after={t['retry_after']} {t['body'][:200]}")
            for t in op.tries:
                if t["status"] != 200:
                    continue
                try:
                    b = json.loads(t["body"])
                except ValueError:
                    not_row.append(f"key {op.key}: a 200 that is not JSON: {t['body'][:200]}")
                    continue
                row = by_id.get(b.get("userCouponId"))
                if row != (op.coupon, op.user, op.key) or b.get("couponId") != op.coupon or b.get("userId") != op.user:
                    not_row.append(f"key {op.key} (user {op.user}, coupon {op.coupon}): 200 {t['body'][:160]} but the row is {row}")
            if op.final and op.final["status"] == 200:
                acked += 1
            elif op.final and not (op.final["status"] == 422 and op.final["code"] in RUSH_REFUSALS):
                unexpected.append(f"user {op.user} coupon {op.coupon}: {answer(op.final)} {op.final['body'][:160]}")
        phantom = []
        for i, (c, u, k) in by_id.items():
            op = by_key.get((u, k))
            if op is None or op.coupon != c:
                phantom.append(f"row {i} (coupon {c}, user {u}, key {k}): no client sent it")
            elif not (op.final and op.final["status"] == 200):
                phantom.append(f"row {i} (coupon {c}, user {u}): its client's answer was "
                               f"{answer(op.final) if op.final else 'none'}")
        add("rush: every 200 a client got is its user_coupons row (id, coupon, user, key)", not_row,
            f"{acked} clients ended on 200")
        add("rush: every user_coupons row is a client's 200 (none unacknowledged, none of a key no client sent)", phantom,
            f"{len(rows)} rows")
        add("rush: every client got an answer (200 or 422 COUPON_SOLD_OUT)", unanswered + unexpected,
            f"{len(ops)} clients: {acked} issued, {sum(1 for op in ops if op.final and op.final['status'] == 422)} sold out")
        add("rush: all answers of one key byte-identical; at most one non-replayed 200", body_diff + fresh2)
        add("rush: no error body shows internals; every 5xx a problem+json 503 with Retry-After", leaks + bad5xx)

        tries = [t for op in ops for t in op.tries]
        early = [op for wave in self.waves for op in wave if op.final and op.final["code"] == "COUPON_SOLD_OUT"
                 and sum(1 for o in wave if o.final and o.final["status"] == 200) < STOCK]
        self.counts = {
            "rush clients": len(ops), "rush requests": len(tries), "rush retries": len(tries) - len(ops),
            "rush issued": acked, "rush sold out": sum(1 for op in ops if op.final and op.final["code"] == "COUPON_SOLD_OUT"),
            "rush 5xx": sum(1 for t in tries if (t["status"] or 0) >= 500),
            "rush transport errors": sum(1 for t in tries if t["err"]),
            "rush replayed after a failed try": sum(1 for op in ops if op.final and op.final["replayed"]
                                                   and any(t["err"] or (t["status"] or 0) >= 500 for t in op.tries)),
            # Sold out while the wave's coupon still had units: units pending at the fault, held by the gate
            # until its pending lifetime passed (the sweep issued them).
            "rush sold out before the stock was gone": len(early),
        }
        log(f"  rush: {self.counts}")
        return out


async def rush_with(sc: Scenario, strike) -> None:
    """The rush, with `strike(rush)` (the fault) running beside its waves; then every client
    answered, the sweep after the gate's pending lifetime, and the books' readings."""
    rush = Rush(sc)
    sc.rush = rush
    await rush.create_coupons()
    waves = asyncio.create_task(rush.run_waves())
    try:
        await strike(rush)
    finally:
        await waves
        await rush.finish()
    pending = (sc.spec.lock_wait_ms + sc.spec.lock_lease_ms) / 1000
    await rush.sweep(sc.now() + pending + 1)


def rush_evidence(sc: Scenario) -> None:
    """The rush's checks (and its records), as evidence of the scenario."""
    rush: Rush | None = getattr(sc, "rush", None)
    if rush is None:
        sc.evidence.append(("rush ran", False, "no rush"))
        return
    rush.save()
    sc.evidence += rush.check()
    sc.counts.update(rush.counts)
