"""--sleep-idle-seconds against real servers: the model unloads after the idle period and the
next request that needs it loads it again (llama-server's server_queue sleeping state).

No durations are asserted: states are waited for by polling with a generous deadline.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time

import httpx
import pytest

from pyllama.cli import FlagError, parse_server_args
from .conftest import ServerProcess

DEADLINE = 120  # seconds to wait for a state; the test never asserts how long it took

GREEDY = {"prompt": "The capital of France is", "n_predict": 12, "temperature": 0.0, "seed": 1,
          "cache_prompt": False}


def _worker_pid(srv: ServerProcess) -> int:
    # the gunicorn worker is the child of the server process (its arbiter)
    deadline = time.time() + DEADLINE
    while time.time() < deadline:
        with open(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children") as f:
            children = f.read().split()
        if children:
            return int(children[0])
        time.sleep(0.1)
    raise AssertionError("no worker process")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _wait_sleeping(client: httpx.Client, sleeping: bool = True) -> dict:
    deadline = time.time() + DEADLINE
    while time.time() < deadline:
        props = client.get("/props").json()
        if props["is_sleeping"] is sleeping:
            return props
        time.sleep(0.2)
    raise AssertionError(f"/props never reported is_sleeping={sleeping}")


def _streamed_content(client: httpx.Client, body: dict, while_open=None) -> str:
    """A streamed /completion's text; `while_open()` runs after its first event, while the
    response is still open (the request holds the model loaded until then)."""
    parts = []
    with client.stream("POST", "/completion", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if while_open is not None:
                while_open()
                while_open = None
            parts.append(event.get("content", ""))
            if event.get("stop"):
                break
    return "".join(parts)


@pytest.fixture(scope="module")
def sleepy_server(synthetic_path):
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "2", "-c", "1024", "--metrics",
                         "--sleep-idle-seconds", "1"])
    srv.wait_ready()
    yield srv
    srv.stop()


def test_sleeps_when_idle_and_wakes_on_a_completion(sleepy_server):
    with httpx.Client(base_url=sleepy_server.base, timeout=DEADLINE) as client:
        before = client.post("/completion", json=GREEDY).json()["content"]
        assert before
        props_awake = None

        def read_props():  # while a stream is open the model is held: never asleep
            nonlocal props_awake
            props_awake = client.get("/props").json()
        assert _streamed_content(client, GREEDY, read_props) == before
        assert props_awake["is_sleeping"] is False
        models_awake = client.get("/v1/models").json()

        props = _wait_sleeping(client)
        # get_props while sleeping: the answer cached when the model was unloaded
        assert {k: v for k, v in props.items() if k != "is_sleeping"} == \
            {k: v for k, v in props_awake.items() if k != "is_sleeping"}
        # /health, /props, /models and /metrics answer without waking it
        for _ in range(5):
            health = client.get("/health")
            assert health.status_code == 200 and health.json() == {"status": "ok"}
            models = client.get("/v1/models").json()
            assert models["data"][0]["meta"] == models_awake["data"][0]["meta"]
            metrics = client.get("/metrics")
            assert metrics.status_code == 200 and "llamacpp:requests_processing 0" in metrics.text
            assert client.get("/props").json()["is_sleeping"] is True

        # the next completion loads the model again, waits for it and gives the same output
        props_during = None

        def read_props_again():
            nonlocal props_during
            props_during = client.get("/props").json()
        assert _streamed_content(client, GREEDY, read_props_again) == before
        assert props_during["is_sleeping"] is False
        assert {k: v for k, v in props_during.items() if k != "is_sleeping"} == \
            {k: v for k, v in props_awake.items() if k != "is_sleeping"}

        # and it goes back to sleep, and a non-streamed request wakes it as well
        _wait_sleeping(client)
        assert client.post("/completion", json=GREEDY).json()["content"] == before
        # /tokenize needs the vocabulary: it wakes the model too (upstream's post_tokenize)
        _wait_sleeping(client)
        tokens = client.post("/tokenize", json={"content": "hello"}).json()["tokens"]
        assert tokens
        # requests arriving together while it sleeps all wait for the one reload
        _wait_sleeping(client)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            outs = list(pool.map(lambda _: client.post("/completion", json=GREEDY).json()["content"], range(6)))
        assert outs == [before] * 6
        # a failed request and a stream its client drops let it sleep again (their holds end)
        _wait_sleeping(client)
        bad = client.post("/completion", json={"prompt": "x", "n_probs": "many"})
        assert bad.status_code == 400
        with client.stream("POST", "/completion", json={**GREEDY, "n_predict": 200, "stream": True}) as resp:
            next(resp.iter_lines())
        _wait_sleeping(client)
    log = sleepy_server.proc.stdout.read().decode(errors="replace")
    assert "entering sleeping state" in log and "exiting sleeping state" in log


def test_sleeping_frees_the_model_memory(gemma_path):
    srv = ServerProcess(["-m", str(gemma_path), "-np", "1", "-c", "2048", "--sleep-idle-seconds", "1"])
    try:
        srv.wait_ready()
        pid = _worker_pid(srv)
        with httpx.Client(base_url=srv.base, timeout=DEADLINE) as client:
            before = client.post("/completion", json=GREEDY).json()["content"]
            rss_loaded = 0

            def read_rss():  # the stream holds the model loaded
                nonlocal rss_loaded
                rss_loaded = _rss_kib(pid)
            assert _streamed_content(client, GREEDY, read_rss) == before
            _wait_sleeping(client)
            rss_asleep = _rss_kib(pid)
            # the weights (a memory-mapped or repacked copy of the file), the context and the
            # KV cache are gone: at least half the file's size comes back
            assert rss_loaded - rss_asleep > os.path.getsize(gemma_path) // 2 // 1024, (rss_loaded, rss_asleep)
            rss_awake = 0

            def read_rss_again():
                nonlocal rss_awake
                rss_awake = _rss_kib(pid)
            assert _streamed_content(client, GREEDY, read_rss_again) == before
            assert rss_awake - rss_asleep > os.path.getsize(gemma_path) // 2 // 1024, (rss_awake, rss_asleep)
    finally:
        srv.stop()


def test_sleep_idle_seconds_flag():
    assert parse_server_args([]).sleep_idle_seconds == -1
    assert parse_server_args(["--sleep-idle-seconds", "30"]).sleep_idle_seconds == 30
    assert parse_server_args(["--sleep-idle-seconds", "-1"]).sleep_idle_seconds == -1
    for bad in ("0", "-2"):  # arg.cpp: "invalid value: cannot be 0 or less than -1"
        with pytest.raises(FlagError, match="cannot be 0 or less than -1"):
            parse_server_args(["--sleep-idle-seconds", bad])
