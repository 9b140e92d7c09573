"""/health while the model loads, and running the app under gunicorn directly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import falcon.testing
import httpx

from pyllama.cli import parse_server_args
from pyllama.server.app import ServerState, create_app


def test_health_is_503_while_loading_then_200(synthetic_path):
    state = ServerState(parse_server_args(["-m", str(synthetic_path), "-np", "1", "-c", "256"], environ={}),
                        str(synthetic_path))
    client = falcon.testing.TestClient(create_app(state))
    r = client.simulate_get("/health")
    assert r.status_code == 503
    assert r.json == {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
    assert client.simulate_post("/completion", json={"prompt": "x"}).status_code == 503
    state.load()
    try:
        assert client.simulate_get("/health").json == {"status": "ok"}
        r = client.simulate_post("/completion", json={"prompt": "Hello", "n_predict": 3, "ignore_eos": True})
        assert r.status_code == 200 and r.json["tokens_predicted"] == 3
    finally:
        state.close()


def test_gunicorn_directly_with_the_wsgi_factory(synthetic_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYLLAMA_ARGS": f"-m {synthetic_path} -np 2 -c 512 --port {port} --metrics"}
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    # gunicorn puts its working folder on sys.path: run it elsewhere than the source tree, as a
    # deployment does, so the installed pyllama is the one imported
    proc = subprocess.Popen([gunicorn, "-c", "python:pyllama.server.wsgi", "pyllama.server.wsgi:create_app()"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=synthetic_path.parent)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        r = httpx.post(base + "/completion", json={"prompt": "Hello", "n_predict": 2, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["tokens_predicted"] == 2
        assert "llamacpp:n_decode_total" in httpx.get(base + "/metrics").text
    finally:
        proc.terminate()
        assert proc.wait(30) == 0  # SIGTERM: a clean, graceful stop


def test_sigterm_drains_an_in_flight_stream(synthetic_path):
    import json
    import signal

    from .conftest import ServerProcess

    srv = ServerProcess(["-m", str(synthetic_path), "-np", "2", "-c", "512"])
    srv.wait_ready()
    events = []
    with httpx.stream("POST", srv.base + "/completion", timeout=60, json={
            "prompt": "Once upon a time", "n_predict": 60, "ignore_eos": True, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if len(events) == 1:
                    srv.proc.send_signal(signal.SIGTERM)
    assert events[-1]["stop"] is True and events[-1]["tokens_predicted"] == 60
    assert srv.proc.wait(60) == 0


def test_kv_unified_per_slot_caps_each_slot(synthetic_path):
    state = ServerState(parse_server_args(["-m", str(synthetic_path), "--kv-unified-per-slot", "256"],
                                          environ={}), str(synthetic_path))
    state.load()
    try:
        client = falcon.testing.TestClient(create_app(state))
        props = client.simulate_get("/props").json
        assert props["total_slots"] == 4 and props["default_generation_settings"]["n_ctx"] == 256
        r = client.simulate_post("/completion", json={"prompt": [1] * 300})
        assert r.status_code == 400 and r.json["error"]["n_ctx"] == 256
    finally:
        state.close()


def test_host_binds_every_comma_separated_address(synthetic_path, tmp_path):
    from .conftest import ServerProcess

    sock = tmp_path / "pyllama.sock"
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "1", "-c", "256",
                         "--host", f"127.0.0.1, 127.0.0.2,{sock}"])
    try:
        srv.wait_ready()
        for base in (srv.base, f"http://127.0.0.2:{srv.port}"):
            assert httpx.get(base + "/health", timeout=10).json() == {"status": "ok"}
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as client:
            r = client.post("http://localhost/completion", json={"prompt": "Hello", "n_predict": 2, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["tokens_predicted"] == 2
    finally:
        srv.stop()


def test_http_threads_default_is_upstreams():
    from pyllama.server.gunicorn import gunicorn_options

    opts = gunicorn_options(parse_server_args(["-np", "3", "--host", "127.0.0.1,::1", "--port", "9"], environ={}))
    fixed = max(3 + 4, (os.cpu_count() or 1) - 1)
    assert opts["threads"] == fixed + 1024 and opts["worker_connections"] > opts["threads"]
    assert opts["bind"] == ["127.0.0.1:9", "[::1]:9"]
    opts = gunicorn_options(parse_server_args(["--threads-http", "2"], environ={}))
    assert opts["threads"] == 2 + 1024


def test_no_gunicorn_control_socket_is_made(synthetic_path, tmp_path):
    # gunicorn >= 25.1 opens a control socket at one path per user: two servers would fight
    # over it, and llama-server has none
    from .conftest import ServerProcess

    env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": ""}
    srv = ServerProcess(["-m", str(synthetic_path), "-c", "256"], env=env)
    try:
        srv.wait_ready()
    finally:
        srv.stop()
    assert not (tmp_path / ".gunicorn").exists()
    assert b"Control socket" not in srv.proc.stdout.read()
