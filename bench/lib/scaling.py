"""What the scaling benchmarks share (scenarios/galera.py, redis_cluster.py, instances.py):
the processes they start, service instances, and wrk runs side by side.

Unlike `just bench`, which measures one service in one process, these start several
instances (and servers of their own), load them at once with one wrk per instance, and
print a table of medians. Every process they start is recorded here and killed by its
pid at the end, never by name: other people's servers on the machine are left alone.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

from lib.common import WRK_SCRIPT, http_get, wrk_env, wrk_json


class Procs:
    """The processes a benchmark started, and only those."""

    def __init__(self) -> None:
        self.live: list[subprocess.Popen] = []

    def spawn(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(log_path, "ab") as out:
            p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                 start_new_session=True)
        self.live.append(p)
        return p

    def kill_all(self) -> None:
        for p in self.live:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)  # a stopped process dies of SIGKILL too, but say it
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.live:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self.live.clear()

    def stop(self, p: subprocess.Popen, timeout: float = 15) -> None:
        """SIGTERM (the service drains and exits), SIGKILL if it does not within `timeout`."""
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """An instance sees only what it is given (no DATABASE_URL, API_TOKEN, … of the caller)."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TZ") if k in os.environ}
    env.update(extra)
    return env


def wait_ready(port: int, timeout: float = 60, proc: subprocess.Popen | None = None) -> None:
    """Until the instance on `port` answers /health/ready 200 (its pool and Redis connected)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the instance on {port} exited with {proc.returncode}")
        if http_get(f"http://127.0.0.1:{port}/health/ready", 2)[0] == 200:
            return
        time.sleep(0.2)
    raise RuntimeError(f"instance on {port} not ready after {timeout}s")


def split(total: int, parts: int) -> list[int]:
    """`total` connections over `parts` instances as evenly as they go (32 over 3: 11, 11, 10)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def wrk_cmd(port: int, conns: int, secs: int, latency: bool = True) -> list[str]:
    return ["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--timeout", "15s", *(["--latency"] if latency else []),
            "-s", str(WRK_SCRIPT), f"http://127.0.0.1:{port}"]


def wrk_start(port: int, conns: int, secs: int, hot: bool, run_id: str) -> subprocess.Popen:
    """One wrk (one thread) on one instance, charge.lua spread over 100 users or on user 1."""
    return subprocess.Popen(wrk_cmd(port, conns, secs), env=wrk_env(hot, run_id), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wrk_result(p: subprocess.Popen, timeout: float = 300) -> dict:
    """The run's JSON line, with `rps`, `p50_ms`, `p99_ms` and socket errors among the statuses."""
    out, err = p.communicate(timeout=timeout)
    res = wrk_json(out, err)
    res["rps"], res["p50_ms"], res["p99_ms"] = res["throughput_rps"], res["latency_ms"]["p50"], res["latency_ms"]["p99"]
    errors = sum(res["socket_errors"].values())
    if errors:
        res["statuses"]["socket errors"] = errors
    return res


def wrk_side_by_side(ports: list[int], conns: list[int], secs: int, hot: bool, run_id: str) -> dict:
    """One wrk per instance, all at once; throughput summed, p99 the worst instance's (wrk
    reports percentiles, which do not add up), p50 the median of the instances'."""
    procs = [wrk_start(port, c, secs, hot, f"{run_id}-{i}") for i, (port, c) in enumerate(zip(ports, conns))]
    parts = [wrk_result(p) for p in procs]
    statuses: dict[str, int] = {}
    for part in parts:
        for k, v in part["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    return {"rps": sum(x["rps"] for x in parts), "p99_ms": max(x["p99_ms"] for x in parts),
            "p50_ms": statistics.median(x["p50_ms"] for x in parts), "statuses": statuses,
            "requests": sum(x["requests"] for x in parts), "parts": parts}


def non200(runs: list[dict]) -> int:
    return sum(v for r in runs for k, v in r["statuses"].items() if k != "200")
