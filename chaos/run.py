#!/usr/bin/env python3
"""The fault suite of balance-service: `just chaos` (or `python3 chaos/run.py`).

Each scenario starts its own servers (one private MariaDB for the whole suite, one Redis
per scenario, two or three service instances), drives a mixed load of charges, uses,
payments, refunds and order cancellations through every instance, injects one fault
mid-load, waits for every client to finish, and then checks the books and every answer
the clients got:

- the audit is clean (`balance-service audit` when the binary has it, and the same checks
  in SQL here in every case, the ledger's signs from `lib.common.LEDGER_SIGN`, checked
  against the service's `EntryKind::sign` at the start);
- no (user, key) has two ledger entries;
- every acknowledged operation (a 200, fresh or replayed) has exactly one ledger entry of
  its kind and amount, a stored refusal has none, and no ledger entry has a key that no
  client sent;
- each user's balance equals its opening balance plus the acknowledged effects (REFUND +);
- each payment's refunded total is its acknowledged refunds, within its amount, its order
  REFUNDED exactly when refunded in full, and the service's GETs of it agree; a cancelled
  order is unpaid, and a payment racing a cancellation has one winner;
- every operation got a final answer (clients retry timeouts, connection errors, 5xx and
  409 IDEMPOTENCY_KEY_IN_USE with the same key, honouring Retry-After);
- every answer of one key is byte-identical, and at most one 200 per key is not a replay;
- no error body shows internals, every 5xx is a problem+json 503 with Retry-After;
- the fault really happened (scenario-specific evidence).

Standard library only. Run as root (it starts servers, and the namespace scenario creates
a network namespace and a veth pair). Nothing here touches the machine's own MariaDB or
Redis: every server it talks to is one it started, on 127.0.0.1 or on the veth pair it
created.

Layout: this file is the driver (arguments, the run lock, the build, the report);
`lib/` holds the pieces every scenario shares (`common` constants and processes, `servers`,
`http`, `driver` with the load and the `Spec` of a scenario, `checks`, `suite`), and
`scenarios/` one module per scenario, run in the order of `scenarios/__init__.py`.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib.common import RUN_LOCK, WORKERS, log  # noqa: E402
from lib.suite import Suite, build, ensure_tools, git_state, table, update_doc  # noqa: E402
from scenarios import all_specs  # noqa: E402

SPECS = all_specs()


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
            print(f"{s.name:27} {s.injected}")
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

