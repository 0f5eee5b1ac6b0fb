"""One `balance-service serve` process: start, readiness, stop, and its /metrics."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from lib.common import SERVICE_BIN, http_get

# The service's counters whose increase is reported per run.
COUNTERS = [
    "balance_lock_acquired_total",
    "balance_lock_handoffs_total",
    "balance_lock_timeouts_total",
    "balance_optimistic_conflicts_total",
    "balance_optimistic_retries_total",
    "balance_optimistic_exhausted_total",
    "balance_idempotent_replays_total",
    "balance_idempotency_in_use_total",
    "balance_lock_degraded_total",
    "balance_operations_applied_total",
    "coupon_gate_answered_total",
    "coupon_gate_rebuilds_total",
    "coupon_gate_disagreed_total",
    "coupon_gate_bypassed_total",
]
HISTOGRAMS = ["balance_lock_wait_seconds", "http_request_duration_seconds", "http_request_duration_seconds_issue"]


class Service:
    def __init__(self, env: dict, log_path: Path):
        self.env, self.log_path = env, log_path
        self.base = f"http://{env['BIND_ADDR']}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(SERVICE_BIN), "serve"], env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited with {self.proc.returncode}:\n{self.log_tail()}")
            if http_get(self.base + "/health/ready", 2)[0] == 200:
                time.sleep(0.5)
                if self.proc.poll() is None:  # the port is ours: a failed bind exits
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the service was not ready in 60 s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text()[-3000:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log_file.close()

    def metrics(self) -> dict:
        status, text = http_get(self.base + "/metrics", 10)
        if status != 200:
            return {}
        sums: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line[0] == "#":
                continue
            # Label values may hold braces (route="/api/users/{userId}/…"): the labels end at the last one.
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(\s+\d+)?$", line)
            if not m:
                continue
            name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
            if name.startswith("http_request_duration_seconds") and "/issue" in labels:
                # The coupon issue route's own, apart (the coupon rush): its time inside the
                # service, and how many took at most 50 ms there.
                if name.endswith("_bucket"):
                    if 'le="0.05"' in labels:
                        sums["issue_within_50ms"] = sums.get("issue_within_50ms", 0.0) + value
                    continue
                name = name.replace("http_request_duration_seconds", "http_request_duration_seconds_issue")
                sums[name] = sums.get(name, 0.0) + value
                continue
            if name.endswith("_bucket"):
                continue
            if name.startswith("http_request_duration_seconds") and "charge" not in labels:
                continue  # the charge route only
            if name == "balance_audit_last_run_timestamp_seconds":
                sums[name] = value
                continue
            sums[name] = sums.get(name, 0.0) + value
        return sums


def metric_delta(before: dict, after: dict) -> dict:
    d = {name: int(after.get(name, 0) - before.get(name, 0)) for name in COUNTERS}
    for h in HISTOGRAMS:
        n = after.get(h + "_count", 0) - before.get(h + "_count", 0)
        s = after.get(h + "_sum", 0) - before.get(h + "_sum", 0)
        d[h + "_count"] = int(n)
        d[h + "_mean_ms"] = round(1000 * s / n, 3) if n else None
    n = after.get("http_request_duration_seconds_issue_count", 0) - before.get("http_request_duration_seconds_issue_count", 0)
    w = after.get("issue_within_50ms", 0) - before.get("issue_within_50ms", 0)
    d["issue_within_50ms_pct"] = round(100 * w / n, 1) if n else None
    a0, a1 = before.get("balance_audit_last_run_timestamp_seconds"), after.get("balance_audit_last_run_timestamp_seconds")
    d["audit_ran"] = bool(a0 is not None and a1 is not None and a1 != a0)
    return d



def service_pool_size() -> int:
    """The service's default DB_MAX_CONNECTIONS: eight per core, 16 to 64."""
    return min(64, max(16, 8 * (os.cpu_count() or 2)))


