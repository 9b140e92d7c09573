"""A real pyllama-server process on 127.0.0.1 per configuration, talked to over HTTP."""

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


class ServerProcess:
    def __init__(self, args: list[str], env: dict | None = None, scheme: str = "http",
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.base = f"{scheme}://127.0.0.1:{self.port}"
        script = Path(sys.executable).parent / "pyllama-server"
        # the output goes to a file, read back through proc.stdout: a pipe nobody drains while
        # the test runs would stall a verbose server once it holds 64 KiB
        self.log = tempfile.NamedTemporaryFile(prefix="pyllama-server-", suffix=".log")
        self.proc = subprocess.Popen([str(script), "--port", str(self.port), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.proc.stdout = open(self.log.name, "rb")

    def wait_ready(self, timeout: float = 120, **client_kwargs) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited: " + self.proc.stdout.read().decode(errors="replace")[-3000:])
            try:
                if httpx.get(self.base + "/health", timeout=2, **client_kwargs).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def slot_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("slots")


@pytest.fixture(scope="session")
def server(gemma_path, slot_dir):
    srv = ServerProcess(["-m", str(gemma_path), "-np", "4", "-c", "8192", "--metrics",
                         "--slot-save-path", str(slot_dir)])
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def synthetic_server(synthetic_path):
    # The F32 synthetic model gives the same numbers whatever the batch: runs side by side
    # must equal runs alone (the quantised default model's batched kernels differ).
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "4", "-c", "2048"])
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.base, timeout=120) as client:
        yield client
