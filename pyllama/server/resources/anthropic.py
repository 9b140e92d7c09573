"""/v1/messages and /v1/messages/count_tokens: Anthropic's Messages API over the chat pipeline.

The request becomes an OpenAI chat request (upstream's convert_anthropic_to_oai); results and
stream events are written in Anthropic's shapes (§4.9 of the reference).
"""

from __future__ import annotations

import json

import orjson

from pyllama.engine import FinishEvent, FinishReason, TokenEvent
from pyllama.errors import EngineError, InvalidRequestError
from pyllama.server.resources.body import read_json, write_json
from pyllama.server.resources.chat import prepare_chat
from pyllama.server.resources.completions import make_tasks
from pyllama.server.resources.generation import Run, stream_response
from pyllama.server.templates import random_id


def _text_of(blocks) -> str:
    if isinstance(blocks, str):
        return blocks
    return "".join(b.get("text", "") for b in blocks or [] if isinstance(b, dict) and b.get("type") == "text")


def to_chat(body: dict) -> dict:
    """An Anthropic Messages body as an OpenAI chat body (only the fields upstream passes on)."""
    if "messages" not in body:
        raise EngineError("'messages' is required")  # upstream: a runtime error, so 500
    if not isinstance(body["messages"], list) or not all(isinstance(m, dict) for m in body["messages"]):
        raise InvalidRequestError("'messages' must be an array of objects")
    messages = []
    if body.get("system"):
        messages.append({"role": "system", "content": _text_of(body["system"])})
    for msg in body["messages"]:
        role, content = msg.get("role"), msg.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        text, reasoning, calls = [], [], []
        for block in content or []:
            kind = block.get("type")
            if kind == "text":
                text.append(block.get("text", ""))
            elif kind == "thinking":
                reasoning.append(block.get("thinking", ""))
            elif kind == "tool_use":
                calls.append({"id": block.get("id") or random_id(), "type": "function",
                              "function": {"name": block.get("name", ""),
                                           "arguments": json.dumps(block.get("input", {}))}})
            elif kind == "tool_result":
                result = block.get("content")
                messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id", ""),
                                 "content": _text_of(result) if not isinstance(result, str) else result})
            elif kind == "image":
                messages.append({"role": role, "content": [{"type": "image_url", "image_url": {"url": ""}}]})
        if text or reasoning or calls:
            out = {"role": role, "content": "".join(text)}
            if reasoning:
                out["reasoning_content"] = "".join(reasoning)
            if calls:
                out["tool_calls"] = calls
            messages.append(out)
    chat = {"messages": messages, "max_tokens": body.get("max_tokens", 4096)}
    for key in ("temperature", "top_p", "top_k", "stream", "chat_template_kwargs"):
        if key in body:
            chat[key] = body[key]
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


def _blocks(msg: dict) -> list[dict]:
    blocks = []
    if msg.get("reasoning_content"):
        blocks.append({"type": "thinking", "thinking": msg["reasoning_content"], "signature": ""})
    if msg.get("content"):
        blocks.append({"type": "text", "text": msg["content"]})
    for call in msg.get("tool_calls") or []:
        fn = call.get("function", {})
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            args = {}
        blocks.append({"type": "tool_use", "id": call.get("id") or "toolu_" + random_id(),
                       "name": fn.get("name", ""), "input": args})
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
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class MessagesResource:
    """POST /v1/messages."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        body = read_json(req, self.state.settings.max_body_mb << 20)
        chat_body = to_chat(body)
        native, parser = prepare_chat(self.state, chat_body)
        tasks = make_tasks(self.state, native)[:1]
        run = Run(self.state, tasks)
        chat = self.state.chat
        mid = "msg_" + random_id()
        name = self.state.model_name

        if not body.get("stream"):
            task = run.gather()[0]
            msg = chat.parse(task.result.text, False, parser)
            event = task.result
            write_json(resp, {"id": mid, "type": "message", "role": "assistant", "model": name,
                              "content": _blocks(msg), "stop_reason": _stop_reason(event, msg),
                              "stop_sequence": event.stopping_word or None, "usage": _usage(event)})
            return

        def frames(task, event):
            st = task.extra
            out = []
            if "msg" not in st:
                st.update(msg={}, open=None, index=-1, kinds=[])
                out.append(_event("message_start", {"type": "message_start", "message": {
                    "id": mid, "type": "message", "role": "assistant", "model": name, "content": [],
                    "stop_reason": None, "stop_sequence": None,
                    "usage": {"input_tokens": len(task.request.prompt), "output_tokens": 0}}}))

            def open_block(kind, block):
                if st["open"] is not None:
                    out.append(_event("content_block_stop", {"type": "content_block_stop", "index": st["index"]}))
                st["index"] += 1
                st["open"] = kind
                out.append(_event("content_block_start", {"type": "content_block_start",
                                                          "index": st["index"], "content_block": block}))

            def emit(msg):
                prev = st["msg"]
                r0, r1 = prev.get("reasoning_content") or "", msg.get("reasoning_content") or ""
                if r1 != r0 and r1.startswith(r0):
                    if st["open"] != "thinking":
                        open_block("thinking", {"type": "thinking", "thinking": ""})
                    out.append(_event("content_block_delta", {"type": "content_block_delta", "index": st["index"],
                                                              "delta": {"type": "thinking_delta", "thinking": r1[len(r0):]}}))
                t0, t1 = prev.get("content") or "", msg.get("content") or ""
                if t1 != t0 and t1.startswith(t0):
                    if st["open"] == "thinking":
                        out.append(_event("content_block_delta", {"type": "content_block_delta", "index": st["index"],
                                                                  "delta": {"type": "signature_delta", "signature": ""}}))
                    if st["open"] != "text":
                        open_block("text", {"type": "text", "text": ""})
                    out.append(_event("content_block_delta", {"type": "content_block_delta", "index": st["index"],
                                                              "delta": {"type": "text_delta", "text": t1[len(t0):]}}))
                prev_calls = prev.get("tool_calls") or []
                for i, call in enumerate(msg.get("tool_calls") or []):
                    fn = call.get("function", {})
                    before = prev_calls[i].get("function", {}).get("arguments", "") if i < len(prev_calls) else None
                    if before is None:
                        open_block(f"tool{i}", {"type": "tool_use", "id": call.get("id") or "toolu_" + random_id(),
                                                "name": fn.get("name", ""), "input": {}})
                        before = ""
                    after = fn.get("arguments", "")
                    if after != before and after.startswith(before):
                        out.append(_event("content_block_delta", {"type": "content_block_delta", "index": st["index"],
                                                                  "delta": {"type": "input_json_delta",
                                                                            "partial_json": after[len(before):]}}))
                st["msg"] = msg

            if isinstance(event, TokenEvent):
                emit(chat.parse(task.text, True, parser))
            elif isinstance(event, FinishEvent):
                msg = chat.parse(event.text, False, parser)
                emit(msg)
                if st["open"] is not None:
                    out.append(_event("content_block_stop", {"type": "content_block_stop", "index": st["index"]}))
                out.append(_event("message_delta", {"type": "message_delta",
                                                    "delta": {"stop_reason": _stop_reason(event, msg),
                                                              "stop_sequence": event.stopping_word or None},
                                                    "usage": {"output_tokens": len(event.tokens)}}))
                out.append(_event("message_stop", {"type": "message_stop"}))
            return b"".join(out)

        stream_response(resp, run, frames, frames, ping_interval=self.state.settings.sse_ping_interval)
        # mid-stream errors: Anthropic's `event: error` with the bare error object
        inner = resp.stream

        def anthropic_errors():
            for chunk in inner:
                if chunk.startswith(b"data: {\"error\""):
                    err = orjson.loads(chunk[6:])["error"]
                    yield _event("error", err)
                    return
                yield chunk
        resp.stream = anthropic_errors()


def count_prompt_tokens(state, chat_body: dict) -> int:
    """Tokens of the rendered chat prompt, as the completion would tokenize it."""
    native, _ = prepare_chat(state, chat_body)
    return len(state.engine.model.tokenize(native["prompt"], add_special=True, parse_special=True))


class CountTokensResource:
    """POST /v1/messages/count_tokens: {"input_tokens": N}."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        body = read_json(req, self.state.settings.max_body_mb << 20)
        body.setdefault("max_tokens", 1)
        write_json(resp, {"input_tokens": count_prompt_tokens(self.state, to_chat(body))})


class ChatInputTokensResource:
    """POST /chat/completions/input_tokens, /v1/chat/completions/input_tokens."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        body = read_json(req, self.state.settings.max_body_mb << 20)
        write_json(resp, {"input_tokens": count_prompt_tokens(self.state, body),
                          "object": "response.input_tokens"})


