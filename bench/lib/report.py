"""docs/benchmarks.md and docs/benchmarks/runs.json: the figures, the tables, the sentences."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time

from lib.bench import Bench
from lib.common import DOCS, OUT, REDIS_URL, ROOT, SEED_BALANCE, TARGETS, USERS, log, out, sql
from lib.service import service_pool_size
from lib.targets import cpu_per_charge_us, figures, issue_rows, successful_charges


def machine_info() -> dict:
    cpu = "unknown"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dirty = out(["git", "status", "--porcelain", "--", "crates", "migrations", "Cargo.toml", "Cargo.lock"])
    return {
        "nproc": out(["nproc"]),
        "cpu": cpu,
        "memory": out(["free", "-h"]),
        "kernel": platform.release(),
        "os": out(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "mariadb": sql("select version()"),
        "mariadb_settings": sql(
            "select concat_ws(', ', concat('innodb_flush_log_at_trx_commit=', @@innodb_flush_log_at_trx_commit),"
            " concat('sync_binlog=', @@sync_binlog), concat('log_bin=', @@log_bin),"
            " concat('innodb_buffer_pool_size=', @@innodb_buffer_pool_size div 1048576, 'M'),"
            " concat('transaction_isolation=', @@tx_isolation))"
        ),
        "redis": out(["redis-server", "--version"]),
        "rustc": out(["rustc", "--version"]),
        "k6": out(["k6", "version"]).splitlines()[0],
        "wrk": out(["wrk", "-v"]).splitlines()[0] if out(["wrk", "-v"]) else "wrk",
        "python": sys.version.split()[0],
        "commit": out(["git", "rev-parse", "--short", "HEAD"]),
        "dirty": dirty,
        "loadavg_before": open("/proc/loadavg").read().strip(),
    }


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=1, unit=""):
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "–"
    if isinstance(v, int):
        return f"{v:,}{unit}"
    return f"{v:,.{digits}f}{unit}"


def verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("**PASS**" if ok else "**MISS**")


def runs_of(runs, scenario, kind=None):
    return [r for r in runs if r["scenario"] == scenario and (kind is None or r["kind"] == kind)]


def throughput(r):
    res = r["result"]
    return res.get("throughput_tps", res.get("throughput_rps"))


def errors_of(r):
    res = r["result"]
    if res["tool"] == "baseline":
        return res["errors"] + res["exhausted"]
    if res["tool"] == "wrk":
        e = res["socket_errors"]
        return res["non200"] + e["connect"] + e["read"] + e["write"] + e["timeout"]
    return res["failed_requests"]


def conflicts_of(r):
    res = r["result"]
    if res["tool"] == "baseline":
        return res["conflicts"]
    return r["service_counters"]["balance_optimistic_conflicts_total"]


def run_table(runs: list[dict]) -> list[str]:
    lines = [
        "| run | throughput /s | avg | p50 | p95 | p99 | max (ms) | errors | conflicts | lock waits (mean ms) | lock timeouts | peak RSS MiB | CPU µs / charge, all processes | other CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        l = r["result"]["latency_ms"]
        sc = r["service_counters"]
        svc = r["kind"] != "baseline" and r["kind"] != "variant"
        lines.append(
            f"| {r['label']} | {fmt(throughput(r))} | {fmt(l['avg'], 2)} | {fmt(l['p50'], 2)} | {fmt(l['p95'], 2)} | "
            f"{fmt(l['p99'], 2)} | {fmt(l['max'], 1)} | {fmt(errors_of(r))} | {fmt(conflicts_of(r))} | "
            f"{fmt(sc['balance_lock_wait_seconds_mean_ms'], 2) if svc else '–'} | {fmt(sc['balance_lock_timeouts_total']) if svc else '–'} | "
            f"{fmt(r['service_rss_peak_mib']) if svc else '–'} | {fmt(cpu_per_charge_us(r), 0)} | "
            f"{100 * r['cpu_s']['other'] / max(r['wall_s'], 1e-9):.0f}% |"
        )
    return lines


def cpu_table(runs: list[dict]) -> list[str]:
    lines = [
        "| run | wall s | done | service | MariaDB | Redis | load client | trivial server | other | machine busy | service µs CPU / request | MariaDB µs CPU / request | service context switches / request | charges succeeded (warm-up included) | all processes µs CPU / charge |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        c, w = r["cpu_s"], r["wall_s"]
        res = r["result"]
        n = res.get("committed") or res.get("requests") or 0
        pct = lambda k: f"{100 * c[k] / w:.0f}%" if w else "–"  # noqa: E731
        per = lambda k: f"{1e6 * c[k] / n:,.0f}" if n else "–"  # noqa: E731
        per_n = lambda v: f"{v / n:,.1f}" if n else "–"  # noqa: E731
        lines.append(
            f"| {r['label']} ({r['scenario']}) | {w:.0f} | {n:,} | {pct('service')} | {pct('mariadb')} | {pct('redis')} | {pct('client')} | "
            f"{pct('trivial') if c.get('trivial') else '–'} | "
            f"{pct('other')} | {100 * c['machine_busy'] / max(c['machine_total'], 1e-9):.0f}% | {per('service')} | {per('mariadb')} | "
            f"{per_n(c['service_ctx_switches']) if r['kind'] not in ('baseline', 'variant', 'floor') else '–'} | "
            f"{fmt(successful_charges(r))} | {fmt(cpu_per_charge_us(r), 0)} |"
        )
    return lines


def counters_table(runs: list[dict]) -> list[str]:
    cols = [
        ("balance_operations_applied_total", "applied"),
        ("balance_lock_acquired_total", "lock acquired"),
        ("balance_lock_handoffs_total", "of which handed off"),
        ("balance_lock_wait_seconds_mean_ms", "lock wait mean ms"),
        ("balance_lock_timeouts_total", "lock timeouts"),
        ("balance_optimistic_conflicts_total", "optimistic conflicts"),
        ("balance_optimistic_retries_total", "retries"),
        ("balance_optimistic_exhausted_total", "exhausted"),
        ("balance_idempotent_replays_total", "replays"),
        ("balance_idempotency_in_use_total", "key in use"),
        ("balance_lock_degraded_total", "degraded"),
        ("http_request_duration_seconds_mean_ms", "server-side mean ms (charge route)"),
        ("audit_ran", "audit ran"),
    ]
    lines = ["| run | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in runs:
        if r["kind"] in ("baseline", "variant", "floor"):
            continue
        sc = r["service_counters"]
        cells = []
        for key, _ in cols:
            v = sc.get(key)
            cells.append(("yes" if v else "no") if isinstance(v, bool) else fmt(v, 2))
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return lines


def per_request(rs: list[dict], key: str) -> float | None:
    """Median CPU µs of `key` per completed request over runs `rs`."""
    vals = []
    for r in rs:
        n = r["result"].get("committed") or r["result"].get("requests") or 0
        if n:
            vals.append(1e6 * r["cpu_s"][key] / n)
    return med(vals)


def busy_pct(rs: list[dict], key: str) -> float | None:
    return med(100 * r["cpu_s"][key] / r["wall_s"] for r in rs if r["wall_s"])


def observations(runs: list[dict]) -> list[str]:
    """Sentences computed from the figures above."""
    lines = []
    for scenario in ("spread", "hot"):
        b, s = runs_of(runs, scenario, "baseline"), runs_of(runs, scenario, "service")
        if not b or not s:
            continue
        lines.append(
            f"- **{scenario}**: per charge the service process used {fmt(per_request(s, 'service'), 0)} µs of CPU and "
            f"{fmt(med(r['cpu_s']['service_ctx_switches'] / r['result']['requests'] for r in s if r['result'].get('requests')), 1)} "
            "context switches, Redis "
            f"{fmt(per_request(s, 'redis'), 0)} µs and wrk {fmt(per_request(s, 'client'), 0)} µs; MariaDB used "
            f"{fmt(per_request(s, 'mariadb'), 0)} µs per charge under the service against {fmt(per_request(b, 'mariadb'), 0)} µs under "
            f"the baseline (whose client used {fmt(per_request(b, 'client'), 0)} µs). The machine was "
            f"{fmt(med(100 * r['cpu_s']['machine_busy'] / max(r['cpu_s']['machine_total'], 1e-9) for r in s), 0)}% busy during the service "
            f"runs, {fmt(med(100 * r['cpu_s']['machine_busy'] / max(r['cpu_s']['machine_total'], 1e-9) for r in b), 0)}% during the baseline's; "
            f"processes outside the benchmark took {fmt(busy_pct(s + b, 'other'), 0)}% of a core (median)."
        )
    lookup = [r for r in runs if r["label"] == "baseline + key lookup"]
    spread_b = runs_of(runs, "spread", "baseline")
    if lookup and spread_b:
        lb, bb = throughput(lookup[0]), med(throughput(r) for r in spread_b)
        lines.append(
            f"- The service sends one statement more per charge than the baseline: the idempotency lookup before the lock. "
            f"The database alone with that lookup did {fmt(lb, 0)} charges/s ({fmt(100 * lb / bb if bb else None, 0)}% of the plain baseline)."
        )
    ping = [r for r in runs if r["label"] == "baseline with a ping per acquire"]
    if ping and spread_b:
        pb, bb = throughput(ping[0]), med(throughput(r) for r in spread_b)
        lines.append(
            f"- sqlx's default ping before every acquire (`test_before_acquire`, one more round trip per query; the service "
            f"turns it off): the database alone did {fmt(pb, 0)}/s with it ({fmt(100 * pb / bb if bb else None, 0)}% of the "
            "baseline without it)."
        )
    small_pool = [r for r in runs if r["label"].startswith("baseline at ") and "service's pool" in r["label"]]
    if small_pool and spread_b:
        pb, bb = throughput(small_pool[0]), med(throughput(r) for r in spread_b)
        lines.append(
            f"- {small_pool[0]['label']}: {fmt(pb, 0)}/s ({fmt(100 * pb / bb if bb else None, 0)}% of 32 connections): "
            "the service's own pool bounds how many charges it has in the database at once."
        )
    hot = runs_of(runs, "hot", "service")
    if hot:
        lines.append(
            f"- **hot**: the service's charges waited {fmt(med(r['service_counters']['balance_lock_wait_seconds_mean_ms'] for r in hot), 1)} ms "
            "on average for the user's lock (their queue); one holder at a time, so the hot user's throughput is one charge's "
            "lock-to-release time, inverted: the read of the user and its database transaction, plus the hand-off to the next "
            "waiter of the same process (no Redis round trip; after 32 hand-offs or 100 ms the key is deleted and set again "
            "in Redis, two round trips)."
        )
    ch = runs_of(runs, "balance-charge")
    if ch:
        c = ch[0]
        lines.append(
            f"- **balance-charge.js**: k6 used {fmt(busy_pct(ch, 'client'), 0)}% of a core on average over the run, the service "
            f"{fmt(busy_pct(ch, 'service'), 0)}%, MariaDB {fmt(busy_pct(ch, 'mariadb'), 0)}%, Redis {fmt(busy_pct(ch, 'redis'), 0)}%; "
            f"peak service RSS {fmt(c['service_rss_peak_mib'])} MiB."
        )
    noisy = [r for r in runs if r["wall_s"] and r["cpu_s"]["other"] / r["wall_s"] > 0.25]
    if noisy:
        lines.append(
            f"- **Caution**: in {len(noisy)} of {len(runs)} runs, processes outside the benchmark used more than 25% of a core "
            f"({', '.join(r['label'] + ' (' + r['scenario'] + ')' for r in noisy[:6])}{'…' if len(noisy) > 6 else ''}); those figures are low."
        )
    return lines


# ---- the coupon rush (bench/scenarios/coupon_rush.py)


def rush_figures(r: dict) -> dict:
    """One k6 coupon-rush.js run: its books, its answers and its own timing."""
    res = r["result"]
    counts, values, trends = res.get("counts", {}), res.get("values", {}), res.get("trends", {})
    sent = (trends.get("rush_sent_ms") or {}).get("min")
    answered = (trends.get("rush_answered_ms") or {}).get("max")
    last_unit = (trends.get("rush_issued_ms") or {}).get("max")
    requests = counts.get("http_reqs{name:issue}") or 0
    window = (answered - sent) / 1000 if sent is not None and answered is not None and answered > sent else None
    issued = counts.get("rush_users_issued", 0)
    return {
        "issued": issued,
        "issued_quantity": values.get("coupon_issued_quantity"),
        "holders": values.get("coupon_holders_listed"),
        "exact": (res.get("rates", {}).get("books_exact") == 1),
        "requests": requests,
        "rps": requests / window if window else None,
        "window_s": window,
        # Units issued per second while the stock lasted (first send to the last unit).
        "issue_rate": issued / ((last_unit - sent) / 1000) if issued and last_unit is not None and sent is not None
        and last_unit > sent else None,
        "last_unit_ms": None if last_unit is None or sent is None else last_unit - sent,
        "sold_out": counts.get("rush_users_sold_out", 0),
        "already": counts.get("rush_users_already_issued", 0),
        "not_open": counts.get("rush_users_not_open", 0),
        "unexpected": counts.get("rush_users_unexpected_answer", 0),
        "unanswered": counts.get("rush_users_unanswered", 0),
        "5xx": counts.get("issue_5xx", 0),
        "lock_timeouts": counts.get("issue_lock_timeouts", 0),
        "retries": counts.get("issue_retries", 0),
        "latency": res["latency_ms"],
        "exit": res.get("exit_code"),
        # The same calls as the service timed them (from the request's arrival to its answer).
        "server_mean_ms": r["service_counters"].get("http_request_duration_seconds_issue_mean_ms"),
        "server_within_50ms_pct": r["service_counters"].get("issue_within_50ms_pct"),
    }


def coupon_targets(runs: list[dict]) -> list[tuple[str, str, str, str]]:
    rush = [rush_figures(r) for r in runs_of(runs, "coupon-rush", "k6")]
    late = runs_of(runs, "coupon-rush", "late")
    rows = []
    if rush:
        n = TARGETS["coupon_issued"]
        issued = [f["issued"] for f in rush]
        exact = all(f["issued"] == n and f["issued_quantity"] == n and f["exact"] for f in rush)
        rows.append(("coupon rush: exactly 100 issued (200s = issuedQuantity = holders)", f"{n} in every run",
                     ", ".join(str(i) for i in issued) + f" ({len(rush)} runs)", verdict(exact)))
        e5, lt = sum(f["5xx"] for f in rush), sum(f["lock_timeouts"] for f in rush)
        rows.append(("coupon rush: 5xx / lock timeouts", "0 / 0", f"{e5} / {lt}", verdict(e5 == 0 and lt == 0)))
        p99 = med(f["latency"]["p99"] for f in rush)
        rows.append(("coupon rush: p99 of the issue calls (median of runs)", f"≤ {TARGETS['coupon_p99_ms']:g} ms",
                     fmt(p99, 1, " ms"), verdict(p99 is not None and p99 <= TARGETS["coupon_p99_ms"])))
        inside = med(f["server_within_50ms_pct"] for f in rush)
        rows.append(("coupon rush: issue calls the service itself answered within 50 ms (its histogram, median)",
                     "(k6's figure above is the target)", fmt(inside, 1, "%"), "–"))
    if late:
        refusals = [sum(r["result"]["counts"].get(k, 0) for k in ("rush_users_sold_out", "rush_users_already_issued"))
                    for r in late]
        net = [r["result"]["statements"]["Questions"] - max(0, r["result"]["idle_statements"]["Questions"]) for r in late]
        during = [r["result"]["statements"]["Questions"] for r in late]
        ok = all(n_ < 0.01 * max(1, f) for n_, f in zip(net, refusals))
        rows.append(("refusals after the sell-out: database statements (Questions) during them, less the idle window's",
                     "< 1% of the refusals", "; ".join(f"{d} during {f} refusals" for d, f in zip(during, refusals)),
                     verdict(ok)))
    return rows


def coupon_section(runs: list[dict]) -> list[str]:
    rs = runs_of(runs, "coupon-rush")
    if not rs:
        return []
    lines = ["## 6. Coupon rush: 1,000 users at once on one coupon of 100", ""]
    w = lines.append
    w("[k6/coupon-rush.js](../k6/coupon-rush.js): setup creates a coupon of 100 (`POST /api/coupons`) and reads the "
      "balance of each of users 1..1000 (seeded for this scenario); then 1,000 VUs, one iteration each, VU n being "
      "user n, all wait for the same instant and send `POST /api/coupons/{id}/issue` with a key of their own, "
      "sending it again with the same key on a 5xx, a 409 or a network error until they get 200 or 422. Teardown "
      "reads the coupon's `issuedQuantity` and every user's coupons. Latency is of every issue call (retries "
      "included); requests/s is the issue calls over the rush's own window (first send to last answer); "
      "\"issued/s\" is the units over first send to the last unit. \"In the service\" is the same calls as the "
      "service's own histogram timed them (`http_request_duration_seconds` of the issue route: from the request's "
      "arrival to its answer), its mean and the share it counted within 50 ms; the rest of k6's figure is the time "
      "the request waited to be sent and read, on the same two cores as 1,000 VUs.")
    w("")
    w("| run | 200s | issuedQuantity | holders listed | books | issue calls | req/s | p50 | p95 | p99 | max (ms) | "
      "in the service: mean ms | ≤ 50 ms | 5xx | lock timeouts | sold out | other answers | retries | "
      "last unit after (ms) | issued/s | k6 exit |")
    w("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rush = []
    for r in runs_of(runs, "coupon-rush", "k6"):
        f = rush_figures(r)
        rush.append(f)
        l = f["latency"]
        w(f"| {r['label']} | {f['issued']} | {fmt(f['issued_quantity'])} | {fmt(f['holders'])} | "
          f"{'exact' if f['exact'] else '**NOT exact**'} | {fmt(f['requests'])} | {fmt(f['rps'], 0)} | "
          f"{fmt(l['p50'], 2)} | {fmt(l['p95'], 2)} | {fmt(l['p99'], 2)} | {fmt(l['max'], 1)} | "
          f"{fmt(f['server_mean_ms'], 2)} | {fmt(f['server_within_50ms_pct'], 1, '%')} | {f['5xx']} | "
          f"{f['lock_timeouts']} | {f['sold_out']} | {f['already'] + f['not_open'] + f['unexpected'] + f['unanswered']} | "
          f"{f['retries']} | {fmt(f['last_unit_ms'])} | {fmt(f['issue_rate'], 0)} | {f['exit']} |")
    w("")
    base = runs_of(runs, "coupon-rush", "baseline")
    variants = runs_of(runs, "coupon-rush", "variant")
    if base or variants:
        w("The database alone ([crates/bench/src/coupon.rs](../crates/bench/src/coupon.rs), `coupon-baseline`): "
          "N connections issue one coupon to users 1..1000 in turn, every issue `BEGIN`; the `user_coupons` row; "
          "`update coupons set issued_quantity = issued_quantity + 1 where id = ? and issued_quantity < total_quantity`; "
          "`COMMIT` — every connection on the same coupon row, as in a rush (a fresh coupon once each user has one); "
          "the count last, as the MySQL adapter sends it. The variants: the service's pool size, the count first (the "
          "row lock held over the insert), the adapter's whole step (the user's read and version, the key's record), "
          "and a rush with no gate (a stock of 100 for the 1,000 users: 9 in 10 issues are sold-out refusals the "
          "database answers).")
        w("")
        w("| run | committed issues/s | p50 | p95 | p99 | max (ms) | refused (sold out) | refusal p50 (ms) | conflicts | "
          "errors | books exact |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in base + variants:
            res, l = r["result"], r["result"]["latency_ms"]
            rl = res.get("refused_latency_ms") or {}
            w(f"| {r['label']} | {fmt(res['throughput_tps'])} | {fmt(l['p50'], 2)} | {fmt(l['p95'], 2)} | "
              f"{fmt(l['p99'], 2)} | {fmt(l['max'], 1)} | {fmt(res.get('refused'))} | {fmt(rl.get('p50'), 2)} | "
              f"{fmt(res['conflicts'])} | {fmt(res['errors'] + res['exhausted'])} | {'yes' if res.get('books_exact') else '**no**'} |")
        w("")
        bmed = med(throughput(r) for r in base)
        rate = med(f["issue_rate"] for f in rush)
        if bmed and rate:
            w(f"Medians: the database alone committed {fmt(bmed, 0)} issues/s on one coupon; the service issued the "
              f"100 units at {fmt(rate, 0)}/s during the rush ({fmt(100 * rate / bmed, 0)}%), while answering "
              f"{fmt(med(f['rps'] for f in rush), 0)} issue calls/s in all.")
            w("")
    late = runs_of(runs, "coupon-rush", "late")
    if late:
        w("**Refusals after the sell-out.** After each rush, the same 1,000 users send again, each with a fresh key, on "
          "the sold-out coupon (`MODE=late ONLY_ISSUE=1`: the run sends nothing but these 1,000 issue calls). "
          "MariaDB's global counters are read right before and right after the k6 run, and again after an idle window "
          "as long (what the server ran without the refusals: this MariaDB is shared, and has no performance_schema to "
          "count one database's statements). Each reading's own `show global status` is subtracted. "
          "\"gate answered\" is the service's `coupon_gate_answered_total` increase: refusals the Redis gate gave "
          "without the database.")
        w("")
        w("| run | refusals (sold out + already issued) | gate answered | Questions during | Com_stmt_execute during | "
          "Questions in the idle window | seconds | p50 | p99 (ms) | in the service: mean ms | ≤ 50 ms | 5xx | k6 exit |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in late:
            res = r["result"]
            c = res["counts"]
            st, idle = res["statements"], res["idle_statements"]
            w(f"| {r['label']} | {c.get('rush_users_sold_out', 0)} + {c.get('rush_users_already_issued', 0)} | "
              f"{fmt(r['service_counters'].get('coupon_gate_answered_total'))} | {st['Questions']} | "
              f"{st['Com_stmt_execute']} | {idle['Questions']} | {res['statements_window_s']:g} | "
              f"{fmt(res['latency_ms']['p50'], 2)} | {fmt(res['latency_ms']['p99'], 2)} | "
              f"{fmt(r['service_counters'].get('http_request_duration_seconds_issue_mean_ms'), 2)} | "
              f"{fmt(r['service_counters'].get('issue_within_50ms_pct'), 1, '%')} | {c.get('issue_5xx', 0)} | "
              f"{res.get('exit_code')} |")
        w("")
    cmds = []
    for r in rs:
        cmd = r["result"].get("command")
        if cmd and cmd not in cmds:
            cmds.append(cmd)
    w("Commands (`python3 bench/run.py --only coupon-rush` runs this section alone; users 1..1000 seeded first with "
      "`balance-service seed --users 1000 --balance 100000`):")
    w("")
    w("```sh")
    for cmd in cmds:
        w(cmd)
    w("```")
    w("")
    return lines


def write_report(bench: Bench, info: dict, command: str, started: float, stages: list[dict]) -> None:
    runs = bench.runs
    OUT.mkdir(parents=True, exist_ok=True)
    # ---- the figures against the targets
    fig = figures(runs)
    idle_b, idle_s, spread_b, spread_s = fig["idle_b"], fig["idle_s"], fig["spread_b"], fig["spread_s"]
    hot_b, hot_s = fig["hot_b"], fig["hot_s"]
    spread_ratio, hot_ratio, idle_ratio = fig["spread_ratio"], fig["hot_ratio"], fig["idle_ratio"]
    hot_runs = runs_of(runs, "hot", "service")
    hot_errors = sum(errors_of(r) for r in hot_runs) if hot_runs else None
    hot_timeouts = sum(r["service_counters"]["balance_lock_timeouts_total"] for r in hot_runs) if hot_runs else None
    ch, fl = fig["charge"], fig["floor"]
    peak_1000 = max((s["rss_peak_mib"] or 0 for s in stages if "1000" in s["stage"]), default=None) if stages else None

    # Issue #15's table first (with the figures of the runs before it), then the bars of the
    # earlier issues that still hold.
    rows = issue_rows(fig, bench.quick)
    if ch:
        cr = ch["result"]
        conflicts = ch["service_counters"]["balance_optimistic_conflicts_total"]
        rows.append(("original profile: checks", "100%", f"{cr['checks_pct']:.2f}%", verdict(cr["checks_failed"] == 0)))
        rows.append(("original profile: failed requests", "0", fmt(cr["failed_requests"]), verdict(cr["failed_requests"] == 0)))
        rows.append(("original profile: optimistic conflicts", f"≤ {TARGETS['original_conflicts']}", fmt(conflicts), verdict(conflicts <= TARGETS["original_conflicts"])))
        peak = peak_1000 if peak_1000 else ch["service_rss_peak_mib"]
        rows.append(("service RSS at 1000 VUs (peak)", f"< {TARGETS['rss_mib']:g} MiB", fmt(peak, 1, " MiB"), verdict(peak is not None and peak < TARGETS["rss_mib"])))
    if hot_ratio is not None:
        rows.append(("hot user: errors / lock timeouts", "0 / 0", f"{hot_errors} / {hot_timeouts}", verdict(hot_errors == 0 and hot_timeouts == 0)))
    rows += coupon_targets(runs)
    # Every row as (figure, bar, reached, the previous runs', verdict).
    rows = [row if len(row) == 5 else (row[0], row[1], row[2], "", row[3]) for row in rows]

    # ---- raw JSON (small files only: no per-request samples)
    slim = []
    for r in runs:
        r2 = {k: v for k, v in r.items() if k not in ("t0", "t1")}
        slim.append(r2)
    audits = [dt.datetime.fromtimestamp(a, dt.timezone.utc).isoformat(timespec="seconds") for a in sorted(bench.rss.audits)]
    (OUT / "runs.json").write_text(json.dumps(
        {"machine": info, "command": command, "quick": bench.quick, "audits_finished": audits, "audit": bench.audit,
         "runs": slim, "stages": stages}, indent=1))

    md = []
    w = md.append
    w("# Benchmarks")
    w("")
    w(f"Generated by `{command}` ([bench/run.py](../bench/run.py)) on {bench.stamp.strftime('%Y-%m-%d %H:%M UTC')}, "
      f"in {(time.time() - started) / 60:.0f} minutes{' — a **--quick** development run, not the reference figures' if bench.quick else ''}.")
    w(f"Commit measured: `{info['commit']}`" + (f" with uncommitted changes in: `{', '.join(l.split(None, 1)[-1] for l in info['dirty'].splitlines())}`" if info["dirty"] else " (clean tree)") + ".")
    w("")
    w("Every figure below comes from this one run: the database baseline and the service were measured on the same")
    w("machine, the same database and in the same minutes, interleaved. Raw figures: [benchmarks/runs.json](benchmarks/runs.json).")
    w("What limits these figures, and what was changed to reach them: [performance.md](performance.md).")
    w("")
    w("## Targets")
    w("")
    w("Reported, not asserted. The first rows are issue #15's (group commit); \"before\" is the issue's \"now\" column, "
      "the figures of the runs before it (not this run's).")
    w("")
    w("| target | bar | reached | before (issue #15) | |")
    w("|---|---|---|---|---|")
    for name, bar, got, before, v in rows:
        w(f"| {name} | {bar} | {got} | {before} | {v} |")
    w("")
    a = bench.audit
    if a:
        counts = ", ".join(f"{v:,} {k}" for k, v in a["counted"].items() if isinstance(v, int) and v)
        verdict_text = "clean" if a["clean"] else f"**not clean** (exit {a['exit']})"
        w(f"The books after every run: `balance-service audit` {verdict_text}, in {a['seconds']:.1f} s "
          f"({counts or 'no counts reported'}).")
        w("")
    w("## Machine")
    w("")
    w(f"- {info['nproc']} cores ({info['cpu']}), {info['os']}, Linux {info['kernel']}")
    w("- memory (`free -h`):")
    w("")
    w("  ```text")
    for l in info["memory"].splitlines():
        w("  " + l)
    w("  ```")
    w(f"- MariaDB {info['mariadb']} ({info['mariadb_settings']}); {info['redis']}")
    w(f"- {info['rustc']}; {info['k6']}; {info['wrk']}; Python {info['python']}")
    w(f"- load average when the run started: {info['loadavg_before']}")
    w("")
    w(f"**The load client, the service, MariaDB and Redis share these {info['nproc']} cores.** Every run's CPU use is")
    w("below (\"where the time goes\"); \"other\" is CPU used by processes outside the benchmark in the same seconds.")
    w("")
    w("## How it was measured")
    w("")
    w(f"- A fresh database (`bench_<timestamp>`, dropped afterwards), migrated, users 1..{USERS} seeded with {SEED_BALANCE:,}.")
    w(f"- The service: `target/release/balance-service serve` with `DATABASE_URL` (that database), `REDIS_URL={REDIS_URL}` "
      f"(a key prefix of its own), `LOG_FORMAT=json`, `RUST_LOG={bench.args.rust_log}` and "
      f"`DB_MAX_CONNECTIONS={bench.args.db_max_connections or f'unset (the default: {service_pool_size()} on this machine)'}`; every other setting "
      "at its default (lock wait 10 s, lease 30 s, 10 optimistic retries) but the periodic audit, off (`AUDIT_INTERVAL_SECS=0`): "
      "it reads the whole history, a core of MariaDB for about a minute once the runs have written a few million rows, "
      "and would land in whichever run it fell on; `balance-service audit` runs once after the runs instead, timed "
      "(below), as [operations.md](operations.md#auditing-the-books) advises for tables this size. Logging a line per request "
      "(`RUST_LOG=info`) costs throughput, so the run logs warnings only.")
    w("- **The database baseline** (`target/release/baseline`, [crates/bench](../crates/bench)) sends the service's own statements: "
      "the SQL text is shared with the adapter ([crates/mysql-repo/src/sql.rs](../crates/mysql-repo/src/sql.rs)), through the same "
      "sqlx pool builder (`mysql_repo::connect`), with the same "
      "durability (the server's `innodb_flush_log_at_trx_commit`). A charge: read the user; `BEGIN`; `UPDATE users … WHERE id = ? "
      "AND version = ?`; `INSERT` the ledger entry; `INSERT` the idempotency record (a fresh UUID key, the same ~100-byte body); "
      "`COMMIT`. Optimistic mode retries a lost version race from the read (at most 10 times, as the service); "
      "for-update mode reads with `SELECT … FOR UPDATE` inside the transaction instead. Latency per charge in an HDR histogram, "
      f"{bench.warmup:g} s of unmeasured warm-up first.")
    w("- **The service's load client** for the throughput figures is wrk (one thread; [bench/wrk/charge.lua](../bench/wrk/charge.lua)): "
      "every request its own idempotency key, amount 1, round robin over users 1..100 or all on user 1. wrk is closed-loop "
      "(each connection sends its next request when the answer arrives), like the baseline's tasks, and needs far less CPU "
      "than k6 at these rates. The same warm-up, unmeasured.")
    w("- Interleaved: baseline, service, baseline, service, baseline; the ratios use the medians.")
    w("- Around every run: the service's `/metrics` (the increase of its counters), the CPU time of the service, MariaDB, "
      "Redis and the load client (`/proc`), and the service's RSS every 250 ms (`VmRSS`).")
    w("- \"other CPU\": CPU used in the same seconds by processes outside the benchmark (other work on this shared machine), "
      "as a share of one core; a run with much of it is slowed by it.")
    w("- **CPU per charge, all processes**: the CPU time of the service, MariaDB, Redis and the load client (wrk, k6 or the "
      "baseline) around a run, over the charges that succeeded in it, both warm-up included (the baseline's commits during "
      "its warm-up, wrk's warm-up 200s; k6's `charges_applied`). The target row is the median of the spread service runs.")
    w("- **The load client's floor**: after the service's balance-charge.js run, the same k6 profile runs as long against "
      "a trivial HTTP server (`target/release/trivial`, actix-web, one worker per core as the service, every request "
      "answered 200 with a fixed charge-sized JSON body).")
    w("- **The disk's floor**: all through the runs, every 100 ms, the bench makes 4 KiB durable in MariaDB's data "
      "directory (`pwrite` + `fdatasync`, a file of its own, `DiskSampler` in [bench/lib/meter.py](../bench/lib/meter.py)). "
      "Every durable commit waits for such a flush (`innodb_flush_log_at_trx_commit=1`), so a flush that stalls holds up "
      "every charge committing behind it, whatever runs in front of the database; each run's flush p99 and max are "
      "beside its figures, and the k6 profile's per stage.")
    w("- k6 runs the project's scripts unchanged ([k6/](../k6)), with `--out csv` for the per-window figures; at 1000 VUs "
      "k6 itself needs a good part of a core (see its CPU below).")
    w("")

    def scenario_section(title, key, text):
        rs = runs_of(runs, key)
        if not rs:
            return
        w(f"## {title}")
        w("")
        w(text)
        w("")
        for l in run_table(rs):
            w(l)
        w("")
        cmds = []
        for r in rs:
            c = r["result"].get("command")
            if c and c not in cmds:
                cmds.append(c)
        w("Commands:")
        w("")
        w("```sh")
        for c in cmds:
            w(c)
        w("```")
        w("")

    if idle_ratio is not None:
        scenario_section("1. One charge at a time", "idle",
                         f"One connection, one charge after the other. Median p50: database {idle_b:.2f} ms, service {idle_s:.2f} ms: "
                         f"**{idle_ratio:.2f}×** (target ≤ {TARGETS['idle_p50_ratio']:g}×).")
    if spread_ratio is not None:
        scenario_section("2. Spread: 32 connections over 100 users", "spread",
                         f"Median throughput: database {spread_b:,.0f} charges/s, service {spread_s:,.0f}/s: **{spread_ratio:.0%}** "
                         f"(target ≥ {TARGETS['spread_ratio']:.0%}). The variants measure, on the database alone, what the service "
                         "adds or could add: its idempotency lookup before the lock (`--key-lookup`, one more read per charge), "
                         "sqlx's default ping on every acquire (`--ping`, off in the service), and the service's pool size.")
    if hot_ratio is not None:
        scenario_section("3. Hot user: 32 connections on user 1", "hot",
                         f"Median throughput: database with `SELECT … FOR UPDATE` {hot_b:,.0f} charges/s, service {hot_s:,.0f}/s: "
                         f"**{hot_ratio:.0%}** (target ≥ {TARGETS['hot_ratio']:.0%}); errors {hot_errors}, lock timeouts {hot_timeouts}. "
                         "The optimistic variants are the version guard alone with no lock (the collapse the Redis lock avoids): "
                         "\"exhausted\" charges gave up after 10 retries and count as errors.")
    if ch:
        cr = ch["result"]
        w("## 4. The original profile: k6 balance-charge.js")
        w("")
        w("30 s → 100 VUs, 1 m at 100, 30 s → 500, 1 m at 500, 30 s → 1000, 1 m at 1000, 30 s → 0; each iteration one charge of "
          "10000 to user (VU % 100) + 1 with a fresh key, then 1 s of sleep.")
        w("")
        w("| against | requests | req/s | avg | p50 | p90 | p95 | p99 | max (ms) | checks | failed requests | conflicts | lock timeouts | peak RSS MiB | CPU µs / charge, all processes | k6 exit |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        l = cr["latency_ms"]
        sc = ch["service_counters"]
        w(f"| the service | {fmt(cr['requests'])} | {fmt(cr['throughput_rps'])} | {fmt(l['avg'], 2)} | {fmt(l['p50'], 2)} | {fmt(l['p90'], 2)} | "
          f"{fmt(l['p95'], 2)} | {fmt(l['p99'], 2)} | {fmt(l['max'], 1)} | {cr['checks_pct']:.2f}% | {fmt(cr['failed_requests'])} | "
          f"{fmt(sc['balance_optimistic_conflicts_total'])} | {fmt(sc['balance_lock_timeouts_total'])} | {fmt(ch['service_rss_peak_mib'])} | "
          f"{fmt(cpu_per_charge_us(ch), 0)} | {cr['exit_code']} |")
        if fl:
            fr, fll = fl["result"], fl["result"]["latency_ms"]
            w(f"| the trivial server (the load client's floor) | {fmt(fr['requests'])} | {fmt(fr['throughput_rps'])} | {fmt(fll['avg'], 2)} | "
              f"{fmt(fll['p50'], 2)} | {fmt(fll['p90'], 2)} | {fmt(fll['p95'], 2)} | {fmt(fll['p99'], 2)} | {fmt(fll['max'], 1)} | "
              f"(fixed body) | {fmt(fr['failed_requests'])} | – | – | – | – | {fr['exit_code']} |")
        w("")
        w(f"Latency of `{cr['latency_metric']}`. The original's expected figures were avg 50 ms, p95 150 ms, p99 300 ms.")
        if fl:
            w("The second row is the same profile, as long and in the same run, against `target/release/trivial` "
              "([crates/bench/src/bin/trivial.rs](../crates/bench/src/bin/trivial.rs)): every request answered 200 with one "
              "fixed 95-byte JSON body, nothing behind it. Its latency is the load client's own floor on these cores (k6 at "
              "up to 1000 VUs and the kernel's loopback); its checks fail by design (the body names user 1 whatever the "
              "request) and its k6 exit is the thresholds on them. CPU during it: "
              f"k6 {fmt(100 * fl['cpu_s']['client'] / max(fl['wall_s'], 1e-9), 0)}% of a core, "
              f"the trivial server {fmt(100 * fl['cpu_s'].get('trivial', 0) / max(fl['wall_s'], 1e-9), 0)}%.")
        w("")
        if stages:
            w("Per stage:")
            w("")
            w("| stage | seconds | requests | req/s | p50 | p95 | p99 | max (ms) | failed | disk flush p99 / max (ms) | service peak RSS MiB | CPU: machine | service | MariaDB | Redis | k6 and the rest |")
            w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for s in stages:
                cpu = lambda k: f"{s[k]}%" if k in s else "–"  # noqa: E731
                disk = s.get("fsync_ms")
                flushes = f"{fmt(disk['p99'], 1)} / {fmt(disk['max'], 0)}" if disk else "–"
                w(f"| {s['stage']} | {s['from_s']:g}–{s['to_s']:g} | {fmt(s['requests'])} | {fmt(s['rps'])} | {fmt(s['p50'], 2)} | "
                  f"{fmt(s['p95'], 2)} | {fmt(s['p99'], 2)} | {fmt(s['max'], 1)} | {fmt(s['failed'])} | {flushes} | {fmt(s['rss_peak_mib'])} | "
                  f"{cpu('cpu_busy_pct')} | {cpu('cpu_service_pct')} | {cpu('cpu_mariadb_pct')} | {cpu('cpu_redis_pct')} | {cpu('cpu_rest_pct')} |")
            w("")
            w("CPU as a share of one core (the machine has "
              f"{os.cpu_count()}: {100 * (os.cpu_count() or 2)}% is all of it).")
            w("")
        w("![balance-charge.js: latency percentiles, throughput and RSS per window](benchmarks/balance-charge.png)")
        w("")
        thr = cr["thresholds"]
        if thr:
            w("k6 thresholds: " + "; ".join(f"`{k}` {v}" for k, v in thr.items()) + ".")
            w("")
        w("```sh")
        w(cr["command"])
        w("```")
        w("")
    k6_more = [r for r in runs if r["kind"] == "k6" and r["scenario"] not in ("balance-charge", "coupon-rush")]
    if k6_more:
        w("## 5. The other k6 scripts, at a moderate scale")
        w("")
        w("| script | command | requests | req/s | p50 | p95 | p99 | max (ms) | checks | failed requests | conflicts | lock timeouts | replays | peak RSS MiB | thresholds | k6 exit |")
        w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
        for r in k6_more:
            cr, l, sc = r["result"], r["result"]["latency_ms"], r["service_counters"]
            failed_thr = [k for k, v in cr["thresholds"].items() if v == "FAIL"]
            w(f"| {r['scenario']} | `{cr['command']}` | {fmt(cr['requests'])} | {fmt(cr['throughput_rps'])} | {fmt(l['p50'], 2)} | "
              f"{fmt(l['p95'], 2)} | {fmt(l['p99'], 2)} | {fmt(l['max'], 1)} | {cr['checks_pct']:.2f}% | {fmt(cr['failed_requests'])} | "
              f"{fmt(sc['balance_optimistic_conflicts_total'])} | {fmt(sc['balance_lock_timeouts_total'])} | "
              f"{fmt(sc['balance_idempotent_replays_total'])} | {fmt(r['service_rss_peak_mib'])} | "
              f"{'all passed' if not failed_thr else 'crossed: ' + ', '.join(f'`{t}`' for t in failed_thr)} | {cr['exit_code']} |")
        w("")
        w("Latency is of the charge requests for hot-user.js, of every request otherwise. "
          "[benchmarks/runs.json](benchmarks/runs.json) has every k6 metric of each run.")
        w("")
        for r in k6_more:
            for line in r["result"].get("console", []):
                w(f"- {r['scenario']}: {line}")
        w("")
    for line in coupon_section(runs):
        w(line)
    if (OUT / "wrk.png").exists():
        w("![baseline and service, medians: throughput and latency](benchmarks/wrk.png)")
        w("")
    w("## The service's counters per run")
    w("")
    w("The increase of each counter between the scrapes before and after the run.")
    w("")
    for l in counters_table(runs):
        w(l)
    w("")
    w("## Where the time goes")
    w("")
    w("CPU used during each run, as a share of one core (200% is the whole machine), and per completed request.")
    w("")
    for l in cpu_table(runs):
        w(l)
    w("")
    for line in observations(runs):
        w(line)
    w("")
    notes = ROOT / "bench" / "notes.md"
    if notes.exists():
        w(notes.read_text().strip())
        w("")
    w(f"Peak service RSS over the whole run (`VmHWM`): {fmt(bench.rss.hwm_kib / 1024, 1)} MiB.")
    w("")
    # Past one instance: the scaling benchmarks run apart (servers of their own, minutes
    # each), so their figures are not this run's; bench/scaling.md carries them, with their
    # dates and commands, into every report.
    scaling = ROOT / "bench" / "scaling.md"
    if scaling.exists():
        w(scaling.read_text().strip())
        w("")
    (DOCS / "benchmarks.md").write_text("\n".join(md) + "\n")
    log(f"wrote {DOCS / 'benchmarks.md'}")


