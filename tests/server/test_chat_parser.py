"""The stateful chat parser (pyllama._chat.ChatParser): diffs as upstream computes them.

ChatStream's fast path (a parser that takes the whole output as content is not run per token)
must give exactly what the full parse gives; templates with reasoning or tool syntax must
never take it.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from pyllama._chat import ChatParser
from pyllama.engine import Model
from pyllama.server.protocol.chat import ChatStream
from pyllama.server.templates import ChatFormatter

TOOLS_TEMPLATE = (Path(__file__).parents[1] / "data" / "hermes-tools.jinja").read_text()
PIECES = ["Hello", ",", " wor", "ld", "!", "\n", " <", "tool", "_call", ">", " é", "😀", " {\"a\": 1}", " done"]


def _parser_params(fmt: ChatFormatter, body: dict) -> dict:
    params = fmt.apply(body)
    return {"format": params["format"], "reasoning_format": body.get("reasoning_format", "auto"),
            "generation_prompt": params["generation_prompt"],
            "parse_tool_calls": bool(body.get("tools")), "parser": params["parser"]}


def _full_parser(params: dict) -> ChatParser:
    return ChatParser(orjson.dumps(params))  # always the C++ parser, whatever the template


def _run(fmt: ChatFormatter, params: dict, fast: bool, pieces) -> tuple[list, dict]:
    stream = ChatStream(fmt.parser(params), fast_path=True) if fast else \
        ChatStream(_full_parser(params), fast_path=False)
    deltas = [stream.update(p) for p in pieces]
    deltas.append(stream.finish("".join(pieces)))
    return deltas, stream.message


@pytest.fixture(scope="module", params=["synthetic", "gemma"])
def formatter(request):
    path = request.getfixturevalue("synthetic_path" if request.param == "synthetic" else "gemma_path")
    return ChatFormatter(Model(str(path), vocab_only=True))


def test_fast_path_equals_the_full_parse(formatter):
    params = _parser_params(formatter, {"messages": [{"role": "user", "content": "hi"}]})
    assert formatter.parser(params).pure_content  # these templates have no reasoning or tool syntax
    fast = _run(formatter, params, True, PIECES)
    full = _run(formatter, params, False, PIECES)
    assert fast == full
    deltas, message = fast
    assert "".join(d["content"] for step in deltas for d in step) == "".join(PIECES)
    assert message == {"role": "assistant", "content": "".join(PIECES)}
    # a final text shorter than what streamed: upstream's compute_diffs gives one empty delta
    for fast_path in (True, False):
        stream = ChatStream(formatter.parser(params) if fast_path else _full_parser(params), fast_path=fast_path)
        stream.update("abc STOP")
        assert stream.finish("abc") == [{}] and stream.message["content"] == "abc"
        assert stream.update("") == [] and stream.finish("") == [] and stream.message["content"] == "abc"


def test_tool_and_reasoning_templates_take_the_full_parse(synthetic_path):
    fmt = ChatFormatter(Model(str(synthetic_path), vocab_only=True), TOOLS_TEMPLATE)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    params = _parser_params(fmt, {"messages": [{"role": "user", "content": "weather?"}], "tools": tools})
    parser = fmt.parser(params)
    assert not parser.pure_content
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    stream = ChatStream(parser)
    pieces = [text[i:i + 7] for i in range(0, len(text), 7)]
    deltas = [d for p in pieces for d in stream.update(p)] + stream.finish(text)
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert calls and calls[0]["function"]["name"] == "get_weather" and calls[0]["id"]
    assert {c["id"] for c in calls if "id" in c} == {calls[0]["id"]}  # one id, kept across updates
    args = "".join(c.get("function", {}).get("arguments", "") for c in calls)
    assert orjson.loads(args) == {"city": "Paris"}
    assert stream.message["tool_calls"][0]["id"] == calls[0]["id"]


def test_each_template_keeps_its_own_analysis(synthetic_path):
    # common's template analysis is made once per template (patches/): formatters of
    # different templates in one process, used in turn, must each get their own parser, as
    # on their first render
    model = Model(str(synthetic_path), vocab_only=True)
    data = Path(__file__).parents[1] / "data"
    formatters = {"default": ChatFormatter(model), "tools": ChatFormatter(model, TOOLS_TEMPLATE),
                  "thinking": ChatFormatter(model, (data / "thinking.jinja").read_text())}
    body = {"messages": [{"role": "user", "content": "hi"}]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    bodies = {"default": body, "tools": {**body, "tools": tools}, "thinking": body}
    first = {name: fmt.apply(bodies[name]) for name, fmt in formatters.items()}
    assert len({p["parser"] for p in first.values()}) == 3
    assert first["thinking"]["thinking_start_tag"] == "<think>" and not first["default"].get("thinking_start_tag")
    assert first["tools"]["grammar"] and not first["default"].get("grammar")
    for _ in range(2):
        for name in ("thinking", "default", "tools"):
            assert formatters[name].apply(bodies[name]) == first[name], name
