"""The report's figures (matplotlib, imported only when a figure is drawn)."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from lib.common import TARGETS
from lib.meter import RssSampler


def plot_k6(entry: dict, rss: RssSampler, path: Path, title: str, floor: dict | None = None) -> None:
    """`floor`: the same profile's run against the trivial server, its p99 drawn beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = entry["result"].get("series") or {}
    if not s.get("t"):
        return
    fig, (ax1, ax2, ax4, ax3) = plt.subplots(4, 1, figsize=(10, 12), sharex=True)
    for p, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        ax1.plot(s["t"], [v if v is not None else float("nan") for v in s[p]], style, label=p)
    fs = (floor or {}).get("result", {}).get("series") or {}
    if fs.get("t"):
        ax1.plot(fs["t"], [v if v is not None else float("nan") for v in fs["p99"]], ":", color="grey",
                 label="p99, trivial server (the floor)")
    ax1.set_ylabel("latency (ms)")
    ax1.set_yscale("log")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(loc="upper left")
    ax1.set_title(f"{title}: per {s['window_s']:g} s window")
    ax2.plot(s["t"], s["rps"], color="tab:green", label="req/s")
    ax2.set_ylabel("req/s")
    ax2.grid(True, alpha=0.3)
    ax2b = ax2.twinx()
    ax2b.plot(s["t"], [v if v is not None else float("nan") for v in s["vus"]], color="tab:gray", alpha=0.6, label="VUs")
    ax2b.set_ylabel("VUs")
    lines = ax2.get_lines() + ax2b.get_lines()
    ax2.legend(lines, [l.get_label() for l in lines], loc="upper left")
    start = s["start"]
    pts = [(t - start, kib / 1024) for t, kib in rss.samples if start - 5 <= t <= start + s["t"][-1] + s["window_s"]]
    if pts:
        ax3.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:red", label="service RSS")
    ax3.axhline(TARGETS["rss_mib"], color="black", linestyle=":", linewidth=1, label=f"{TARGETS['rss_mib']:g} MiB target")
    end = start + s["t"][-1] + s["window_s"] / 2
    cpu = rss.cpu_series(start, end, s["window_s"])
    if cpu["t"]:
        ax4.stackplot(
            cpu["t"], cpu["service"], cpu["mariadb"], cpu["redis"], cpu["rest"],
            labels=["service", "MariaDB", "Redis", "k6 and everything else"],
            colors=["tab:orange", "tab:blue", "tab:red", "tab:gray"], alpha=0.8,
        )
        ax4.axhline(100 * (os.cpu_count() or 2), color="black", linestyle=":", linewidth=1)
        ax4.set_ylabel("CPU (% of one core)")
        ax4.set_ylim(0, 100 * (os.cpu_count() or 2) * 1.05)
        ax4.grid(True, alpha=0.3)
        ax4.legend(loc="upper left", fontsize="small")
    audits = sorted(a - start for a in rss.audits if start <= a <= end)
    for i, a in enumerate(audits):
        for ax in (ax1, ax2, ax3, ax4):
            ax.axvline(a, color="purple", linestyle="--", linewidth=1, label="an audit finished" if (i == 0 and ax is ax1) else None)
    if audits:
        ax1.legend(loc="upper left")
    ax3.set_ylabel("RSS (MiB)")
    ax3.set_xlabel("seconds since the first request")
    ax3.grid(True, alpha=0.3)
    ax3.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_wrk(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("idle", "1 connection"), ("spread", "32 conns, 100 users"), ("hot", "32 conns, user 1")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels, base_tps, svc_tps, base_p = [], [], [], {50: [], 95: [], 99: []}
    svc_p = {50: [], 95: [], 99: []}
    for scenario, label in groups:
        b = [r["result"] for r in runs if r["scenario"] == scenario and r["kind"] == "baseline"]
        s = [r["result"] for r in runs if r["scenario"] == scenario and r["kind"] == "service"]
        if not b or not s:
            continue
        labels.append(f"{scenario}\n{label}")
        base_tps.append(statistics.median(x["throughput_tps"] for x in b))
        svc_tps.append(statistics.median(x["throughput_rps"] for x in s))
        for p in (50, 95, 99):
            base_p[p].append(statistics.median(x["latency_ms"][f"p{p}"] for x in b))
            svc_p[p].append(statistics.median(x["latency_ms"][f"p{p}"] for x in s))
    if not labels:
        plt.close(fig)
        return
    x = range(len(labels))
    w = 0.38
    ax = axes[0]
    ax.bar([i - w / 2 for i in x], base_tps, w, label="database alone (baseline)")
    ax.bar([i + w / 2 for i in x], svc_tps, w, label="service (wrk)")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("charges/s (median)")
    ax.set_ylim(0, max(base_tps + svc_tps) * 1.25)
    ax.legend(loc="upper right", fontsize="small")
    ax.grid(True, axis="y", alpha=0.3)
    ax = axes[1]
    for i, p in enumerate((50, 95, 99)):
        ax.bar([j - w / 2 + (i - 1) * w / 3 for j in x], base_p[p], w / 3, color=f"C0", alpha=0.4 + 0.3 * i)
        ax.bar([j + w / 2 + (i - 1) * w / 3 for j in x], svc_p[p], w / 3, color=f"C1", alpha=0.4 + 0.3 * i)
    ax.set_xticks(list(x), labels)
    ax.set_yscale("log")
    ax.set_ylabel("latency ms: p50, p95, p99 (light to dark)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.set_title("blue: baseline, orange: service")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


