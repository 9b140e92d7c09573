"""Reasoning controls as llama-server: -rea, --reasoning-budget(-message), --reasoning-preserve,
the request budgets (reasoning_budget_tokens, thinking_budget_tokens, Anthropic thinking) and
POST /v1/chat/completions/control. The template (tests/data/thinking.jinja) opens a <think>
block in its generation prompt; the synthetic model's output is random, so the tests look only at
what the budget sampler forces."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from .conftest import ServerProcess

TEMPLATE = Path(__file__).parent.parent / "data" / "thinking.jinja"
MESSAGES = [{"role": "user", "content": "one two three"}]
# no byte tokens of multi-byte UTF-8 characters: random ones never complete a character, and a
# spent budget waits for the character to end before it forces the end tag (as upstream's)
NO_HIGH_BYTES = [[3 + b, False] for b in range(0x80, 0x100)]


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory):
    from pyllama.synthetic import SyntheticSpec, write_synthetic_model

    # <think> and </think> as single tokens, as reasoning models have them
    spec = SyntheticSpec(special_tokens=("<think>", "</think>"))
    return write_synthetic_model(tmp_path_factory.mktemp("thinking") / "thinking.gguf", spec)


@pytest.fixture(scope="module")
def thinker(thinking_model):
    srv = ServerProcess(["-m", str(thinking_model), "-np", "2", "-c", "8192", "--jinja",
                         "--chat-template-file", str(TEMPLATE), "--reasoning-budget-message", " Enough."])
    srv.wait_ready()
    yield srv
    srv.stop()


def _chat(srv, **fields):
    # nor a second <think>, which would open a new block (and a new budget)
    think = httpx.post(srv.base + "/tokenize", json={"content": "<think>", "add_special": False,
                                                     "parse_special": True}).json()["tokens"]
    body = {"messages": MESSAGES, "max_tokens": 48, "temperature": 0, "ignore_eos": True,
            "logit_bias": NO_HIGH_BYTES + [[t, False] for t in think], **fields}
    r = httpx.post(srv.base + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]


def _tokens(srv, text):
    r = httpx.post(srv.base + "/tokenize", json={"content": text, "add_special": False}, timeout=30)
    return len(r.json()["tokens"])


def test_without_a_budget_the_whole_output_is_reasoning(thinker):
    message = _chat(thinker)
    assert message.get("reasoning_content") and not message["content"]


@pytest.mark.parametrize("field", ["reasoning_budget_tokens", "thinking_budget_tokens"])
def test_a_request_budget_ends_the_thinking_block(thinker, field):
    free = _chat(thinker)["reasoning_content"]
    message = _chat(thinker, **{field: 4})
    # four tokens of thought (a few more to finish a UTF-8 character), then the budget
    # message and the end tag are forced: the rest of the output is the answer
    assert message["reasoning_content"].endswith("Enough.")
    assert _tokens(thinker, message["reasoning_content"]) <= 8 + _tokens(thinker, " Enough.")
    assert message["reasoning_content"].startswith(free[:1])
    assert message["content"]


def test_the_request_message_wins_over_the_servers(thinker):
    message = _chat(thinker, reasoning_budget_tokens=0, reasoning_budget_message=" Stop now.")
    assert message["reasoning_content"].strip() == "Stop now." and message["content"]


def test_anthropic_thinking_budget(thinker):
    body = {"model": "x", "max_tokens": 48, "temperature": 0, "messages": MESSAGES,
            "thinking": {"type": "enabled", "budget_tokens": 0}}
    r = httpx.post(thinker.base + "/v1/messages", json=body, timeout=120)
    blocks = {b["type"]: b for b in r.json()["content"]}
    assert blocks["thinking"]["thinking"].strip() == "Enough." and blocks["text"]["text"]


def test_native_completion_takes_the_budget_fields(thinker):
    body = {"prompt": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n", "n_predict": 32,
            "temperature": 0, "ignore_eos": True, "generation_prompt": "<|im_start|>assistant\n<think>\n",
            "reasoning_budget_tokens": 0, "reasoning_budget_start_tag": "<think>",
            "reasoning_budget_end_tags": ["</think>"], "reasoning_budget_message": " Done.",
            "logit_bias": NO_HIGH_BYTES}
    r = httpx.post(thinker.base + "/completion", json=body, timeout=120)
    assert r.json()["content"].lstrip().startswith("Done.</think>")


@pytest.fixture(scope="module")
def slow_thinker(gemma_path):
    # the default model, whose decode takes milliseconds: a control arrives while it thinks
    # (the synthetic model writes thousands of tokens before an HTTP round trip ends)
    srv = ServerProcess(["-m", str(gemma_path), "-np", "2", "-c", "4096", "--jinja",
                         "--chat-template-file", str(TEMPLATE), "--reasoning-budget-message", " Enough."])
    srv.wait_ready()
    yield srv
    srv.stop()


def test_reasoning_end_control(slow_thinker):
    base = slow_thinker.base
    body = {"messages": MESSAGES, "max_tokens": 1000, "temperature": 0, "ignore_eos": True, "stream": True,
            "reasoning_control": True}
    reasoning, content, answer = [], [], None
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
            if delta.get("reasoning_content"):
                reasoning.append(delta["reasoning_content"])
                if answer is None and len(reasoning) >= 3:
                    answer = httpx.post(base + "/v1/chat/completions/control",
                                        json={"id": chunk["id"], "action": "reasoning_end"}, timeout=30).json()
            if delta.get("content"):
                content.append(delta["content"])
                if len(content) > 5:
                    break  # the answer has begun: thinking was ended on demand
    assert answer == {"success": True}
    assert "".join(reasoning).endswith("Enough.") and content


def test_control_errors_are_upstreams(slow_thinker):
    url = slow_thinker.base + "/v1/chat/completions/control"
    assert httpx.post(url, json={"id": "chatcmpl-none", "action": "reasoning_end"}).json() == \
        {"success": False, "message": "no active completion for this id"}
    r = httpx.post(url, json={"action": "reasoning_end"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "missing completion id"
    r = httpx.post(url, json={"id": "x", "action": "pause"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "unknown control action"
    # a live completion that did not ask for reasoning control
    body = {"messages": MESSAGES, "max_tokens": 1000, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", slow_thinker.base + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():  # asked while the stream is read: leaving it would close it
            if line.startswith("data: {"):
                answer = httpx.post(url, json={"id": json.loads(line[6:])["id"], "action": "reasoning_end"}).json()
                break
    assert answer == {"success": False, "message": "reasoning control not enabled for this completion"}
    # a stream read to its end is no longer live
    body = {**body, "max_tokens": 2, "reasoning_control": True}
    with httpx.stream("POST", slow_thinker.base + "/v1/chat/completions", json=body, timeout=120) as r:
        ids = {json.loads(line[6:])["id"] for line in r.iter_lines() if line.startswith("data: {")}
    assert len(ids) == 1
    assert httpx.post(url, json={"id": ids.pop(), "action": "reasoning_end"}).json() == \
        {"success": False, "message": "no active completion for this id"}


def test_server_budget_and_reasoning_off(thinking_model):
    srv = ServerProcess(["-m", str(thinking_model), "-np", "1", "-c", "2048", "--jinja",
                         "--chat-template-file", str(TEMPLATE), "--reasoning-budget", "3"])
    off = ServerProcess(["-m", str(thinking_model), "-np", "1", "-c", "2048", "--jinja",
                         "--chat-template-file", str(TEMPLATE), "-rea", "off"])
    try:
        srv.wait_ready()
        off.wait_ready()
        message = _chat(srv)
        # the template's "<think>\n" counts as the first of the 3 (upstream's prefill)
        assert _tokens(srv, message["reasoning_content"]) <= 3 + 4 and message["content"]
        prompt = httpx.post(off.base + "/apply-template", json={"messages": MESSAGES}).json()["prompt"]
        assert prompt.endswith("<think>\n\n</think>\n\n")  # -rea off: enable_thinking false
        on = httpx.post(srv.base + "/apply-template", json={"messages": MESSAGES}).json()["prompt"]
        assert on.endswith("<think>\n")
    finally:
        srv.stop()
        off.stop()
    out = srv.proc.stdout.read().decode(errors="replace")
    assert "chat template supports preserving reasoning, it is enabled by default" in out
