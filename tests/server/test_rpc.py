"""ggml RPC: real pyllama-rpc-server workers on loopback and a real pyllama-server using them.

Covers --rpc (the devices registered before the load, listed by --list-devices, picked by
-dev / -ts), the worker console script's flags, a worker killed mid-generation, and peers that
are not ggml RPC or speak another protocol version.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from pyllama.engine import RPC_PROTO_VERSION

from .conftest import ServerProcess, free_port

BIN = Path(sys.executable).parent
PROMPT = "The quick brown fox"


class RpcWorker:
    """A pyllama-rpc-server process on 127.0.0.1 (its own port unless given one)."""

    def __init__(self, port: int | None = None, *args: str) -> None:
        self.port = port or free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([str(BIN / "pyllama-rpc-server"), "-p", str(self.port), "-t", "1", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while time.time() < deadline:  # a bare connect: the worker takes it as a client that left
            assert self.proc.poll() is None, "pyllama-rpc-server exited"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("pyllama-rpc-server did not listen")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def workers():
    pair = [RpcWorker(), RpcWorker()]
    yield pair
    for w in pair:
        w.kill()


def _rpc(workers) -> str:
    return ",".join(w.endpoint for w in workers)


def _server(args, workers=None, **kwargs) -> ServerProcess:
    extra = ["--rpc", _rpc(workers)] if workers else []
    srv = ServerProcess([*args, *extra, "--no-warmup"], **kwargs)
    srv.wait_ready()
    return srv


def _log(srv: ServerProcess) -> str:
    return Path(srv.log.name).read_text(errors="replace")


def _greedy(base: str, n: int = 24) -> dict:
    r = httpx.post(base + "/completion", json={"prompt": PROMPT, "n_predict": n, "temperature": 0,
                                               "return_tokens": True}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_list_devices_shows_each_worker(workers):
    out = subprocess.run([str(BIN / "pyllama-server"), "--rpc", _rpc(workers), "--list-devices"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "Available devices:"
    assert lines[1].startswith(f"  RPC0: {workers[0].endpoint} (")
    assert lines[2].startswith(f"  RPC1: {workers[1].endpoint} (")


def test_two_workers_split_the_synthetic_model_and_match_one_process(workers, synthetic_path, synthetic_server):
    srv = _server(["-m", str(synthetic_path), "-c", "2048", "-ts", "1,1"], workers)
    try:
        log = _log(srv)
        assert "assigned to device RPC0" in log or "using device RPC0" in log
        # -ts 1,1 over the synthetic model's layers: each worker holds some of them
        assert f"RPC0[{workers[0].endpoint}] model buffer size" in log
        assert f"RPC0[{workers[1].endpoint}] model buffer size" in log
        remote, local = _greedy(srv.base), _greedy(synthetic_server.base)
        assert remote["tokens"] == local["tokens"] and remote["content"] == local["content"]
        assert remote["tokens_predicted"] == local["tokens_predicted"] > 4
    finally:
        srv.stop()


def test_two_workers_serve_the_default_model(workers, gemma_path):
    srv = _server(["-m", str(gemma_path), "-c", "1024", "-ts", "1,1"], workers)
    try:
        log = _log(srv)
        assert f"RPC0[{workers[0].endpoint}] model buffer size" in log
        assert f"RPC0[{workers[1].endpoint}] model buffer size" in log
        out = _greedy(srv.base, 8)
        assert out["tokens_predicted"] == 8 and out["content"]
    finally:
        srv.stop()


def test_device_picks_one_worker(workers, synthetic_path):
    srv = _server(["-m", str(synthetic_path), "-c", "512", "-dev", "RPC1"], workers)
    try:
        log = _log(srv)
        assert "using device RPC1" in log and "using device RPC0" not in log
        assert f"RPC0[{workers[0].endpoint}] model buffer size" not in log
        assert _greedy(srv.base, 4)["tokens_predicted"] == 4
    finally:
        srv.stop()


def test_a_killed_worker_fails_its_requests_and_the_server_recovers(synthetic_path):
    """ggml-rpc aborts the process on a lost server: the stream gets an error frame first, gunicorn
    starts a new worker, /health answers (503 while the RPC server is gone), and once the RPC
    server is back on its port the model loads again."""
    pair = [RpcWorker(), RpcWorker()]
    srv = _server(["-m", str(synthetic_path), "-c", "8192", "-ts", "1,1"], pair)
    try:
        lines = []
        # ignore_eos: the synthetic model's greedy text ends at its 19th token, a few ms after the
        # kill, so without it the request sometimes finished before the RPC server was gone
        with httpx.stream("POST", srv.base + "/completion", timeout=60,
                          json={"prompt": PROMPT, "n_predict": 6000, "stream": True, "temperature": 0,
                                "ignore_eos": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 10:
                    pair[1].kill()
        assert len(lines) < 6000  # it did not run to its end
        errors = [line for line in lines if "Remote RPC server crashed" in line]
        assert errors and '"code":500' in errors[0] and "restarts its worker" in errors[0], \
            (lines[-3:], [line for line in _log(srv).splitlines() if "abort" in line.lower() or "rpc" in line.lower()][-20:])
        statuses = []
        deadline = time.time() + 60
        while time.time() < deadline and 503 not in statuses:
            try:
                statuses.append(httpx.get(srv.base + "/health", timeout=5).status_code)
            except httpx.HTTPError:  # between the old worker's end and the new one's start
                pass
            time.sleep(0.2)
        assert 503 in statuses  # a new worker answers, waiting for the RPC server
        assert srv.proc.poll() is None
        pair[1] = RpcWorker(pair[1].port)
        srv.wait_ready(timeout=60)
        assert _greedy(srv.base, 4)["tokens_predicted"] == 4
        log = _log(srv)
        assert "was sent SIGABRT" in log and "waiting for it to come back" in log
    finally:
        srv.stop()
        for w in pair:
            w.kill()


class FakePeer:
    """A TCP listener on loopback that answers every connection with `reply` and closes it."""

    def __init__(self, reply: bytes) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.reply = reply
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.recv(64)
                    conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def _hello_reply(major: int, minor: int) -> bytes:
    return struct.pack("<Q", 28) + bytes([major, minor, 0, 0]) + bytes(24)


@pytest.mark.parametrize("reply, message", [
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", "did not answer the ggml RPC handshake"),
    (_hello_reply(RPC_PROTO_VERSION[0] - 1, 0), f"speaks protocol v{RPC_PROTO_VERSION[0] - 1}.0.0"),
    (_hello_reply(RPC_PROTO_VERSION[0], RPC_PROTO_VERSION[1] + 1), "speaks protocol v"),
    (b"", "did not answer the ggml RPC handshake"),
], ids=["http", "older-major", "newer-minor", "closes"])
def test_a_garbage_or_mismatched_peer_is_refused(reply, message, synthetic_path):
    peer = FakePeer(reply)
    try:
        out = subprocess.run([str(BIN / "pyllama-server"), "--rpc", peer.endpoint, "--list-devices"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and message in out.stderr and peer.endpoint in out.stderr, out.stderr
        srv = ServerProcess(["-m", str(synthetic_path), "--rpc", peer.endpoint])
        try:
            rc = srv.proc.wait(60)
        finally:
            srv.stop()
        log = _log(srv)
        assert rc != 0 and message in log, log[-2000:]
        assert "SIGABRT" not in log and "ggml aborted" not in log
    finally:
        peer.close()


def test_an_unreachable_server_is_refused_at_start(synthetic_path):
    port = free_port()
    srv = ServerProcess(["-m", str(synthetic_path), "--rpc", f"127.0.0.1:{port}"])
    try:
        rc = srv.proc.wait(60)
    finally:
        srv.stop()
    log = _log(srv)
    assert rc != 0 and f"failed to connect to RPC server 127.0.0.1:{port}: Connection refused" in log


@pytest.mark.parametrize("value, message", [
    ("127.0.0.1", "invalid RPC server '127.0.0.1' (expected HOST:PORT)"),
    (",", "no RPC servers specified"),
    ("localhost:http", "invalid RPC server"),
])
def test_rpc_flag_values_are_checked(value, message):
    out = subprocess.run([str(BIN / "pyllama-server"), "--rpc", value], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and message in out.stderr, out.stderr


def test_rpc_server_flags():
    run = [str(BIN / "pyllama-rpc-server")]
    out = subprocess.run(run + ["--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("-t, --threads N", "-d, --device", "-H, --host HOST", "-p, --port PORT", "-c, --cache"):
        assert flag in out.stderr
    for bad in (["-p", "0"], ["-t", "0"], ["--mem", "1024"], ["-p"]):
        out = subprocess.run(run + bad, capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "Invalid parameters" in out.stderr, (bad, out.stderr)
    out = subprocess.run(run + ["-d", "NOPE"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "error: unknown device: NOPE" in out.stderr


def _banner(args, env=None) -> tuple[str, str]:
    proc = subprocess.Popen([str(BIN / "pyllama-rpc-server"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    out = []
    try:
        for line in proc.stdout:  # line-buffered: the banner arrives as printed
            out.append(line)
            if line.startswith("  transport"):
                break
    finally:
        proc.send_signal(signal.SIGINT)  # the default action: it ends as upstream's does
        proc.wait(10)
    return "".join(out), proc.stderr.read()


def test_rpc_server_warns_off_loopback_and_uses_its_cache(tmp_path):
    out, err = _banner(["-H", "0.0.0.0", "-p", str(free_port()), "-t", "1"])
    assert "WARNING: Host ('0.0.0.0') is != '127.0.0.1'" in err
    assert "Never expose the RPC server to an open network!" in err
    assert "Starting RPC server v%d.%d.%d" % RPC_PROTO_VERSION in out and "local cache    : n/a" in out
    out, err = _banner(["-p", str(free_port()), "-t", "1", "-c"], env={"LLAMA_CACHE": str(tmp_path)})
    assert "WARNING" not in err
    assert f"local cache    : {tmp_path / 'rpc'}" in out and (tmp_path / "rpc").is_dir()
    assert "CPU: " in out  # no accelerator: the CPU device is served
