"""Servers: our own MariaDB, our own Redis, the service instances, the namespace."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from lib.common import BIN, HOST_IP, NETNS, NS_IP, PROCS, ROOT, VETH_HOST, VETH_NS, clean_env, free_port, sh


class MariaDB:
    def __init__(self, base: Path, binds: list[str]) -> None:
        self.base = base
        self.datadir = base / "data"
        self.sock = base / "mariadb.sock"
        self.pidfile = base / "mariadb.pid"
        self.errlog = base / "mariadb.err"
        self.port = free_port()
        self.binds = binds
        self.proc: subprocess.Popen | None = None

    def install(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        sh(["mariadb-install-db", "--no-defaults", f"--datadir={self.datadir}",
            "--auth-root-authentication-method=normal", "--skip-test-db", "--skip-name-resolve",
            "--user=root"], timeout=180)

    def start(self) -> None:
        self.proc = PROCS.spawn([
            "mariadbd", "--no-defaults", f"--datadir={self.datadir}", f"--socket={self.sock}",
            f"--port={self.port}", f"--bind-address={','.join(self.binds)}", f"--pid-file={self.pidfile}",
            "--innodb-buffer-pool-size=64M", "--user=root", "--skip-name-resolve",
            f"--log-error={self.errlog}", "--max-connections=400", "--innodb-flush-log-at-trx-commit=1",
        ], self.base / "mariadbd.out")
        self.wait_ready(120)
        self.sql("create user if not exists 'chaos'@'%' identified by 'chaos'; "
                 "grant all on *.* to 'chaos'@'%'")

    def wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited with {self.proc.returncode}; see {self.errlog}")
            r = sh(self.client() + ["-e", "select 1"], check=False, timeout=10)
            if r.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"mariadbd not ready after {timeout}s; see {self.errlog}")

    def client(self, db: str | None = None) -> list[str]:
        args = ["mariadb", "--no-defaults", f"--socket={self.sock}", "-uroot", "-N", "-B"]
        return args + ([db] if db else [])

    def sql(self, query: str, db: str | None = None, timeout: float = 120) -> list[list[str]]:
        r = sh(self.client(db) + ["-e", query], check=False, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"sql failed ({r.returncode}): {r.stderr.strip()}\n{query}")
        return [line.split("\t") for line in r.stdout.splitlines() if line]

    def url(self, db: str, host: str = "127.0.0.1") -> str:
        return f"mysql://chaos:chaos@{host}:{self.port}/{db}"

    def kill9(self) -> int:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=30)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)


class Redis:
    def __init__(self, base: Path, binds: list[str]) -> None:
        self.base = base
        self.port = free_port()
        self.binds = binds
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", " ".join(self.binds),
                "--save", "", "--appendonly", "no", "--daemonize", "no"]
        if any(b != "127.0.0.1" for b in self.binds):
            # Listening on our veth address too; without a password protected mode would
            # refuse the namespace's connections.
            args += ["--protected-mode", "no"]
        self.proc = PROCS.spawn(args, self.base / f"redis-{self.port}.log")
        end = time.monotonic() + 15
        while time.monotonic() < end:
            if self.ping():
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill9(self) -> int:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=10)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)


@dataclasses.dataclass
class Instance:
    name: str
    host: str
    port: int
    env: dict[str, str]
    logdir: Path
    netns: str | None = None
    proc: subprocess.Popen | None = None
    exits: list[int] = dataclasses.field(default_factory=list)

    def start(self) -> None:
        args = [str(BIN), "serve"]
        if self.netns:
            # `ip netns exec` execs the binary: the pid we hold is the service's own.
            args = ["ip", "netns", "exec", self.netns] + args
        self.proc = PROCS.spawn(args, self.logdir / f"instance-{self.name}.log", clean_env(self.env))

    def wait_ready(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"instance {self.name} exited with {self.proc.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    s.settimeout(3)
                    s.sendall(f"GET /health/ready HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n\r\n".encode())
                    data = s.recv(64)
                    if data.startswith(b"HTTP/1.1 200"):
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"instance {self.name} not ready after {timeout}s")

    def kill9(self) -> int:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        rc = self.proc.wait(timeout=10)
        self.exits.append(rc)
        return rc


class Netns:
    """A network namespace joined to this machine by its own veth pair (a private /30)."""

    def __init__(self) -> None:
        self.up = False
        self.cut_method = ""

    @staticmethod
    def _teardown() -> None:
        sh(["ip", "link", "del", VETH_HOST], check=False)
        sh(["ip", "netns", "del", NETNS], check=False)

    def setup(self) -> None:
        self._teardown()  # a leftover of an interrupted run
        addrs = sh(["ip", "-4", "addr"]).stdout
        if HOST_IP.rsplit(".", 1)[0] + "." in addrs:
            raise RuntimeError(f"{HOST_IP}/30 is already in use on this machine")
        for args in (
            ["ip", "netns", "add", NETNS],
            ["ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS],
            ["ip", "link", "set", VETH_NS, "netns", NETNS],
            ["ip", "addr", "add", f"{HOST_IP}/30", "dev", VETH_HOST],
            ["ip", "link", "set", VETH_HOST, "up"],
            ["ip", "netns", "exec", NETNS, "ip", "addr", "add", f"{NS_IP}/30", "dev", VETH_NS],
            ["ip", "netns", "exec", NETNS, "ip", "link", "set", VETH_NS, "up"],
            ["ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up"],
        ):
            r = sh(args, check=False)
            if r.returncode != 0:
                self._teardown()
                raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
        self.up = True
        # How to cut Redis off: an iptables DROP rule inside the namespace when iptables
        # works there, else a policy route sending the Redis port to a blackhole.
        probe = ["ip", "netns", "exec", NETNS, "iptables", "-w", "-L", "OUTPUT", "-n"]
        self.cut_method = "iptables" if shutil.which("iptables") and sh(probe, check=False).returncode == 0 else "iprule"

    def teardown(self) -> None:
        if self.up:
            self._teardown()
            self.up = False

    def cut(self, port: int) -> None:
        if self.cut_method == "iptables":
            sh(["ip", "netns", "exec", NETNS, "iptables", "-w", "-A", "OUTPUT", "-p", "tcp", "-d", HOST_IP,
                "--dport", str(port), "-j", "DROP"])
        else:
            sh(["ip", "netns", "exec", NETNS, "ip", "route", "add", "blackhole", "default", "table", "213"])
            sh(["ip", "netns", "exec", NETNS, "ip", "rule", "add", "ipproto", "tcp", "dport", str(port),
                "table", "213", "priority", "100"])

    def restore(self, port: int) -> None:
        if self.cut_method == "iptables":
            sh(["ip", "netns", "exec", NETNS, "iptables", "-w", "-D", "OUTPUT", "-p", "tcp", "-d", HOST_IP,
                "--dport", str(port), "-j", "DROP"])
        else:
            sh(["ip", "netns", "exec", NETNS, "ip", "rule", "del", "priority", "100"])
            sh(["ip", "netns", "exec", NETNS, "ip", "route", "del", "blackhole", "default", "table", "213"])


class RedisCluster:
    """A 6-node Redis Cluster (3 primaries, 3 replicas) started by scripts/redis-cluster.sh
    on ports of its own, with its files in the scenario's directory. The script daemonizes
    the nodes and writes their pids there; they are stopped by those pids (`down`), never
    by name."""

    SCRIPT = ROOT / "scripts" / "redis-cluster.sh"

    def __init__(self, base_dir: Path) -> None:
        self.dir = base_dir
        self.base = self.free_base()
        self.ports = [self.base + i for i in range(6)]
        self.url = ""

    @staticmethod
    def free_base(start: int = 17000) -> int:
        """The first of six consecutive ports whose cluster-bus ports (+10000) are free too."""
        def free(port: int) -> bool:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                    return True
                except OSError:
                    return False
        for base in range(start, start + 2000, 10):
            if all(free(base + i) and free(base + 10000 + i) for i in range(6)):
                return base
        raise RuntimeError(f"no six free ports (and bus ports) from {start}")

    def env(self) -> dict[str, str]:
        return dict(os.environ, REDIS_CLUSTER_PORT=str(self.base), REDIS_CLUSTER_DIR=str(self.dir))

    def up(self) -> str:
        r = sh(["bash", str(self.SCRIPT), "up"], check=False, timeout=120, env=self.env())
        if r.returncode != 0:
            raise RuntimeError(f"redis-cluster.sh up failed: {r.stdout[-1000:]}{r.stderr[-1000:]}")
        self.url = next(line for line in r.stdout.splitlines() if line.startswith("REDIS_URL=")).split("=", 1)[1]
        return self.url

    def down(self) -> None:
        sh(["bash", str(self.SCRIPT), "down"], check=False, timeout=60, env=self.env())

    def cli(self, port: int, *args: str) -> str:
        return sh(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], check=False, timeout=10).stdout

    def pid(self, port: int) -> int:
        return int((self.dir / f"{port}.pid").read_text().strip())

    def nodes(self, via: int) -> list[dict[str, str]]:
        """CLUSTER NODES as seen from the node on `via`: id, port, flags, master (a replica's
        primary id, else '-'), slots."""
        out = []
        for line in self.cli(via, "cluster", "nodes").splitlines():
            f = line.split()
            if len(f) < 8:
                continue
            out.append({"id": f[0], "port": f[1].split("@")[0].rsplit(":", 1)[1], "flags": f[2], "master": f[3],
                        "slots": " ".join(f[8:])})
        return out

    def keyslot(self, key: str) -> int:
        return int(self.cli(self.ports[0], "cluster", "keyslot", key).strip())

    def primary_of(self, slot: int, via: int | None = None) -> int:
        for n in self.nodes(via or self.ports[0]):
            if "master" not in n["flags"] or "fail" in n["flags"]:
                continue
            for part in n["slots"].split():
                if part.startswith("["):
                    continue  # a slot being migrated
                a, _, b = part.partition("-")
                if int(a) <= slot <= int(b or a):
                    return int(n["port"])
        raise RuntimeError(f"no live primary holds slot {slot}")

    def replica_of(self, primary_port: int) -> int:
        nodes = self.nodes(primary_port)
        pid = next(n["id"] for n in nodes if int(n["port"]) == primary_port)
        return next(int(n["port"]) for n in nodes if n["master"] == pid)

    def kill9(self, port: int) -> None:
        """SIGKILL of the node on `port`, and until it is gone (it is not our child)."""
        pid = self.pid(port)
        os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server {pid} on {port} still there 10 s after SIGKILL")

    def promoted(self, dead: int, replica: int) -> bool:
        """The survivors see `dead` as failed and `replica` as a primary, and the cluster is ok."""
        nodes = self.nodes(replica)
        d = next((n for n in nodes if int(n["port"]) == dead), None)
        r = next((n for n in nodes if int(n["port"]) == replica), None)
        if d is None or r is None or "fail" not in d["flags"].split(",") or "master" not in r["flags"]:
            return False
        return "cluster_state:ok" in self.cli(replica, "cluster", "info")
