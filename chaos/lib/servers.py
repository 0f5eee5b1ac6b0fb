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

from lib.common import BIN, HOST_IP, NETNS, NS_IP, PROCS, VETH_HOST, VETH_NS, clean_env, free_port, sh


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
