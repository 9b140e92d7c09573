"""Router mode, the rest of server-models.cpp's routes: POST/DELETE /models, GET /models?reload,
the resumable stream routes, a client that leaves mid-stream, a multipart body.

One real router over a models folder of tiny synthetic models and an empty cache, with the
Hugging Face hub played by tests/hub_standin.py (HF_ENDPOINT), every check over HTTP.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import httpx
import pytest
from hub_standin import HubStandIn

from .conftest import ServerProcess
from .router_client import WAIT, ModelEvents as Events, child_port as _port, models as _models, \
    wait_for_models as _wait_for

HEADER = "X-Conversation-Id"


# --- helpers ------------------------------------------------------------------------------
def _error(r) -> tuple:
    return r.status_code, r.json()["error"]["message"]


# --- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    from pyllama.synthetic import SyntheticSpec, write_synthetic_model

    folder = tmp_path_factory.mktemp("router-routes-models")
    write_synthetic_model(folder / "alpha.gguf", SyntheticSpec(name="alpha", seed=11))
    tiny = write_synthetic_model(tmp_path_factory.mktemp("hub") / "tiny-Q4_K_M.gguf", SyntheticSpec(seed=5))
    return folder, tiny.read_bytes()


@pytest.fixture(scope="module")
def hub(ggufs):
    with HubStandIn() as standin:
        standin.add_repo("user/tiny", {"tiny-Q4_K_M.gguf": ggufs[1], "README.md": b"# tiny\n"})
        yield standin


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("router-routes-cache")


@pytest.fixture(scope="module")
def router(ggufs, hub, cache, tmp_path_factory):
    env = {"LLAMA_CACHE": str(cache), "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path_factory.mktemp("hf-home")),
           "HF_TOKEN": "", "MODEL_ENDPOINT": ""}
    # two slots and a shifting context: a generation with ignore_eos runs until it is stopped
    srv = ServerProcess(["--models-dir", str(ggufs[0]), "-c", "512", "-np", "2", "--no-warmup", "--context-shift"],
                        env=env)
    srv.wait_ready()
    yield srv
    srv.stop()


# --- POST /models, DELETE /models ------------------------------------------------------------
def test_post_models_downloads_into_the_cache_and_delete_removes_it(router, hub, cache, ggufs):
    r = httpx.post(router.base + "/models", json={})
    assert _error(r) == (400, "model must be a non-empty string")
    r = httpx.post(router.base + "/models", json={"model": "no-slash"})
    assert r.status_code == 400 and "invalid HF repo format" in r.json()["error"]["message"]

    sse = Events(router)
    try:
        r = httpx.post(router.base + "/models", json={"model": "user/tiny"}, timeout=WAIT)
        assert r.status_code == 200 and r.json() == {"success": True}
        sse.wait_for({"model": "user/tiny", "event": "model_status", "data": {"status": "downloading"}})
        sse.wait_for({"model": "user/tiny", "event": "download_finished", "data": {}})
        # the next listing re-scans the sources: the download's entry becomes the cache's model
        models = _wait_for(router, lambda m: "user/tiny:Q4_K_M" in m, "the cache model")
        sse.wait_for({"model": "*", "event": "models_reload"})
        assert "user/tiny" not in models
        tiny = models["user/tiny:Q4_K_M"]
        assert (tiny["source"], tiny["can_remove"], tiny["status"]["value"]) == ("cache", True, "unloaded")
        assert "--hf-repo" in tiny["status"]["args"]
        sha = hashlib.sha256(ggufs[1]).hexdigest()
        repo_dir = cache / "models--user--tiny"
        blob = repo_dir / "blobs" / sha
        snapshot = repo_dir / "snapshots" / hub.repos["user/tiny"].commit / "tiny-Q4_K_M.gguf"
        assert blob.read_bytes() == ggufs[1] and snapshot.resolve() == blob.resolve()

        r = httpx.post(router.base + "/models", json={"model": "user/tiny:Q4_K_M"})
        assert _error(r) == (400, "model 'user/tiny:Q4_K_M' already exists")

        # the downloaded model serves requests like any other
        r = httpx.post(router.base + "/completion", json={"model": "user/tiny:Q4_K_M", "prompt": "Hi",
                                                           "n_predict": 2, "ignore_eos": True}, timeout=WAIT)
        assert r.status_code == 200 and r.json()["tokens_predicted"] == 2

        assert _error(httpx.delete(router.base + "/models")) == (400, "model must be a non-empty string")
        r = httpx.delete(router.base + "/models", params={"model": "alpha"})
        assert _error(r) == (500, "model name=alpha is not removable (not from cache)")
        r = httpx.delete(router.base + "/models", params={"model": "nope/nope"})
        assert _error(r) == (500, "model name=nope/nope is not found")

        r = httpx.delete(router.base + "/models", params={"model": "user/tiny:Q4_K_M"}, timeout=WAIT)
        assert r.status_code == 200 and r.json() == {"success": True}  # stopped first, then deleted
        sse.wait_for({"model": "user/tiny:Q4_K_M", "event": "model_remove", "data": {}})
        assert not snapshot.exists() and not snapshot.is_symlink() and not blob.exists()
        assert "user/tiny:Q4_K_M" not in _models(router)
        assert "alpha" in _models(router)

        # a repo the hub does not have: the download child reports the failure
        r = httpx.post(router.base + "/models", json={"model": "user/missing"}, timeout=WAIT)
        assert r.status_code == 200
        sse.wait_for({"model": "user/missing", "event": "download_failed", "data": {}})
        _wait_for(router, lambda m: "user/missing" not in m and "alpha" in m, "the failed download's entry gone")
    finally:
        sse.close()


# --- GET /models?reload ------------------------------------------------------------------------
def test_reload_rescans_the_sources(router, ggufs):
    from pyllama.synthetic import SyntheticSpec, write_synthetic_model

    folder = ggufs[0]
    gamma = write_synthetic_model(folder / "gamma.gguf", SyntheticSpec(name="gamma", seed=33))
    try:
        assert "gamma" not in _models(router)  # a plain listing does not look again
        models = _models(router, reload="1")
        assert models["gamma"]["source"] == "models_dir" and models["gamma"]["status"]["value"] == "unloaded"
        r = httpx.post(router.base + "/completion", json={"model": "gamma", "prompt": "Hi", "n_predict": 2},
                       timeout=WAIT)
        assert r.status_code == 200, r.text
    finally:
        gamma.unlink()
    # gone from the folder: a running model is stopped, then dropped from the list
    models = _models(router, reload="1")
    assert "gamma" not in models and "alpha" in models


# --- the resumable stream routes ----------------------------------------------------------------
def test_stream_routes_reach_the_child_holding_the_session(router):
    body = {"model": "alpha", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5,
            "stream": True, "temperature": 0}
    with httpx.stream("POST", router.base + "/v1/chat/completions", json=body, headers={HEADER: "conv/1"},
                      timeout=WAIT) as r:
        assert r.status_code == 200
        sent = b"".join(r.iter_bytes())
    assert sent.rstrip().endswith(b"data: [DONE]")

    r = httpx.get(router.base + "/v1/stream", params={"conv_id": "conv/1"}, timeout=WAIT)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.content == sent  # replayed by the child, byte for byte
    r = httpx.get(router.base + "/v1/stream", params={"conv_id": "conv/1", "from": str(len(sent) - 10)},
                  timeout=WAIT)
    assert r.content == sent[-10:]

    r = httpx.post(router.base + "/v1/streams/lookup", json={"conversation_ids": ["conv/1", "other", 3]})
    assert r.status_code == 200
    [entry] = r.json()
    assert (entry["conversation_id"], entry["is_done"], entry["total_bytes"]) == ("conv/1", True, len(sent))
    assert httpx.post(router.base + "/v1/streams/lookup", content=b"not json").json() == []

    assert _error(httpx.get(router.base + "/v1/stream")) == (400, "Missing conversation id in path")
    r = httpx.get(router.base + "/v1/stream", params={"conv_id": "never"})
    assert _error(r) == (404, "File Not Found")  # every 404, as server-http.cpp's error handler
    r = httpx.delete(router.base + "/v1/stream", params={"conv_id": "conv/1"})
    assert r.status_code == 204
    r = httpx.get(router.base + "/v1/stream", params={"conv_id": "conv/1"})
    assert _error(r) == (404, "File Not Found")
    assert httpx.post(router.base + "/v1/streams/lookup", json={"conversation_ids": ["conv/1"]}).json() == []


# --- a client that leaves mid-stream --------------------------------------------------------------
def _slots(port: int) -> dict:
    r = httpx.get(f"http://127.0.0.1:{port}/slots", timeout=30)
    assert r.status_code == 200, r.text
    return {s["id"]: s["is_processing"] for s in r.json()}


def _wait_slots(port: int, predicate, what: str) -> dict:
    deadline = time.time() + WAIT
    while time.time() < deadline:
        slots = _slots(port)
        if predicate(slots):
            return slots
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {_slots(port)}")


class Generation:
    """A streamed /completion through the router on a thread of its own, read as fast as it
    comes (a client that stops reading would stall the child), until `leave()` closes it."""

    def __init__(self, srv) -> None:
        # a generation that cannot end by itself: far more tokens than the test waits for, no EOS
        self.body = {"model": "alpha", "prompt": "Hello", "n_predict": 1_000_000, "ignore_eos": True,
                     "stream": True}
        self.url = srv.base + "/completion"
        self.chunks = 0
        self.ended = ""  # why the stream ended, if it did
        self._leave = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with httpx.Client(timeout=WAIT) as client, client.stream("POST", self.url, json=self.body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.chunks += 1
                    if self._leave.is_set():
                        return  # closes the connection mid-stream
            self.ended = "the stream ended"
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.ended = repr(exc)

    def wait_started(self) -> None:
        deadline = time.time() + WAIT
        while self.chunks < 3 and not self.ended and time.time() < deadline:
            time.sleep(0.02)
        assert self.chunks >= 3, self.ended

    def leave(self) -> None:
        self._leave.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive() and not self.ended, self.ended


def test_a_client_that_leaves_stops_the_generation_in_the_child(router):
    kept = Generation(router)
    kept.wait_started()
    port = _port(_models(router)["alpha"])
    busy = _wait_slots(port, lambda s: sum(s.values()) == 1, "one slot generating")
    kept_slot = next(i for i, p in busy.items() if p)
    left = Generation(router)
    try:
        left.wait_started()
        _wait_slots(port, lambda s: all(s.values()), "both slots generating")
        left.leave()
        # the client closed its connection mid-stream: the router stops reading from the child,
        # whose generation is cancelled, while the other one generates on
        slots = _wait_slots(port, lambda s: sum(s.values()) == 1, "the left request's slot idle")
        assert slots[kept_slot] is True
        seen = kept.chunks
        deadline = time.time() + WAIT
        while kept.chunks == seen and time.time() < deadline:
            time.sleep(0.02)
        assert kept.chunks > seen and not kept.ended  # still relayed
    finally:
        kept.leave()
    _wait_slots(port, lambda s: not any(s.values()), "every slot idle")


# --- a multipart body ------------------------------------------------------------------------------
def test_a_multipart_request_is_relayed_to_its_model(router):
    files = {"file": ("a.wav", b"RIFF....WAVEfmt not really audio", "audio/wav")}
    r = httpx.post(router.base + "/v1/audio/transcriptions", data={"model": "alpha"}, files=files, timeout=WAIT)
    port = _port(_models(router)["alpha"])
    direct = httpx.post(f"http://127.0.0.1:{port}/v1/audio/transcriptions", data={"model": "alpha"}, files=files)
    # the child's own answer (pyllama has no audio input), through the router as straight
    assert (r.status_code, r.json()) == (direct.status_code, direct.json())
    assert _error(r) == (501, "The current model does not support audio input.")
    r = httpx.post(router.base + "/v1/audio/transcriptions", data={"language": "en"}, files=files)
    assert _error(r) == (400, "model name is missing from the request")


# --- gunicorn directly ------------------------------------------------------------------------------
def test_router_under_gunicorn_directly(ggufs, cache, tmp_path):
    import os
    import subprocess
    import sys

    from . import conftest as server_conftest

    port = server_conftest.free_port()
    args = f"--models-dir {ggufs[0]} -c 256 -np 1 --no-warmup --port {port}"
    env = {**os.environ, "PYLLAMA_ARGS": args, "LLAMA_CACHE": str(cache)}
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    log = tmp_path / "gunicorn.log"  # a file, not a pipe nobody drains: children log a lot
    with open(log, "wb") as out:
        proc = subprocess.Popen([gunicorn, "-c", "python:pyllama.server.wsgi", "pyllama.server.wsgi:create_app()"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    proc.stdout = open(log, "rb")
    try:
        srv = ServerProcess.__new__(ServerProcess)  # wait_ready on gunicorn's process
        srv.proc, srv.base = proc, f"http://127.0.0.1:{port}"
        srv.wait_ready()
        assert httpx.get(srv.base + "/props").json()["role"] == "router"
        r = httpx.post(srv.base + "/completion", json={"model": "alpha", "prompt": "Hi", "n_predict": 2, "ignore_eos": True}, timeout=WAIT)
        assert r.status_code == 200 and r.json()["tokens_predicted"] == 2
        child = _port(_models(srv)["alpha"])
        assert httpx.get(f"http://127.0.0.1:{child}/health").status_code == 200
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
        proc.stdout.close()
    with pytest.raises(httpx.HTTPError):  # the worker stopped its child on the way out
        httpx.get(f"http://127.0.0.1:{child}/health", timeout=5)

    bad = tmp_path / "bad.ini"
    bad.write_text("[m]\nno-such-option = 1\n")
    done = subprocess.run([gunicorn, "-c", "python:pyllama.server.wsgi", "pyllama.server.wsgi:create_app()"],
                          env={**env, "PYLLAMA_ARGS": f"--models-preset {bad}"}, capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert done.returncode != 0
    assert "failed to initialize router models: option 'no-such-option' not recognized" in done.stderr
