"""k6's results: the summary, the per-window series and the stages of balance-charge.js."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

from lib.common import percentile
from lib.meter import DiskSampler, RssSampler


def k6_report(summary: dict) -> dict:
    m = summary["metrics"]
    # The script's main request when it has a `name` sub-metric, else every request.
    key = next((k for k in ("http_req_duration{name:charge}", "http_req_duration{name:issue}") if k in m),
               "http_req_duration")
    d = m.get(key, {})
    checks = m.get("checks", {})
    failed = m.get("http_req_failed", {})
    n_checks = checks.get("passes", 0) + checks.get("fails", 0)
    thresholds = {}
    for metric, v in m.items():
        for expr, crossed in (v.get("thresholds") or {}).items():
            thresholds[f"{metric}: {expr}"] = "FAIL" if crossed else "ok"
    gauges = {k: v.get("value") for k, v in m.items() if k.startswith("server_")}
    counts = {k: v.get("count") for k, v in m.items() if "count" in v and k not in ("data_sent", "data_received")}
    rates = {k: v.get("value") for k, v in m.items() if "passes" in v}
    # Every other Gauge and Trend of the script (coupon-rush.js reports its books and its
    # timing so), by name.
    values = {k: v.get("value") for k, v in m.items() if "value" in v and "passes" not in v and not k.startswith("server_")}
    trends = {k: {s: v.get(s) for s in ("min", "med", "avg", "p(95)", "p(99)", "max")} for k, v in m.items()
              if "med" in v and not k.startswith("http_req_") and k != "iteration_duration"}
    return {
        "tool": "k6",
        "latency_metric": key,
        "requests": m.get("http_reqs", {}).get("count", 0),
        "throughput_rps": m.get("http_reqs", {}).get("rate", 0.0),
        "latency_ms": {
            "avg": d.get("avg"), "p50": d.get("med"), "p90": d.get("p(90)"), "p95": d.get("p(95)"),
            "p99": d.get("p(99)"), "max": d.get("max"),
        },
        "checks_pct": 100.0 * checks.get("passes", 0) / n_checks if n_checks else 100.0,
        "checks_failed": checks.get("fails", 0),
        "failed_requests": failed.get("passes", 0),
        "vus_max": m.get("vus", {}).get("max"),
        "thresholds": thresholds,
        "server_gauges": gauges,
        "counts": counts,
        "rates": rates,
        "values": values,
        "trends": trends,
    }


def k6_series(path: Path, t0: float, window: float) -> dict:
    """Buckets the requests of the run (not setup/teardown) by `window` seconds: p50/p95/p99
    latency, req/s, errors and the VU count."""
    if not path.exists():
        return {}
    buckets: dict[int, list[float]] = {}
    errors: dict[int, int] = {}
    vus: dict[int, float] = {}
    first = None
    with gzip.open(path, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        col = {name: i for i, name in enumerate(header)}
        i_name, i_ts, i_val, i_group = col["metric_name"], col["timestamp"], col["metric_value"], col["group"]
        rows = []
        for row in reader:
            metric = row[i_name]
            if metric not in ("http_req_duration", "http_req_failed", "vus"):
                continue
            if metric != "vus" and row[i_group] in ("::setup", "::teardown"):
                continue
            ts = int(row[i_ts]) / 1000.0
            rows.append((metric, ts, float(row[i_val])))
            if metric == "http_req_duration" and (first is None or ts < first):
                first = ts
    if first is None:
        return {}
    start = first
    for metric, ts, value in rows:
        b = int((ts - start) // window)
        if b < 0:
            continue
        if metric == "http_req_duration":
            buckets.setdefault(b, []).append(value)
        elif metric == "http_req_failed":
            errors[b] = errors.get(b, 0) + int(value)
        else:
            vus[b] = max(vus.get(b, 0), value)
    out = {"window_s": window, "start": start, "t": [], "rps": [], "p50": [], "p95": [], "p99": [], "errors": [], "vus": []}
    for b in range(0, max(buckets) + 1):
        values = sorted(buckets.get(b, []))
        out["t"].append(round(b * window + window / 2, 2))
        out["rps"].append(round(len(values) / window, 1))
        for p in (50, 95, 99):
            out[f"p{p}"].append(round(percentile(values, p), 2) if values else None)
        out["errors"].append(errors.get(b, 0))
        out["vus"].append(vus.get(b))
    # Per stage of balance-charge.js (the original's profile).
    return out


def stage_cpu(rss: RssSampler, t0: float, t1: float) -> dict:
    c = rss.cpu_series(t0, t1, t1 - t0)
    if not c["t"]:
        return {}
    return {f"cpu_{k}_pct": round(c[k][0]) for k in ("busy", "service", "mariadb", "redis", "rest")}


def stage_table(series: dict, samples_path: Path | None, time_scale: float, rss: RssSampler,
                disk: DiskSampler | None = None) -> list[dict]:
    """The original profile's stages (scaled), with req/s, latency, the service's peak RSS and
    the disk's flushes (p99, max) in the same seconds."""
    stages = [(30, 100), (60, 100), (30, 500), (60, 500), (30, 1000), (60, 1000), (30, 0)]
    rows = []
    if not series or samples_path is None or not samples_path.exists():
        return rows
    start = series["start"]
    bounds = []
    t = 0.0
    prev = 0
    for secs, target in stages:
        d = max(1, round(secs * time_scale))
        bounds.append((t, t + d, prev, target))
        t += d
        prev = target
    values: list[list[float]] = [[] for _ in bounds]
    failed = [0 for _ in bounds]
    with gzip.open(samples_path, "rt", newline="") as f:
        reader = csv.reader(f)
        col = {name: i for i, name in enumerate(next(reader))}
        for row in reader:
            metric = row[col["metric_name"]]
            if metric not in ("http_req_duration", "http_req_failed") or row[col["group"]] in ("::setup", "::teardown"):
                continue
            rel = int(row[col["timestamp"]]) / 1000.0 - start
            for i, (a, b, _, _) in enumerate(bounds):
                if a <= rel < b or (i == len(bounds) - 1 and rel >= a):
                    if metric == "http_req_duration":
                        values[i].append(float(row[col["metric_value"]]))
                    else:
                        failed[i] += int(float(row[col["metric_value"]]))
                    break
    for (a, b, v0, v1), vals, fails in zip(bounds, values, failed):
        vals.sort()
        rows.append({
            "stage": f"{v0}→{v1} VUs" if v0 != v1 else f"{v1} VUs",
            "from_s": a, "to_s": b, "requests": len(vals), "rps": round(len(vals) / (b - a), 1),
            "p50": round(percentile(vals, 50), 2) if vals else None,
            "p95": round(percentile(vals, 95), 2) if vals else None,
            "p99": round(percentile(vals, 99), 2) if vals else None,
            "max": round(vals[-1], 2) if vals else None,
            "failed": fails,
            "rss_peak_mib": rss.peak_mib(start + a, start + b),
            "fsync_ms": disk.stats(start + a, start + b) if disk else None,
            **stage_cpu(rss, start + a, start + b),
        })
    return rows


