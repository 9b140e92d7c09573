"""/v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, both directions.

The body becomes an OpenAI chat body (upstream's convert_anthropic_to_oai) and runs as a chat;
MessagesCall is a second formatter over the same chat diffs, writing Anthropic's message and
stream events (§4.9 of the reference), errors as `event: error`.
Imports: `engine`, `errors`, the chat protocol.
"""

from __future__ import annotations

import logging

import orjson

from pyllama.engine import FinishEvent, FinishReason, TokenEvent
from pyllama.errors import InvalidRequestError, error_json
from pyllama.server.protocol.base import ProtocolContext, Task, random_id
from pyllama.server.protocol.chat import ChatCall, ChatStream, chat_tasks, count_tokens, render
from pyllama.server.protocol.params import parses_body


logger = logging.getLogger(__name__)


def _text_of(blocks) -> str:
    if isinstance(blocks, str):
        return blocks
    return "".join(b.get("text", "") for b in blocks or [] if isinstance(b, dict) and b.get("type") == "text")


BILLING_HEADER = b"x-anthropic-billing-header:"


def normalize_billing_header(text: str) -> str:
    """Claude Code's per-request `cch=XXXXX;` stamp as `cch=fffff;`, so its system prompt
    stays one prefix for the prompt cache (normalize_anthropic_billing_header, server-chat.cpp).
    Any other text is left as it is."""
    raw = text.encode("utf-8", "surrogatepass")
    if not raw.startswith(BILLING_HEADER):
        return text
    at = raw.find(b"cch=", len(BILLING_HEADER))
    if at < 0:
        return text
    start = at + 4
    if start + 5 < len(raw) and raw[start + 5:start + 6] == b";":
        return (raw[:start] + b"fffff" + raw[start + 5:]).decode("utf-8", "replace")
    logger.error("anthropic string not as expected: %s", text)
    return text


def _system_text(system) -> str:
    # each text block normalised on its own, then joined (server_chat_convert_anthropic_to_oai)
    if isinstance(system, str):
        return normalize_billing_header(system)
    return "".join(normalize_billing_header(b.get("text", "")) for b in system or []
                   if isinstance(b, dict) and b.get("type") == "text")


def to_chat(body: dict) -> dict:
    """An Anthropic Messages body as an OpenAI chat body (only the fields upstream passes on)."""
    if "messages" not in body:
        raise InvalidRequestError("'messages' is required", param="messages")
    if not isinstance(body["messages"], list) or not all(isinstance(m, dict) for m in body["messages"]):
        raise InvalidRequestError("'messages' must be an array of objects", param="messages")
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise InvalidRequestError("'system' must be a string or an array of content blocks", param="system")
    for msg in body["messages"]:
        content = msg.get("content")
        if content is not None and not isinstance(content, str) and (
                not isinstance(content, list) or not all(isinstance(b, dict) for b in content)):
            raise InvalidRequestError("message content must be a string or an array of content blocks",
                                      param="messages")
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
        raise InvalidRequestError("Field 'stop_sequences': expected an array of strings", param="stop_sequences")
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise InvalidRequestError("'tools' must be an array of objects", param="tools")
    if body.get("tool_choice") is not None and not isinstance(body["tool_choice"], dict):
        raise InvalidRequestError("'tool_choice' must be an object", param="tool_choice")
    messages = []
    if body.get("system"):
        messages.append({"role": "system", "content": _system_text(body["system"])})
    for msg in body["messages"]:
        role, content = msg.get("role"), msg.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        text, reasoning, calls, parts, results = [], [], [], [], []
        for block in content or []:
            kind = block.get("type")
            if kind == "text":
                text.append(block.get("text", ""))
                parts.append({"type": "text", "text": block.get("text", "")})
            elif kind == "thinking":
                reasoning.append(block.get("thinking", ""))
            elif kind == "tool_use":
                calls.append({"id": block.get("id") or random_id(), "type": "function",
                              "function": {"name": block.get("name", ""),
                                           "arguments": orjson.dumps(block.get("input", {})).decode()}})
            elif kind == "tool_result":
                results.append({"role": "tool", "tool_call_id": block.get("tool_use_id", ""),
                                "content": _tool_result_content(block.get("content"))})
            elif kind == "image":
                # convert_anthropic_to_oai: a base64 source as a data: URL, a url source as is
                parts.append({"type": "image_url", "image_url": {"url": _image_url(block.get("source"))}})
        if text or reasoning or calls or parts:
            has_image = any(p["type"] == "image_url" for p in parts)
            out = {"role": role, "content": parts if has_image else "".join(text)}
            if reasoning:
                out["reasoning_content"] = "".join(reasoning)
            if calls:
                out["tool_calls"] = calls
            messages.append(out)
        messages += results  # after the message they came in (convert_anthropic_to_oai)
    chat = {"messages": messages, "max_tokens": body.get("max_tokens", 4096)}
    for key in ("temperature", "top_p", "top_k", "stream", "chat_template_kwargs"):
        if key in body:
            chat[key] = body[key]
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str) and metadata["user_id"]:
        chat["__metadata_user_id"] = metadata["user_id"]  # passed on as upstream does; unused
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        chat["thinking_budget_tokens"] = thinking.get("budget_tokens", 10000)  # upstream's default
    if body.get("stop_sequences"):
        chat["stop"] = body["stop_sequences"]
    if body.get("tools"):
        chat["tools"] = [{"type": "function", "function": {"name": t.get("name", ""),
                                                           "description": t.get("description", ""),
                                                           "parameters": t.get("input_schema", {})}}
                         for t in body["tools"]]
        choice = (body.get("tool_choice") or {}).get("type", "auto")
        chat["tool_choice"] = "auto" if choice == "auto" else ("none" if choice == "none" else "required")
    return chat


def _tool_input(arguments: str) -> dict:
    try:
        return orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return {}


def _tool_result_content(result):
    # convert_anthropic_to_oai: text alone collapses to a string; with images, OAI content parts
    if isinstance(result, str):
        return result
    if not isinstance(result, list):
        return ""
    if not any(isinstance(b, dict) and b.get("type") == "image" for b in result):
        return _text_of(result)
    parts = []
    for b in result:
        if not isinstance(b, dict):
            continue
        if b.get("type") == "text":
            parts.append({"type": "text", "text": b.get("text", "")})
        elif b.get("type") == "image" and isinstance(b.get("source"), dict) \
                and b["source"].get("type") in ("base64", "url"):
            parts.append({"type": "image_url", "image_url": {"url": _image_url(b["source"])}})
    return parts


def _image_url(source) -> str:
    if not isinstance(source, dict):
        return ""
    if source.get("type") == "base64":
        return f"data:{source.get('media_type') or 'image/jpeg'};base64,{source.get('data', '')}"
    if source.get("type") == "url":
        return source.get("url", "") or ""
    return ""


def _blocks(msg: dict) -> list[dict]:
    blocks = []
    if msg.get("reasoning_content"):
        blocks.append({"type": "thinking", "thinking": msg["reasoning_content"], "signature": ""})
    if msg.get("content"):
        blocks.append({"type": "text", "text": msg["content"]})
    for call in msg.get("tool_calls") or []:
        fn = call.get("function", {})
        blocks.append({"type": "tool_use", "id": call.get("id") or "toolu_" + random_id(),
                       "name": fn.get("name", ""), "input": _tool_input(fn.get("arguments", ""))})
    return blocks


def _stop_reason(event: FinishEvent, msg: dict) -> str:
    if event.reason == FinishReason.LIMIT:
        return "max_tokens"
    return "tool_use" if msg.get("tool_calls") else "end_turn"


def _usage(event: FinishEvent) -> dict:
    return {"cache_read_input_tokens": event.timings.cache_n,
            "input_tokens": event.n_prompt_tokens - event.timings.cache_n,
            "output_tokens": len(event.tokens)}


def _event(name: str, data: dict) -> bytes:
    # format_anthropic_sse
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class _Blocks:
    """Which content block of the message is open, for the stream's block events."""

    __slots__ = ("open", "index", "tools")

    def __init__(self) -> None:
        self.open: str | None = None
        self.index = -1
        self.tools: set = set()


class MessagesCall(ChatCall):
    """An Anthropic message, or its stream of events, over the chat diffs."""

    done = b""

    def __init__(self, tasks: list[Task], body: dict, ctx: ProtocolContext) -> None:
        super().__init__(tasks[:1], body, ctx)
        self.id = "msg_" + random_id()

    def response(self):
        task = self.tasks[0]
        stream: ChatStream = task.state
        stream.finish(task.result.chat_text, task.result.text)
        msg, event = stream.message, task.result
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model_name,
                "content": _blocks(msg), "stop_reason": _stop_reason(event, msg),
                "stop_sequence": event.stopping_word or None, "usage": _usage(event)}

    def error_frame(self, exc: BaseException) -> bytes:
        return _event("error", error_json(exc)[1]["error"])

    def frames(self, task: Task, event) -> bytes:
        stream: ChatStream = task.state
        out = []
        if not stream.started:
            stream.started = True
            stream.blocks = _Blocks()
            out.append(_event("message_start", {"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model_name,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": len(task.request.prompt), "output_tokens": 0}}}))
        blocks = stream.blocks
        if isinstance(event, TokenEvent):
            if event.text:
                self._deltas(blocks, stream.update(event.text), out)
        elif isinstance(event, FinishEvent):
            self._deltas(blocks, stream.finish(event.chat_text, event.text), out)
            if blocks.open is not None:
                out.append(_event("content_block_stop", {"type": "content_block_stop", "index": blocks.index}))
            out.append(_event("message_delta", {"type": "message_delta",
                                                "delta": {"stop_reason": _stop_reason(event, stream.message),
                                                          "stop_sequence": event.stopping_word or None},
                                                "usage": {"output_tokens": len(event.tokens)}}))
            out.append(_event("message_stop", {"type": "message_stop"}))
        return b"".join(out)

    @staticmethod
    def _open(blocks: _Blocks, kind: str, block: dict, out: list) -> None:
        if blocks.open is not None:
            out.append(_event("content_block_stop", {"type": "content_block_stop", "index": blocks.index}))
        blocks.index += 1
        blocks.open = kind
        out.append(_event("content_block_start", {"type": "content_block_start", "index": blocks.index,
                                                  "content_block": block}))

    def _deltas(self, blocks: _Blocks, deltas: list[dict], out: list) -> None:
        for delta in deltas:
            if delta.get("reasoning_content"):
                if blocks.open != "thinking":
                    self._open(blocks, "thinking", {"type": "thinking", "thinking": ""}, out)
                out.append(_event("content_block_delta", {"type": "content_block_delta", "index": blocks.index,
                                                          "delta": {"type": "thinking_delta",
                                                                    "thinking": delta["reasoning_content"]}}))
            if delta.get("content"):
                if blocks.open == "thinking":
                    out.append(_event("content_block_delta", {"type": "content_block_delta", "index": blocks.index,
                                                              "delta": {"type": "signature_delta", "signature": ""}}))
                if blocks.open != "text":
                    self._open(blocks, "text", {"type": "text", "text": ""}, out)
                out.append(_event("content_block_delta", {"type": "content_block_delta", "index": blocks.index,
                                                          "delta": {"type": "text_delta", "text": delta["content"]}}))
            for call in delta.get("tool_calls") or ():
                i = call.get("index", 0)
                fn = call.get("function") or {}
                if i not in blocks.tools:
                    blocks.tools.add(i)
                    self._open(blocks, f"tool{i}", {"type": "tool_use", "id": call.get("id") or "toolu_" + random_id(),
                                                    "name": fn.get("name", ""), "input": {}}, out)
                if fn.get("arguments"):
                    out.append(_event("content_block_delta", {"type": "content_block_delta", "index": blocks.index,
                                                              "delta": {"type": "input_json_delta",
                                                                        "partial_json": fn["arguments"]}}))


@parses_body
def parse(body: dict, ctx: ProtocolContext) -> MessagesCall:
    """A /v1/messages body -> its Call."""
    return MessagesCall(chat_tasks(render(to_chat(body), ctx), ctx), body, ctx)


@parses_body
def count_message_tokens(body: dict, ctx: ProtocolContext) -> dict:
    """/v1/messages/count_tokens: {"input_tokens": N}."""
    return {"input_tokens": count_tokens(to_chat({**body, "max_tokens": body.get("max_tokens", 1)}), ctx)}


@parses_body
def count_chat_tokens(body: dict, ctx: ProtocolContext) -> dict:
    """/v1/chat/completions/input_tokens."""
    return {"input_tokens": count_tokens(body, ctx), "object": "response.input_tokens"}
