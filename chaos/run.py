#!/usr/bin/env python3
"""The fault suite of balance-service: `just chaos` (or `python3 chaos/run.py`).

Each scenario starts its own servers (one private MariaDB for the whole suite, one Redis
per scenario, two or three service instances), drives a mixed load of charges, uses and
payments through every instance, injects one fault mid-load, waits for every client to
finish, and then checks the books and every answer the clients got:

- the audit is clean (`balance-service audit` when the binary has it, and the same checks
  in SQL here in every case);
- no (user, key) has two ledger entries;
- every acknowledged operation (a 200, fresh or replayed) has exactly one ledger entry of
  its kind and amount, a stored refusal has none, and no ledger entry has a key that no
  client sent;
- each user's balance equals its opening balance plus the acknowledged effects;
- every operation got a final answer (clients retry timeouts, connection errors, 5xx and
  409 IDEMPOTENCY_KEY_IN_USE with the same key, honouring Retry-After);
- every answer of one key is byte-identical, and at most one 200 per key is not a replay;
- no error body shows internals, every 5xx is a problem+json 503 with Retry-After;
- the fault really happened (scenario-specific evidence).

Standard library only. Run as root (it starts servers, and the namespace scenario creates
a network namespace and a veth pair). Nothing here touches the machine's own MariaDB or
Redis: every server it talks to is one it started, on 127.0.0.1 or on the veth pair it
created.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import datetime as dt
import fcntl
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release" / "balance-service"
DOC = ROOT / "docs" / "reliability.md"
DOC_START = "<!-- chaos:results:start -->"
DOC_END = "<!-- chaos:results:end -->"

# The namespace scenario's private link: a veth pair in a /30 that exists only inside this
# machine. Nothing is ever sent to any other address.
NETNS = "bschaos"
VETH_HOST = "bschaos0"
VETH_NS = "bschaos1"
HOST_IP = "10.213.77.1"
NS_IP = "10.213.77.2"
NS_PORT = 18080
# One run at a time on a machine: runs share the namespace name and its /30, and a run
# removes a namespace left over by an interrupted one.
RUN_LOCK = Path("/tmp/balance-service-chaos.lock")

USERS = 16
SEED_BALANCE = 1_000_000
ORDERS_PER_USER = 30
WORKERS = 12
MAX_TRIES = 20  # per operation, with backoff: about a minute of retrying at most
OP_DEADLINE = 75.0  # seconds an operation keeps retrying
TRY_TIMEOUT = 10.0  # seconds one try may take before the client gives up on it
IDLE_MAX = 1.5  # seconds a kept-alive connection may idle before it is dropped

# What an error body must never contain.
INTERNALS = re.compile(
    r"sqlx|mysql|mariadb|redis|fred|panicked|at src/|src/|\.rs:|Error \{|Os \{|SELECT|INSERT|"
    r"UPDATE |DELETE |stack|backtrace|tokio|actix|errno|Connection refused|os error|HY\d{3}|\(\d{4}\)|"
    r"io error|unwrap|thread '|NOSCRIPT|WRONGTYPE|ERR ",
    re.IGNORECASE,
)
RETRYABLE_CODES = {"IDEMPOTENCY_KEY_IN_USE", "LOCK_TIMEOUT", "SERVICE_UNAVAILABLE"}
STORED_REFUSALS = {"INSUFFICIENT_BALANCE", "BALANCE_LIMIT_EXCEEDED", "ORDER_ALREADY_PAID"}

T_START = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T_START:7.1f}s] {msg}", flush=True)


def sh(args: list[str], check: bool = True, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, timeout=timeout, capture_output=True, text=True, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------
# Processes we start, and only those: every one is killed at the end, by its pid.
# ---------------------------------------------------------------------------------------


class Procs:
    def __init__(self) -> None:
        self.live: list[subprocess.Popen] = []

    def spawn(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        out = open(log_path, "ab")
        p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        out.close()
        self.live.append(p)
        return p

    def kill_all(self) -> None:
        for p in self.live:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)  # works on SIGSTOPped processes too
                except ProcessLookupError:
                    pass
        for p in self.live:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.live.clear()


PROCS = Procs()


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """The service sees only what we give it (no API_TOKEN or DATABASE_URL of the caller)."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TZ") if k in os.environ}
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------
# Servers: our own MariaDB, our own Redis, the service instances, the namespace.
# ---------------------------------------------------------------------------------------


class MariaDB:
    def __init__(self, base: Path, binds: list[str]) -> None:
        self.base = base
        self.datadir = base / "data"
        self.sock = base / "mariadb.sock"
        self.pidfile = base / "mariadb.pid"
        self.errlog = base / "mariadb.err"
        self.port = free_port()
        self.binds = binds
        self.proc: subprocess.Popen | None = None

    def install(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        sh(["mariadb-install-db", "--no-defaults", f"--datadir={self.datadir}",
            "--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve",
            "--user=root"], timeout=180)

    def start(self) -> None:
        self.proc = PROCS.spawn([
            "mariadbd", "--no-defaults", f"--datadir={self.datadir}", f"--socket={self.sock}",
            f"--port={self.port}", f"--bind-address={','.join(self.binds)}", f"--pid-file={self.pidfile}",
            "--innodb-buffer-pool-size=64M", "--user=root", "--skip-name-resolve",
            f"--log-error={self.errlog}", "--max-connections=400", "--innodb-flush-log-at-trx-commit=1",
        ], self.base / "mariadbd.out")
        self.wait_ready(120)
        self.sql("create user if not exists 'chaos'@'%' identified by 'chaos'; "
                 "grant all on *.* to 'chaos'@'%'")

    def wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited with {self.proc.returncode}; see {self.errlog}")
            r = sh(self.client() + ["-e", "select 1"], check=False, timeout=10)
            if r.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"mariadbd not ready after {timeout}s; see {self.errlog}")

    def client(self, db: str | None = None) -> list[str]:
        args = ["mariadb", "--no-defaults", f"--socket={self.sock}", "-uroot", "-N", "-B"]
        return args + ([db] if db else [])

    def sql(self, query: str, db: str | None = None, timeout: float = 120) -> list[list[str]]:
        r = sh(self.client(db) + ["-e", query], check=False, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"sql failed ({r.returncode}): {r.stderr.strip()}\n{query}")
        return [line.split("\t") for line in r.stdout.splitlines() if line]

    def url(self, db: str, host: str = "127.0.0.1") -> str:
        return f"mysql://chaos:chaos@{host}:{self.port}/{db}"

    def kill9(self) -> int:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=30)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)


class Redis:
    def __init__(self, base: Path, binds: list[str]) -> None:
        self.base = base
        self.port = free_port()
        self.binds = binds
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", " ".join(self.binds),
                "--save", "", "--appendonly", "no", "--daemonize", "no"]
        if any(b != "127.0.0.1" for b in self.binds):
            # Listening on our veth address too; without a password protected mode would
            # refuse the namespace's connections.
            args += ["--protected-mode", "no"]
        self.proc = PROCS.spawn(args, self.base / f"redis-{self.port}.log")
        end = time.monotonic() + 15
        while time.monotonic() < end:
            if self.ping():
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill9(self) -> int:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=10)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)


@dataclasses.dataclass
class Instance:
    name: str
    host: str
    port: int
    env: dict[str, str]
    logdir: Path
    netns: str | None = None
    proc: subprocess.Popen | None = None
    exits: list[int] = dataclasses.field(default_factory=list)

    def start(self) -> None:
        args = [str(BIN), "serve"]
        if self.netns:
            # `ip netns exec` execs the binary: the pid we hold is the service's own.
            args = ["ip", "netns", "exec", self.netns] + args
        self.proc = PROCS.spawn(args, self.logdir / f"instance-{self.name}.log", clean_env(self.env))

    def wait_ready(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"instance {self.name} exited with {self.proc.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    s.settimeout(3)
                    s.sendall(f"GET /health/ready HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n".encode())
                    data = s.recv(64)
                    if data.startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"instance {self.name} not ready after {timeout}s")

    def kill9(self) -> int:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        rc = self.proc.wait(timeout=10)
        self.exits.append(rc)
        return rc


class Netns:
    """A network namespace joined to this machine by its own veth pair (a private /30)."""

    def __init__(self) -> None:
        self.up = False
        self.cut_method = ""

    @staticmethod
    def _teardown() -> None:
        sh(["ip", "link", "del", VETH_HOST], check=False)
        sh(["ip", "netns", "del", NETNS], check=False)

    def setup(self) -> None:
        self._teardown()  # a leftover of an interrupted run
        addrs = sh(["ip", "-4", "addr"]).stdout
        if HOST_IP.rsplit(".", 1)[0] + "." in addrs:
            raise RuntimeError(f"{HOST_IP}/30 is already in use on this machine")
        for args in (
            ["ip", "netns", "add", NETNS],
            ["ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS],
            ["ip", "link", "set", VETH_NS, "netns", NETNS],
            ["ip", "addr", "add", f"{HOST_IP}/30", "dev", VETH_HOST],
            ["ip", "link", "set", VETH_HOST, "up"],
            ["ip", "netns", "exec", NETNS, "ip", "addr", "add", f"{NS_IP}/30", "dev", VETH_NS],
            ["ip", "netns", "exec", NETNS, "ip", "link", "set", VETH_NS, "up"],
            ["ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up"],
        ):
            r = sh(args, check=False)
            if r.returncode != 0:
                self._teardown()
                raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
        self.up = True
        # How to cut Redis off: an iptables DROP rule inside the namespace when iptables
        # works there, else a policy route sending the Redis port to a blackhole.
        probe = ["ip", "netns", "exec", NETNS, "iptables", "-w", "-L", "OUTPUT", "-n"]
        self.cut_method = "iptables" if shutil.which("iptables") and sh(probe, check=False).returncode == 0 else "iprule"

    def teardown(self) -> None:
        if self.up:
            self._teardown()
            self.up = False

    def cut(self, port: int) -> None:
        if self.cut_method == "iptables":
            sh(["ip", "netns", "exec", NETNS, "iptables", "-w", "-A", "OUTPUT", "-p", "tcp", "-d", HOST_IP,
                "--dport", str(port), "-j", "DROP"])
        else:
            sh(["ip", "netns", "exec", NETNS, "ip", "route", "add", "blackhole", "default", "table", "213"])
            sh(["ip", "netns", "exec", NETNS, "ip", "rule", "add", "ipproto", "tcp", "dport", str(port),
                "table", "213", "priority", "100"])

    def restore(self, port: int) -> None:
        if self.cut_method == "iptables":
            sh(["ip", "netns", "exec", NETNS, "iptables", "-w", "-D", "OUTPUT", "-p", "tcp", "-d", HOST_IP,
                "--dport", str(port), "-j", "DROP"])
        else:
            sh(["ip", "netns", "exec", NETNS, "ip", "rule", "del", "priority", "100"])
            sh(["ip", "netns", "exec", NETNS, "ip", "route", "del", "blackhole", "default", "table", "213"])


# ---------------------------------------------------------------------------------------
# HTTP/1.1 over asyncio streams, with a small keep-alive pool per instance.
# ---------------------------------------------------------------------------------------


class Http:
    def __init__(self) -> None:
        self.idle: dict[tuple[str, int], list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]]] = \
            collections.defaultdict(list)

    def _take(self, key: tuple[str, int]):
        pool = self.idle[key]
        while pool:
            r, w, t = pool.pop()
            if time.monotonic() - t < IDLE_MAX and not w.is_closing() and not r.at_eof():
                return r, w
            w.close()
        return None

    def close_all(self) -> None:
        for pool in self.idle.values():
            for _, w, _ in pool:
                w.close()
        self.idle.clear()

    async def request(self, host: str, port: int, method: str, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None, timeout: float = TRY_TIMEOUT,
                      barrier: asyncio.Event | None = None,
                      on_connected: Callable[[], None] | None = None) -> dict[str, Any]:
        """One exchange. Never raises: transport failures come back as `err`."""
        key = (host, port)
        res: dict[str, Any] = {"status": None, "headers": {}, "body": b"", "err": None, "reused": False}
        conn = None if barrier else self._take(key)
        writer = None
        try:
            if conn is None:
                try:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 3)
                except ConnectionRefusedError:
                    res["err"] = "refused"
                    return res
                except asyncio.TimeoutError:
                    res["err"] = "connect-timeout"
                    return res
            else:
                reader, writer = conn
                res["reused"] = True
            if barrier is not None:
                if on_connected:
                    on_connected()
                await barrier.wait()
            head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: keep-alive\r\n"
            for k, v in (headers or {}).items():
                head += f"{k}: {v}\r\n"
            if body is not None:
                head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            data = head.encode() + b"\r\n" + (body or b"")
            keep = await asyncio.wait_for(self._exchange(reader, writer, data, res), timeout)
            if keep:
                self.idle[key].append((reader, writer, time.monotonic()))
                writer = None
        except asyncio.TimeoutError:
            res["err"] = "timeout"
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as e:
            res["err"] = "reset" if res["status"] is None else f"reset-after-status:{type(e).__name__}"
        except OSError as e:
            res["err"] = f"oserror:{e.errno}"
        finally:
            if writer is not None:
                writer.close()
        return res

    @staticmethod
    async def _exchange(reader, writer, data: bytes, res: dict[str, Any]) -> bool:
        writer.write(data)
        await writer.drain()
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        hdrs: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        res["status"], res["headers"] = status, hdrs
        keep = hdrs.get("connection", "").lower() != "close"
        if "content-length" in hdrs:
            res["body"] = await reader.readexactly(int(hdrs["content-length"]))
        elif hdrs.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
            res["body"] = b"".join(chunks)
        else:
            res["body"] = await reader.read()
            keep = False
        return keep


# ---------------------------------------------------------------------------------------
# The driver: operations, their tries, and the record of every request and answer.
# ---------------------------------------------------------------------------------------


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
        db = suite.db
        db.sql(f"drop database if exists {self.dbname}; create database {self.dbname}")
        binds = ["127.0.0.1"] + ([HOST_IP] if s.netns else [])
        self.redis = Redis(self.dir, binds)
        self.redis.start()
        base_env = {
            "DATABASE_URL": db.url(self.dbname), "REDIS_URL": f"redis://127.0.0.1:{self.redis.port}",
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
            self.instances.append(Instance(name, "127.0.0.1", port, dict(base_env, BIND_ADDR=f"127.0.0.1:{port}"),
                                           self.dir))
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


# ---------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------


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


async def fault_kill_mariadb(sc: Scenario) -> None:
    db = sc.suite.db
    await sc.at(6)
    t = sc.now()
    rc = await asyncio.to_thread(db.kill9)
    sc.event(f"mariadb start: SIGKILL mariadbd, exit {rc}", t)
    await sc.at(10)
    await asyncio.to_thread(db.start)
    sc.event("mariadb end: mariadbd restarted on the same datadir (crash recovery done)")
    sc.db_exit = rc


def evidence_kill_mariadb(sc: Scenario) -> None:
    start, end = sc.window("mariadb")
    during = [t for t in all_tries(sc) if start + 0.5 <= t["t"] < end]
    bad = [t for t in during if t["status"] == 503 or t["err"]]
    after = [t for t in all_tries(sc) if t["t"] > end + 5 and t["status"] == 200]
    sc.evidence.append(("mariadbd killed by SIGKILL", getattr(sc, "db_exit", None) == -9, f"exit {getattr(sc, 'db_exit', None)}"))
    sc.evidence.append(("503s while the database was down, 200s after",
                        bool(bad) and bool(after),
                        f"{len(bad)} of {len(during)} tries during the outage failed; {len(after)} 200s later"))


async def fault_kill_redis(sc: Scenario, down: tuple[float, float]) -> None:
    assert sc.redis is not None
    await sc.at(down[0])
    t = sc.now()
    rc = await asyncio.to_thread(sc.redis.kill9)
    sc.event(f"redis start: SIGKILL redis-server, exit {rc}", t)
    await sc.at(down[1])
    await asyncio.to_thread(sc.redis.start)
    sc.event("redis end: redis-server restarted on the same port (empty)")


def evidence_redis_degrade(sc: Scenario) -> None:
    start, end = sc.window("redis")
    fresh = [t for t in all_tries(sc) if start + 1 <= t["t"] and t["t"] + t["dur"] < end
             and t["status"] == 200 and not t["replayed"]]
    deg = metric(sc, "balance_lock_degraded_total")
    sc.evidence.append(("balance changes kept going while Redis was down (degrade)", len(fresh) > 0 and deg > 0,
                        f"{len(fresh)} fresh 200s inside the outage; balance_lock_degraded_total={deg:g}"))


def evidence_redis_fail(sc: Scenario) -> None:
    start, end = sc.window("redis")
    inside = [t for t in all_tries(sc) if start + 1 <= t["t"] and t["t"] + t["dur"] < end]
    unavailable = [t for t in inside if t["status"] == 503 and t["code"] == "SERVICE_UNAVAILABLE"]
    applied = [t for t in inside if t["status"] == 200 and not t["replayed"]]
    una = metric(sc, "balance_lock_unavailable_total")
    sc.evidence.append(("503 SERVICE_UNAVAILABLE while Redis was down (fail)", len(unavailable) > 0 and una > 0,
                        f"{len(unavailable)} of {len(inside)} tries; balance_lock_unavailable_total={una:g}"))
    sc.evidence.append(("no balance change applied without the lock (fail)", not applied,
                        f"{len(applied)} fresh 200s sent and answered inside the outage"
                        + (": " + ", ".join(t["key"] for t in applied[:5]) if applied else "")))


async def fault_pause_redis(sc: Scenario) -> None:
    """Transactions of users 1-2 are held on their row locks (a separate connection has
    them FOR UPDATE) while Redis is stopped past the lease: their leases expire in Redis
    while their transactions still run, and other instances take the same users' locks."""
    assert sc.redis is not None
    db = sc.suite.db
    await sc.at(5)
    holder = await asyncio.create_subprocess_exec(
        *db.client(sc.dbname), "-e",
        "start transaction; select id from users where id in (1,2) for update; select sleep(5.2); commit;",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    sc.event("rowlock start: users 1-2 locked FOR UPDATE by a separate connection for 5.2 s")
    await sc.at(5.5)
    sc.redis.signal(signal.SIGSTOP)
    sc.event(f"pause start: SIGSTOP redis-server for 3.5 s (lease {sc.spec.lock_lease_ms} ms)")
    await sc.at(9.0)
    sc.redis.signal(signal.SIGCONT)
    sc.event("pause end: SIGCONT redis-server")
    await holder.wait()
    sc.event(f"rowlock end: row locks released (exit {holder.returncode})")


def evidence_pause(sc: Scenario) -> None:
    lost = metric(sc, "balance_lock_lease_lost_total")
    errs = metric(sc, "balance_lock_redis_errors_total")
    start, end = sc.window("rowlock")
    p0, p1 = sc.window("pause")
    held = [t for t in all_tries(sc) if t["user"] <= 2 and t["t"] < p0 and t["t"] + t["dur"] > p1
            and t["status"] == 200]
    deg = metric(sc, "balance_lock_degraded_total")
    sc.evidence.append(("a lease expired while its holder's transaction was still running",
                        lost > 0 and len(held) > 0,
                        f"balance_lock_lease_lost_total={lost:g}; {len(held)} changes of users 1-2 began before "
                        f"the pause and committed after it"))
    sc.evidence.append(("requests met the paused Redis (degraded, database guard alone)", deg > 0,
                        f"balance_lock_degraded_total={deg:g}; redis errors={errs:g}; "
                        f"optimistic conflicts={metric(sc, 'balance_optimistic_conflicts_total'):g}"))


async def fault_db_stall(sc: Scenario) -> None:
    db = sc.suite.db
    await sc.at(5)
    started = time.monotonic()
    sc.event("stall start: FLUSH TABLES WITH READ LOCK held for 5 s by a separate connection")
    r = await asyncio.to_thread(sh, db.client() + ["-e", "flush tables with read lock; select sleep(5); unlock tables;"],
                                False, 120)
    sc.event(f"stall end: UNLOCK TABLES after {time.monotonic() - started:.1f} s (exit {r.returncode})")


async def fault_db_sigstop(sc: Scenario) -> None:
    db = sc.suite.db
    await sc.at(5)
    db.signal(signal.SIGSTOP)
    sc.event("stall start: SIGSTOP mariadbd for 5 s")
    await sc.at(10)
    db.signal(signal.SIGCONT)
    sc.event("stall end: SIGCONT mariadbd")


def evidence_stall(sc: Scenario) -> None:
    start, end = sc.window("stall")
    lease = sc.spec.lock_lease_ms / 1000
    slow = [t for t in all_tries(sc) if t["t"] <= start + 0.5 and t["t"] + t["dur"] >= end - 0.5
            and t["dur"] > lease]
    lost = metric(sc, "balance_lock_lease_lost_total")
    sc.evidence.append((f"requests outlived the lease ({sc.spec.lock_lease_ms} ms) during the stall",
                        len(slow) > 0 and lost > 0,
                        f"{len(slow)} tries spanned the stall; balance_lock_lease_lost_total={lost:g}; "
                        f"optimistic conflicts={metric(sc, 'balance_optimistic_conflicts_total'):g}"))


async def fault_netns_cut(sc: Scenario) -> None:
    assert sc.redis is not None
    ns = sc.suite.netns
    await sc.at(5)
    await asyncio.to_thread(ns.cut, sc.redis.port)
    sc.event(f"cut start: instance N cut off from Redis {HOST_IP}:{sc.redis.port} ({ns.cut_method}), database still reachable")
    await sc.at(17)
    await asyncio.to_thread(ns.restore, sc.redis.port)
    sc.event("cut end: Redis reachable again from the namespace")


def evidence_netns(sc: Scenario) -> None:
    start, end = sc.window("cut")
    n_ok = [t for t in all_tries(sc) if t["inst"] == "N" and start + 1 <= t["t"] and t["t"] + t["dur"] < end
            and t["status"] == 200 and not t["replayed"]]
    n_503 = [t for t in all_tries(sc) if t["inst"] == "N" and start + 1 <= t["t"] and t["t"] + t["dur"] < end
             and t["status"] == 503]
    deg = {i.name: metric(sc, "balance_lock_degraded_total", i.name) for i in sc.instances}
    una = {i.name: metric(sc, "balance_lock_unavailable_total", i.name) for i in sc.instances}
    others_ok = all(deg[i.name] == 0 and una[i.name] == 0 for i in sc.instances if i.name != "N")
    if sc.spec.mode == "degrade":
        ok = deg["N"] > 0 and len(n_ok) > 0 and others_ok
        what = f"instance N degraded ({len(n_ok)} fresh 200s while cut); degraded={deg}, unavailable={una}"
        sc.evidence.append(("only the cut-off instance lost Redis, and it kept applying changes", ok, what))
    else:
        ok = una["N"] > 0 and len(n_503) > 0 and not n_ok and others_ok
        what = (f"instance N: {len(n_503)} 503s and {len(n_ok)} fresh 200s while cut; "
                f"degraded={deg}, unavailable={una}")
        sc.evidence.append(("only the cut-off instance lost Redis, and it refused changes", ok, what))


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


# ---------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------


def all_tries(sc: Scenario) -> list[dict[str, Any]]:
    if not hasattr(sc, "_tries"):
        sc._tries = [t for op in sc.ops for t in op.tries]
    return sc._tries


def metric(sc: Scenario, name: str, inst: str | None = None) -> float:
    return sum(v for (i, n), v in sc.metrics.items() if n == name and (inst is None or i == inst))


async def scrape_metrics(sc: Scenario) -> None:
    sc.metrics = collections.defaultdict(float)
    for inst in sc.instances:
        res = await sc.http.request(inst.host, inst.port, "GET", "/metrics")
        if res["status"] != 200:
            continue
        for line in res["body"].decode().splitlines():
            if line.startswith("#") or not line.strip():
                continue
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)", line)
            if m:
                try:
                    sc.metrics[(inst.name, m.group(1))] += float(m.group(3))
                except ValueError:
                    pass
    sc.http.close_all()


async def readiness(sc: Scenario) -> list[str]:
    """Every instance ready again once the fault is over (pools and Redis reconnected)."""
    down = []
    for inst in sc.instances:
        for _ in range(40):
            res = await sc.http.request(inst.host, inst.port, "GET", "/health/ready", timeout=3)
            if res["status"] == 200:
                break
            await asyncio.sleep(0.25)
        else:
            down.append(f"{inst.name}: {res['status'] or res['err']} {res['body'][:200]!r}")
    sc.http.close_all()
    return down


def sql_audit(sc: Scenario) -> list[str]:
    """The audit's five checks, in SQL: used when the binary has no `audit`, and always as
    a second opinion."""
    q = lambda s: sc.suite.db.sql(s, sc.dbname)  # noqa: E731
    breaches: list[str] = []
    for r in q("select u.id, u.balance, coalesce(l.total, 0), n.balance_after from users u "
               "left join (select user_id, sum(case kind when 'CHARGE' then amount else -amount end) total, "
               "max(id) newest from ledger_entries group by user_id) l on l.user_id = u.id "
               "left join ledger_entries n on n.id = l.newest "
               "where coalesce(l.total, 0) <> u.balance or n.balance_after <> u.balance"):
        breaches.append(f"balance_matches_ledger: user {r[0]} balance {r[1]} ledger sum {r[2]} newest after {r[3]}")
    for r in q("select l.user_id, count(*) from ledger_entries l left join users u on u.id = l.user_id "
               "where u.id is null group by l.user_id"):
        breaches.append(f"balance_matches_ledger: {r[1]} entries of missing user {r[0]}")
    for r in q("select user_id, k, max(status), sum(is_entry) from ("
               " select user_id, idempotency_key k, response_status status, 0 is_entry from idempotency_records"
               " union all select user_id, idempotency_key, 0, 1 from ledger_entries where idempotency_key is not null"
               ") x group by user_id, k having (max(status) between 200 and 299 and sum(is_entry) <> 1) "
               "or (max(status) not between 200 and 299 and sum(is_entry) <> 0)"):
        breaches.append(f"record_has_one_effect: user {r[0]} key {r[1]} status {r[2]} ledger entries {r[3]}")
    for r in q("select user_id, idempotency_key, count(*) from ledger_entries where idempotency_key is not null "
               "group by user_id, idempotency_key having count(*) > 1"):
        breaches.append(f"key_applied_once: user {r[0]} key {r[1]} has {r[2]} ledger entries")
    for r in q("select user_id, idempotency_key, status from idempotency_records where status <> 'COMPLETED'"):
        breaches.append(f"no_record_stuck_in_flight: user {r[0]} key {r[1]} {r[2]}")
    for r in q("select o.id, o.status, count(p.id) from orders o left join payments p on p.order_id = o.id "
               "group by o.id, o.status having (o.status = 'PAID' and count(p.id) <> 1) "
               "or (o.status <> 'PAID' and count(p.id) <> 0)"):
        breaches.append(f"paid_order_has_one_payment: order {r[0]} {r[1]} with {r[2]} payments")
    for r in q("select p.id, p.order_id from payments p left join orders o on o.id = p.order_id "
               "where o.id is null or o.user_id <> p.user_id or o.amount <> p.amount"):
        breaches.append(f"paid_order_has_one_payment: payment {r[0]} does not match order {r[1]}")
    for r in q("select user_id, k, amount, sum(is_payment), sum(1 - is_payment) from ("
               " select user_id, idempotency_key k, amount, 1 is_payment from payments"
               " union all select user_id, idempotency_key, amount, 0 from ledger_entries where kind = 'PAYMENT'"
               ") x group by user_id, k, amount having sum(is_payment) <> 1 or sum(1 - is_payment) <> 1"):
        breaches.append(f"paid_order_has_one_payment: user {r[0]} key {r[1]} amount {r[2]}: "
                        f"{r[3]} payments, {r[4]} PAYMENT entries")
    return breaches


def binary_audit(sc: Scenario) -> tuple[bool | None, str]:
    """`balance-service audit` when the binary has it: (clean?, output); (None, why) if not."""
    if not sc.suite.has_audit:
        return None, "the binary has no `audit` subcommand"
    r = sh([str(BIN), "audit"], env=clean_env(sc.env), check=False, timeout=300)
    out = (r.stdout + r.stderr).strip()
    (sc.dir / "audit.txt").write_text(out + f"\n(exit {r.returncode})\n")
    if r.returncode == 0:
        return True, "exit 0"
    return False, f"exit {r.returncode}: {out[-1500:]}"


def check_scenario(sc: Scenario) -> list[tuple[str, bool, str]]:
    db = sc.suite.db
    checks: list[tuple[str, bool, str]] = []

    def add(name: str, problems: list[str], ok_detail: str = "") -> None:
        detail = "; ".join(problems[:8]) + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else "")
        checks.append((name, not problems, detail or ok_detail))

    # The books.
    ok, out = binary_audit(sc)
    if ok is not None:
        checks.append(("balance-service audit clean", ok, out))
    breaches = sql_audit(sc)
    add("audit checks in SQL clean", breaches, "5 checks, 0 breaches")

    ledger: dict[tuple[int, str], list[tuple[str, int, int]]] = collections.defaultdict(list)
    for user, key, kind, amount, eid in db.sql(
            "select user_id, idempotency_key, kind, amount, id from ledger_entries where idempotency_key is not null",
            sc.dbname):
        ledger[(int(user), key)].append((kind, int(amount), int(eid)))
    sc.ledger = ledger
    sc.order_status = {int(o): (st, int(a), k if k != "NULL" else None) for o, st, a, k in db.sql(
        "select o.id, o.status, o.amount, p.idempotency_key from orders o left join payments p on p.order_id = o.id",
        sc.dbname)}
    balances = {int(u): int(b) for u, b in db.sql("select id, balance from users", sc.dbname)}

    add("no key applied twice", [f"user {u} key {k}: {len(v)} entries" for (u, k), v in ledger.items() if len(v) > 1])

    by_key: dict[tuple[int, str], list[Op]] = collections.defaultdict(list)
    for op in sc.ops:
        by_key[(op.user, op.key)].append(op)

    phantom = [f"user {u} key {k}" for (u, k) in ledger if (u, k) not in by_key]
    missing, wrong, unacked, refused_applied, mismatch, fresh2, body_diff, bad_body = [], [], [], [], [], [], [], []
    expected = dict(sc.initial)
    acked = applied = refusals = 0
    for (user, key), senders in by_key.items():
        entries = ledger.get((user, key), [])
        oks = [s for s in senders if s.final and s.final["status"] == 200]
        stored = [s for s in senders if s.final and s.final["code"] in STORED_REFUSALS]
        answered = [s for s in senders if s.final]
        if len(answered) < len(senders):
            unacked.append(f"user {user} key {key} ({len(entries)} ledger entries)")
        if len({s.fingerprint() for s in oks}) > 1:
            mismatch.append(f"user {user} key {key}: 200s for different requests")
        # Every answer of this key that is not about the key itself must be byte-identical.
        answers = {t["body"] for s in senders for t in s.tries
                   if t["status"] == 200 or (t["code"] in STORED_REFUSALS)}
        if len(answers) > 1:
            body_diff.append(f"user {user} key {key}: {len(answers)} different bodies")
        fresh = [t for s in senders for t in s.tries if t["status"] == 200 and not t["replayed"]]
        if len(fresh) > 1:
            fresh2.append(f"user {user} key {key}: {len(fresh)} non-replayed 200s")
        if oks:
            acked += 1
            op = oks[0]
            kind = {"charge": "CHARGE", "use": "USE", "payment": "PAYMENT"}[op.kind]
            if len(entries) != 1:
                missing.append(f"user {user} key {key}: acknowledged, {len(entries)} ledger entries")
            elif entries[0][:2] != (kind, op.amount):
                wrong.append(f"user {user} key {key}: sent {kind} {op.amount}, ledger {entries[0][:2]}")
            expected[user] = expected.get(user, 0) + op.effect()
            if op.kind == "payment":
                st = sc.order_status.get(op.order)
                if not st or st[0] != "PAID" or st[2] != key:
                    wrong.append(f"order {op.order} paid by {key} is {st}")
            try:
                b = json.loads(op.final["body"])
                want = {"charge": {"userId": user, "chargedAmount": op.amount},
                        "use": {"userId": user, "usedAmount": op.amount},
                        "payment": {"userId": user, "orderId": op.order, "amount": op.amount,
                                    "status": "COMPLETED"}}[op.kind]
                if any(b.get(k) != v for k, v in want.items()) or not isinstance(b.get("balance"), int):
                    bad_body.append(f"{key}: {op.final['body'][:200]}")
            except ValueError:
                bad_body.append(f"{key}: not JSON: {op.final['body'][:200]}")
        elif stored:
            refusals += 1
            if entries:
                refused_applied.append(f"user {user} key {key}: refused {stored[0].final['code']} but "
                                       f"{len(entries)} ledger entries")
        elif entries:
            # Never acknowledged but applied: allowed (its answer was lost), and counted.
            op = senders[0]
            expected[user] = expected.get(user, 0) + op.effect()
        applied += len(entries)

    add("every acknowledged operation in the ledger exactly once, as sent", missing + wrong + mismatch,
        f"{acked} acknowledged keys, {applied} ledger entries with a client key")
    add("stored refusals have no ledger entry", refused_applied, f"{refusals} stored refusals")
    add("no ledger entry with a key no client sent", phantom)
    add("every operation got a final answer", unacked, f"{len(by_key)} keys, all answered")
    add("balance of every user = opening balance + acknowledged effects",
        [f"user {u}: balance {balances.get(u)} expected {e}" for u, e in expected.items() if balances.get(u) != e],
        f"{len(balances)} users")
    add("all answers of one key byte-identical; at most one non-replayed 200", body_diff + fresh2)
    add("200 bodies match their requests", bad_body)

    # What the clients saw.
    leaks, bad5xx, unexpected4xx = [], [], []
    storm_diff_keys = {op.key for op in sc.ops if op.group.endswith(":diff")}
    for t in all_tries(sc):
        st = t["status"]
        if st is None or st < 400:
            continue
        if INTERNALS.search(t["body"]):
            leaks.append(f"{st} {t['body'][:300]}")
        if st >= 500:
            if st != 503 or t["code"] not in ("LOCK_TIMEOUT", "SERVICE_UNAVAILABLE") or not t["retry_after"] \
                    or not (t["content_type"] or "").startswith("application/problem+json"):
                bad5xx.append(f"{st} ct={t['content_type']} retry-after={t['retry_after']} {t['body'][:300]}")
        elif t["code"] in RETRYABLE_CODES:
            if not t["retry_after"]:
                bad5xx.append(f"{st} {t['code']} without Retry-After")
        elif t["code"] in STORED_REFUSALS:
            if t["code"] == "ORDER_ALREADY_PAID":
                unexpected4xx.append(f"{st} {t['code']} for key {t['key']}")
        elif t["code"] == "IDEMPOTENCY_KEY_REUSED" and t["key"] in storm_diff_keys:
            pass
        else:
            unexpected4xx.append(f"{st} {t['code']} {t['body'][:200]}")
    add("no error body shows internals", leaks)
    add("every 5xx is a problem+json 503 with Retry-After (no 500)", bad5xx)
    add("no unexpected 4xx", unexpected4xx)

    # The service's own log: a panic is a bug even if the books reconcile.
    panics = []
    for inst in sc.instances:
        p = sc.dir / f"instance-{inst.name}.log"
        if p.exists():
            panics += [f"{inst.name}: {line[:300]}" for line in p.read_text(errors="replace").splitlines()
                       if "panicked" in line]
    add("no panic in the service logs", panics)
    add("every instance ready (/health/ready 200) after the fault", sc.not_ready)

    sc.counts = {
        "operations": len(sc.ops), "keys": len(by_key), "requests": len(all_tries(sc)),
        "retries": len(all_tries(sc)) - len(sc.ops), "acknowledged": acked, "refused": refusals,
        "applied": applied, "unanswered": len(unacked),
        "5xx": sum(1 for t in all_tries(sc) if (t["status"] or 0) >= 500),
        "409 in use": sum(1 for t in all_tries(sc) if t["code"] == "IDEMPOTENCY_KEY_IN_USE"),
        "transport errors": sum(1 for t in all_tries(sc) if t["err"]),
        # Operations whose earlier try failed (5xx, cut, timeout) and whose final answer was a
        # replay: the change had been applied and its first answer lost, or a duplicate won.
        "replayed after a failed try": sum(
            1 for op in sc.ops if op.final and op.final["replayed"]
            and any(t["err"] or (t["status"] or 0) >= 500 for t in op.tries)),
        "timeouts": sum(1 for t in all_tries(sc) if t["err"] == "timeout"),
    }
    return checks


# ---------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------


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


COMMON = "audit clean, no key applied twice, every acknowledged operation in the ledger once, balances = acknowledged effects, every operation answered, no internals in error bodies"

SPECS = [
    Spec("kill9-instance",
         "SIGKILL of instance A at 4 s, B at 9 s, A at 14 s, B at 19 s, each restarted on its port 2 s later",
         "each kill cut requests in flight, the dead instance refused, it served again after restart",
         fault_kill_instances, evidence_kill_instances, duration=26),
    Spec("mariadb-kill",
         "SIGKILL of mariadbd at 6 s, restarted on the same datadir at 10 s (InnoDB crash recovery)",
         "503s during the outage, 200s after; the pools reconnected",
         fault_kill_mariadb, evidence_kill_mariadb, duration=26),
    Spec("redis-kill-degrade",
         "SIGKILL of redis-server at 5 s, restarted empty at 15 s; LOCK_ON_REDIS_DOWN=degrade",
         "balance changes kept being applied during the outage (database guard alone)",
         lambda sc: fault_kill_redis(sc, (5, 15)), evidence_redis_degrade),
    Spec("redis-kill-fail",
         "SIGKILL of redis-server at 5 s, restarted empty at 13 s; LOCK_ON_REDIS_DOWN=fail",
         "503 SERVICE_UNAVAILABLE during the outage and no change applied without the lock; all completed after",
         lambda sc: fault_kill_redis(sc, (5, 13)), evidence_redis_fail, mode="fail"),
    Spec("redis-pause-lease",
         "users 1-2 held FOR UPDATE by another connection 5-10.2 s; SIGSTOP of redis-server 5.5-9 s "
         "(lease 2000 ms, wait 5000 ms)",
         "leases expired while their holders' transactions ran (balance_lock_lease_lost_total > 0)",
         fault_pause_redis, evidence_pause, duration=22, lock_wait_ms=5000, lock_lease_ms=2000),
    Spec("db-stall-ftwrl",
         "FLUSH TABLES WITH READ LOCK held 5 s by another connection at 5 s (lease 2000 ms, wait 5000 ms)",
         "requests outlived the lease, leases were lost and the version guard held",
         fault_db_stall, evidence_stall, duration=22, lock_wait_ms=5000, lock_lease_ms=2000),
    Spec("db-stall-sigstop",
         "SIGSTOP of mariadbd 5-10 s (lease 2000 ms, wait 5000 ms)",
         "requests outlived the lease, leases were lost and the version guard held",
         fault_db_sigstop, evidence_stall, duration=22, lock_wait_ms=5000, lock_lease_ms=2000),
    Spec("duplicate-storm",
         "12 storms of 50 simultaneous sends of one key, 25 through each instance: charge, use and payment, "
         "with the same body and with 50 different amounts/orders; 6 background clients",
         "same body: one ledger entry, every sender ends on the identical 200; different bodies: one applied "
         "(the 200's amount/order), the other 49 end on 422 IDEMPOTENCY_KEY_REUSED",
         fault_storms, evidence_storms, duration=12, storms=True, workers=6),
    Spec("netns-redis-cut",
         "instance N in its own network namespace (veth 10.213.77.2/30) cut off from Redis only, 5-17 s, "
         "by a DROP rule in the namespace; A and B on 127.0.0.1 keep Redis; degrade",
         "N ran on the database guard alone (degraded > 0) while A and B kept the lock (degraded = 0)",
         fault_netns_cut, evidence_netns, host_instances=2, netns=True),
    Spec("netns-redis-cut-fail",
         "as netns-redis-cut, with LOCK_ON_REDIS_DOWN=fail",
         "N refused changes with 503 while cut (clients went on through A and B); A and B unaffected",
         fault_netns_cut, evidence_netns, host_instances=2, netns=True, mode="fail"),
]


# ---------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------


class Suite:
    def __init__(self, args: argparse.Namespace, specs: list[Spec]) -> None:
        self.args = args
        self.specs = specs
        self.workers = args.workers
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="chaos-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.netns = Netns()
        self.netns_error: str | None = None
        self.db: MariaDB
        self.has_audit = False

    def prepare(self) -> None:
        need_netns = any(s.netns for s in self.specs)
        if need_netns:
            try:
                self.netns.setup()
                log(f"namespace {NETNS}: {HOST_IP} <-> {NS_IP} over {VETH_HOST}/{VETH_NS}, "
                    f"Redis cut by {self.netns.cut_method}")
            except Exception as e:  # reported as the scenario's failure, not hidden
                self.netns_error = f"network namespace unavailable: {e}"
                log(self.netns_error)
        binds = ["127.0.0.1"] + ([HOST_IP] if self.netns.up else [])
        self.db = MariaDB(self.workdir / "mariadb", binds)
        log(f"installing and starting a private MariaDB on 127.0.0.1:{self.db.port} ({self.db.datadir})")
        self.db.install()
        self.db.start()
        helptext = sh([str(BIN), "--help"]).stdout
        self.has_audit = bool(re.search(r"^\s+audit\s", helptext, re.M))
        log(f"balance-service audit: {'present, used' if self.has_audit else 'absent, SQL checks only'}")

    def run_one(self, spec: Spec) -> dict[str, Any]:
        started = time.monotonic()
        log(f"== {spec.name}: {spec.injected}")
        sc = Scenario(spec, self)
        result: dict[str, Any] = {"name": spec.name, "injected": spec.injected,
                                  "checked": COMMON + "; " + spec.checked, "passed": False, "checks": [],
                                  "counts": {}, "events": [], "error": None}
        try:
            if spec.netns and self.netns_error:
                raise RuntimeError(self.netns_error)
            sc.setup()
            asyncio.run(self.drive(sc))
            checks = check_scenario(sc)
            spec.evidence(sc)
            checks += sc.evidence
            result["checks"] = checks
            result["passed"] = all(ok for _, ok, _ in checks)
            result["counts"] = sc.counts
            result["metrics"] = {f"{i}:{n}": v for (i, n), v in sorted(sc.metrics.items())
                                 if n.startswith("balance_lock") or n.startswith("balance_optimistic")
                                 or n.startswith("balance_idempotency_in_use")}
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"
            log(traceback.format_exc())
        finally:
            result["events"] = sc.events
            self.save(sc)
            for inst in sc.instances:
                if inst.proc and inst.proc.poll() is None:
                    os.kill(inst.proc.pid, signal.SIGKILL)
                    inst.proc.wait(timeout=10)
            if sc.redis and sc.redis.proc and sc.redis.proc.poll() is None:
                os.kill(sc.redis.proc.pid, signal.SIGKILL)
                sc.redis.proc.wait(timeout=10)
            try:
                os.kill(self.db.proc.pid, signal.SIGCONT)  # never leave it stopped
            except (ProcessLookupError, AttributeError):
                pass
            if self.db.proc is not None and self.db.proc.poll() is not None:
                log("mariadbd is down after the scenario; restarting it for the next one")
                self.db.start()
        result["duration"] = round(time.monotonic() - started, 1)
        (sc.dir / "result.json").write_text(json.dumps(result, indent=1, default=str))
        self.print_result(result)
        return result

    async def drive(self, sc: Scenario) -> None:
        await sc.run()
        sc.not_ready = await readiness(sc)
        await scrape_metrics(sc)

    def save(self, sc: Scenario) -> None:
        with open(sc.dir / "requests.jsonl", "w") as f:
            for op in sc.ops:
                path, body, headers = op.request()
                for t in op.tries:
                    f.write(json.dumps(dict(t, group=op.group, path=path, request=body.decode(),
                                            key_in=op.key_in)) + "\n")

    @staticmethod
    def print_result(r: dict[str, Any]) -> None:
        log(f"== {r['name']}: {'PASS' if r['passed'] else 'FAIL'} in {r.get('duration')} s  {r['counts']}")
        if r["error"]:
            log(f"   error: {r['error']}")
        for name, ok, detail in r["checks"]:
            log(f"   {'ok  ' if ok else 'FAIL'} {name}: {detail}")

    def cleanup(self) -> None:
        PROCS.kill_all()
        self.netns.teardown()
        if not self.args.keep:
            shutil.rmtree(self.workdir / "mariadb" / "data", ignore_errors=True)


def ensure_tools(need_netns: bool) -> None:
    tools = {"mariadbd": "mariadb-server", "mariadb-install-db": "mariadb-server", "mariadb": "mariadb-client",
             "redis-server": "redis-server", "ip": "iproute2"}
    if need_netns:
        tools["iptables"] = "iptables"
    missing = sorted({pkg for tool, pkg in tools.items() if not shutil.which(tool)})
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit(f"missing tools; install the Debian packages {' '.join(missing)}")
    log(f"installing {' '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env)


def build() -> None:
    if not shutil.which("cargo"):
        raise SystemExit("cargo is needed to build the service (https://rustup.rs)")
    log("cargo build --release -p app")
    r = subprocess.run(["cargo", "build", "--release", "-p", "app"], cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit("the build failed")


def table(results: list[dict[str, Any]]) -> str:
    head = "| scenario | result | time | requests | retries | acknowledged | applied | 5xx | answers lost |\n"
    head += "|---|---|---|---|---|---|---|---|---|\n"
    rows = []
    for r in results:
        c = r.get("counts") or {}
        rows.append(f"| {r['name']} | {'PASS' if r['passed'] else 'FAIL'} | {r.get('duration', '')} s | "
                    f"{c.get('requests', '')} | {c.get('retries', '')} | {c.get('acknowledged', '')} | "
                    f"{c.get('applied', '')} | {c.get('5xx', '')} | {c.get('unanswered', '')} |")
    return head + "\n".join(rows) + "\n"


def git_state() -> tuple[str, bool]:
    """The commit checked out, and whether tracked files differ from it."""
    commit = sh(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT).stdout.strip() or "?"
    dirty = sh(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=ROOT).stdout.strip()
    return commit, bool(dirty)


def update_doc(results: list[dict[str, Any]], total: float, commit: str, dirty: bool) -> None:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [DOC_START, "",
           f"Last run: {when}, commit `{commit}`{' (with uncommitted changes in the tree)' if dirty else ''}, "
           f"`just chaos`, {total:.0f} s in all, "
           f"{sum(r['passed'] for r in results)} of {len(results)} scenarios passed. "
           "Requests counts every try; retries are tries after an operation's first; acknowledged counts "
           "keys answered 200; applied counts ledger entries carrying a client's key.", "",
           "| scenario | injected | checked (besides the common checks) | result | requests | retries "
           "| acknowledged | applied |",
           "|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r.get("counts") or {}
        checked = r["checked"].split("; ", 1)[1] if "; " in r["checked"] else r["checked"]
        out.append(f"| `{r['name']}` | {r['injected']} | {checked} | **{'PASS' if r['passed'] else 'FAIL'}** "
                   f"({r.get('duration', '?')} s) | {c.get('requests', '')} | {c.get('retries', '')} | "
                   f"{c.get('acknowledged', '')} | {c.get('applied', '')} |")
    out += ["", "Every check of every scenario, as the last run reported it:", ""]
    for r in results:
        c = r.get("counts") or {}
        out.append(f"**`{r['name']}`** — {'PASS' if r['passed'] else 'FAIL'}: "
                   + ", ".join(f"{k} {v}" for k, v in c.items()) + ".")
        out.append("")
        if r["error"]:
            out.append(f"- error: {r['error']}")
        for name, ok, detail in r["checks"]:
            out.append(f"- {'✔' if ok else '✘'} {name}: {detail}")
        if r.get("events"):
            out.append("- timeline: " + "; ".join(f"{t} s {e}" for t, e in r["events"]))
        out.append("")
    out.append(DOC_END)
    text = DOC.read_text()
    start, end = text.index(DOC_START), text.index(DOC_END) + len(DOC_END)
    DOC.write_text(text[:start] + "\n".join(out) + text[end:])
    log(f"updated {DOC.relative_to(ROOT)}")


def main() -> int:
    p = argparse.ArgumentParser(description="The fault suite of balance-service (see docs/reliability.md).")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--only", action="append", default=[], help="run only this scenario (repeatable, or a,b)")
    p.add_argument("--no-build", action="store_true", help="use the existing target/release/balance-service")
    p.add_argument("--workers", type=int, default=WORKERS, help="concurrent clients per scenario")
    p.add_argument("--workdir", help="where logs and request records go (default: a new /tmp/chaos-*)")
    p.add_argument("--keep", action="store_true", help="keep the MariaDB datadir afterwards")
    p.add_argument("--update-doc", action="store_true", help="write the results into docs/reliability.md")
    args = p.parse_args()

    if args.list:
        for s in SPECS:
            print(f"{s.name:22} {s.injected}")
        return 0
    names = [n for o in args.only for n in o.split(",") if n]
    unknown = set(names) - {s.name for s in SPECS}
    if unknown:
        print(f"unknown scenario(s): {', '.join(sorted(unknown))}; see --list", file=sys.stderr)
        return 2
    specs = [s for s in SPECS if not names or s.name in names]
    if os.geteuid() != 0:
        print("run as root: the suite starts servers and creates a network namespace", file=sys.stderr)
        return 2

    lock = open(RUN_LOCK, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        print(f"another chaos run holds {RUN_LOCK} ({lock.read().strip() or 'pid unknown'}); "
              "wait for it to finish", file=sys.stderr)
        return 2
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}\n")
    lock.flush()

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    commit, dirty = git_state()  # what is built and run, before anyone commits meanwhile
    ensure_tools(any(s.netns for s in specs))
    if not args.no_build:
        build()
    suite = Suite(args, specs)
    log(f"work directory {suite.workdir} (request records, logs, audit reports)")
    results: list[dict[str, Any]] = []
    began = time.monotonic()
    try:
        suite.prepare()
        for spec in specs:
            results.append(suite.run_one(spec))
    finally:
        suite.cleanup()
    total = time.monotonic() - began
    print()
    print(table(results))
    (suite.workdir / "summary.json").write_text(json.dumps(results, indent=1, default=str))
    failed = [r["name"] for r in results if not r["passed"]]
    print(f"{len(results) - len(failed)} of {len(results)} scenarios passed in {total:.0f} s; "
          f"records in {suite.workdir}")
    if failed:
        print("FAILED: " + ", ".join(failed))
    if args.update_doc:
        update_doc(results, total, commit, dirty)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
