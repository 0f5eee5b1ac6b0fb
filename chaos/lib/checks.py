"""Checks: the books (audit, ledger, balances) and every answer the clients got."""

from __future__ import annotations

import asyncio
import collections
import json
import re
from typing import Any

from lib.common import BIN, INTERNALS, RETRYABLE_CODES, STORED_REFUSALS, clean_env, sh
from lib.driver import Op, Scenario


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


def sql_audit(sc: Scenario, db: Any) -> list[str]:
    """The audit's five checks, in SQL on `db`: used when the binary has no `audit`, and
    always as a second opinion."""
    q = lambda s: db.sql(s, sc.dbname)  # noqa: E731
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


def binary_audit(sc: Scenario, env: dict[str, str], label: str = "") -> tuple[bool | None, str]:
    """`balance-service audit` when the binary has it: (clean?, output); (None, why) if not."""
    if not sc.suite.has_audit:
        return None, "the binary has no `audit` subcommand"
    r = sh([str(BIN), "audit"], env=clean_env(env), check=False, timeout=300)
    out = (r.stdout + r.stderr).strip()
    name = f"audit-{label.rstrip(': ')}.txt" if label else "audit.txt"
    (sc.dir / name).write_text(out + f"\n(exit {r.returncode})\n")
    if r.returncode == 0:
        return True, "exit 0"
    return False, f"exit {r.returncode}: {out[-1500:]}"


def settle(node: Any, dbname: str) -> None:
    """Waits until a Galera node has applied every write the cluster committed (a read
    with `wsrep_sync_wait`), so its books are read whole."""
    node.sql("set session wsrep_sync_wait = 1; select count(*) from users", dbname, timeout=120)


def check_scenario(sc: Scenario) -> list[tuple[str, bool, str]]:
    checks: list[tuple[str, bool, str]] = []

    def add(name: str, problems: list[str], ok_detail: str = "") -> None:
        detail = "; ".join(problems[:8]) + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else "")
        checks.append((name, not problems, detail or ok_detail))

    def books(label: str, db: Any, env: dict[str, str], first: bool) -> tuple[int, int, int, list[str], int]:
        """The checks of the books on one database; the answers-only checks once (`first`)."""
        ok, out = binary_audit(sc, env, label)
        if ok is not None:
            checks.append((label + "balance-service audit clean", ok, out))
        breaches = sql_audit(sc, db)
        add(label + "audit checks in SQL clean", breaches, "5 checks, 0 breaches")

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

        add(label + "no key applied twice", [f"user {u} key {k}: {len(v)} entries" for (u, k), v in ledger.items() if len(v) > 1])

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

        add(label + "every acknowledged operation in the ledger exactly once, as sent", missing + wrong + mismatch,
            f"{acked} acknowledged keys, {applied} ledger entries with a client key")
        add(label + "stored refusals have no ledger entry", refused_applied, f"{refusals} stored refusals")
        add(label + "no ledger entry with a key no client sent", phantom)
        if first:
            add("every operation got a final answer", unacked, f"{len(by_key)} keys, all answered")
        add(label + "balance of every user = opening balance + acknowledged effects",
            [f"user {u}: balance {balances.get(u)} expected {e}" for u, e in expected.items() if balances.get(u) != e],
            f"{len(balances)} users")
        if first:
            add("all answers of one key byte-identical; at most one non-replayed 200", body_diff + fresh2)
            add("200 bodies match their requests", bad_body)

        return acked, refusals, applied, unacked, len(by_key)

    # The books: on the database, or on every Galera node (each settled first).
    results = []
    for n, (label, db, env) in enumerate(sc.books()):
        if sc.spec.galera:
            settle(db, sc.dbname)
        results.append(books(label, db, env, n == 0))
    acked, refusals, applied, unacked, keys = results[0]

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
        "operations": len(sc.ops), "keys": keys, "requests": len(all_tries(sc)),
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
