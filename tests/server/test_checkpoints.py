"""Context checkpoints on the default model (gemma-3, sliding window of 512), over HTTP.

One slot holds 1,024 sliding-window cells (the window plus a micro-batch): in a conversation
longer than that, an edit further back than the cells reach can only be served from a
checkpoint (made where the last user message starts), and an edit nearer the end from the
cells themselves. The counts come from the server's own `timings`; the same conversation runs
with --ctx-checkpoints 0 as the baseline.
"""

from __future__ import annotations

import httpx
import pytest

from .conftest import ServerProcess


def _words(n, start=0):
    return " ".join(f"item{i}" for i in range(start, start + n))


SYSTEM = "You keep lists. " + _words(40)
FIRST = "Remember these: " + _words(60, 100)
REPLY = "Noted: " + _words(10, 100)
LONG = _words(450, 1000)  # the last user message: well past 1,024 tokens with the rest


def _messages(last):
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": FIRST},
            {"role": "assistant", "content": REPLY}, {"role": "user", "content": last}]


def _chat(client, last):
    body = {"messages": _messages(last), "max_tokens": 2, "temperature": 0}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    return data["timings"]["cache_n"], data["usage"]["prompt_tokens"]


def _user_start(client):
    # where the last user message starts: the rendered prompt up to its delimiter, tokenized
    prompt = client.post("/apply-template", json={"messages": _messages(LONG)}).json()["prompt"]
    head = prompt[:prompt.rindex("<|im_start|>user")]
    return len(client.post("/tokenize", json={"content": head, "add_special": True,
                                              "parse_special": True}).json()["tokens"])


@pytest.fixture(scope="module")
def runs(gemma_path):
    out = {}
    for name, extra in (("checkpoints", []), ("none", ["--ctx-checkpoints", "0"])):
        srv = ServerProcess(["-m", str(gemma_path), "-np", "1", "-c", "4096", "--cache-ram", "0", *extra])
        try:
            srv.wait_ready()
            with httpx.Client(base_url=srv.base, timeout=300) as client:
                start = _user_start(client)
                first = _chat(client, LONG)
                far = _chat(client, "Also " + LONG)  # diverges right after the user delimiter
                _chat(client, LONG)
                near = _chat(client, LONG + " and one more")  # diverges at the very end
            out[name] = dict(start=start, first=first, far=far, near=near)
        finally:
            srv.stop()
    return out


def test_the_conversation_outgrows_the_window_cells(runs):
    _, n_prompt = runs["checkpoints"]["first"]
    assert n_prompt > 1024 + 200


def test_an_edit_outside_the_window_resumes_from_a_checkpoint(runs):
    start = runs["checkpoints"]["start"]
    cached, _ = runs["checkpoints"]["far"]
    # the checkpoint at the last user message's start; the token before it is evaluated again
    assert cached == start - 1
    assert runs["none"]["far"][0] == 0  # without checkpoints: the whole prompt again


def test_an_edit_inside_the_window_reuses_the_cells(runs):
    with_ckpt, n_prompt = runs["checkpoints"]["near"]
    without, _ = runs["none"]["near"]
    assert with_ckpt == without > n_prompt - 20
