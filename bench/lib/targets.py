"""The figures issue #15 (group commit) sets targets for, computed from one run's entries,
and the rows of the report's "Targets" table.

CPU per charge: the CPU time of every process of the benchmark (the service, MariaDB, Redis
and the load client, from the /proc readings around each run, lib/meter.py) over the charges
that succeeded in the same window. Both sides cover the whole run, warm-up included: the
baseline counts the charges it committed during its warm-up, wrk's warm-up run its 200s.
"""

from __future__ import annotations

import statistics

from lib.common import PREVIOUS, TARGETS
from lib.meter import bench_cpu_s

# The scenarios whose every successful request is one charge.
CHARGE_SCENARIOS = ("idle", "spread", "hot", "balance-charge")
# The run whose CPU per charge is held against the target: the spread service runs (32
# connections over 100 users, wrk), their median.
CPU_TARGET_SCENARIO = "spread"


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def runs_of(runs, scenario, kind=None):
    return [r for r in runs if r["scenario"] == scenario and (kind is None or r["kind"] == kind)]


def successful_charges(r: dict) -> int | None:
    """The charges of run `r` that succeeded, warm-up included; None when the run's requests
    are not all charges (or it sent none)."""
    if r["scenario"] not in CHARGE_SCENARIOS:
        return None
    res = r["result"]
    tool = res.get("tool")
    if tool == "baseline":
        n = res.get("committed", 0) + res.get("warmup_committed", 0)
    elif tool == "wrk":
        n = int(res.get("statuses", {}).get("200", 0)) + res.get("warmup_ok", 0)
    elif tool == "k6":
        # balance-charge.js counts its 200s itself (`charges_applied`).
        n = res.get("counts", {}).get("charges_applied") or 0
    else:
        return None
    return n or None


def cpu_per_charge_us(r: dict) -> float | None:
    """µs of CPU of every benchmark process per successful charge of run `r`."""
    n = successful_charges(r)
    return 1e6 * bench_cpu_s(r["cpu_s"]) / n if n else None


def figures(runs: list[dict]) -> dict:
    """The medians the targets are held against."""
    f = {}
    tp = lambda r: r["result"].get("throughput_tps", r["result"].get("throughput_rps"))  # noqa: E731
    for scenario in ("spread", "hot"):
        f[f"{scenario}_b"] = med(tp(r) for r in runs_of(runs, scenario, "baseline"))
        f[f"{scenario}_s"] = med(tp(r) for r in runs_of(runs, scenario, "service"))
    f["idle_b"] = med(r["result"]["latency_ms"]["p50"] for r in runs_of(runs, "idle", "baseline"))
    f["idle_s"] = med(r["result"]["latency_ms"]["p50"] for r in runs_of(runs, "idle", "service"))
    ratio = lambda a, b: (a / b) if a is not None and b else None  # noqa: E731
    f["spread_ratio"] = ratio(f["spread_s"], f["spread_b"])
    f["hot_ratio"] = ratio(f["hot_s"], f["hot_b"])
    f["idle_ratio"] = ratio(f["idle_s"], f["idle_b"])
    cpu_runs = runs_of(runs, CPU_TARGET_SCENARIO, "service")
    f["cpu_runs"] = len([r for r in cpu_runs if cpu_per_charge_us(r) is not None])
    f["cpu_per_charge_us"] = med(cpu_per_charge_us(r) for r in cpu_runs)
    f["cpu_per_charge_baseline_us"] = med(cpu_per_charge_us(r) for r in runs_of(runs, CPU_TARGET_SCENARIO, "baseline"))
    ch = runs_of(runs, "balance-charge", "k6")
    fl = runs_of(runs, "balance-charge-floor", "floor")
    f["charge"] = ch[0] if ch else None
    f["floor"] = fl[0] if fl else None
    return f


def _fmt(v, digits=1, unit=""):
    if v is None:
        return "–"
    return f"{v:,.{digits}f}{unit}"


def _verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("**PASS**" if ok else "**MISS**")


def issue_rows(f: dict, quick: bool = False) -> list[tuple[str, str, str, str, str]]:
    """Issue #15's table, in its order: (figure, bar, reached, the previous runs', verdict).
    `quick`: the k6 profile ran at a tenth of its length (--quick), and the row says so."""
    rows = []
    if f["spread_ratio"] is not None:
        r = f["spread_ratio"]
        rows.append(("spread, 32 connections over 100 users: service / database per-request transaction",
                     f"≥ {TARGETS['spread_ratio']:.0%}", f"{r:.0%} ({f['spread_s']:,.0f} / {f['spread_b']:,.0f} per s)",
                     PREVIOUS["spread_ratio"], _verdict(r >= TARGETS["spread_ratio"])))
    if f["hot_ratio"] is not None:
        r = f["hot_ratio"]
        rows.append(("hot user, 32 connections: service / database `SELECT … FOR UPDATE`",
                     f"≥ {TARGETS['hot_ratio']:.0%}", f"{r:.0%} ({f['hot_s']:,.0f} / {f['hot_b']:,.0f} per s)",
                     PREVIOUS["hot_ratio"], _verdict(r >= TARGETS["hot_ratio"])))
    ch, fl = f["charge"], f["floor"]
    if ch:
        p99 = ch["result"]["latency_ms"]["p99"]
        beside = f"; the trivial server's, same profile: {_fmt(fl['result']['latency_ms']['p99'], 1, ' ms')}" if fl else ""
        disk = ch.get("fsync_ms")
        if disk:
            beside += (f"; the disk's 4 KiB flush in the same minutes: p99 {_fmt(disk['p99'], 1, ' ms')}, "
                       f"max {_fmt(disk['max'], 0, ' ms')}, {disk['over_30ms']:.1%} over 30 ms")
        length = "a tenth of its length (--quick)" if quick else "full length"
        rows.append((f"the original's k6 profile (balance-charge.js), {length}: p99",
                     f"≤ {TARGETS['original_p99_ms']:g} ms", _fmt(p99, 1, " ms") + beside, PREVIOUS["original_p99_ms"],
                     _verdict(p99 is not None and p99 <= TARGETS["original_p99_ms"])))
    if fl:
        l = fl["result"]["latency_ms"]
        rows.append(("the load client's floor: the same k6 profile against the trivial server, same run: p50 / p95 / p99",
                     "(reported beside the p99)", f"{_fmt(l['p50'], 2)} / {_fmt(l['p95'], 2)} / {_fmt(l['p99'], 2)} ms",
                     "p99 under 3 ms (as the issue quotes it)", "–"))
    if f["idle_ratio"] is not None:
        r = f["idle_ratio"]
        rows.append(("idle, one charge at a time: p50 / one database transaction", f"≤ {TARGETS['idle_p50_ratio']:g}×",
                     f"{r:.2f}× ({f['idle_s']:.2f} / {f['idle_b']:.2f} ms)", PREVIOUS["idle_p50_ratio"],
                     _verdict(r <= TARGETS["idle_p50_ratio"])))
    if f["cpu_per_charge_us"] is not None:
        v = f["cpu_per_charge_us"]
        rows.append((f"CPU per charge, all processes (service + MariaDB + Redis + wrk; the spread service runs, "
                     f"median of {f['cpu_runs']})", f"≤ {TARGETS['cpu_per_charge_us']:,.0f} µs",
                     f"{v:,.0f} µs (the baseline runs, same processes metered: {_fmt(f['cpu_per_charge_baseline_us'], 0, ' µs')})",
                     PREVIOUS["cpu_per_charge_us"], _verdict(v <= TARGETS["cpu_per_charge_us"])))
    return rows
