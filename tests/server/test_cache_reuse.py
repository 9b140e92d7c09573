"""--cache-reuse N and a request's n_cache_reuse on a real server, reported in timings.cache_n.

An editor's FIM client resends its context with a few lines gone from near the top; the server
moves the cached rest of it down into place (server_context::update_slots) instead of
computing it again. With PYLLAMA_UPSTREAM_SERVER naming a llama-server binary (of the vendored
source; a build with GGML_BACKEND_DL and no CPU backend inside takes one through
GGML_BACKEND_PATH), the same requests go to it too and both must answer alike.
"""

from __future__ import annotations

import os
import random
import subprocess
import time

import httpx
import pytest

from .conftest import ServerProcess, free_port

WORDS = range(259, 290)  # the synthetic model's word pieces
UPSTREAM = os.environ.get("PYLLAMA_UPSTREAM_SERVER")


def _chunks(*sizes, seed=0):
    # random word runs, each starting with its own token (no run continues into another)
    rng = random.Random(seed)
    return [[WORDS[i]] + [rng.choice(WORDS) for _ in range(n - 1)] for i, n in enumerate(sizes)]


def _complete(base, prompt, **body):
    res = httpx.post(base + "/completion", timeout=120,
                     json={"prompt": prompt, "n_predict": 8, "temperature": 0.0, **body})
    assert res.status_code == 200, res.text
    return res.json()


ARGS = ["-c", "2048", "-np", "1", "--cache-ram", "0"]


@pytest.fixture
def start(synthetic_path):
    servers = []

    def run(*args):
        srv = ServerProcess(["-m", str(synthetic_path), *ARGS, *args])
        servers.append(srv)
        srv.wait_ready()
        return srv

    yield run
    for srv in servers:
        srv.stop()


def test_cache_reuse_moves_the_rest_of_an_edited_prompt_into_place(start):
    a, b, c = _chunks(30, 40, 150)
    srv = start("--cache-reuse", "16")
    _complete(srv.base, [1] + a + b + c)
    edited = [1] + a + c
    result = _complete(srv.base, edited)
    # every token but the last, evaluated for its logits: not only the 31 of the common prefix
    assert result["timings"]["cache_n"] == len(edited) - 1 and result["timings"]["prompt_n"] == 1
    assert result["tokens_cached"] == len(edited) + 7
    # a request's n_cache_reuse wins over the flag: 0 keeps only the common prefix
    _complete(srv.base, [1] + a + b + c)
    assert _complete(srv.base, edited, n_cache_reuse=0)["timings"]["cache_n"] == 1 + len(a)
    res = httpx.post(srv.base + "/completion", json={"prompt": edited, "n_cache_reuse": -1}, timeout=60)
    assert res.status_code == 400 and "n_cache_reuse" in res.text


def test_without_the_flag_a_request_can_ask_for_it(start):
    a, b, c = _chunks(30, 40, 150, seed=1)
    srv = start()  # upstream's default, 0
    _complete(srv.base, [1] + a + b + c)
    assert _complete(srv.base, [1] + a + c)["timings"]["cache_n"] == 1 + len(a)
    _complete(srv.base, [1] + a + b + c)
    assert _complete(srv.base, [1] + a + c, n_cache_reuse=16)["timings"]["cache_n"] == len(a) + len(c)
    # cache_prompt off: nothing at all is reused
    _complete(srv.base, [1] + a + b + c)
    assert _complete(srv.base, [1] + a + c, n_cache_reuse=16, cache_prompt=False)["timings"]["cache_n"] == 0


def test_the_flag_and_its_variable(start):
    # LLAMA_ARG_CACHE_REUSE as upstream's set_env; the flag is not refused any more
    from pyllama.cli import parse_server_args
    from pyllama.server.app import engine_config

    assert parse_server_args(["-m", "x.gguf"], environ={}).cache_reuse == 0
    s = parse_server_args(["-m", "x.gguf"], environ={"LLAMA_ARG_CACHE_REUSE": "256"})
    assert s.cache_reuse == 256 and engine_config(s).n_cache_reuse == 256
    assert parse_server_args(["-m", "x.gguf", "--cache-reuse", "64"], environ={}).cache_reuse == 64


# requests (edits of one long prompt) whose answers upstream's llama-server must match
_A, _B, _C, _D, _E = _chunks(20, 30, 10, 30, 100, seed=2)
SCRIPT = [  # (prompt, request fields, timings.cache_n with --cache-reuse 16)
    ([1] + _A + _B + _C + _D + _E, {}, 0),
    ([1] + _A + _C + _E, {}, 21),  # C (10 tokens) is too short for 16: the search stops there
    ([1] + _A + _B + _C + _D + _E, {}, 21),
    ([1] + _A + _C + _E, {"n_cache_reuse": 8}, 130),  # C then E reused (all but the last token)
    ([1] + _A + _C + _D + _B + _E, {}, 31),  # an insertion: the cache head never moves back
    ([1] + _A + _C + _D + _B + _E + _A, {"cache_prompt": False}, 0),
]


def test_a_script_of_edits(start):
    srv = start("--cache-reuse", "16")
    for prompt, extra, cache_n in SCRIPT:
        assert _complete(srv.base, prompt, **extra)["timings"]["cache_n"] == cache_n, extra


def _wait_ready(base, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError("llama-server did not become ready")


@pytest.mark.skipif(not UPSTREAM, reason="PYLLAMA_UPSTREAM_SERVER names no llama-server binary")
def test_the_same_as_upstreams_llama_server(start, synthetic_path, tmp_path):
    # two layers: where the reused cells saw removed text the output is upstream's own
    # approximation, so it is compared with upstream's rather than with a fresh run
    ours = start("--cache-reuse", "16")
    port = free_port()
    with open(tmp_path / "upstream.log", "wb") as log:
        theirs = subprocess.Popen([UPSTREAM, "-m", str(synthetic_path), *ARGS, "--cache-reuse", "16",
                                   "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base, theirs)
        for prompt, extra, cache_n in SCRIPT:
            body = dict(extra, return_tokens=True)
            mine, upstream = _complete(ours.base, prompt, **body), _complete(base, prompt, **body)
            assert mine["tokens"] == upstream["tokens"], extra
            assert mine["timings"]["cache_n"] == cache_n, extra
            for key in ("cache_n", "prompt_n", "predicted_n"):
                assert mine["timings"][key] == upstream["timings"][key], (key, extra)
            assert mine["tokens_cached"] == upstream["tokens_cached"], extra
    finally:
        theirs.terminate()
        theirs.wait(30)
