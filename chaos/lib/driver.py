"""The driver: operations, their tries, and the record of every request and answer; a scenario's spec."""

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

from lib.common import (BIN, HOST_IP, MAX_TRIES, NETNS, NS_IP, NS_PORT, OP_DEADLINE, ORDERS_PER_USER,
                        SEED_BALANCE, USERS, clean_env, free_port, log, sh)
from lib.http import Http
from lib.servers import Instance, Redis, RedisCluster

if TYPE_CHECKING:
    from lib.suite import Suite


@dataclasses.dataclass
class Op:
    id: int
    key: str
    user: int
    kind: str  # charge | use | payment
    amount: int  # for a payment, the order's amount
    order: int | None
    key_in: str  # body | header
    group: str  # load, or the storm it belongs to
    tries: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    final: dict[str, Any] | None = None

    def fingerprint(self) -> tuple:
        return (self.kind, self.user, self.amount if self.kind != "payment" else self.order)

    def effect(self) -> int:
        return self.amount if self.kind == "charge" else -self.amount

    def request(self) -> tuple[str, bytes, dict[str, str]]:
        headers: dict[str, str] = {}
        if self.kind == "payment":
            payload: dict[str, Any] = {"orderId": self.order, "userId": self.user}
            path = "/api/payments"
        else:
            payload = {"amount": self.amount}
            path = f"/api/users/{self.user}/balance/{self.kind}"
        if self.key_in == "header":
            headers["Idempotency-Key"] = self.key
        else:
            payload["idempotencyKey"] = self.key
        return path, json.dumps(payload, separators=(",", ":")).encode(), headers


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

    def new_op(self, user: int, kind: str, amount: int, order: int | None = None, group: str = "load",
               key: str | None = None) -> Op:
        self.seq += 1
        op = Op(id=self.seq, key=key or f"{self.spec.name}-{self.seq}-{uuid.uuid4().hex[:12]}", user=user,
                kind=kind, amount=amount, order=order, key_in=self.rng.choice(["body", "header"]), group=group)
        self.ops.append(op)
        return op

    def random_op(self) -> Op:
        user = self.rng.randint(1, USERS)
        r = self.rng.random()
        if r < 0.2 and self.orders[user]:
            order, amount = self.orders[user].popleft()
            return self.new_op(user, "payment", amount, order)
        if r < 0.55:
            return self.new_op(user, "charge", self.rng.randint(1, 5000))
        if self.rng.random() < 0.05:
            # Far above any balance: a stored INSUFFICIENT_BALANCE refusal, replayed too.
            return self.new_op(user, "use", 900_000_000)
        return self.new_op(user, "use", self.rng.randint(1, 3000))

    def any_instance(self, _n: int) -> Instance:
        return self.rng.choice(self.instances)

    async def worker(self) -> None:
        while time.monotonic() < self.stop_at:
            await self.run_op(self.random_op(), self.any_instance)

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
        self.env = base_env
        r = sh([str(BIN), "migrate"], env=clean_env(base_env), check=False)
        if r.returncode != 0:
            raise RuntimeError(f"migrate failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
        r = sh([str(BIN), "seed", "--users", str(USERS), "--balance", str(SEED_BALANCE)],
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
