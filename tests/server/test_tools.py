"""Tool calls parsed into OpenAI tool_calls by llama.cpp's common chat code (a Hermes-style template)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import ServerProcess

TEMPLATE = Path(__file__).parents[1] / "data" / "hermes-tools.jinja"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather of a city",
    # maxLength: the grammar ends the call within max_tokens, whatever city the model picks
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                   "required": ["city"]}}}]


@pytest.fixture(scope="module")
def tools_server(gemma_path):
    srv = ServerProcess(["-m", str(gemma_path), "-np", "2", "-c", "4096", "--jinja",
                         "--chat-template-file", str(TEMPLATE)])
    srv.wait_ready()
    yield srv
    srv.stop()


def test_required_tool_call(tools_server):
    from openai import OpenAI

    client = OpenAI(base_url=tools_server.base + "/v1", api_key="none")
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    # a 270M base model needs a nudge to start the call; the grammar does the rest
    # cache_prompt false: the streamed run below repeats this computation exactly
    nudge = {"logit_bias": {"<tool_call>": 5}, "cache_prompt": False}
    res = client.chat.completions.create(model="x", messages=messages, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=200, temperature=0,
                                         extra_body=nudge)
    choice = res.choices[0]
    # this base model keeps calling until max_tokens: upstream reports "length" then too
    assert choice.finish_reason in ("tool_calls", "length") and choice.message.content in ("", None)
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert isinstance(json.loads(call.function.arguments)["city"], str)

    stream = client.chat.completions.create(model="x", messages=messages, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=200, temperature=0,
                                            stream=True, extra_body=nudge)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "args": ""})
            if tc.id:
                assert entry["id"] is None  # id, type and name come once per call
                entry["id"] = tc.id
            if tc.function and tc.function.name:
                entry["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                entry["args"] += tc.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish == choice.finish_reason and len(calls) == len(choice.message.tool_calls)
    first = calls[0]
    assert first["id"] and first["name"] == "get_weather"
    assert json.loads(first["args"]) == json.loads(call.function.arguments)


def test_tool_result_round_trip_and_errors(tools_server):
    import httpx

    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"},
    ]
    prompt = httpx.post(tools_server.base + "/apply-template", json={"messages": messages, "tools": TOOLS}).json()["prompt"]
    assert "<tool_response>\nsunny, 21 C" in prompt and "get_weather" in prompt
    r = httpx.post(tools_server.base + "/v1/chat/completions", json={
        "messages": messages, "tools": TOOLS, "tool_choice": "bogus"})
    assert r.status_code == 400
    r = httpx.post(tools_server.base + "/v1/chat/completions", json={
        "messages": messages[:1], "tools": TOOLS, "grammar": "root ::= \"x\""})
    assert r.status_code == 400 and "grammar" in r.json()["error"]["message"]
