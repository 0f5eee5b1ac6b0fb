"""Checks: the books (audit, ledger, balances) and every answer the clients got."""

from __future__ import annotations

import asyncio
import collections
import json
import re
from typing import Any

from lib.common import (BIN, INTERNALS, LEDGER_SIGN, RETRYABLE_CODES, STORED_REFUSALS, TRY_TIMEOUT, clean_env,
                        signed_amount_sql, sh)
from lib.driver import ENTRY_KIND, Op, Scenario


def all_tries(sc: Scenario) -> list[dict[str, Any]]:
    if not hasattr(sc, "_tries"):
        sc._tries = [t for op in sc.ops for t in op.tries]
    return sc._tries


def lock_tries(sc: Scenario) -> list[dict[str, Any]]:
    """The tries of operations that take the user's lock: every keyed one (a balance change).
    A cancellation takes no lock (its write is guarded by the order's status), so it may
    succeed while the lock service is gone, under either policy: the lock scenarios judge
    only these."""
    if not hasattr(sc, "_lock_tries"):
        sc._lock_tries = [t for op in sc.ops if op.keyed for t in op.tries]
    return sc._lock_tries


def metric(sc: Scenario, name: str, inst: str | None = None) -> float:
    return sum(v for (i, n), v in sc.metrics.items() if n == name and (inst is None or i == inst))


def metric_samples(text: str) -> list[tuple[str, str, float]]:
    """The samples of a Prometheus text exposition: (name, labels as written or '', value)."""
    out = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)", line)
        if m:
            try:
                out.append((m.group(1), m.group(2) or "", float(m.group(3))))
            except ValueError:
                pass
    return out


async def instance_metrics(sc: Scenario, inst: Any) -> list[tuple[str, str, float]] | None:
    """One instance's /metrics now, as samples; None when it does not answer 200."""
    res = await sc.http.request(inst.host, inst.port, "GET", "/metrics")
    if res["status"] != 200:
        return None
    return metric_samples(res["body"].decode("utf-8", "replace"))


async def scrape_metrics(sc: Scenario) -> None:
    sc.metrics = collections.defaultdict(float)
    for inst in sc.instances:
        for name, _labels, value in await instance_metrics(sc, inst) or []:
            sc.metrics[(inst.name, name)] += value
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
    """The audit's checks, in SQL on `db`: used when the binary has no `audit`, and always
    as a second opinion. The ledger's signs come from `LEDGER_SIGN` (`signed_amount_sql`),
    never restated here."""
    q = lambda s: db.sql(s, sc.dbname)  # noqa: E731
    breaches: list[str] = []
    kinds = ", ".join(f"'{k}'" for k in LEDGER_SIGN)
    for r in q(f"select id, user_id, kind from ledger_entries where kind not in ({kinds})"):
        breaches.append(f"balance_matches_ledger: entry {r[0]} of user {r[1]} has kind {r[2]}, "
                        "which LEDGER_SIGN does not know")
    for r in q("select u.id, u.balance, coalesce(l.total, 0), n.balance_after from users u "
               f"left join (select user_id, sum({signed_amount_sql()}) total, "
               "max(id) newest from ledger_entries group by user_id) l on l.user_id = u.id "
               "left join ledger_entries n on n.id = l.newest "
               "where coalesce(l.total, 0) <> u.balance or n.balance_after <> u.balance"):
        breaches.append(f"balance_matches_ledger: user {r[0]} balance {r[1]} ledger sum {r[2]} newest after {r[3]}")
    for r in q("select l.user_id, count(*) from ledger_entries l left join users u on u.id = l.user_id "
               "where u.id is null group by l.user_id"):
        breaches.append(f"balance_matches_ledger: {r[1]} entries of missing user {r[0]}")
    coupons = bool(q("select 1 from information_schema.tables where table_schema = database() "
                     "and table_name = 'user_coupons'"))
    # A coupon issue's record pairs with its user coupon, not with a ledger entry (below).
    not_issue = " where coalesce(operation, '') <> 'COUPON_ISSUE'" if coupons else ""
    for r in q("select user_id, k, max(status), sum(is_entry) from ("
               " select user_id, idempotency_key k, response_status status, 0 is_entry from idempotency_records"
               f"{not_issue}"
               " union all select user_id, idempotency_key, 0, 1 from ledger_entries where idempotency_key is not null"
               ") x group by user_id, k having (max(status) between 200 and 299 and sum(is_entry) <> 1) "
               "or (max(status) not between 200 and 299 and sum(is_entry) <> 0)"):
        breaches.append(f"record_has_one_effect: user {r[0]} key {r[1]} status {r[2]} ledger entries {r[3]}")
    for r in q("select user_id, idempotency_key, count(*) from ledger_entries where idempotency_key is not null "
               "group by user_id, idempotency_key having count(*) > 1"):
        breaches.append(f"key_applied_once: user {r[0]} key {r[1]} has {r[2]} ledger entries")
    for r in q("select user_id, idempotency_key, status from idempotency_records where status <> 'COMPLETED'"):
        breaches.append(f"no_record_stuck_in_flight: user {r[0]} key {r[1]} {r[2]}")
    # A PAID or REFUNDED order has its one payment; a PENDING or CANCELLED one has none.
    for r in q("select o.id, o.status, count(p.id) from orders o left join payments p on p.order_id = o.id "
               "group by o.id, o.status having (o.status in ('PAID', 'REFUNDED') and count(p.id) <> 1) "
               "or (o.status not in ('PAID', 'REFUNDED') and count(p.id) <> 0)"):
        breaches.append(f"paid_order_has_one_payment: order {r[0]} {r[1]} with {r[2]} payments")
    for r in q("select p.id, p.order_id from payments p left join orders o on o.id = p.order_id "
               "where o.id is null or o.user_id <> p.user_id or o.amount <> p.amount"):
        breaches.append(f"paid_order_has_one_payment: payment {r[0]} does not match order {r[1]}")
    # The order's status follows its payment: REFUNDED exactly when refunded in full.
    for r in q("select p.id, p.order_id, o.status, p.amount, p.refunded_total from payments p "
               "join orders o on o.id = p.order_id "
               "where o.status <> case when p.refunded_total >= p.amount then 'REFUNDED' else 'PAID' end"):
        breaches.append(f"paid_order_has_one_payment: payment {r[0]} (amount {r[3]}, refunded {r[4]}) "
                        f"but order {r[1]} is {r[2]}")
    for r in q("select user_id, k, amount, sum(is_payment), sum(1 - is_payment) from ("
               " select user_id, idempotency_key k, amount, 1 is_payment from payments"
               " union all select user_id, idempotency_key, amount, 0 from ledger_entries where kind = 'PAYMENT'"
               ") x group by user_id, k, amount having sum(is_payment) <> 1 or sum(1 - is_payment) <> 1"):
        breaches.append(f"paid_order_has_one_payment: user {r[0]} key {r[1]} amount {r[2]}: "
                        f"{r[3]} payments, {r[4]} PAYMENT entries")
    # Refunds: the payment's total is the sum of its refunds and within its amount; each
    # refund is of its payment's user and order; refunds and REFUND entries pair up one to
    # one by (user, key, amount); and the refunds of a payment, by total, each add their
    # amount to the one before (a lost update would leave two on one total, or a gap).
    for r in q("select p.id, p.amount, p.refunded_total, coalesce(r.total, 0), coalesce(r.n, 0) from payments p "
               "left join (select payment_id, sum(amount) total, count(*) n from refunds group by payment_id) r "
               "on r.payment_id = p.id where p.refunded_total <> coalesce(r.total, 0) "
               "or p.refunded_total > p.amount or p.refunded_total < 0"):
        breaches.append(f"refunds_match_payment: payment {r[0]} amount {r[1]} refunded total {r[2]}, "
                        f"its {r[4]} refunds sum to {r[3]}")
    for r in q("select r.id, r.payment_id from refunds r left join payments p on p.id = r.payment_id "
               "where p.id is null or p.user_id <> r.user_id or p.order_id <> r.order_id"):
        breaches.append(f"refunds_match_payment: refund {r[0]} does not match payment {r[1]}")
    for r in q("select user_id, k, amount, sum(is_refund), sum(1 - is_refund) from ("
               " select user_id, idempotency_key k, amount, 1 is_refund from refunds"
               " union all select user_id, idempotency_key, amount, 0 from ledger_entries where kind = 'REFUND'"
               ") x group by user_id, k, amount having sum(is_refund) <> 1 or sum(1 - is_refund) <> 1"):
        breaches.append(f"refunds_match_payment: user {r[0]} key {r[1]} amount {r[2]}: "
                        f"{r[3]} refunds, {r[4]} REFUND entries")
    for r in q("select payment_id, id, amount, refunded_total, prev from (select payment_id, id, amount, "
               "refunded_total, coalesce(lag(refunded_total) over (partition by payment_id order by refunded_total), 0) prev "
               "from refunds) x where refunded_total <> prev + amount"):
        breaches.append(f"refunds_match_payment: payment {r[0]} refund {r[1]} of {r[2]} brings the total to {r[3]} "
                        f"from {r[4]}")
    if coupons:
        breaches += sql_audit_coupons(q)
    return breaches


def sql_audit_coupons(q: Any) -> list[str]:
    """The coupons' books: each coupon's count is its user coupons and within its stock, one
    per user, and each issue's stored answer pairs with its user coupon (a 200 with exactly
    one, under the same user and key; a refusal with none)."""
    breaches = []
    for r in q("select c.id, c.total_quantity, c.issued_quantity, count(u.id) from coupons c "
               "left join user_coupons u on u.coupon_id = c.id group by c.id, c.total_quantity, c.issued_quantity "
               "having c.issued_quantity <> count(u.id) or count(u.id) > c.total_quantity or c.issued_quantity < 0"):
        breaches.append(f"coupon_stock_matches_issued: coupon {r[0]} stock {r[1]} issued_quantity {r[2]}, {r[3]} rows")
    for r in q("select coupon_id, user_id, count(*) from user_coupons group by coupon_id, user_id having count(*) > 1"):
        breaches.append(f"coupon_stock_matches_issued: user {r[1]} holds {r[2]} of coupon {r[0]}")
    for r in q("select user_id, k, max(status), sum(is_row) from ("
               " select user_id, idempotency_key k, response_status status, 0 is_row from idempotency_records"
               " where operation = 'COUPON_ISSUE'"
               " union all select user_id, idempotency_key, 0, 1 from user_coupons"
               ") x group by user_id, k having (max(status) between 200 and 299 and sum(is_row) <> 1) "
               "or (max(status) not between 200 and 299 and sum(is_row) <> 0)"):
        breaches.append(f"coupon_record_has_its_row: user {r[0]} key {r[1]} status {r[2]} user coupons {r[3]}")
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


async def read_payments(sc: Scenario) -> dict[int, tuple[dict[str, Any] | None, dict[str, Any] | None, str]]:
    """GET /api/payments/{id} and its refunds list for every payment a client was answered
    200 for, through the instances in turn: (payment, refunds list, problem) per id."""
    sem = asyncio.Semaphore(8)
    out: dict[int, tuple[dict[str, Any] | None, dict[str, Any] | None, str]] = {}

    async def one(n: int, pid: int) -> None:
        inst = sc.instances[n % len(sc.instances)]
        got: list[dict[str, Any] | None] = []
        why = ""
        async with sem:
            for path in (f"/api/payments/{pid}", f"/api/payments/{pid}/refunds"):
                res = await sc.http.request(inst.host, inst.port, "GET", path, timeout=TRY_TIMEOUT)
                try:
                    got.append(json.loads(res["body"]) if res["status"] == 200 else None)
                except ValueError:
                    got.append(None)
                if got[-1] is None:
                    why += f"{path}: {res['status'] or res['err']} {res['body'][:200]!r} "
        out[pid] = (got[0], got[1], why)

    await asyncio.gather(*(one(n, pid) for n, pid in enumerate(sorted(sc.paid))))
    sc.http.close_all()
    return out


def payment_status(amount: int, refunded: int) -> str:
    """The payment's status its refunded total gives it (docs/api.md)."""
    return "COMPLETED" if refunded == 0 else "REFUNDED" if refunded >= amount else "PARTIALLY_REFUNDED"


def check_scenario(sc: Scenario) -> list[tuple[str, bool, str]]:
    checks: list[tuple[str, bool, str]] = []

    def add(name: str, problems: list[str], ok_detail: str = "") -> None:
        detail = "; ".join(problems[:8]) + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else "")
        checks.append((name, not problems, detail or ok_detail))

    keyed_ops = [op for op in sc.ops if op.keyed]
    cancels = [op for op in sc.ops if op.kind == "cancel"]
    ops_by_id = {op.id: op for op in sc.ops}

    def body(op: Op) -> dict[str, Any]:
        try:
            b = json.loads(op.final["body"]) if op.final else None
        except ValueError:
            b = None
        return b if isinstance(b, dict) else {}

    def books(label: str, db: Any, env: dict[str, str], first: bool) -> dict[str, Any]:
        """The checks of the books on one database; the answers-only checks once (`first`)."""
        ok, out = binary_audit(sc, env, label)
        if ok is not None:
            checks.append((label + "balance-service audit clean", ok, out))
        breaches = sql_audit(sc, db)
        add(label + "audit checks in SQL clean", breaches, "6 checks (refunds and coupons too), 0 breaches")

        ledger: dict[tuple[int, str], list[tuple[str, int, int]]] = collections.defaultdict(list)
        for user, key, kind, amount, eid in db.sql(
                "select user_id, idempotency_key, kind, amount, id from ledger_entries where idempotency_key is not null",
                sc.dbname):
            ledger[(int(user), key)].append((kind, int(amount), int(eid)))
        sc.ledger = ledger
        sc.order_status = {int(o): (st, int(a), k if k != "NULL" else None) for o, st, a, k in db.sql(
            "select o.id, o.status, o.amount, p.idempotency_key from orders o left join payments p on p.order_id = o.id",
            sc.dbname)}
        payments = {int(i): {"order": int(o), "user": int(u), "amount": int(a), "refunded": int(r), "key": k}
                    for i, o, u, a, r, k in db.sql(
                        "select id, order_id, user_id, amount, refunded_total, idempotency_key from payments",
                        sc.dbname)}
        refund_rows: dict[tuple[int, str], list[dict[str, int]]] = collections.defaultdict(list)
        for i, pid, u, a, tot, k in db.sql(
                "select id, payment_id, user_id, amount, refunded_total, idempotency_key from refunds order by id",
                sc.dbname):
            refund_rows[(int(u), k)].append({"id": int(i), "payment": int(pid), "amount": int(a), "total": int(tot)})
        sc.payments, sc.refund_rows = payments, refund_rows
        balances = {int(u): int(b) for u, b in db.sql("select id, balance from users", sc.dbname)}

        add(label + "no key applied twice", [f"user {u} key {k}: {len(v)} entries" for (u, k), v in ledger.items() if len(v) > 1])

        by_key: dict[tuple[int, str], list[Op]] = collections.defaultdict(list)
        for op in keyed_ops:
            by_key[(op.user, op.key)].append(op)

        phantom = [f"user {u} key {k}" for (u, k) in ledger if (u, k) not in by_key]
        phantom += [f"refund row of user {u} key {k}" for (u, k) in refund_rows if (u, k) not in by_key]
        missing, wrong, unacked, refused_applied, mismatch, fresh2, body_diff, bad_body = [], [], [], [], [], [], [], []
        refund_wrong: list[str] = []
        expected = dict(sc.initial)
        acked = applied = refusals = 0
        # Per payment: the refunds acknowledged, and whether a refund key of it went unanswered.
        acked_refunds: dict[int, int] = collections.defaultdict(int)
        unanswered_refund: set[int] = set()
        for (user, key), senders in by_key.items():
            entries = ledger.get((user, key), [])
            oks = [s for s in senders if s.final and s.final["status"] == 200]
            stored = [s for s in senders if s.final and s.final["code"] in STORED_REFUSALS]
            answered = [s for s in senders if s.final]
            if len(answered) < len(senders):
                unacked.append(f"user {user} key {key} ({len(entries)} ledger entries)")
                if senders[0].kind == "refund":
                    unanswered_refund.add(senders[0].payment)
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
                kind = ENTRY_KIND[op.kind]
                b = body(op)
                # What the ledger must hold: the amount sent, or for a refund the amount its
                # 200 says it gave back (the rest, when none was asked).
                amount = b.get("amount") if op.kind == "refund" else op.amount
                if len(entries) != 1:
                    missing.append(f"user {user} key {key}: acknowledged, {len(entries)} ledger entries")
                elif entries[0][:2] != (kind, amount):
                    wrong.append(f"user {user} key {key}: sent {kind} {amount}, ledger {entries[0][:2]}")
                if entries:
                    expected[user] = expected.get(user, 0) + LEDGER_SIGN[entries[0][0]] * entries[0][1]
                else:
                    expected[user] = expected.get(user, 0) + (op.effect() if op.kind != "refund" else 0)
                if op.kind == "payment":
                    st = sc.order_status.get(op.order)
                    if not st or st[0] not in ("PAID", "REFUNDED") or st[2] != key:
                        wrong.append(f"order {op.order} paid by {key} is {st}")
                if op.kind == "refund":
                    rows = refund_rows.get((user, key), [])
                    if any(s.group == "refund:exceeding" for s in senders):
                        refund_wrong.append(f"user {user} key {key}: asked more than can be left, answered 200")
                    if len(rows) != 1 or rows[0]["payment"] != op.payment or rows[0]["amount"] != amount:
                        refund_wrong.append(f"user {user} key {key}: refund of {amount} on payment {op.payment}, "
                                            f"refund rows {rows}")
                    if isinstance(amount, int):
                        acked_refunds[op.payment] += amount
                try:
                    b = json.loads(op.final["body"])
                    if op.kind == "refund":
                        want: dict[str, Any] = {"userId": user, "paymentId": op.payment}
                        if op.amount is not None:
                            want["amount"] = op.amount
                        # The reason of the request that ran (the non-replayed 200), not of a replay.
                        first_run = next((s for s in senders for t in s.tries
                                          if t["status"] == 200 and not t["replayed"]), None)
                        if first_run is not None:
                            want["reason"] = first_run.reason
                        pay = payments.get(op.payment)
                        tot = b.get("refundedTotal")
                        if not isinstance(b.get("amount"), int) or not isinstance(tot, int) or pay is None or \
                                b.get("paymentStatus") != payment_status(pay["amount"], tot) or tot <= 0:
                            bad_body.append(f"{key}: refund answer {op.final['body'][:200]} (payment {pay})")
                    else:
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
                if entries or refund_rows.get((user, key)):
                    refused_applied.append(f"user {user} key {key}: refused {stored[0].final['code']} but "
                                           f"{len(entries)} ledger entries, {len(refund_rows.get((user, key), []))} "
                                           "refund rows")
            elif entries:
                # Never acknowledged but applied: allowed (its answer was lost), and counted.
                expected[user] = expected.get(user, 0) + LEDGER_SIGN[entries[0][0]] * entries[0][1]
            applied += len(entries)

        # Each payment's refunded total: what its acknowledged refunds gave back (more only
        # if a refund of it was never answered), within its amount; the order's status and
        # the payment's follow it.
        for pid, p in sc.paid.items():
            row = payments.get(pid)
            if row is None:
                refund_wrong.append(f"payment {pid} answered 200 but not in the payments table")
                continue
            got = acked_refunds.get(pid, 0)
            if row["refunded"] > row["amount"] or got > row["refunded"] or \
                    (got != row["refunded"] and pid not in unanswered_refund):
                refund_wrong.append(f"payment {pid} amount {row['amount']}: refunded total {row['refunded']}, "
                                    f"acknowledged refunds {got}")
            st = sc.order_status.get(row["order"], ("?",))[0]
            if st != ("REFUNDED" if row["refunded"] >= row["amount"] else "PAID"):
                refund_wrong.append(f"payment {pid} refunded {row['refunded']} of {row['amount']}, order {row['order']} {st}")

        add(label + "every acknowledged operation in the ledger exactly once, as sent", missing + wrong + mismatch,
            f"{acked} acknowledged keys, {applied} ledger entries with a client key")
        add(label + "refunds: each acknowledged one applied once (one REFUND entry, one refund row, its payment); "
            "refunded total = acknowledged refunds <= amount; order REFUNDED iff refunded in full; "
            "none above what was left", refund_wrong,
            f"{sum(1 for (u, k), v in by_key.items() if v[0].kind == 'refund' and any(s.final and s.final['status'] == 200 for s in v))} "
            f"refunds acknowledged over {len(sc.paid)} payments, "
            f"{sum(1 for r in payments.values() if r['refunded'] and r['refunded'] >= r['amount'])} refunded in full")
        add(label + "stored refusals have no ledger entry", refused_applied, f"{refusals} stored refusals")
        add(label + "no ledger entry with a key no client sent", phantom)
        if first:
            add("every operation got a final answer", unacked + [f"cancel of order {op.order}" for op in cancels
                                                                 if not op.final],
                f"{len(by_key)} keys and {len(cancels)} cancellations, all answered")
        add(label + "balance of every user = opening balance + acknowledged effects (REFUND +)",
            [f"user {u}: balance {balances.get(u)} expected {e}" for u, e in expected.items() if balances.get(u) != e],
            f"{len(balances)} users")
        if first:
            add("all answers of one key byte-identical; at most one non-replayed 200", body_diff + fresh2)
            add("200 bodies match their requests", bad_body)

        # Cancellations: a 200 leaves the order CANCELLED (without a payment: SQL audit);
        # 409 ORDER_ALREADY_PAID only for a paid order; a payment refused ORDER_CANCELLED
        # only for a cancelled order; a race has one winner.
        cancel_wrong: list[str] = []
        for op in cancels:
            if not op.final:
                continue
            st = sc.order_status.get(op.order, ("?", 0, None))
            if op.final["status"] == 200:
                if body(op).get("status") != "CANCELLED" or body(op).get("orderId") != op.order or st[0] != "CANCELLED":
                    cancel_wrong.append(f"cancel of order {op.order} answered {op.final['body'][:150]}, order {st}")
            elif op.final["code"] == "ORDER_ALREADY_PAID":
                if st[0] not in ("PAID", "REFUNDED"):
                    cancel_wrong.append(f"cancel of order {op.order} refused ORDER_ALREADY_PAID, order {st}")
            else:
                cancel_wrong.append(f"cancel of order {op.order}: {op.final['status']} {op.final['body'][:150]}")
        for op in keyed_ops:
            if op.kind == "payment" and op.final and op.final["code"] == "ORDER_CANCELLED":
                st = sc.order_status.get(op.order, ("?", 0, None))
                if op.order not in sc.cancel_targets or st[0] != "CANCELLED":
                    cancel_wrong.append(f"payment of order {op.order} refused ORDER_CANCELLED, order {st}")
        races = collections.defaultdict(dict)
        for op in sc.ops:
            if op.group == "cancel:race":
                races[op.order][op.kind] = op
        won = collections.Counter()
        for order, pair in races.items():
            pay, can = pair.get("payment"), pair.get("cancel")
            if not pay or not can or not pay.final or not can.final:
                continue
            outcome = (pay.final["status"], pay.final["code"], can.final["status"], can.final["code"])
            if outcome == (200, None, 409, "ORDER_ALREADY_PAID"):
                won["payment"] += 1
            elif outcome in ((409, "ORDER_CANCELLED", 200, None), (422, "INSUFFICIENT_BALANCE", 200, None)):
                won["cancel"] += 1
            else:
                cancel_wrong.append(f"race on order {order}: payment {outcome[:2]}, cancel {outcome[2:]}")
        sc.race_wins = won
        add(label + "cancellations: a cancelled order stays unpaid, ORDER_ALREADY_PAID only for paid orders, "
            "ORDER_CANCELLED only for cancelled ones, each race has one winner", cancel_wrong,
            f"{sum(1 for op in cancels if op.final and op.final['status'] == 200)} cancels answered 200, "
            f"{sum(1 for op in cancels if op.final and op.final['code'] == 'ORDER_ALREADY_PAID')} refused "
            f"ORDER_ALREADY_PAID; {len(races)} races: payment won {won['payment']}, cancel won {won['cancel']}")

        return {"acked": acked, "refusals": refusals, "applied": applied, "unacked": unacked, "keys": len(by_key)}

    # The books: on the database, or on every Galera node (each settled first).
    results = []
    for n, (label, db, env) in enumerate(sc.books()):
        if sc.spec.galera:
            settle(db, sc.dbname)
        results.append(books(label, db, env, n == 0))
    r0 = results[0]
    acked, refusals, applied, unacked, keys = r0["acked"], r0["refusals"], r0["applied"], r0["unacked"], r0["keys"]

    # What the service itself shows of each payment now: its refunded total, status and refunds.
    reads = asyncio.run(read_payments(sc))
    read_wrong = []
    for pid, (pay, lst, why) in reads.items():
        row = sc.payments.get(pid)
        if pay is None or lst is None or row is None:
            read_wrong.append(f"payment {pid}: {why or 'not in the database'}")
            continue
        rows = sorted((r for rs in sc.refund_rows.values() for r in rs if r["payment"] == pid), key=lambda r: r["id"])
        items = lst.get("items") if isinstance(lst.get("items"), list) else None
        if pay.get("refundedTotal") != row["refunded"] or pay.get("status") != payment_status(row["amount"], row["refunded"]):
            read_wrong.append(f"payment {pid}: GET says {pay.get('status')} {pay.get('refundedTotal')}, "
                              f"the database {row['refunded']} of {row['amount']}")
        elif items is None or [(i.get("refundId"), i.get("amount")) for i in items] != [(r["id"], r["amount"]) for r in rows]:
            read_wrong.append(f"payment {pid}: refunds list {str(items)[:200]} but the database has "
                              f"{[(r['id'], r['amount']) for r in rows]}")
    add("GET /api/payments/{id} and its refunds list agree with the books", read_wrong,
        f"{len(reads)} payments read, {sum(1 for r in sc.payments.values() if r['refunded'])} with refunds")

    # What the clients saw.
    leaks, bad5xx, unexpected4xx = [], [], []
    storm_diff_keys = {op.key for op in sc.ops if op.group.endswith(":diff")}
    for t in all_tries(sc):
        st = t["status"]
        if st is None or st < 400:
            continue
        op = ops_by_id[t["op"]]
        if INTERNALS.search(t["body"]):
            leaks.append(f"{st} {t['body'][:300]}")
        if st >= 500:
            if st != 503 or t["code"] not in ("LOCK_TIMEOUT", "SERVICE_UNAVAILABLE") or not t["retry_after"] \
                    or not (t["content_type"] or "").startswith("application/problem+json"):
                bad5xx.append(f"{st} ct={t['content_type']} retry-after={t['retry_after']} {t['body'][:300]}")
        elif t["code"] in RETRYABLE_CODES:
            if not t["retry_after"]:
                bad5xx.append(f"{st} {t['code']} without Retry-After")
        elif t["code"] == "ORDER_ALREADY_PAID" and op.kind == "cancel":
            pass  # a cancellation of a paid order (checked against the order above)
        elif t["code"] in STORED_REFUSALS:
            expected_here = {"ORDER_ALREADY_PAID": False,  # each order is paid with one key only
                             "ORDER_CANCELLED": op.kind == "payment" and op.order in sc.cancel_targets,
                             "REFUND_EXCEEDS_PAYMENT": op.kind == "refund",
                             "INSUFFICIENT_BALANCE": op.kind in ("use", "payment")}.get(t["code"], True)
            if not expected_here:
                unexpected4xx.append(f"{st} {t['code']} for a {op.kind} ({op.group}) key {t['key']}")
        elif t["code"] == "IDEMPOTENCY_KEY_REUSED" and t["key"] in storm_diff_keys:
            pass
        else:
            unexpected4xx.append(f"{st} {t['code']} ({op.kind}) {t['body'][:200]}")
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

    refund_keys = {(op.user, op.key): op for op in keyed_ops if op.kind == "refund"}
    refund_tries = [t for t in all_tries(sc) if t["kind"] == "refund"]
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
        "payments": len(sc.paid),
        "refund keys": len(refund_keys),
        "refunds applied": sum(1 for k in refund_keys if sc.ledger.get(k)),
        "refunds refused (exceeds)": len({(op.user, op.key) for op in keyed_ops if op.kind == "refund" and op.final
                                          and op.final["code"] == "REFUND_EXCEEDS_PAYMENT"}),
        "refund replays": sum(1 for t in refund_tries if t["replayed"]),
        "payments refunded in full": sum(1 for r in sc.payments.values() if r["refunded"] and r["refunded"] >= r["amount"]),
        "cancels": len(cancels),
        "cancelled": sum(1 for op in cancels if op.final and op.final["status"] == 200),
        "cancel refused (paid)": sum(1 for op in cancels if op.final and op.final["code"] == "ORDER_ALREADY_PAID"),
        "payments refused (cancelled)": sum(1 for op in keyed_ops if op.kind == "payment" and op.final
                                            and op.final["code"] == "ORDER_CANCELLED"),
        "races won by payment": sc.race_wins["payment"], "races won by cancel": sc.race_wins["cancel"],
    }
    return checks
