"""The driver: operations, their tries, and the record of every request and answer; a scenario's spec.

The load: charges, uses, payments of orders made before it, refunds of the payments some
client was answered 200 for, and cancellations of orders (some racing a payment of the same
order). A client learns from its final answers (`Scenario._learn`) which payments exist and
how much of each is refunded at least, so that the refunds it makes next are of real
payments and its "more than can be left" is always that.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import random
import re
import time
import uuid
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from lib.common import (BIN, HOST_IP, LEDGER_SIGN, MAX_TRIES, NETNS, NS_IP, NS_PORT, OP_DEADLINE,
                        ORDERS_PER_USER, REFUND_KEYS_PER_PAYMENT, SEED_BALANCE, USERS, clean_env, free_port,
                        log, sh)
from lib.http import Http
from lib.servers import Instance, Redis, RedisCluster

if TYPE_CHECKING:
    from lib.suite import Suite


# The ledger kind each keyed operation writes.
ENTRY_KIND = {"charge": "CHARGE", "use": "USE", "payment": "PAYMENT", "refund": "REFUND"}


@dataclasses.dataclass
class Op:
    id: int
    # The idempotency key; a cancellation has none (it is idempotent by itself), and its
    # `key` only names it in the records and in X-Request-Id.
    key: str
    user: int  # for a refund, the payment's user (whose key space the key is in)
    kind: str  # charge | use | payment | refund | cancel | issue (a coupon rush's: lib/rush.py)
    # For a payment, the order's amount; for a refund, the amount asked (None: the rest).
    amount: int | None
    order: int | None
    key_in: str  # body | header
    group: str  # load, a refund's plan (refund:partial, …), a cancellation's (cancel:race, …), or a storm
    payment: int | None = None  # the payment a refund is of
    reason: str | None = None  # a refund's reason (not part of its fingerprint)
    coupon: int | None = None  # the coupon an issue is of
    tries: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    final: dict[str, Any] | None = None

    @property
    def keyed(self) -> bool:
        return self.kind != "cancel"

    def fingerprint(self) -> tuple:
        """What the service compares under one key (docs/api.md): the reason of a refund is
        not part of it."""
        if self.kind == "refund":
            return (self.kind, self.user, self.payment, self.amount)
        return (self.kind, self.user, self.amount if self.kind != "payment" else self.order)

    def effect(self) -> int:
        """The change to the balance, for the kinds whose amount is known before the answer
        (a refund's is the ledger's: see checks)."""
        assert self.amount is not None and self.kind in ("charge", "use", "payment")
        return LEDGER_SIGN[ENTRY_KIND[self.kind]] * self.amount

    def request(self) -> tuple[str, bytes, dict[str, str]]:
        headers: dict[str, str] = {}
        if self.kind == "cancel":
            return f"/api/orders/{self.order}/cancel", b"{}", headers
        if self.kind == "payment":
            payload: dict[str, Any] = {"orderId": self.order, "userId": self.user}
            path = "/api/payments"
        elif self.kind == "issue":
            payload = {"userId": self.user}
            path = f"/api/coupons/{self.coupon}/issue"
        elif self.kind == "refund":
            payload = {}
            if self.amount is not None:
                payload["amount"] = self.amount
            if self.reason is not None:
                payload["reason"] = self.reason
            path = f"/api/payments/{self.payment}/refunds"
        else:
            payload = {"amount": self.amount}
            path = f"/api/users/{self.user}/balance/{self.kind}"
        if self.key_in == "header":
            headers["Idempotency-Key"] = self.key
        else:
            payload["idempotencyKey"] = self.key
        return path, json.dumps(payload, separators=(",", ":")).encode(), headers


@dataclasses.dataclass
class Paid:
    """A payment some client was answered 200 for: what refunds are made of."""
    payment: int
    user: int
    order: int
    amount: int
    # The highest refundedTotal a 200 refund answer showed: a lower bound of the real total
    # (refunds in flight only add to it), so asking more than amount - known is always
    # above what is left.
    known_refunded: int = 0
    refund_ops: list[Op] = dataclasses.field(default_factory=list)


def problem_code(t: dict[str, Any]) -> str | None:
    try:
        return json.loads(t["body"]).get("code")
    except (ValueError, AttributeError, TypeError):
        return None


def is_final(t: dict[str, Any]) -> bool:
    """A final answer ends the operation; anything else is retried with the same key."""
    if t["status"] is None:
        return False
    if t["status"] >= 500:
        return False
    if t["status"] == 409 and t["code"] == "IDEMPOTENCY_KEY_IN_USE":
        return False
    return True


class Scenario:
    """Everything one scenario run needs: its servers, its clients, and what they saw."""

    def __init__(self, spec: "Spec", suite: "Suite") -> None:
        self.spec = spec
        self.suite = suite
        self.dir = suite.workdir / spec.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dbname = "chaos_" + re.sub(r"\W", "_", spec.name)
        self.http = Http()
        self.ops: list[Op] = []
        self.instances: list[Instance] = []
        self.redis: Redis | None = None
        self.cluster: RedisCluster | None = None
        self.orders: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self.storm_orders: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        # Payments answered 200, by id, and those still taking new refund keys.
        self.paid: dict[int, Paid] = {}
        self.refundable: list[int] = []
        # Orders a cancellation was sent for (a payment of any other order must never meet
        # ORDER_CANCELLED), and pending orders cancelled (answered 200), to be paid later.
        self.cancel_targets: set[int] = set()
        self.cancelling: dict[int, tuple[int, int, int]] = {}
        self.cancelled_pending: collections.deque = collections.deque()
        self.t0 = 0.0
        self.events: list[tuple[float, str]] = []
        self.evidence: list[tuple[str, bool, str]] = []
        self.initial: dict[int, int] = {}
        self.rng = random.Random(spec.name)
        self.seq = 0
        self.connected = 0
        self.stop_at = 0.0

    # -- time ---------------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def at(self, t: float) -> None:
        await asyncio.sleep(max(0.0, t - self.now()))

    def event(self, what: str, at: float | None = None) -> None:
        """Notes a fault's step; `at` is when it was injected, if that was before now."""
        t = self.now() if at is None else at
        self.events.append((round(t, 2), what))
        log(f"  t={t:5.1f}s  {what}")

    def window(self, name: str) -> tuple[float, float]:
        """The (start, end) load times of a fault: between its 'name start' and 'name end' events."""
        start = next(t for t, e in self.events if e.startswith(name + " start"))
        end = next((t for t, e in self.events if e.startswith(name + " end")), self.now())
        return start, end

    # -- one try, and an operation's retries ---------------------------------------------

    async def send(self, op: Op, inst: Instance, n: int, barrier: asyncio.Event | None = None) -> dict[str, Any]:
        path, body, headers = op.request()
        headers["X-Request-Id"] = f"{op.key[:90]}.{n}"
        start = self.now()
        res = await self.http.request(
            inst.host, inst.port, "POST", path, body, headers, barrier=barrier,
            on_connected=self._connected if barrier else None)
        t = {
            "op": op.id, "key": op.key, "user": op.user, "kind": op.kind, "try": n, "inst": inst.name,
            "t": round(start, 3), "dur": round(self.now() - start, 3), "status": res["status"], "err": res["err"],
            "reused": res["reused"], "body": res["body"].decode("utf-8", "replace"),
            "replayed": res["headers"].get("idempotent-replayed") == "true",
            "retry_after": res["headers"].get("retry-after"),
            "content_type": res["headers"].get("content-type"),
            "request_id": res["headers"].get("x-request-id"),
        }
        t["code"] = problem_code(t) if t["status"] and t["status"] >= 400 else None
        return t

    def books(self) -> list[tuple[str, Any, dict[str, str]]]:
        """Where the books are checked: (label, database, service environment); on Galera,
        every node, each with `audit` pointed at it."""
        if not self.spec.galera:
            return [("", self.db, self.env)]
        return [(f"{n.name}: ", n, dict(self.env, DATABASE_URL=n.url(self.dbname))) for n in self.suite.galera.nodes]

    def _connected(self) -> None:
        self.connected += 1

    async def run_op(self, op: Op, pick: Callable[[int], Instance], barrier: asyncio.Event | None = None) -> None:
        deadline = time.monotonic() + OP_DEADLINE
        for n in range(MAX_TRIES):
            t = await self.send(op, pick(n), n, barrier if n == 0 else None)
            op.tries.append(t)
            if is_final(t):
                op.final = t
                self._learn(op)
                return
            if time.monotonic() > deadline:
                return
            if t["err"] == "reset" and t["reused"]:
                delay = 0.0  # a kept-alive connection the server had closed: retry at once
            else:
                delay = min(2.0, 0.1 * 2 ** n) * self.rng.uniform(0.5, 1.0)
            if t["retry_after"]:
                try:
                    delay = max(delay, min(5.0, float(t["retry_after"])))
                except ValueError:
                    pass
            await asyncio.sleep(delay)

    def _learn(self, op: Op) -> None:
        """What a final 200 teaches the load: a payment to refund, a refund's new total, a
        cancelled order to try paying."""
        if op.final is None or op.final["status"] != 200:
            return
        if op.kind == "cancel":
            if op.order in self.cancelling:
                self.cancelled_pending.append(self.cancelling.pop(op.order))
            return
        try:
            b = json.loads(op.final["body"])
        except ValueError:
            return  # the checks report a 200 that is not JSON
        if op.kind == "payment" and isinstance(b.get("paymentId"), int) and b["paymentId"] not in self.paid:
            self.paid[b["paymentId"]] = Paid(b["paymentId"], op.user, op.order, op.amount)
            self.refundable.append(b["paymentId"])
        elif op.kind == "refund" and op.payment in self.paid and isinstance(b.get("refundedTotal"), int):
            p = self.paid[op.payment]
            p.known_refunded = max(p.known_refunded, b["refundedTotal"])

    def new_op(self, user: int, kind: str, amount: int | None, order: int | None = None, group: str = "load",
               key: str | None = None, payment: int | None = None, reason: str | None = None) -> Op:
        self.seq += 1
        op = Op(id=self.seq, key=key or f"{self.spec.name}-{self.seq}-{uuid.uuid4().hex[:12]}", user=user,
                kind=kind, amount=amount, order=order, key_in=self.rng.choice(["body", "header"]), group=group,
                payment=payment, reason=reason)
        self.ops.append(op)
        return op

    def random_ops(self) -> list[Op]:
        """The next operation of a client, or two sent at once (a cancellation racing a
        payment of the same order). Payments, refunds and cancellations are a small share
        so that the orders last the whole load; charges and uses fill the rest."""
        user = self.rng.randint(1, USERS)
        r = self.rng.random()
        # Each band falls through to a charge when it has nothing to work on (no order left,
        # no payment to refund yet).
        if r < 0.08:
            if self.orders[user]:
                order, amount = self.orders[user].popleft()
                return [self.new_op(user, "payment", amount, order)]
        elif r < 0.11:
            ops = self.cancel_ops(user)
            if ops:
                return ops
        elif r < 0.23:
            if self.refundable:
                return [self.refund_op()]
        if r < 0.55:
            return [self.new_op(user, "charge", self.rng.randint(1, 5000))]
        if self.rng.random() < 0.05:
            # Far above any balance: a stored INSUFFICIENT_BALANCE refusal, replayed too.
            return [self.new_op(user, "use", 900_000_000)]
        return [self.new_op(user, "use", self.rng.randint(1, 3000))]

    def cancel_ops(self, user: int) -> list[Op]:
        """A cancellation: racing a payment of a pending order (half), of a pending order
        nobody pays, of an order paid already (409 ORDER_ALREADY_PAID, not stored); or a
        payment of an order cancelled already (409 ORDER_CANCELLED, stored: sent twice)."""
        c = self.rng.random()
        if c < 0.5:
            if not self.orders[user]:
                return []
            order, amount = self.orders[user].popleft()
            self.cancel_targets.add(order)
            return [self.new_op(user, "payment", amount, order, group="cancel:race"),
                    self.new_op(user, "cancel", None, order, group="cancel:race")]
        if c < 0.7:
            if not self.orders[user]:
                return []
            order, amount = self.orders[user].popleft()
            self.cancel_targets.add(order)
            self.cancelling[order] = (user, order, amount)
            return [self.new_op(user, "cancel", None, order, group="cancel:pending")]
        if c < 0.85:
            if not self.cancelled_pending:
                return []
            u, order, amount = self.cancelled_pending.popleft()
            key = f"{self.spec.name}-{self.seq + 1}-paycancelled-{uuid.uuid4().hex[:12]}"
            # The same key twice, one after the other: the stored 409 and its replay.
            return [self.new_op(u, "payment", amount, order, group="cancel:pay-cancelled", key=key),
                    self.new_op(u, "payment", amount, order, group="cancel:pay-cancelled:again", key=key)]
        if self.paid:
            p = self.paid[self.rng.choice(list(self.paid))]
            self.cancel_targets.add(p.order)
            return [self.new_op(p.user, "cancel", None, p.order, group="cancel:paid")]
        return []

    def refund_op(self) -> Op:
        """A refund of a payment some client was answered 200 for: a part of it, the rest
        (no amount), more than can be left (always 422 REFUND_EXCEEDS_PAYMENT), or an
        earlier refund's key sent again with the same amount (a replay; sometimes with
        another reason, which is not part of the fingerprint). Each payment gets at most
        REFUND_KEYS_PER_PAYMENT keys, from clients that race each other."""
        pid = self.rng.choice(self.refundable)
        p = self.paid[pid]
        fresh = [o for o in p.refund_ops if o.group != "refund:again"]
        if len(fresh) + 1 >= REFUND_KEYS_PER_PAYMENT:
            self.refundable.remove(pid)
        c = self.rng.random()
        reason = self.rng.choice([None, "size", "damaged", "late delivery", "ünïcode ✓"])
        if c < 0.2 and fresh:
            first = self.rng.choice(fresh)
            if self.rng.random() < 0.5:
                reason = first.reason
            op = self.new_op(p.user, "refund", first.amount, group="refund:again", key=first.key,
                             payment=pid, reason=reason)
        elif c < 0.35:
            # Above amount - known_refunded >= what is left, whatever else is in flight.
            op = self.new_op(p.user, "refund", p.amount - p.known_refunded + self.rng.randint(1, 500),
                             group="refund:exceeding", payment=pid, reason=reason)
        elif c < 0.55:
            op = self.new_op(p.user, "refund", None, group="refund:rest", payment=pid, reason=reason)
        else:
            op = self.new_op(p.user, "refund", self.rng.randint(1, max(1, p.amount // 4)), group="refund:partial",
                             payment=pid, reason=reason)
        p.refund_ops.append(op)
        return op

    def any_instance(self, _n: int) -> Instance:
        return self.rng.choice(self.instances)

    async def worker(self) -> None:
        while time.monotonic() < self.stop_at:
            ops = self.random_ops()
            if len(ops) == 1:
                await self.run_op(ops[0], self.any_instance)
            elif ops[0].group == "cancel:race":
                # Both at once, through two different instances when there are two.
                a = self.rng.randrange(len(self.instances))
                b = (a + 1) % len(self.instances)
                await asyncio.gather(self.run_op(ops[0], lambda _n: self.instances[a]),
                                     self.run_op(ops[1], lambda _n: self.instances[b]))
            else:
                for op in ops:  # one after the other: the second replays the first's answer
                    await self.run_op(op, self.any_instance)

    # -- setup --------------------------------------------------------------------------

    def setup(self) -> None:
        s, suite = self.spec, self.suite
        # On Galera the schema and the seed go through node 1 (migrations are not
        # serialised across nodes), and instance A, B, C talk to node 1, 2, 3.
        db = suite.galera.nodes[0] if s.galera else suite.db
        self.db = db
        db.sql(f"drop database if exists {self.dbname}; create database {self.dbname}")
        binds = ["127.0.0.1"] + ([HOST_IP] if s.netns else [])
        if s.redis_cluster:
            # The lock on a 6-node Redis Cluster (scripts/redis-cluster.sh) instead of one Redis.
            self.cluster = RedisCluster(self.dir / "redis-cluster")
            suite.clusters.append(self.cluster)
            redis_url = self.cluster.up()
        else:
            self.redis = Redis(self.dir, binds)
            self.redis.start()
            redis_url = f"redis://127.0.0.1:{self.redis.port}"
        base_env = {
            "DATABASE_URL": db.url(self.dbname), "REDIS_URL": redis_url,
            "REDIS_KEY_PREFIX": f"chaos:{s.name}:", "LOCK_ON_REDIS_DOWN": s.mode,
            "LOCK_WAIT_MS": str(s.lock_wait_ms), "LOCK_LEASE_MS": str(s.lock_lease_ms),
            "LOG_FORMAT": "json", "RUST_LOG": "info", "MIGRATE_ON_START": "true", "SEED_USERS": "0",
            "HTTP_WORKERS": "2", "SHUTDOWN_TIMEOUT_SECS": "2",
        }
        base_env.update(s.env)
        self.env = base_env
        r = sh([str(BIN), "migrate"], env=clean_env(base_env), check=False)
        if r.returncode != 0:
            raise RuntimeError(f"migrate failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
        r = sh([str(BIN), "seed", "--users", str(max(USERS, s.seed_users)), "--balance", str(SEED_BALANCE)],
               env=clean_env(base_env), check=False)
        if r.returncode != 0:
            raise RuntimeError(f"seed failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
        for i in range(s.host_instances):
            name = "ABCDEFG"[i]
            port = free_port()
            env = dict(base_env, BIND_ADDR=f"127.0.0.1:{port}")
            if s.galera:
                env["DATABASE_URL"] = suite.galera.nodes[i % len(suite.galera.nodes)].url(self.dbname)
                # Migrated once through node 1 above; a run per node at once is not safe.
                env["MIGRATE_ON_START"] = "false"
            self.instances.append(Instance(name, "127.0.0.1", port, env, self.dir))
        if s.netns:
            env = dict(base_env, BIND_ADDR=f"{NS_IP}:{NS_PORT}", DATABASE_URL=db.url(self.dbname, HOST_IP),
                       REDIS_URL=f"redis://{HOST_IP}:{self.redis.port}")
            self.instances.append(Instance("N", NS_IP, NS_PORT, env, self.dir, netns=NETNS))
        for inst in self.instances:
            inst.start()
        for inst in self.instances:
            inst.wait_ready()
        self.initial = {int(u): int(b) for u, b in db.sql("select id, balance from users", self.dbname)}

    async def create_orders(self) -> None:
        sem = asyncio.Semaphore(8)

        async def one(user: int, target: collections.deque) -> None:
            amount = self.rng.randint(100, 5000)
            body = json.dumps({"userId": user, "amount": amount}).encode()
            async with sem:
                inst = self.rng.choice(self.instances)
                res = await self.http.request(inst.host, inst.port, "POST", "/api/orders", body)
            if res["status"] != 201:
                raise RuntimeError(f"creating an order: {res['status']} {res['err']} {res['body'][:300]!r}")
            target.append((json.loads(res["body"])["orderId"], amount))

        jobs = [one(u, self.orders[u]) for u in range(1, USERS + 1) for _ in range(ORDERS_PER_USER)]
        if self.spec.storms:
            jobs += [one(u, self.storm_orders[u]) for u in (1, 2) for _ in range(102)]
        await asyncio.gather(*jobs)

    # -- the run ------------------------------------------------------------------------

    async def run(self) -> None:
        await self.create_orders()
        self.t0 = time.monotonic()
        # Storm scenarios keep their background load until the last storm is over.
        self.stop_at = self.t0 + (90 if self.spec.storms else self.spec.duration)
        workers = [asyncio.create_task(self.worker()) for _ in range(self.spec.workers or self.suite.workers)]
        fault = asyncio.create_task(self.spec.fault(self))
        try:
            await fault
        finally:
            # Stop sending new operations when the load time is up (or the fault failed),
            # and let every operation in flight retry to its end.
            if self.spec.storms or not fault.done() or fault.cancelled() or fault.exception():
                self.stop_at = min(self.stop_at, time.monotonic())
            await asyncio.gather(*workers)
            self.event("every client finished")
            self.http.close_all()


@dataclasses.dataclass
class Spec:
    name: str
    injected: str
    checked: str
    fault: Callable[[Scenario], Awaitable[None]]
    evidence: Callable[[Scenario], None]
    duration: float = 24
    mode: str = "degrade"
    lock_wait_ms: int = 3000
    lock_lease_ms: int = 5000
    host_instances: int = 2
    netns: bool = False
    storms: bool = False
    workers: int | None = None
    # On the suite's Galera cluster, one instance per node, instead of its single MariaDB.
    galera: bool = False
    # The lock on a Redis Cluster of the scenario's own (scripts/redis-cluster.sh) instead of
    # one Redis; `Scenario.cluster` then holds it and `Scenario.redis` is None.
    redis_cluster: bool = False
    # Users seeded beyond the load's USERS (a coupon rush's crowd: lib/rush.py); 0: USERS.
    seed_users: int = 0
    # Settings of the service beyond the suite's (GROUP_COMMIT=on for group-commit-kill9).
    env: dict[str, str] = dataclasses.field(default_factory=dict)
