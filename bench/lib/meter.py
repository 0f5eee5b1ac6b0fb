"""Process accounting from /proc: CPU time per process group, context switches, the
machine's busy time, and a sampler of the service's RSS and CPU every 250 ms."""

from __future__ import annotations

import os
import re
import resource
import threading
import time

from lib.common import CLK_TCK, MYSQL_PORT, http_get, machine_busy_ticks, percentile, run


def proc_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of every thread of `pid`."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                total += sum(int(l.split()[1]) for l in f if "ctxt_switches:" in l)
        except (OSError, ValueError, IndexError):
            pass
    return total


def listener_pids(port: int) -> list[int]:
    """The processes listening on 127.0.0.1:port (other instances of MariaDB or Redis on the
    machine are not ours)."""
    res = run(["ss", "-ltnpH", f"sport = :{port}"], timeout=10, check=False)
    return sorted({int(p) for p in re.findall(r"pid=(\d+)", res.stdout)})


# The processes of the benchmark itself: what "CPU per charge, all processes" adds up.
BENCH_GROUPS = ("service", "mariadb", "redis", "client")


class CpuMeter:
    """CPU seconds of the service, MariaDB, Redis, the load client, the trivial server (while
    one runs) and everything else."""

    def __init__(self, service_pid: int):
        self.groups = {"service": [service_pid], "mariadb": listener_pids(MYSQL_PORT), "redis": listener_pids(6379),
                       "trivial": []}

    def track(self, name: str, pid: int) -> None:
        """Meters `pid` under the group `name` (one of the groups: the sampler thread reads
        them, so the set of names never changes, only their pids)."""
        self.groups[name] = [pid]

    def untrack(self, name: str) -> None:
        self.groups[name] = []

    def snapshot(self) -> dict:
        snap = {f"{name}/{p}": proc_ticks(p) / CLK_TCK for name, pids in self.groups.items() for p in pids}
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        snap["client"] = ru.ru_utime + ru.ru_stime
        snap["service_ctx_switches"] = context_switches(self.groups["service"][0])
        busy, total = machine_busy_ticks()
        snap["machine_busy"] = busy / CLK_TCK
        snap["machine_total"] = total / CLK_TCK
        return snap

    def delta(self, a: dict, b: dict) -> dict:
        d = {k: round(b[k] - a[k], 3) for k in ("client", "machine_busy", "machine_total", "service_ctx_switches")}
        for name in self.groups:
            # A process that ended (read as 0) counts for nothing rather than negatively.
            d[name] = round(sum(max(0.0, b[k] - a[k]) for k in a if k.startswith(name + "/") and b.get(k)), 3)
        ours = sum(d[name] for name in self.groups) + d["client"]
        d["other"] = round(max(0.0, d["machine_busy"] - ours), 3)
        return d


def bench_cpu_s(cpu_s: dict) -> float:
    """CPU seconds of every process of the benchmark in one run: the service, MariaDB, Redis
    and the load client (k6, wrk or the baseline)."""
    return sum(cpu_s.get(k, 0.0) for k in BENCH_GROUPS)


class RssSampler(threading.Thread):
    """Every 250 ms: the service's VmRSS (and VmHWM), and the CPU time so far of the service,
    MariaDB, Redis and the whole machine; every 2 s, when the service's last audit finished."""

    def __init__(self, pid: int, cpu: CpuMeter, metrics_url: str):
        super().__init__(daemon=True)
        self.pid, self.cpu, self.metrics_url = pid, cpu, metrics_url
        self.samples: list[tuple[float, int]] = []
        self.cpu_samples: list[tuple[float, dict]] = []
        self.audits: set[float] = set()
        self.hwm_kib = 0
        self._halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self._halt.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    status = f.read()
                rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
                self.hwm_kib = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
                now = time.time()
                self.samples.append((now, rss))
                ticks = {name: sum(proc_ticks(p) for p in pids) / CLK_TCK for name, pids in self.cpu.groups.items()}
                ticks["machine_busy"], ticks["machine_total"] = (v / CLK_TCK for v in machine_busy_ticks())
                self.cpu_samples.append((now, ticks))
            except (OSError, AttributeError):
                pass
            if n % 8 == 0:
                status, text = http_get(self.metrics_url, 2)
                m = re.search(r"^balance_audit_last_run_timestamp_seconds (\S+)", text, re.M) if status == 200 else None
                if m:
                    self.audits.add(float(m.group(1)))
            n += 1
            self._halt.wait(0.25)

    def stop(self) -> None:
        self._halt.set()

    def peak_mib(self, t0: float, t1: float) -> float | None:
        window = [kib for t, kib in self.samples if t0 <= t <= t1]
        return round(max(window) / 1024, 1) if window else None

    def cpu_series(self, start: float, end: float, window: float) -> dict:
        """CPU use per window between start and end, % of one core."""
        pts = [(t, c) for t, c in self.cpu_samples if start - window <= t <= end + window]
        out = {"t": [], "service": [], "mariadb": [], "redis": [], "rest": [], "busy": []}
        t = start
        while t < end:
            inside = [(ts, c) for ts, c in pts if t <= ts <= t + window]
            if len(inside) >= 2:
                (ta, a), (tb, b) = inside[0], inside[-1]
                span = tb - ta
                d = {k: (b[k] - a[k]) / span * 100 for k in ("service", "mariadb", "redis")}
                busy = (b["machine_busy"] - a["machine_busy"]) / max(b["machine_total"] - a["machine_total"], 1e-9) * 100 * (os.cpu_count() or 2)
                out["t"].append(t + window / 2 - start)
                for k in d:
                    out[k].append(d[k])
                out["busy"].append(busy)
                out["rest"].append(max(0.0, busy - sum(d.values())))
            t += window
        return out


class DiskSampler(threading.Thread):
    """Every 100 ms: how long the disk under MariaDB's data takes to make 4 KiB durable
    (`pwrite` + `fdatasync` of a file of its own in the data directory). Every durable
    commit waits for such a flush; a flush that stalls stalls every commit behind it, which
    no server in front of the database can hide. 10 small flushes a second beside the
    database's hundreds: the probe costs the runs nothing measurable."""

    PERIOD_S = 0.1

    def __init__(self, directory: str):
        super().__init__(daemon=True)
        self.path = os.path.join(directory, f"bench-fsync-probe-{os.getpid()}.tmp")
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError:
            return
        block = b"\0" * 4096
        try:
            while not self._halt.is_set():
                try:
                    start = time.perf_counter()
                    os.pwrite(fd, block, 0)
                    os.fdatasync(fd)
                    self.samples.append((time.time(), (time.perf_counter() - start) * 1000))
                except OSError:
                    pass
                self._halt.wait(self.PERIOD_S)
        finally:
            os.close(fd)
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def stop(self) -> None:
        self._halt.set()

    def stats(self, t0: float, t1: float) -> dict | None:
        """The flushes between t0 and t1: how many, p50 / p99 / max (ms), and the share over 30 ms."""
        window = sorted(ms for t, ms in self.samples if t0 <= t <= t1)
        if not window:
            return None
        return {
            "n": len(window),
            "p50": round(percentile(window, 50), 2),
            "p99": round(percentile(window, 99), 2),
            "max": round(window[-1], 1),
            "over_30ms": round(sum(1 for ms in window if ms > 30) / len(window), 4),
        }
