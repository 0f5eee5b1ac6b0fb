#!/usr/bin/env python3
"""A 3-node MariaDB Galera cluster on loopback: `just galera up|down|status` (or
`python3 chaos/galera.py up`).

Each node has SQL, group-communication, IST and SST ports of its own and a datadir under
one base folder (default /tmp/balance-galera, or $GALERA_DIR, or --dir). `up` installs a
fresh datadir for node 1, bootstraps it with --wsrep-new-cluster, then starts nodes 2 and 3
one at a time, each joining by an rsync state transfer, and waits until all three are
Synced. It prints the `TEST_GALERA_URLS=…` line the Galera tests read. The pids and ports
go to `cluster.json` in the base folder, which `status` and `down` (and the fault suite)
read; `down` kills only the pids recorded there, after checking that each is still a
mariadbd of this cluster, and removes the base folder.

Standard library only; run as root (mariadbd runs with user=root). Nothing here touches the
machine's own MariaDB: every port is checked free before use and every server is started
with --defaults-file pointing at a config of its own.

The module is also imported by the fault suite (`chaos/scenarios/galera_*.py`), which
starts its own cluster with `GaleraCluster(..., spawn=PROCS.spawn)`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

PROVIDER = "/usr/lib/galera/libgalera_smm.so"
DEFAULT_DIR = Path(os.environ.get("GALERA_DIR") or "/tmp/balance-galera")
# Ports of our own, far from 3306/4567/4568/4444 that a machine's own Galera would use.
DEFAULT_BASE_PORT = 23306
NODES = 3
CLUSTER_NAME = "balance-galera"


def sh(args: list[str], check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, timeout=timeout, capture_output=True, text=True)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base(start: int) -> int:
    """The first base port from `start` (steps of 2000, below the ephemeral range where
    client connections would take ports at random) whose cluster ports are all free."""
    for base in range(start, 31400, 2000):
        probe = GaleraCluster(Path("/nonexistent"), base)
        if all(port_free(p) for n in probe.nodes for p in n.ports()):
            return base
    raise RuntimeError(f"no free ports for a Galera cluster from {start}")


def detached_spawn(args: list[str], log_path: Path) -> subprocess.Popen:
    """A server that outlives this script (the CLI's `up`): its own session, no pipes."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


class Node:
    def __init__(self, cluster: "GaleraCluster", n: int) -> None:
        self.cluster = cluster
        self.n = n  # 1-based
        self.name = f"node{n}"
        self.base = cluster.dir / self.name
        self.datadir = self.base / "data"
        self.sock = self.base / "mariadb.sock"
        self.cnf = self.base / "my.cnf"
        self.errlog = self.base / "mariadb.err"
        p = cluster.base_port
        # SQL ports base+0..2; the group, IST and SST ports of node n are a block of 10.
        self.port = p + n - 1
        self.gcomm_port = p + 1000 + 10 * n
        self.ist_port = self.gcomm_port + 1
        self.sst_port = self.gcomm_port + 2
        self.pid: int | None = None
        self.proc: subprocess.Popen | None = None

    def ports(self) -> list[int]:
        return [self.port, self.gcomm_port, self.ist_port, self.sst_port]

    def url(self, db: str = "test") -> str:
        return f"mysql://root@127.0.0.1:{self.port}/{db}"

    def write_config(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        # The rsync SST daemon runs as `nobody`: the joiner's datadir (and the folders above
        # it) must let it in and write.
        self.datadir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o755)
        os.chmod(self.datadir, 0o777)
        peers = ",".join(f"127.0.0.1:{m.gcomm_port}" for m in self.cluster.nodes)
        options = ";".join([
            f"gmcast.listen_addr=tcp://127.0.0.1:{self.gcomm_port}",
            f"ist.recv_addr=127.0.0.1:{self.ist_port}",
            f"base_port={self.gcomm_port}",
            "gcache.size=256M",
            # A killed peer is declared gone after a few seconds rather than the default ~5 s
            # of inactivity checks plus suspicion, so the fault scenarios see the view change.
            "evs.suspect_timeout=PT3S",
            "evs.inactive_timeout=PT6S",
        ])
        text = f"""[mysqld]
user=root
datadir={self.datadir}
socket={self.sock}
port={self.port}
bind-address=127.0.0.1
pid-file={self.base / 'mariadb.pid'}
log-error={self.errlog}
skip-name-resolve
max_connections=400
innodb_buffer_pool_size=96M
innodb_log_file_size=64M
innodb_flush_log_at_trx_commit=2
binlog_format=ROW
default_storage_engine=InnoDB
innodb_autoinc_lock_mode=2
wsrep_on=ON
wsrep_provider={PROVIDER}
wsrep_cluster_name={CLUSTER_NAME}
wsrep_cluster_address=gcomm://{peers}
wsrep_node_name={self.name}
wsrep_node_address=127.0.0.1:{self.gcomm_port}
wsrep_node_incoming_address=127.0.0.1:{self.port}
wsrep_sst_method=rsync
wsrep_sst_receive_address=127.0.0.1:{self.sst_port}
wsrep_provider_options="{options}"
wsrep_slave_threads=2
"""
        self.cnf.write_text(text)
        # mariadbd ignores a world-writable config file.
        os.chmod(self.cnf, 0o644)

    def install(self) -> None:
        sh(["mariadb-install-db", "--no-defaults", f"--datadir={self.datadir}", "--user=root",
            "--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve"], timeout=180)

    def start(self, new_cluster: bool = False, position: str | None = None) -> None:
        args = ["mariadbd", f"--defaults-file={self.cnf}"] + (["--wsrep-new-cluster"] if new_cluster else [])
        if position:
            args.append(f"--wsrep-start-position={position}")
        self.proc = self.cluster.spawn(args, self.base / "mariadbd.out")
        self.pid = self.proc.pid

    def crashed(self) -> bool:
        """Whether the node stopped without saving its position (killed while running:
        grastate.dat says seqno -1); a clean shutdown saves it."""
        try:
            state = (self.datadir / "grastate.dat").read_text()
        except OSError:
            return False
        return re.search(r"^seqno:\s+-1\s*$", state, re.M) is not None

    def recover_position(self) -> str | None:
        """The last committed `uuid:seqno` of a node that was killed (its grastate.dat says
        seqno -1), read from InnoDB by `mariadbd --wsrep-recover`; None when the saved
        state already has it."""
        try:
            state = (self.datadir / "grastate.dat").read_text()
        except OSError:
            return None
        if "seqno:   -1" not in state and "seqno: -1" not in state:
            return None
        for attempt in range(1, 4):
            log = self.base / f"wsrep-recover-{attempt}.log"
            log.unlink(missing_ok=True)
            r = sh(["mariadbd", f"--defaults-file={self.cnf}", "--wsrep-recover", f"--log-error={log}"],
                   check=False, timeout=180)
            text = log.read_text(errors="replace") if log.exists() else ""
            found = [line.rsplit("Recovered position:", 1)[1].strip() for line in text.splitlines()
                     if "WSREP: Recovered position:" in line]
            # A position of seqno -1 is no position: the node would still ask for an SST.
            if found and not found[-1].endswith(":-1"):
                return found[-1]
            self.cluster.log(f"{self.name}: --wsrep-recover (try {attempt}, exit {r.returncode}) found no position; "
                             f"see {log}")
            time.sleep(1)
        return None

    def restart(self) -> str | None:
        """Starts a stopped or killed node again so that it rejoins the running cluster.
        Without its recovered position a killed node would ask for a full state transfer
        (SST) instead of the missing writes (IST); returns the position it started from."""
        crashed = self.crashed()
        position = self.recover_position() if crashed else None
        if crashed and position is None:
            # No position: the node needs a full SST, which the rsync daemon (`nobody`)
            # cannot write over the files a root mariadbd left. Start it empty, as a
            # first join.
            self.cluster.log(f"{self.name}: no recovered position; emptying its datadir for a full SST")
            shutil.rmtree(self.datadir)
            self.datadir.mkdir()
            os.chmod(self.datadir, 0o777)
        self.start(position=position)
        return position

    def alive(self) -> bool:
        if self.pid is None:
            return False
        if self.proc is not None:
            return self.proc.poll() is None
        return is_our_mariadbd(self.pid, self.cnf)

    def client(self, db: str | None = None) -> list[str]:
        return ["mariadb", "--no-defaults", f"--socket={self.sock}", "-uroot", "-N", "-B"] + ([db] if db else [])

    def sql(self, query: str, db: str | None = None, timeout: float = 60) -> list[list[str]]:
        r = sh(self.client(db) + ["-e", query], check=False, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{self.name}: sql failed ({r.returncode}): {r.stderr.strip()}\n{query}")
        return [line.split("\t") for line in r.stdout.splitlines() if line]

    def status(self) -> dict[str, str]:
        """wsrep status of the node, or {} when it does not answer."""
        try:
            rows = self.sql("show global status where variable_name in ('wsrep_local_state_comment', "
                            "'wsrep_cluster_size', 'wsrep_ready', 'wsrep_cluster_status', "
                            "'wsrep_last_committed', 'wsrep_flow_control_paused')", timeout=5)
        except (RuntimeError, subprocess.TimeoutExpired):
            return {}
        return {k.lower(): v for k, v in rows}

    def synced(self, size: int | None = None) -> bool:
        st = self.status()
        ok = st.get("wsrep_local_state_comment") == "Synced" and st.get("wsrep_ready") == "ON"
        return ok and (size is None or st.get("wsrep_cluster_size") == str(size))

    def wait_synced(self, timeout: float = 180, size: int | None = None) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.errlog}")
            if self.synced(size):
                return
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not Synced after {timeout:.0f}s; see {self.errlog}")

    def wait_rejoined(self, peer: "Node", timeout: float = 180) -> None:
        """Waits until this node is Synced in the same view as `peer` (same
        `wsrep_cluster_conf_id`, full size). Right after SIGCONT a stopped node still
        reports the view it had before it stopped, so Synced alone proves nothing."""
        end = time.monotonic() + timeout
        size = str(len(self.cluster.nodes))
        while time.monotonic() < end:
            mine, theirs = self.conf(), peer.conf()
            if mine and mine == theirs and self.synced() and peer.status().get("wsrep_cluster_size") == size:
                return
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} did not rejoin {peer.name}'s view within {timeout:.0f}s; see {self.errlog}")

    def conf(self) -> str | None:
        try:
            rows = self.sql("show global status like 'wsrep_cluster_conf_id'", timeout=5)
        except (RuntimeError, subprocess.TimeoutExpired):
            return None
        return rows[0][1] if rows else None

    def signal(self, sig: int) -> None:
        if self.pid is None:
            raise RuntimeError(f"{self.name} was not started")
        os.kill(self.pid, sig)

    def leave(self, timeout: float = 120) -> None:
        """A clean shutdown (SIGTERM): the node leaves the cluster, which keeps its quorum
        with the members that remain."""
        self.signal(signal.SIGTERM)
        if self.proc is not None:
            self.proc.wait(timeout=timeout)
        else:
            wait_gone(self.pid, timeout)

    def kill9(self) -> int | None:
        """SIGKILL; the exit status when we are its parent."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            return self.proc.wait(timeout=30)
        wait_gone(self.pid, 30)
        return None

    def log_size(self) -> int:
        try:
            return self.errlog.stat().st_size
        except OSError:
            return 0

    def joined_by(self, since: int | None = None) -> str:
        """How the node's last start (or, with `since`, its last rejoin after that offset of
        its error log) got its state: 'IST (n writesets)', 'SST' or '?'."""
        try:
            text = self.errlog.read_bytes().decode(errors="replace")
        except OSError:
            return "?"
        if since is not None:
            tail = text[since:]
            m = re.findall(r"Receiving IST: (\d+) writesets", tail)
            if m:
                return f"IST ({m[-1]} writesets)"
        else:
            tail = text[text.rfind("Starting MariaDB"):] if "Starting MariaDB" in text else text
        # The rsync script says which it did; with IST the server still logs an "SST" of the
        # position it already had, so "SST received" alone means nothing.
        if "rsync SST completed on joiner" in tail:
            return "SST"
        if "rsync IST completed on joiner" in tail:
            m = re.search(r"Receiving IST: (\d+) writesets", tail)
            return f"IST ({m.group(1)} writesets)" if m else "IST"
        return "?"


def is_our_mariadbd(pid: int, cnf: Path) -> bool:
    """Whether `pid` is still a mariadbd started with this node's config (not a reused pid)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmd) and cmd[0].endswith(b"mariadbd") and f"--defaults-file={cnf}".encode() in cmd


def wait_gone(pid: int | None, timeout: float) -> None:
    end = time.monotonic() + timeout
    while pid is not None and time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # A zombie of a process we did not start goes when its parent (init) reaps it.
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return
        except OSError:
            return
        time.sleep(0.1)


class GaleraCluster:
    def __init__(self, base: Path, base_port: int = DEFAULT_BASE_PORT,
                 spawn: Callable[[list[str], Path], subprocess.Popen] = detached_spawn,
                 log: Callable[[str], None] = print) -> None:
        self.dir = base
        self.base_port = base_port
        self.spawn = spawn
        self.log = log
        self.nodes: list[Node] = []
        self.nodes = [Node(self, n) for n in range(1, NODES + 1)]

    @property
    def state_file(self) -> Path:
        return self.dir / "cluster.json"

    def urls(self, db: str = "test") -> list[str]:
        return [n.url(db) for n in self.nodes]

    def up(self, count: int = NODES) -> None:
        """Bootstraps node 1 and joins nodes 2..`count` one at a time (all by default)."""
        busy = [p for n in self.nodes for p in n.ports() if not port_free(p)]
        if busy:
            raise RuntimeError(f"ports already in use: {busy} (another cluster? `galera.py status`, or --base-port)")
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        os.chmod(self.dir, 0o755)
        # Every folder above the datadirs must be traversable by the SST daemon's `nobody`.
        for parent in self.dir.parents:
            if parent != Path("/") and not os.stat(parent).st_mode & 0o001:
                raise RuntimeError(f"{parent} is not traversable by others; the rsync SST needs it (use --dir)")
        for node in self.nodes:
            node.write_config()
        first = self.nodes[0]
        started = time.monotonic()
        self.log(f"installing {first.name} ({first.datadir})")
        first.install()
        self.log(f"bootstrapping {first.name} on 127.0.0.1:{first.port} (--wsrep-new-cluster)")
        first.start(new_cluster=True)
        self.save()
        first.wait_synced(120)
        first.sql("create user if not exists 'root'@'127.0.0.1'; "
                  "grant all on *.* to 'root'@'127.0.0.1' with grant option; "
                  "create database if not exists test")
        for node in self.nodes[1:count]:
            self.log(f"starting {node.name} on 127.0.0.1:{node.port}; it joins by SST")
            node.start()
            self.save()
            node.wait_synced(180)
        for node in self.nodes[:count]:
            node.wait_synced(60, size=count)
        self.log(f"cluster of {count} Synced in {time.monotonic() - started:.0f} s")
        self.save()

    def save(self) -> None:
        state = {"base_port": self.base_port, "nodes": [
            {"name": n.name, "pid": n.pid, "port": n.port, "gcomm_port": n.gcomm_port, "ist_port": n.ist_port,
             "sst_port": n.sst_port, "datadir": str(n.datadir), "cnf": str(n.cnf), "url": n.url()}
            for n in self.nodes]}
        self.state_file.write_text(json.dumps(state, indent=1) + "\n")

    @classmethod
    def load(cls, base: Path, **kw) -> "GaleraCluster | None":
        try:
            state = json.loads((base / "cluster.json").read_text())
        except (OSError, ValueError):
            return None
        cluster = cls(base, state["base_port"], **kw)
        for node, saved in zip(cluster.nodes, state["nodes"]):
            node.pid = saved.get("pid")
        return cluster

    def down(self, remove: bool = True) -> None:
        for node in reversed(self.nodes):
            if node.pid is not None and (node.proc is not None or is_our_mariadbd(node.pid, node.cnf)):
                try:
                    # SIGCONT first: a stopped node never acts on the kill's exit otherwise.
                    os.kill(node.pid, signal.SIGCONT)
                    os.kill(node.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                if node.proc is not None:
                    node.proc.wait(timeout=30)
                else:
                    wait_gone(node.pid, 30)
                self.log(f"{node.name}: killed pid {node.pid}")
        if remove and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)

    def describe(self) -> list[str]:
        lines = []
        for node in self.nodes:
            alive = node.alive()
            st = node.status() if alive else {}
            lines.append(
                f"{node.name}: pid {node.pid} {'running' if alive else 'not running'}, sql 127.0.0.1:{node.port}, "
                f"group {node.gcomm_port}, ist {node.ist_port}, sst {node.sst_port}; "
                + (", ".join(f"{k.removeprefix('wsrep_')}={v}" for k, v in sorted(st.items())) or "no answer"))
        return lines


def main() -> int:
    p = argparse.ArgumentParser(description="A 3-node MariaDB Galera cluster on loopback for the tests.")
    p.add_argument("command", choices=["up", "down", "status", "urls"])
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"base folder (default {DEFAULT_DIR})")
    p.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT,
                   help="SQL ports are base..base+2; group/IST/SST ports base+1010.. (default %(default)s)")
    args = p.parse_args()
    if args.command in ("up", "down") and os.geteuid() != 0:
        print("run as root: mariadbd runs with user=root and the SST daemon as nobody", file=sys.stderr)
        return 2
    existing = GaleraCluster.load(args.dir)
    if args.command == "up":
        if existing and any(n.alive() for n in existing.nodes):
            print(f"a cluster is already running from {args.dir}:", file=sys.stderr)
            print("\n".join(existing.describe()), file=sys.stderr)
            return 1
        if not Path(PROVIDER).exists():
            print(f"no Galera provider at {PROVIDER} (apt-get install galera-4)", file=sys.stderr)
            return 2
        cluster = GaleraCluster(args.dir, args.base_port)
        try:
            cluster.up()
        except Exception as e:
            print(f"galera up failed: {e}", file=sys.stderr)
            cluster.down(remove=False)
            print(f"logs kept in {args.dir}", file=sys.stderr)
            return 1
        print("\n".join(cluster.describe()))
        print(f"export TEST_GALERA_URLS={','.join(cluster.urls())}")
        return 0
    if existing is None:
        print(f"no cluster recorded in {args.dir}")
        return 0 if args.command == "down" else 1
    if args.command == "down":
        existing.down()
        return 0
    if args.command == "urls":
        print(",".join(existing.urls()))
        return 0
    lines = existing.describe()
    print("\n".join(lines))
    return 0 if all("Synced" in line for line in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
