"""OpenAI Responses API: /v1/responses, /responses and their /input_tokens, as llama-server has them.

Real server processes are driven with the `openai` client and plain HTTP; the exact wire format
is checked over a FakeEngine against transcripts recorded from upstream's llama-server at the
vendored pin (tests/data/responses-*.{json,stream.txt}). Each was recorded on the default model
with the template named in its test, temperature 0 and cache_prompt false; the FakeEngine replays
the tokens upstream generated (read from its chat logprobs), so only ids, timestamps, timings and
the model path are normalised away.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from pyllama.engine import ProgressEvent, Timings, TokenEvent
from pyllama.errors import EngineError, InvalidRequestError

from .conftest import ServerProcess
from .fake_engine import error, fake_app, finish, parse_sse, tokens

DATA = Path(__file__).parents[1] / "data"
HERMES = DATA / "hermes-tools.jinja"
THINK = DATA / "reasoning-think.jinja"
WEATHER = {"type": "function", "name": "get_weather", "description": "Get the weather of a city",
           # maxLength: the grammar ends the call within the token budget, whatever the city
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                          "required": ["city"]}}
WEATHER_CHAT = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
NUDGE = {"logit_bias": {"<tool_call>": 5}, "cache_prompt": False}  # a 270M base model needs a nudge


def normalise(text: str) -> str:
    """A response body or stream with what differs between runs replaced."""
    text = re.sub(r'"(resp|msg|rs|fc|call)_[A-Za-z0-9]{32}"', r'"\1_ID"', text)
    text = re.sub(r'"(created_at|completed_at)":\d+', r'"\1":T', text)
    text = re.sub(r'"timings":\{[^}]*\}', '"timings":{}', text)
    text = re.sub(r'"prompt_progress":\{[^}]*\}', '"prompt_progress":{}', text)
    return re.sub(r'"model":"[^"]*"', '"model":"M"', text)


def event_names(raw: bytes) -> list[str]:
    """The `event:` names of a Responses stream; each must name its data's `type`."""
    frames = parse_sse(raw)
    for f in frames:
        assert isinstance(f.data, dict) and f.event == f.data["type"], f.raw
    return [f.event for f in frames]


def text_events(n_deltas: int) -> list[str]:
    """Upstream's event order for a response that is one message of plain text."""
    return ["response.created", "response.in_progress", "response.output_item.added",
            "response.content_part.added", *["response.output_text.delta"] * n_deltas,
            "response.output_text.done", "response.content_part.done", "response.output_item.done",
            "response.completed"]


# --- a real server, the openai client --------------------------------------------------------
def test_openai_client_text_non_streamed_and_streamed(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.base + "/v1", api_key="none")
    # ignore_eos: the answer is exactly max_output_tokens long; cache_prompt false: both runs
    # evaluate the whole prompt, the same computation
    extra = {"ignore_eos": True, "cache_prompt": False}
    res = client.responses.create(model="x", input="Name a color.", max_output_tokens=6, temperature=0,
                                  extra_body=extra)
    assert res.object == "response" and res.status == "completed" and res.id.startswith("resp_")
    assert res.usage.output_tokens == 6  # max_output_tokens is the chat's max_tokens
    assert res.usage.total_tokens == res.usage.input_tokens + res.usage.output_tokens
    assert res.usage.input_tokens_details.cached_tokens == 0
    assert [o.type for o in res.output] == ["message"]
    message = res.output[0]
    assert message.role == "assistant" and message.status == "completed" and message.id.startswith("msg_")
    assert [c.type for c in message.content] == ["output_text"] and message.content[0].annotations == []

    events = list(client.responses.create(model="x", input="Name a color.", max_output_tokens=6,
                                          temperature=0, stream=True, extra_body=extra))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert [e.type for e in events] == text_events(len(deltas)) and deltas
    created, final = events[0].response, events[-1].response
    assert created.status == "in_progress" and final.status == "completed" and final.id == created.id
    item_id = events[2].item.id
    assert item_id.startswith("msg_") and all(e.item_id == item_id for e in deltas)
    assert events[-2].item.id == item_id and final.output[0].id == item_id
    streamed = "".join(e.delta for e in deltas)
    assert streamed == events[-4].text == final.output_text
    assert streamed == res.output_text  # greedy, same prompt: the same answer
    assert final.usage.output_tokens == 6 and final.usage.input_tokens == res.usage.input_tokens


def test_wire_format_and_both_routes(http):
    body = {"model": "x", "input": "Hi", "max_output_tokens": 3, "ignore_eos": True}
    for path in ("/v1/responses", "/responses"):
        r = http.post(path, json=body)
        assert r.status_code == 200 and r.json()["object"] == "response", r.text
        assert list(r.json()) == ["completed_at", "created_at", "id", "model", "object", "output",
                                  "status", "usage"]
        assert list(r.json()["usage"]) == ["input_tokens", "output_tokens", "total_tokens",
                                           "input_tokens_details"]
        with http.stream("POST", path, json={**body, "stream": True}) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            raw = s.read()
        names = event_names(raw)  # `event:` lines, no [DONE]
        assert names[:2] == ["response.created", "response.in_progress"] and names[-1] == "response.completed"
        completed = parse_sse(raw)[-1].data
        assert completed["response"]["usage"]["output_tokens"] == 3
        assert set(completed["timings"]) >= {"prompt_n", "predicted_n", "predicted_ms"}


def test_input_tokens_and_how_input_items_become_a_chat(http):
    def count(body):
        r = http.post("/v1/responses/input_tokens", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["object"] == "response.input_tokens" and out == http.post(
            "/responses/input_tokens", json=body).json()
        return out["input_tokens"]

    def chat_count(messages):
        return http.post("/v1/chat/completions/input_tokens", json={"messages": messages}).json()["input_tokens"]

    assert count({"input": "Hi"}) == chat_count([{"role": "user", "content": "Hi"}])
    with_instructions = count({"input": "Hi", "instructions": "Answer in one word."})
    assert with_instructions == chat_count([{"role": "system", "content": "Answer in one word."},
                                            {"role": "user", "content": "Hi"}])
    assert with_instructions > count({"input": "Hi"})
    items = [{"role": "user", "content": "Hi"},
             {"type": "message", "role": "assistant", "status": "completed",
              "content": [{"type": "output_text", "text": "Hello!", "annotations": []}]},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name a color."}]}]
    assert count({"input": items}) == chat_count([{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "Hello!"},
                                                  {"role": "user", "content": "Name a color."}])
    # the prompt a response runs on is the one counted
    r = http.post("/v1/responses", json={"input": items, "max_output_tokens": 1})
    assert r.json()["usage"]["input_tokens"] == count({"input": items})


@pytest.mark.parametrize("body,message", [
    ({}, "'input' is required"),
    ({"input": "Hi", "previous_response_id": "resp_x"}, "llama.cpp does not support 'previous_response_id'."),
    ({"input": 5}, "'input' must be a string or array of objects"),
    ({"input": [{"foo": 1}]}, "Cannot determine type of 'item'"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "'input_file' is not supported by llamacpp at this moment"),
    ({"input": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
     "'type' must be one of 'input_text', 'input_image', or 'input_file'"),
    ({"input": [{"type": "reasoning", "summary": [], "content": []}]}, "item['content'] is empty"),
    ({"input": "Hi", "tools": {}}, "'tools' must be an array of objects"),
], ids=["no-input", "previous-response", "input-type", "item", "input-file", "part-type", "reasoning",
        "tools"])
def test_client_mistakes_are_400_with_upstreams_message(http, body, message):
    for path in ("/v1/responses", "/v1/responses/input_tokens"):
        r = http.post(path, json={"model": "x", **body})
        assert r.status_code == 400 and r.json() == {"error": {
            "code": 400, "message": message, "type": "invalid_request_error"}}, (path, r.text)


def test_openai_client_sees_bad_request(server):
    import openai

    client = openai.OpenAI(base_url=server.base + "/v1", api_key="none")
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="x", input="Hi", previous_response_id="resp_abc")
    assert "previous_response_id" in info.value.message


@pytest.fixture(scope="module")
def tools_server(gemma_path):
    srv = ServerProcess(["-m", str(gemma_path), "-np", "2", "-c", "4096", "--jinja",
                         "--chat-template-file", str(HERMES)])
    srv.wait_ready()
    yield srv
    srv.stop()


def test_function_call_round_trip(tools_server):
    from openai import OpenAI

    client = OpenAI(base_url=tools_server.base + "/v1", api_key="none")
    question = "What is the weather in Paris?"
    ask = dict(model="x", tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
               max_output_tokens=60, temperature=0, extra_body=NUDGE)
    res = client.responses.create(input=question, **ask)
    calls = [o for o in res.output if o.type == "function_call"]
    assert calls and [o.type for o in res.output] == ["function_call"] * len(calls)
    call = calls[0]
    assert call.name == "get_weather" and call.status == "completed"
    assert call.call_id.startswith("call_") and call.id == "fc_" + call.call_id[len("call_"):]
    assert isinstance(json.loads(call.arguments)["city"], str)

    events = list(client.responses.create(input=question, stream=True, **ask))
    added = [e.item for e in events if e.type == "response.output_item.added"]
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [a.type for a in added] == ["function_call"] * len(calls) and len(done) == len(calls)
    for a, d in zip(added, done):
        args = "".join(e.delta for e in events
                       if e.type == "response.function_call_arguments.delta" and e.item_id == a.id)
        assert a.status == "in_progress" and a.arguments == ""
        assert (a.id, a.call_id, a.name) == (d.id, d.call_id, d.name)
        assert args == d.arguments
    final = events[-1].response
    assert [(o.name, o.arguments) for o in final.output] == [(c.name, c.arguments) for c in calls]

    # the call and its output go back as input items
    turn = [{"role": "user", "content": question},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}]
    follow = client.responses.create(model="x", input=turn, tools=[WEATHER], max_output_tokens=4, temperature=0)
    assert follow.status == "completed" and follow.usage.output_tokens <= 4
    chat = [{"role": "user", "content": question},
            {"role": "assistant", "tool_calls": [{"id": call.call_id, "type": "function", "function": {
                "name": call.name, "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 21 C"}]
    prompt = httpx.post(tools_server.base + "/apply-template", json={"messages": chat, "tools": [WEATHER_CHAT]},
                        timeout=60).json()["prompt"]
    assert "<tool_response>\nsunny, 21 C" in prompt
    counted = httpx.post(tools_server.base + "/v1/chat/completions/input_tokens",
                         json={"messages": chat, "tools": [WEATHER_CHAT]}, timeout=60).json()["input_tokens"]
    assert follow.usage.input_tokens == counted


# --- the wire format, over a FakeEngine replaying upstream's tokens -------------------------
REASONING_BODY = {"model": "x", "temperature": 0, "cache_prompt": False, "input": "hi",
                  "grammar": 'root ::= "<think>\\nhmm\\n</think>\\n\\nHi there"'}
REASONING_TOKENS = ["<", "t", "hi", "n", "k", ">", "\n", "h", "mm", "\n", "<", "/", "t", "hi", "n", "k", ">",
                    "\n", "\n", "Hi", " there"]
TOOL_BODY = {"model": "x", "temperature": 0, "cache_prompt": False, "input": "What is the weather in Paris?",
             "tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False,
             "logit_bias": {"<tool_call>": 5}, "max_output_tokens": 30}
TOOL_TOKENS = ["<", "tool", "_", "call", ">", "\n", '{"', "name", '":', ' "', "get", "_", "weather", '",', ' "',
               "arguments", '":', ' {"', "city", '":', ' "', "Paris", '"', "}}", "<", "/", "tool", "_", "call", ">"]


@pytest.mark.parametrize("template,body,pieces,reason,n_tokens,n_prompt,name", [
    # the grammar's end is an EOS token: one token more than the text's
    (THINK, REASONING_BODY, REASONING_TOKENS, "eos", 22, 25, "reasoning"),
    (HERMES, TOOL_BODY, TOOL_TOKENS, "limit", 30, 203, "tool-call"),
], ids=["reasoning", "tool-call"])
def test_events_and_response_match_upstream(synthetic_path, template, body, pieces, reason, n_tokens,
                                            n_prompt, name):
    script = [*tokens(*pieces), finish("".join(pieces), reason, n_tokens=n_tokens, n_prompt_tokens=n_prompt)]
    client, fake = fake_app(synthetic_path, script, args=["--jinja", "--chat-template-file", str(template)])
    r = client.simulate_post("/v1/responses", json={**body, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert normalise(r.text) == (DATA / f"responses-{name}.stream.txt").read_text()
    r = client.simulate_post("/v1/responses", json=body)
    assert normalise(r.text) == (DATA / f"responses-{name}.json").read_text()
    assert fake.submitted[0].n_predict == body.get("max_output_tokens", -1)


def test_stream_ids_are_one_per_response(synthetic_path):
    client, _ = fake_app(synthetic_path, [*tokens(*REASONING_TOKENS), finish("".join(REASONING_TOKENS))],
                         args=["--jinja", "--chat-template-file", str(THINK)])
    frames = parse_sse(client.simulate_post("/v1/responses", json={**REASONING_BODY, "stream": True}).content)
    data = [f.data for f in frames]
    responses = {d["response"]["id"] for d in data if "response" in d}
    reasoning = {d["item_id"] for d in data if d["type"] == "response.reasoning_text.delta"}
    texts = {d["item_id"] for d in data if d["type"] == "response.output_text.delta"}
    assert len(responses) == len(reasoning) == len(texts) == 1
    assert next(iter(responses)).startswith("resp_") and next(iter(reasoning)).startswith("rs_")
    assert next(iter(texts)).startswith("msg_")
    assert [o["id"] for o in data[-1]["response"]["output"]] == [*reasoning, *texts]


def test_progress_and_timings_per_token(synthetic_path):
    t = Timings(prompt_n=5, prompt_ms=1.0, predicted_n=1, predicted_ms=1.0)
    script = [ProgressEvent(total=5, cache=0, processed=0, time_ms=0.0),
              ProgressEvent(total=5, cache=0, processed=5, time_ms=1.0),
              TokenEvent("Hello", [300], None, t), TokenEvent(" world", [301], None, t),
              finish("Hello world", n_tokens=2)]
    client, _ = fake_app(synthetic_path, script)
    r = client.simulate_post("/v1/responses", json={"input": "hi", "stream": True, "return_progress": True,
                                                    "timings_per_token": True})
    frames = parse_sse(r.content)
    names = event_names(r.content)
    # server_task_result_cmpl_partial::to_json_oaicompat_resp: progress rides on the last event
    # of its result, timings too
    assert names == ["response.created", "response.in_progress", "response.in_progress",
                     *text_events(2)[2:]]
    assert "prompt_progress" not in frames[0].data
    assert frames[1].data["prompt_progress"] == {"total": 5, "cache": 0, "processed": 0, "time_ms": 0.0}
    assert frames[2].data["prompt_progress"]["processed"] == 5
    with_timings = [f.event for f in frames if "timings" in f.data]
    # progress events carry timings too with timings_per_token (upstream's progress results)
    assert with_timings == ["response.in_progress", "response.in_progress", "response.output_text.delta",
                            "response.output_text.delta", "response.completed"]


def test_mid_stream_error_ends_the_stream_and_early_errors_are_json(synthetic_path):
    client, _ = fake_app(synthetic_path, [*tokens("Hello", " world"), error(EngineError("boom"))])
    r = client.simulate_post("/v1/responses", json={"input": "hi", "stream": True})
    assert r.status_code == 200
    assert r.content.endswith(b'\n\ndata: {"error":{"code":500,"message":"boom","type":"server_error"}}\n\n')
    frames = parse_sse(r.content)
    assert frames[-1].event is None and all(f.data != "[DONE]" for f in frames)
    assert "".join(f.data["delta"] for f in frames if f.event == "response.output_text.delta") == "Hello world"
    for stream in (True, False):
        client, _ = fake_app(synthetic_path, [error(InvalidRequestError("bad request"))])
        r = client.simulate_post("/v1/responses", json={"input": "hi", "stream": stream})
        assert r.status_code == 400 and r.json == {"error": {"code": 400, "message": "bad request",
                                                             "type": "invalid_request_error"}}


def test_an_empty_answer_has_no_output_items(synthetic_path):
    client, _ = fake_app(synthetic_path, [finish("", n_tokens=1)])
    r = client.simulate_post("/v1/responses", json={"input": "hi"})
    assert r.json["output"] == [] and r.json["usage"]["output_tokens"] == 1
    r = client.simulate_post("/v1/responses", json={"input": "hi", "stream": True})
    assert event_names(r.content) == ["response.created", "response.in_progress", "response.completed"]


# --- the conversion (server_chat_convert_responses_to_chatcmpl) -----------------------------
def test_conversion_to_a_chat_body():
    from pyllama.server.protocol.responses import to_chat

    body = {
        "model": "m", "instructions": "Be brief.", "max_output_tokens": 7, "temperature": 0.5,
        "reasoning": {"effort": "low", "summary": "auto"}, "tool_choice": "auto",
        "tools": [WEATHER, {"type": "web_search"}, {**WEATHER, "name": "f", "strict": False}],
        "input": [
            {"role": "user", "content": "Hi", "type": "message"},
            {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "hmm"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Calling."}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "ok"}]},
            {"role": "developer", "content": [{"type": "input_image", "image_url": "data:x"}]},
        ]}
    function = {k: v for k, v in WEATHER.items() if k != "type"}
    assert to_chat(body) == {
        "model": "m", "max_tokens": 7, "temperature": 0.5, "reasoning_effort": "low", "tool_choice": "auto",
        "tools": [{"type": "function", "function": {**function, "strict": True}},
                  {"type": "function", "function": {**function, "name": "f", "strict": False}}],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"text": "Hi", "type": "text"}]},
            # a reasoning item opens an assistant message; what follows merges into it
            {"role": "assistant", "content": [{"text": "Calling.", "type": "text"}], "reasoning_content": "hmm",
             "tool_calls": [
                 {"function": {"arguments": "{}", "name": "get_weather"}, "id": "c1", "type": "function"},
                 {"function": {"arguments": "{}", "name": "f"}, "id": "c2", "type": "function"}]},
            {"content": "sunny", "role": "tool", "tool_call_id": "c1"},
            {"content": [{"type": "text", "text": "ok"}], "role": "tool", "tool_call_id": "c2"},
            {"role": "developer", "content": [{"image_url": {"url": "data:x"}, "type": "image_url"}]},
        ]}
    # only tools of type "function" are kept; none left, no tools at all
    assert "tools" not in to_chat({"input": "x", "tools": [{"type": "web_search"}]})
    assert to_chat({"input": "x", "instructions": None})["messages"][0] == {"role": "system", "content": ""}
    assert "previous_response_id" in to_chat({"input": "x", "previous_response_id": ""})


# --- in process ---------------------------------------------------------------------------
def test_llama_create_response(gemma_path):
    import pyllama

    with pyllama.Llama(gemma_path, n_ctx=2048, n_parallel=1) as llm:
        fixed = dict(temperature=0, cache_prompt=False, ignore_eos=True)
        res = llm.create_response("Name a color.", instructions="Be brief.", max_output_tokens=4, **fixed)
        assert res["object"] == "response" and res["usage"]["output_tokens"] == 4
        events = list(llm.create_response("Name a color.", instructions="Be brief.", max_output_tokens=4,
                                          stream=True, **fixed))
        deltas = [e["data"]["delta"] for e in events if e["event"] == "response.output_text.delta"]
        assert [e["event"] for e in events] == text_events(len(deltas))
        assert "".join(deltas) == res["output"][0]["content"][0]["text"]
