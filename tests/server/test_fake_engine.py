"""The HTTP layer over a FakeEngine: error statuses, SSE error frames, cancels, pings, bodies.

Each generation family (/completion, /v1/completions, /v1/chat/completions, /v1/messages,
/infill) replays scripted engine events. Wire formats are llama-server's
(tools/server/server-context.cpp handle_completions_impl; server-common.cpp format_oai_sse,
format_anthropic_sse, format_error_response): an error before the first result is a plain JSON
error with its status; a later one is one error frame and the end of the stream, with no
[DONE]: `data: {"error":{...}}` on OpenAI-style and native routes, and
`event: error\ndata: {...}` (the bare error object) on /v1/messages. Pings are `:\n\n`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from pyllama.errors import ContextLengthExceededError, EngineError, InvalidRequestError

from .fake_engine import completion, error, fake_app, finish, open_stream, parse_sse, tokens


@dataclass(frozen=True)
class Family:
    path: str
    body: dict
    done: bool = False  # the stream ends with data: [DONE]
    anthropic: bool = False
    fim: bool = False  # needs a model with FIM tokens
    n_key: str | None = None  # the field that asks for several requests in one call


USER = [{"role": "user", "content": "Hi"}]
FAMILIES = {
    "completion": Family("/completion", {"prompt": "Hello", "n_predict": 8}, n_key="n_cmpl"),
    "v1_completions": Family("/v1/completions", {"model": "x", "prompt": "Hello", "max_tokens": 8},
                             done=True, n_key="n"),
    "chat": Family("/v1/chat/completions", {"model": "x", "messages": USER, "max_tokens": 8},
                   done=True, n_key="n"),
    "messages": Family("/v1/messages", {"model": "x", "messages": USER, "max_tokens": 8},
                       anthropic=True),
    "infill": Family("/infill", {"input_prefix": "def f(", "input_suffix": "):\n", "n_predict": 8},
                     fim=True, n_key="n_cmpl"),
}
ALL = list(FAMILIES)

MID_ERROR = tokens("Hello", " world") + [error(EngineError("boom"))]


@pytest.fixture(scope="module")
def fim_path(tmp_path_factory):
    from pyllama.synthetic import SyntheticSpec, write_synthetic_model

    return write_synthetic_model(tmp_path_factory.mktemp("fim") / "fim.gguf", SyntheticSpec(fim=True))


@pytest.fixture
def make(synthetic_path, fim_path):
    """make(family, script, **fake_app kwargs) -> (client, fake, Family)."""
    def build(name, script=(), **kwargs):
        fam = FAMILIES[name]
        client, fake = fake_app(fim_path if fam.fim else synthetic_path, script, **kwargs)
        return client, fake, fam
    return build


def error_frame(fam: Family, status: int, message: str, type_: str) -> bytes:
    """Upstream's mid-stream error frame for the family (handle_completions_impl's format_error)."""
    err = {"code": status, "message": message, "type": type_}
    data = json.dumps(err if fam.anthropic else {"error": err}, separators=(",", ":")).encode()
    return (b"event: error\n" if fam.anthropic else b"") + b"data: " + data + b"\n\n"


def streamed_text(name: str, frames) -> str:
    out = []
    for f in frames:
        d = f.data
        if not isinstance(d, dict):
            continue
        if name in ("completion", "infill") and "content" in d and d.get("stop") is False:
            out.append(d["content"])
        elif name == "v1_completions" and d.get("choices"):
            out.append(d["choices"][0]["text"])
        elif name == "chat" and d.get("choices"):
            out.append(d["choices"][0]["delta"].get("content") or "")
        elif name == "messages" and f.event == "content_block_delta" and d["delta"]["type"] == "text_delta":
            out.append(d["delta"]["text"])
    return "".join(out)


def assert_ends_with_one_error(name: str, fam: Family, raw: bytes) -> None:
    frames = parse_sse(raw)
    assert raw.endswith(error_frame(fam, 500, "boom", "server_error")), raw[-300:]
    errors = [f for f in frames if f.event == "error" or (isinstance(f.data, dict) and "error" in f.data)]
    assert errors == [frames[-1]]
    assert all(f.data != "[DONE]" for f in frames)
    assert streamed_text(name, frames[:-1]) == "Hello world"


# --- errors before the first event: plain JSON, real status ----------------------------------
EARLY = [
    (InvalidRequestError("bad request"), 400, {"code": 400, "message": "bad request",
                                               "type": "invalid_request_error"}),
    (EngineError("engine broke"), 500, {"code": 500, "message": "engine broke", "type": "server_error"}),
    (ContextLengthExceededError("too long", n_prompt_tokens=9000, n_ctx=4096), 400,
     {"code": 400, "message": "too long", "type": "exceed_context_size_error",
      "n_prompt_tokens": 9000, "n_ctx": 4096}),
]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "nostream"])
@pytest.mark.parametrize("exc,status,expected", EARLY, ids=["invalid", "engine", "context"])
@pytest.mark.parametrize("name", ALL)
def test_early_error_is_a_plain_json_error(make, name, exc, status, expected, stream):
    client, fake, fam = make(name, [error(exc)])
    r = client.simulate_post(fam.path, json={**fam.body, "stream": stream})
    assert r.status_code == status
    assert r.headers["content-type"].startswith("application/json")
    assert r.json == {"error": expected}
    assert len(fake.submitted) == 1


def test_submit_refusal_is_a_plain_json_error(make):
    client, fake, fam = make("completion")
    fake.submit_error = InvalidRequestError("failed to parse grammar")
    r = client.simulate_post(fam.path, json={**fam.body, "stream": True})
    assert r.status_code == 400 and r.json["error"]["message"] == "failed to parse grammar"


# --- errors after some tokens: one error frame in the family's format, then nothing ---------
@pytest.mark.parametrize("name", ALL)
def test_mid_stream_error_released_one_by_one(make, name):
    client, fake, fam = make(name, MID_ERROR, release="manual")
    fake.release(1)
    stream = open_stream(client, fam.path, {**fam.body, "stream": True}, fake=fake)
    assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
    assert stream.next_chunk()
    for _ in range(2):
        fake.release(1)
        assert stream.next_chunk()
    assert stream.next_chunk() is None
    assert_ends_with_one_error(name, fam, b"".join(stream.chunks))


@pytest.mark.parametrize("name", ALL)
def test_mid_stream_error_with_every_event_queued(make, name):
    # a slow reader: the later frames and the error frame leave in one write
    client, fake, fam = make(name, MID_ERROR)
    r = client.simulate_post(fam.path, json={**fam.body, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert_ends_with_one_error(name, fam, r.content)


# --- a client that goes away -----------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_closing_the_stream_cancels_every_request(make, name):
    client, fake, fam = make(name, completion("Hello", " world", " again"), release="manual")
    body = {**fam.body, "stream": True}
    if fam.n_key:
        body[fam.n_key] = 2
    fake.release(1)
    stream = open_stream(client, fam.path, body, fake=fake)
    assert stream.status_code == 200 and stream.next_chunk()
    stream.close()
    assert len(fake.submitted) == (2 if fam.n_key else 1)
    assert set(fake.cancelled) == {r.id for r in fake.submitted}


# --- keep-alive ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_ping_while_the_engine_is_silent(make, name):
    client, fake, fam = make(name, completion("Hello", " world"), release="manual",
                             args=["--sse-ping-interval", "1"])
    fake.release(1)
    stream = open_stream(client, fam.path, {**fam.body, "stream": True}, fake=fake)
    assert stream.next_chunk()
    assert stream.next_chunk() == b":\n\n"  # nothing released until the ping is seen
    fake.release_all()
    frames = parse_sse(stream.rest())
    assert streamed_text(name, frames) == "Hello world"
    assert (frames[-1].data == "[DONE]") == fam.done


# --- whole streams and whole bodies ----------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_stream_completes(make, name):
    client, fake, fam = make(name, completion("Hello", " world", n_prompt_tokens=7, n_cached=2))
    r = client.simulate_post(fam.path, json={**fam.body, "stream": True})
    assert r.status_code == 200
    frames = parse_sse(r.content)
    assert streamed_text(name, frames) == "Hello world"
    assert (frames[-1].data == "[DONE]") == fam.done
    assert sum(f.data == "[DONE]" for f in frames) == int(fam.done)
    if name in ("completion", "infill"):
        last = frames[-1].data
        assert last["stop"] is True and last["stop_type"] == "eos" and last["content"] == ""
        assert last["tokens_predicted"] == 2 and last["tokens_evaluated"] == 7
    elif name == "messages":
        assert [f.event for f in frames] == ["message_start", "content_block_start", "content_block_delta",
                                             "content_block_delta", "content_block_stop", "message_delta",
                                             "message_stop"]
        assert frames[-2].data["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
        assert frames[-2].data["usage"] == {"output_tokens": 2}
    else:
        assert frames[-2].data["choices"][0]["finish_reason"] == "stop"


def test_a_chat_stream_is_live_until_it_ends(make):
    # /v1/chat/completions/control finds a completion by id while it streams, never after
    client, fake, fam = make("chat", completion("Hello", " world", " again"), release="manual")
    fake.release(1)
    stream = open_stream(client, fam.path, {**fam.body, "stream": True}, fake=fake)
    assert stream.next_chunk()
    assert len(client.state.live_calls) == 1
    fake.release_all()
    stream.rest()
    assert client.state.live_calls == {}
    stream = open_stream(client, fam.path, {**fam.body, "stream": True}, fake=fake)
    assert stream.next_chunk() and len(client.state.live_calls) == 1
    stream.close()  # the client went away
    assert client.state.live_calls == {}


REASONS = {"eos": ("eos", "stop", "end_turn"), "limit": ("limit", "length", "max_tokens")}
USAGE = {"completion_tokens": 2, "prompt_tokens": 7, "total_tokens": 9,
         "prompt_tokens_details": {"cached_tokens": 2}}


def _whole(make, name, reason, **finish_kwargs):
    client, fake, fam = make(name, completion("Hello", " world", reason=reason, n_prompt_tokens=7,
                                              n_cached=2, **finish_kwargs))
    r = client.simulate_post(fam.path, json=fam.body)
    assert r.status_code == 200, r.text
    return r.json


@pytest.mark.parametrize("reason", list(REASONS))
@pytest.mark.parametrize("name", ["completion", "infill"])
def test_whole_native_body(make, name, reason):
    body = _whole(make, name, reason)
    assert body["content"] == "Hello world" and body["stop"] is True
    assert body["stop_type"] == REASONS[reason][0]
    assert body["tokens_predicted"] == 2 and body["tokens_evaluated"] == 7
    assert body["timings"]["cache_n"] == 2 and body["timings"]["predicted_n"] == 2


def test_whole_native_body_stopped_by_a_word(make):
    body = _whole(make, "completion", "word", stopping_word="END")
    assert body["stop_type"] == "word" and body["stopping_word"] == "END"


@pytest.mark.parametrize("reason", list(REASONS))
def test_whole_v1_completion(make, reason):
    body = _whole(make, "v1_completions", reason)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "Hello world"
    assert body["choices"][0]["finish_reason"] == REASONS[reason][1]
    assert body["usage"] == USAGE


@pytest.mark.parametrize("reason", list(REASONS))
def test_whole_chat_completion(make, reason):
    body = _whole(make, "chat", reason)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello world"}
    assert body["choices"][0]["finish_reason"] == REASONS[reason][1]
    assert body["usage"] == USAGE


@pytest.mark.parametrize("reason", list(REASONS))
def test_whole_anthropic_message(make, reason):
    body = _whole(make, "messages", reason)
    assert body["type"] == "message" and body["role"] == "assistant"
    assert body["content"] == [{"type": "text", "text": "Hello world"}]
    assert body["stop_reason"] == REASONS[reason][2] and body["stop_sequence"] is None
    # upstream's to_json_anthropic: input_tokens excludes the cached ones
    assert body["usage"] == {"cache_read_input_tokens": 2, "input_tokens": 5, "output_tokens": 2}


def test_whole_anthropic_message_stopped_by_a_word(make):
    body = _whole(make, "messages", "word", stopping_word="END")
    assert body["stop_reason"] == "end_turn" and body["stop_sequence"] == "END"


def test_several_prompts_in_one_call(make):
    def script(request, n):
        return [finish(f"text {n}", n_tokens=1)]
    client, fake, fam = make("completion", script)
    r = client.simulate_post(fam.path, json={"prompt": ["Hello", "world"], "n_predict": 4})
    assert r.status_code == 200
    assert [b["content"] for b in r.json] == ["text 0", "text 1"]
    assert [b["index"] for b in r.json] == [0, 1]


# --- client mistakes are 4xx naming the field, never 5xx --------------------------------------
def test_chat_with_json_schema_and_grammar_is_400(make):
    client, fake, fam = make("chat", completion("x"))
    r = client.simulate_post(fam.path, json={**fam.body, "json_schema": {"type": "object"},
                                             "grammar": 'root ::= "a"'})
    assert r.status_code == 400, r.json
    assert r.json["error"]["type"] == "invalid_request_error"
    assert "json_schema" in r.json["error"]["message"] and "grammar" in r.json["error"]["message"]
    assert fake.submitted == []


def test_messages_without_messages_is_400_naming_it(make):
    client, fake, fam = make("messages", completion("x"))
    r = client.simulate_post(fam.path, json={"model": "x", "max_tokens": 4})
    assert r.status_code == 400, r.json
    assert r.json["error"]["type"] == "invalid_request_error"
    assert "messages" in r.json["error"]["message"]
    assert fake.submitted == []


def _big_json_array(n_bytes: int) -> bytes:
    item = b'{"id":0,"scale":1.0},'
    return b"[" + item * (n_bytes // len(item)) + item[:-1] + b"]"


def test_completion_body_over_the_limit_is_413(make):
    client, fake, fam = make("completion", completion("x"), max_body_mb=1)
    r = client.simulate_post(fam.path, body=b'{"prompt": "' + b"a" * (2 << 20) + b'"}',
                             headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json["error"]["code"] == 413
    assert fake.submitted == []


def test_lora_adapters_body_over_the_limit_is_413(make):
    client, fake, _ = make("completion", max_body_mb=1)
    r = client.simulate_post("/lora-adapters", body=_big_json_array(2 << 20),
                             headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.json
    assert r.json["error"]["code"] == 413


def test_sampling_defaults_from_flags_reach_requests_and_props(synthetic_path):
    client, fake = fake_app(synthetic_path, [*tokens("a"), finish("a")],
                            args=["--adaptive-target", "0.25", "--adaptive-decay", "0.5"])
    params = client.simulate_get("/props").json["default_generation_settings"]["params"]
    assert (params["adaptive_target"], params["adaptive_decay"]) == (0.25, 0.5)
    assert client.simulate_post("/completion", json={"prompt": "hi"}).status_code == 200
    sampling = fake.submitted[0].sampling
    assert (sampling.adaptive_target, sampling.adaptive_decay) == (0.25, 0.5)


def test_skip_chat_parsing_keeps_tool_calls_in_the_content(synthetic_path):
    from pathlib import Path

    template = Path(__file__).parents[1] / "data" / "hermes-tools.jinja"
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    body = {"messages": [{"role": "user", "content": "weather?"}], "tools": tools}
    for flags, parsed in (([], True), (["--skip-chat-parsing"], False)):
        client, _ = fake_app(synthetic_path, [*tokens(call), finish(call)],
                             args=["--jinja", "--chat-template-file", str(template), *flags])
        r = client.simulate_post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        message, finish_reason = r.json["choices"][0]["message"], r.json["choices"][0]["finish_reason"]
        if parsed:
            assert message["tool_calls"][0]["function"]["name"] == "get_weather" and finish_reason == "tool_calls"
        else:  # upstream's force_pure_content: everything stays content
            assert "tool_calls" not in message and message["content"] == call and finish_reason == "stop"


def test_reasoning_effort_reaches_the_template(synthetic_path, tmp_path):
    template = tmp_path / "effort.jinja"
    template.write_text("{{ reasoning_effort | default('unset') }}|{% for m in messages %}{{ m.content }}{% endfor %}")
    body = {"messages": [{"role": "user", "content": "hi"}]}
    for flags, request, expected in (([], {}, "unset|"), (["--reasoning-effort", "high"], {}, "high|"),
                                     (["--reasoning-effort", "high"], {"reasoning_effort": "low"}, "low|"),
                                     (["--reasoning-effort", "high"], {"reasoning_effort": "none"}, "unset|"),
                                     (["--reasoning-effort", "default"], {}, "unset|")):
        client, _ = fake_app(synthetic_path, args=["--jinja", "--chat-template-file", str(template), *flags])
        r = client.simulate_post("/apply-template", json={**body, **request})
        assert r.status_code == 200 and r.json["prompt"].startswith(expected), (flags, request, r.text)
