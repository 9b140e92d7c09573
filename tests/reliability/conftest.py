"""The fault suite's servers: real pyllama-server processes on 127.0.0.1, the synthetic model.

Its own copy of tests/server's ServerProcess (CI runs the suite from outside the source tree,
and the sibling conftest is not importable from here), with what faults need besides: the
gunicorn worker's pid (the master is the process started here) and resident memory read
from /proc.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    """A process's resident set (VmRSS) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (from /proc; no psutil needed)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after its closing paren
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            out.append(int(entry))
    return out


class ServerProcess:
    def __init__(self, args: list[str], env: dict | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        script = Path(sys.executable).parent / "pyllama-server"
        # output to a file: a pipe nobody drains would stall a chatty server at 64 KiB
        self.log = tempfile.NamedTemporaryFile(prefix="pyllama-reliability-", suffix=".log")
        self.proc = subprocess.Popen([str(script), "--port", str(self.port), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def output(self) -> str:
        return Path(self.log.name).read_bytes().decode(errors="replace")

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited: " + self.output()[-3000:])
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready: " + self.output()[-3000:])

    def worker_pid(self) -> int:
        """The gunicorn worker (the master's one child), which owns the model."""
        pids = children(self.proc.pid)
        assert len(pids) == 1, pids
        return pids[0]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def fim_model(tmp_path_factory):
    """The synthetic model with fill-in-the-middle tokens, so /infill serves too."""
    from pyllama.synthetic import SyntheticSpec, write_synthetic_model

    return write_synthetic_model(tmp_path_factory.mktemp("reliability") / "fim.gguf", SyntheticSpec(fim=True))


@pytest.fixture(scope="module")
def gen_server(fim_model, tmp_path_factory):
    """Every generation route on: slots save/restore, POST /props, /infill."""
    slots = tmp_path_factory.mktemp("slots")
    srv = ServerProcess(["-m", str(fim_model), "-np", "2", "-c", "2048", "--props",
                         "--slot-save-path", str(slots)])
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def embed_server(synthetic_path):
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "2", "-c", "2048", "--embeddings",
                         "--reranking"])
    srv.wait_ready()
    yield srv
    srv.stop()
