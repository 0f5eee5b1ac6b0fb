"""The load client's floor: `target/release/trivial` (crates/bench/src/bin/trivial.rs), an
HTTP server that answers every request with 200 and a fixed charge-sized JSON body, under
the same k6 profile as the service, in the same run.

Whatever latency k6 reports against it is k6's own (and the kernel's, on the same two
cores): nothing behind the socket. Its checks are not the service's (the fixed body names
user 1 whatever the request), so only its latency, its throughput and the CPU are reported.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from lib.common import TRIVIAL_BIN, free_port, http_get, log


class TrivialServer:
    def __init__(self, log_path: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen([str(TRIVIAL_BIN), "--bind", f"127.0.0.1:{self.port}"], stdout=self.log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the trivial server exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            if http_get(self.base + "/health/ready", 2)[0] == 200:
                return
            time.sleep(0.1)
        raise RuntimeError("the trivial server was not ready in 30 s")

    def stop(self) -> None:
        """Stops it and reaps it (its CPU then joins RUSAGE_CHILDREN, before the next run's
        first reading: no run's load client figure takes it)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log_file.close()


def floor(bench, scenario: str, label: str, script: str, env_extra: dict, timeout: float) -> dict | None:
    """One measured k6 run of `script` against a trivial server of its own (its CPU metered
    as "trivial"); the run's entry, or None when the binary is missing."""
    if not TRIVIAL_BIN.exists():
        log(f"{TRIVIAL_BIN} is missing: no floor measured (cargo build --release -p bench)")
        return None
    server = TrivialServer(bench.tmp / "trivial.log")
    server.start()
    bench.cpu.track("trivial", server.proc.pid)
    try:
        name = f"{Path(script).stem}-trivial"
        return bench.measure(scenario, "floor", label,
                             lambda: bench.k6(script, env_extra, timeout, base_url=server.base, name=name))
    finally:
        bench.cpu.untrack("trivial")
        server.stop()
