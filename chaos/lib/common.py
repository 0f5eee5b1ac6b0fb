"""Constants, logging, subprocesses and the registry of the processes the suite starts."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any


ROOT = Path(__file__).resolve().parent.parent.parent
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
ORDERS_PER_USER = 60  # payments and cancellations use them up over about the load's 24 s
REFUND_KEYS_PER_PAYMENT = 6  # fresh refund keys one payment gets at most (replays apart)
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
# The business refusals the service stores under the key and replays (docs/api.md).
STORED_REFUSALS = {"INSUFFICIENT_BALANCE", "BALANCE_LIMIT_EXCEEDED", "ORDER_ALREADY_PAID", "ORDER_CANCELLED",
                   "REFUND_EXCEEDS_PAYMENT"}

# The direction of each ledger kind: +1 money in, -1 money out. The one table of it on the
# suite's side: the SQL audit (`signed_amount_sql`), the expected balances and the refund
# checks all read it. The service's own is `EntryKind::sign` in crates/domain/src/model.rs;
# `check_ledger_sign` compares the two when the suite starts, so they cannot drift apart
# silently (a REFUND counted as money out would make every refunded user's books "wrong").
LEDGER_SIGN = {"CHARGE": 1, "USE": -1, "PAYMENT": -1, "REFUND": 1}
MODEL_RS = ROOT / "crates" / "domain" / "src" / "model.rs"


def signed_amount_sql(kind: str = "kind", amount: str = "amount") -> str:
    """The signed amount of a ledger row in SQL, from `LEDGER_SIGN`. A kind the table does
    not know is NULL, so `sum` skips it and the balance check reports the gap."""
    arms = " ".join(f"when '{k}' then {'' if s > 0 else '-'}{amount}" for k, s in LEDGER_SIGN.items())
    return f"(case {kind} {arms} end)"


def rust_ledger_sign(text: str) -> dict[str, int]:
    """`EntryKind::sign` of model.rs as a table of stored names: the `as_str` arms give the
    names, the `sign` arms (`EntryKind::A | EntryKind::B => 1`) the directions."""
    def body(fn: str) -> str:
        m = re.search(r"pub fn " + fn + r"\(self\)[^{]*\{(.*?)\n    \}", text, re.S)
        if not m:
            raise ValueError(f"no `fn {fn}(self)` in {MODEL_RS}")
        return m.group(1)
    names = dict(re.findall(r"EntryKind::(\w+)\s*=>\s*\"(\w+)\"", body("as_str")))
    signs: dict[str, int] = {}
    for variants, sign in re.findall(r"((?:EntryKind::\w+\s*\|?\s*)+)=>\s*(-?1)\b", body("sign")):
        for v in re.findall(r"EntryKind::(\w+)", variants):
            signs[names.get(v, v)] = int(sign)
    if not names or set(signs) != set(names.values()):
        raise ValueError(f"could not read every kind's sign from {MODEL_RS}: names {names}, signs {signs}")
    return signs


def check_ledger_sign() -> str:
    """Stops the suite when `LEDGER_SIGN` and the service's `EntryKind::sign` disagree."""
    try:
        rust = rust_ledger_sign(MODEL_RS.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot compare the suite's LEDGER_SIGN with EntryKind::sign: {e}")
    if rust != LEDGER_SIGN:
        raise SystemExit(f"LEDGER_SIGN in chaos/lib/common.py is {LEDGER_SIGN} but EntryKind::sign in "
                         f"{MODEL_RS.relative_to(ROOT)} says {rust}: update the suite's table")
    return ", ".join(f"{k} {'+' if s > 0 else '-'}" for k, s in LEDGER_SIGN.items())

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
