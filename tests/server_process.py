"""A real pyllama-server process on 127.0.0.1, talked to over HTTP: the helper every suite
that starts servers shares (tests/server, tests/reliability).

Importable as `server_process`: tests/conftest.py puts tests/ on sys.path, so it works from a
copy of the suite outside the source tree too (CI).
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


def peak_rss_kib(pid: int) -> int:
    """A process's peak resident set (VmHWM) in KiB since its start or the last reset_peak_rss."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def reset_peak_rss(pid: int) -> None:
    """Start VmHWM again from the current RSS (proc(5) clear_refs: 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


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
    """`pyllama-server --port PORT ARGS...`, its output in a temporary file.

    Args:
        args: the server's flags (--port is added).
        env: more environment variables for it.
        scheme: http or https, for `base`.
        port: the port (default: a free one).
        popen: more keyword arguments for subprocess.Popen (e.g. preexec_fn).
    """

    def __init__(self, args: list[str], env: dict | None = None, scheme: str = "http",
                 port: int | None = None, popen: dict | None = None) -> None:
        self.port = port or free_port()
        self.base = f"{scheme}://127.0.0.1:{self.port}"
        script = Path(sys.executable).parent / "pyllama-server"
        # the output goes to a file, read back through proc.stdout: a pipe nobody drains while
        # the test runs would stall a verbose server once it holds 64 KiB
        self.log = tempfile.NamedTemporaryFile(prefix="pyllama-server-", suffix=".log")
        self.proc = subprocess.Popen([str(script), "--port", str(self.port), *args],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, **(popen or {}))
        self.proc.stdout = open(self.log.name, "rb")

    def output(self) -> str:
        """Everything the server has written so far."""
        return Path(self.log.name).read_bytes().decode(errors="replace")

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
