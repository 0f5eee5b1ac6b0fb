"""The suite: its servers, running each scenario, reporting, and the results in docs/reliability.md."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from lib.checks import check_scenario, readiness, scrape_metrics
from lib.common import (BIN, DOC, DOC_END, DOC_START, HOST_IP, NETNS, NS_IP, PROCS, ROOT, VETH_HOST, VETH_NS,
                        check_ledger_sign, log, sh)
from lib.driver import Scenario, Spec
from lib.servers import MariaDB, Netns, RedisCluster

from galera import GaleraCluster, free_base


COMMON = ("audit clean, no key applied twice, every acknowledged operation in the ledger once, balances = "
          "acknowledged effects (REFUND +), refunds applied once and within their payment, order and payment "
          "statuses follow the refunds, cancelled orders unpaid, every operation answered, no internals in "
          "error bodies")


class Suite:
    def __init__(self, args: argparse.Namespace, specs: list[Spec]) -> None:
        self.args = args
        self.specs = specs
        self.workers = args.workers
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="chaos-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        # mkdtemp makes it 0700; the Galera scenarios' rsync SST runs as `nobody` and must
        # traverse it to reach the datadirs below.
        os.chmod(self.workdir, 0o755)
        self.netns = Netns()
        self.netns_error: str | None = None
        self.db: MariaDB
        self.galera: GaleraCluster | None = None
        self.has_audit = False
        # Redis Clusters the scenarios started (daemonized by their script): stopped by pid at the end.
        self.clusters: list[RedisCluster] = []

    def prepare(self) -> None:
        log(f"ledger signs {check_ledger_sign()} (LEDGER_SIGN, the same as EntryKind::sign in model.rs)")
        need_netns = any(s.netns for s in self.specs)
        if need_netns:
            try:
                self.netns.setup()
                log(f"namespace {NETNS}: {HOST_IP} <-> {NS_IP} over {VETH_HOST}/{VETH_NS}, "
                    f"Redis cut by {self.netns.cut_method}")
            except Exception as e:  # reported as the scenario's failure, not hidden
                self.netns_error = f"network namespace unavailable: {e}"
                log(self.netns_error)
        binds = ["127.0.0.1"] + ([HOST_IP] if self.netns.up else [])
        self.db = MariaDB(self.workdir / "mariadb", binds)
        log(f"installing and starting a private MariaDB on 127.0.0.1:{self.db.port} ({self.db.datadir})")
        self.db.install()
        self.db.start()
        if any(s.galera for s in self.specs):
            base = free_galera_base()
            self.galera = GaleraCluster(self.workdir / "galera", base, spawn=PROCS.spawn, log=log)
            log(f"starting a 3-node Galera cluster on 127.0.0.1:{base}-{base + 2} ({self.galera.dir})")
            self.galera.up()
        helptext = sh([str(BIN), "--help"]).stdout
        self.has_audit = bool(re.search(r"^\s+audit\s", helptext, re.M))
        log(f"balance-service audit: {'present, used' if self.has_audit else 'absent, SQL checks only'}")

    def run_one(self, spec: Spec) -> dict[str, Any]:
        started = time.monotonic()
        log(f"== {spec.name}: {spec.injected}")
        sc = Scenario(spec, self)
        result: dict[str, Any] = {"name": spec.name, "injected": spec.injected,
                                  "checked": COMMON + "; " + spec.checked, "passed": False, "checks": [],
                                  "counts": {}, "events": [], "error": None}
        try:
            if spec.netns and self.netns_error:
                raise RuntimeError(self.netns_error)
            sc.setup()
            asyncio.run(self.drive(sc))
            checks = check_scenario(sc)
            spec.evidence(sc)
            checks += sc.evidence
            result["checks"] = checks
            result["passed"] = all(ok for _, ok, _ in checks)
            result["counts"] = sc.counts
            result["metrics"] = {f"{i}:{n}": v for (i, n), v in sorted(sc.metrics.items())
                                 if n.startswith("balance_lock") or n.startswith("balance_optimistic")
                                 or n.startswith("balance_idempotency_in_use") or n.startswith("balance_batch")}
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"
            log(traceback.format_exc())
        finally:
            result["events"] = sc.events
            self.save(sc)
            for inst in sc.instances:
                if inst.proc and inst.proc.poll() is None:
                    os.kill(inst.proc.pid, signal.SIGKILL)
                    inst.proc.wait(timeout=10)
            if sc.redis and sc.redis.proc and sc.redis.proc.poll() is None:
                os.kill(sc.redis.proc.pid, signal.SIGKILL)
                sc.redis.proc.wait(timeout=10)
            if sc.cluster is not None:
                sc.cluster.down()
            try:
                os.kill(self.db.proc.pid, signal.SIGCONT)  # never leave it stopped
            except (ProcessLookupError, AttributeError):
                pass
            if self.db.proc is not None and self.db.proc.poll() is not None:
                log("mariadbd is down after the scenario; restarting it for the next one")
                self.db.start()
            if self.galera is not None:
                try:
                    self.heal_galera()
                except Exception as e:  # the next scenario would fail on it: say so here
                    result["passed"] = False
                    result["error"] = (result["error"] or "") + f" galera cluster not healed: {e}"
                    log(f"galera cluster not healed: {e}")
        result["duration"] = round(time.monotonic() - started, 1)
        (sc.dir / "result.json").write_text(json.dumps(result, indent=1, default=str))
        self.print_result(result)
        return result

    async def drive(self, sc: Scenario) -> None:
        await sc.run()
        sc.not_ready = await readiness(sc)
        await scrape_metrics(sc)

    def save(self, sc: Scenario) -> None:
        with open(sc.dir / "requests.jsonl", "w") as f:
            for op in sc.ops:
                path, body, headers = op.request()
                for t in op.tries:
                    f.write(json.dumps(dict(t, group=op.group, path=path, request=body.decode(),
                                            key_in=op.key_in)) + "\n")

    @staticmethod
    def print_result(r: dict[str, Any]) -> None:
        log(f"== {r['name']}: {'PASS' if r['passed'] else 'FAIL'} in {r.get('duration')} s  {r['counts']}")
        if r["error"]:
            log(f"   error: {r['error']}")
        for name, ok, detail in r["checks"]:
            log(f"   {'ok  ' if ok else 'FAIL'} {name}: {detail}")

    def heal_galera(self) -> None:
        """Every node running, not stopped, and Synced in a cluster of three, for the next
        scenario."""
        assert self.galera is not None
        for node in self.galera.nodes:
            if node.proc is not None and node.proc.poll() is None:
                os.kill(node.proc.pid, signal.SIGCONT)
            else:
                log(f"galera {node.name} is down after the scenario; restarting it")
                node.restart()
        for node in self.galera.nodes:
            node.wait_synced(180, size=len(self.galera.nodes))

    def cleanup(self) -> None:
        PROCS.kill_all()
        for cluster in self.clusters:
            cluster.down()  # a no-op for one its scenario stopped already
        self.netns.teardown()
        if not self.args.keep:
            shutil.rmtree(self.workdir / "mariadb" / "data", ignore_errors=True)
            # The nodes' error logs stay (a scenario's failure is read from them); their
            # datadirs go.
            for node in (self.galera.nodes if self.galera is not None else []):
                shutil.rmtree(node.datadir, ignore_errors=True)


def free_galera_base() -> int:
    """Ports for a cluster of the suite's own, clear of `just galera up`'s default (23306)."""
    return free_base(25306)


def ensure_tools(need_netns: bool) -> None:
    tools = {"mariadbd": "mariadb-server", "mariadb-install-db": "mariadb-server", "mariadb": "mariadb-client",
             "redis-server": "redis-server", "ip": "iproute2"}
    if need_netns:
        tools["iptables"] = "iptables"
    missing = sorted({pkg for tool, pkg in tools.items() if not shutil.which(tool)})
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit(f"missing tools; install the Debian packages {' '.join(missing)}")
    log(f"installing {' '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env)


def build() -> None:
    if not shutil.which("cargo"):
        raise SystemExit("cargo is needed to build the service (https://rustup.rs)")
    log("cargo build --release -p app")
    r = subprocess.run(["cargo", "build", "--release", "-p", "app"], cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit("the build failed")


def table(results: list[dict[str, Any]]) -> str:
    head = ("| scenario | result | time | requests | retries | acknowledged | applied | 5xx | answers lost "
            "| refunds applied / refused | cancelled / refused paid |\n")
    head += "|---|---|---|---|---|---|---|---|---|---|---|\n"
    rows = []
    for r in results:
        c = r.get("counts") or {}
        rows.append(f"| {r['name']} | {'PASS' if r['passed'] else 'FAIL'} | {r.get('duration', '')} s | "
                    f"{c.get('requests', '')} | {c.get('retries', '')} | {c.get('acknowledged', '')} | "
                    f"{c.get('applied', '')} | {c.get('5xx', '')} | {c.get('unanswered', '')} | "
                    f"{c.get('refunds applied', '')} / {c.get('refunds refused (exceeds)', '')} | "
                    f"{c.get('cancelled', '')} / {c.get('cancel refused (paid)', '')} |")
    return head + "\n".join(rows) + "\n"


def git_state() -> tuple[str, bool]:
    """The commit checked out, and whether tracked files differ from it."""
    commit = sh(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT).stdout.strip() or "?"
    dirty = sh(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=ROOT).stdout.strip()
    return commit, bool(dirty)


def update_doc(results: list[dict[str, Any]], total: float, commit: str, dirty: bool) -> None:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [DOC_START, "",
           f"Last run: {when}, commit `{commit}`{' (with uncommitted changes in the tree)' if dirty else ''}, "
           f"`just chaos`, {total:.0f} s in all, "
           f"{sum(r['passed'] for r in results)} of {len(results)} scenarios passed. "
           "Requests counts every try; retries are tries after an operation's first; acknowledged counts "
           "keys answered 200; applied counts ledger entries carrying a client's key (refunds among them); "
           "refunds counts refund keys applied and refused REFUND_EXCEEDS_PAYMENT; cancels counts "
           "cancellations answered 200 and refused ORDER_ALREADY_PAID.", "",
           "| scenario | injected | checked (besides the common checks) | result | requests | retries "
           "| acknowledged | applied | refunds applied / refused | cancelled / refused |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r.get("counts") or {}
        checked = r["checked"].split("; ", 1)[1] if "; " in r["checked"] else r["checked"]
        out.append(f"| `{r['name']}` | {r['injected']} | {checked} | **{'PASS' if r['passed'] else 'FAIL'}** "
                   f"({r.get('duration', '?')} s) | {c.get('requests', '')} | {c.get('retries', '')} | "
                   f"{c.get('acknowledged', '')} | {c.get('applied', '')} | "
                   f"{c.get('refunds applied', '')} / {c.get('refunds refused (exceeds)', '')} | "
                   f"{c.get('cancelled', '')} / {c.get('cancel refused (paid)', '')} |")
    out += ["", "Every check of every scenario, as the last run reported it:", ""]
    for r in results:
        c = r.get("counts") or {}
        out.append(f"**`{r['name']}`** — {'PASS' if r['passed'] else 'FAIL'}: "
                   + ", ".join(f"{k} {v}" for k, v in c.items()) + ".")
        out.append("")
        if r["error"]:
            out.append(f"- error: {r['error']}")
        for name, ok, detail in r["checks"]:
            out.append(f"- {'✔' if ok else '✘'} {name}: {detail}")
        if r.get("events"):
            out.append("- timeline: " + "; ".join(f"{t} s {e}" for t, e in r["events"]))
        out.append("")
    out.append(DOC_END)
    text = DOC.read_text()
    start, end = text.index(DOC_START), text.index(DOC_END) + len(DOC_END)
    DOC.write_text(text[:start] + "\n".join(out) + text[end:])
    log(f"updated {DOC.relative_to(ROOT)}")
