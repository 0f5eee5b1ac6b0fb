"""The `just bench` run: its database, its service, and one measured run at a time.

`Bench` sets up (a fresh database, migrated and seeded, one service on it), measures each
run (the service's counters, the CPU of every process and the service's RSS around it) and
tears down; the scenarios in `scenarios/` decide what runs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shlex
import tempfile
import time
from pathlib import Path

from lib.common import (BASELINE_BIN, COUPON_BASELINE_BIN, K6_DIR, REDIS_URL, ROOT, SEED_BALANCE, SERVICE_BIN, USERS,
                        WRK_SCRIPT, db_url, drop_redis_prefix, free_port, log, run, sql, wait_quiet, wrk_env, wrk_json)
from lib.k6 import k6_report, k6_series
from lib.meter import CpuMeter, DiskSampler, RssSampler
from lib.service import Service, metric_delta


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
        self.disk: DiskSampler | None = None
        self.counter = 0
        # `balance-service audit` once, after the scenarios: {seconds, exit, clean, rows}.
        self.audit: dict | None = None

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
        # MariaDB's data directory, when it is on this machine (a local server).
        datadir = sql("select @@datadir")
        if os.path.isdir(datadir):
            self.disk = DiskSampler(datadir)
            self.disk.start()
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
            # The audit reads the whole history (a core of MariaDB for about a minute once
            # the runs have written a few million rows), so it is not left to land in some
            # run by chance: off in the service, run once at the end instead (`audit_books`),
            # as operations.md advises for tables this size.
            AUDIT_INTERVAL_SECS="0",
        )
        if self.args.db_max_connections:
            env["DB_MAX_CONNECTIONS"] = str(self.args.db_max_connections)
        else:
            env.pop("DB_MAX_CONNECTIONS", None)
        return env

    def audit_books(self) -> None:
        """`balance-service audit --json` on the bench database once the runs are done: the
        books of every run reconcile, and how long the audit of them took."""
        env = self.service_env()
        log("auditing the books of the runs (balance-service audit)")
        t0 = time.time()
        res = run([str(SERVICE_BIN), "audit", "--json"], env=env, timeout=1800, check=False)
        seconds = time.time() - t0
        try:
            report = json.loads(res.stdout)
        except ValueError:
            report = None
        counted = report.get("counts", {}) if isinstance(report, dict) else {}
        self.audit = {"seconds": round(seconds, 1), "exit": res.returncode, "clean": res.returncode == 0, "counted": counted}
        log(f"audit: exit {res.returncode} in {seconds:.1f} s")

    def teardown(self) -> None:
        if self.rss:
            self.rss.stop()
        if self.disk:
            self.disk.stop()
            self.disk.join(timeout=5)
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
            "fsync_ms": self.disk.stats(t0, t1) if self.disk else None,
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

    def coupon_baseline(self, conns: int, secs: float, users: int, extra=()) -> dict:
        """`coupon-baseline`: a coupon issue's write straight to the database, every
        connection on one coupon (crates/bench/src/coupon.rs)."""
        cmd = [
            str(COUPON_BASELINE_BIN), "--database-url", db_url(self.db), "--connections", str(conns),
            "--duration", str(secs), "--warmup", str(self.warmup), "--users", str(users), "--json", *extra,
        ]
        res = run(cmd, timeout=secs + self.warmup + 120)
        report = json.loads(res.stdout.strip().splitlines()[-1])
        report["tool"] = "baseline"
        report["command"] = shlex.join(["target/release/coupon-baseline", "--database-url", "mysql://root@127.0.0.1:3306/bench_…"] + cmd[3:])
        return report

    def wrk(self, conns: int, secs: float, hot: bool) -> dict:
        self.counter += 1
        env = wrk_env(hot, f"{self.stamp.strftime('%H%M%S')}-{self.counter}")
        url = f"http://127.0.0.1:{self.port}"
        base = ["wrk", "-t1", f"-c{conns}", "--timeout", "15s", "-s", str(WRK_SCRIPT)]
        warm = None
        if self.warmup > 0:  # the baseline's warm-up, unmeasured
            w = run([*base, f"-d{max(1, round(self.warmup))}s", url], env=dict(env, RUN_ID=env["RUN_ID"] + "w"), timeout=self.warmup + 60)
            warm = wrk_json(w.stdout, w.stderr)
        cmd = [*base, f"-d{max(1, round(secs))}s", "--latency", url]
        res = run(cmd, env=env, timeout=secs + 60)
        report = wrk_json(res.stdout, res.stderr)
        # The warm-up's answers (the run's CPU covers them): its 200s count as charges done.
        report["warmup_ok"] = int((warm or {}).get("statuses", {}).get("200", 0))
        report["command"] = ("HOT_USER=1 " if hot else f"USERS={USERS} ") + shlex.join(cmd).replace(str(ROOT) + "/", "")
        return report

    def k6(self, script: str, env_extra: dict, timeout: float, base_url: str | None = None, name: str | None = None) -> dict:
        """k6 on `script` against the service (or `base_url`); its files in the work folder
        are named after the script (or `name`)."""
        name = name or Path(script).stem
        summary = self.tmp / f"{name}.summary.json"
        samples = self.tmp / f"{name}.csv.gz"
        env = dict(os.environ, BASE_URL=base_url or f"http://127.0.0.1:{self.port}", K6_CSV_TIME_FORMAT="unix_milli", **env_extra)
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
        series = k6_series(samples, t0, self.window_s(env_extra))
        if series and self.disk:
            # The disk's slowest flush in each window, beside the window's latency.
            half = series["window_s"] / 2
            windows = (self.disk.stats(series["start"] + t - half, series["start"] + t + half) for t in series["t"])
            series["disk_flush_max_ms"] = [w["max"] if w else None for w in windows]
        report["series"] = series
        return report

    def window_s(self, env_extra: dict) -> float:
        scale = float(env_extra.get("TIME_SCALE", "1"))
        return max(1.0, round(10 * scale, 1)) if scale < 1 else 10.0

    # ---- what the scenarios share

    @property
    def warmup(self) -> float:
        return 1.0 if self.quick else 2.0

    @property
    def rounds(self) -> int:
        """Service runs per interleaved scenario (each between two baseline runs)."""
        return 1 if self.quick else 3

    @property
    def secs(self) -> float:
        """Seconds of one measured run under load (spread, hot)."""
        return 5 if self.quick else 15

    @property
    def idle_secs(self) -> float:
        return 5 if self.quick else 10

    # The load's concurrency: 32 connections, the service's and the baseline's.
    connections = 32

    def want(self, name: str) -> bool:
        """Whether `--only` selects the scenario `name` (every scenario without it)."""
        return not self.args.only or name in self.args.only.split(",")

    def interleaved(self, scenario: str, baseline_fn, service_fn, rounds: int) -> None:
        """B S B S … B: one more baseline than service run, so each service run has a
        baseline on both sides."""
        for i in range(rounds):
            self.measure(scenario, "baseline", f"baseline #{i + 1}", baseline_fn)
            self.measure(scenario, "service", f"service #{i + 1}", service_fn)
        self.measure(scenario, "baseline", f"baseline #{rounds + 1}", baseline_fn)


def short(entry: dict) -> str:
    r = entry["result"]
    disk = entry.get("fsync_ms")
    flushes = f"; disk flush p99 {disk['p99']:.1f} ms max {disk['max']:.0f} ms" if disk else ""
    if r.get("tool") == "baseline":
        return f"{r['throughput_tps']:.0f} tx/s p50 {r['latency_ms']['p50']:.2f} ms p99 {r['latency_ms']['p99']:.2f} ms conflicts {r['conflicts']} errors {r['errors']}{flushes}"
    if r.get("tool") == "wrk":
        return f"{r['throughput_rps']:.0f} req/s p50 {r['latency_ms']['p50']:.2f} ms p99 {r['latency_ms']['p99']:.2f} ms non-200 {r['non200']}{flushes}"
    return f"{r['throughput_rps']:.0f} req/s p95 {r['latency_ms']['p95']:.1f} ms p99 {r['latency_ms']['p99']:.1f} ms checks {r['checks_pct']:.2f}% failed {r['failed_requests']} (exit {r.get('exit_code')}){flushes}"


