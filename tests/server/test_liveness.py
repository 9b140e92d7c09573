"""/health tells a dead or wedged engine thread, and the gunicorn worker then restarts
(server/health.py); systemd's watchdog pings go out while the engine is fine, and stop when not.

The engine is broken through its test-only fault hook: PYLLAMA_TEST_FAULT=hang blocks the engine
thread inside its first step, =die makes that step raise (engine/client.py `_test_fault`).
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import threading
import time

import httpx
import pytest

from pyllama.server.health import DEFAULT_TIMEOUT_S, liveness_timeout

from .conftest import ServerProcess

BODY = {"prompt": "hello", "n_predict": 4}


def test_liveness_timeout_from_the_environment():
    assert liveness_timeout({}) == DEFAULT_TIMEOUT_S
    assert liveness_timeout({"PYLLAMA_LIVENESS_TIMEOUT": "2.5"}) == 2.5
    assert liveness_timeout({"PYLLAMA_LIVENESS_TIMEOUT": "0"}) == 0  # no stall check
    assert liveness_timeout({"PYLLAMA_LIVENESS_TIMEOUT": "soon"}) == DEFAULT_TIMEOUT_S


def start(synthetic_path, **env) -> ServerProcess:
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "1", "-c", "256"], env=env)
    srv.wait_ready()
    return srv


def kill_all(srv: ServerProcess) -> None:
    """SIGKILL the master and its workers: a wedged worker would hold a graceful stop."""
    try:
        children = open(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read().split()
    except OSError:
        children = []
    for pid in [srv.proc.pid, *map(int, children)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    srv.proc.wait(30)


def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def health(srv: ServerProcess):
    try:
        return httpx.get(srv.base + "/health", timeout=5)
    except httpx.HTTPError:
        return None


def booted_workers(srv: ServerProcess) -> int:
    with open(srv.log.name, "rb") as f:
        return f.read().count(b"Booting worker with pid")


def in_background(fn) -> dict:
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = fn()
        except Exception as exc:  # noqa: BLE001 - what the client saw
            outcome["error"] = exc

    outcome["thread"] = threading.Thread(target=run, daemon=True)
    outcome["thread"].start()
    return outcome


@pytest.fixture
def notify_socket():
    folder = tempfile.mkdtemp(prefix="pyllama-notify-", dir="/tmp")  # short: sun_path is 108 bytes
    path = os.path.join(folder, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    yield path, sock
    sock.close()
    os.unlink(path)
    os.rmdir(folder)


def read_until(sock, predicate, timeout: float = 60) -> list[str]:
    """The datagrams received until one satisfies `predicate` (that one included)."""
    got, deadline = [], time.time() + timeout
    while time.time() < deadline:
        try:
            message = sock.recv(4096).decode()
        except socket.timeout:
            continue
        got.append(message)
        if predicate(message, got):
            return got
    raise AssertionError(f"timed out; got {got}")


def test_wedged_engine_fails_health_and_stops_the_systemd_pings(synthetic_path, notify_socket):
    path, sock = notify_socket
    srv = start(synthetic_path, PYLLAMA_TEST_FAULT="hang", PYLLAMA_LIVENESS_TIMEOUT="1",
                PYLLAMA_LIVENESS_RESTART="0", NOTIFY_SOCKET=path, WATCHDOG_USEC="400000")
    try:
        # gunicorn's master says READY=1; the worker pings at half of WatchdogSec once started
        got = read_until(sock, lambda m, got: "STATUS=model loaded" in got and got.count("WATCHDOG=1") >= 2)
        assert any(m.startswith("READY=1") for m in got)
        assert health(srv).status_code == 200  # idle, the armed fault has not fired
        request = in_background(lambda: httpx.post(srv.base + "/completion", json=BODY, timeout=60))
        answer = wait_for(lambda: (r := health(srv)) is not None and r.status_code == 503 and r, 30, "a 503")
        error = answer.json()["error"]
        assert answer.headers["content-type"].startswith("application/json")
        assert error["code"] == 503 and error["type"] == "unavailable_error"
        assert error["message"].startswith("engine stalled: no progress for ")
        got = read_until(sock, lambda m, got: m.startswith("STATUS=unhealthy: engine stalled"))
        # ... and no WATCHDOG=1 after it, for many ping periods: systemd would restart the unit
        time.sleep(1.5)
        later = []
        while True:
            try:
                later.append(sock.recv(4096).decode())
            except socket.timeout:
                break
        assert "WATCHDOG=1" not in later
        assert request["thread"].is_alive()  # the request is stuck with the engine
        assert booted_workers(srv) == 1  # PYLLAMA_LIVENESS_RESTART=0: left to the probe's owner
    finally:
        kill_all(srv)


def test_dead_engine_fails_health_and_its_requests(synthetic_path):
    srv = start(synthetic_path, PYLLAMA_TEST_FAULT="die", PYLLAMA_LIVENESS_RESTART="0")
    try:
        r = httpx.post(srv.base + "/completion", json=BODY, timeout=60)
        assert r.status_code == 500  # an error, never a normal-looking empty completion
        assert r.json()["error"]["message"] == "engine thread failed: PYLLAMA_TEST_FAULT=die"
        answer = health(srv)
        assert answer.status_code == 503
        assert answer.json() == {"error": {"code": 503, "message": "engine thread failed: PYLLAMA_TEST_FAULT=die",
                                           "type": "unavailable_error"}}
    finally:
        kill_all(srv)


@pytest.mark.parametrize("fault", ["die", "hang"])
def test_the_worker_restarts_when_the_engine_is_dead_or_wedged(synthetic_path, fault):
    srv = start(synthetic_path, PYLLAMA_TEST_FAULT=fault, PYLLAMA_LIVENESS_TIMEOUT="1")
    try:
        assert booted_workers(srv) == 1
        request = in_background(lambda: httpx.post(srv.base + "/completion", json=BODY, timeout=60))
        wait_for(lambda: booted_workers(srv) == 2, 60, "a second worker")
        wait_for(lambda: (r := health(srv)) is not None and r.status_code == 200, 60, "/health 200")
        request["thread"].join(30)
        # the client got an answer or a closed connection, not a hang
        assert not request["thread"].is_alive()
        if fault == "die":
            assert request["result"].status_code == 500
        else:
            assert isinstance(request.get("error"), httpx.HTTPError)
        log = open(srv.log.name, "rb").read().decode(errors="replace")
        assert "restarting the worker" in log
    finally:
        srv.stop()
