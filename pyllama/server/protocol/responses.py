"""/v1/responses and /v1/responses/input_tokens: OpenAI's Responses API, both directions.

The body becomes an OpenAI chat body (upstream's server_chat_convert_responses_to_chatcmpl,
tools/server/server-chat.cpp) and runs as a chat; ResponsesCall is another formatter over the
same chat diffs, writing upstream's `response` object (server_task_result_cmpl_final::
to_json_oaicompat_resp) or its stream of `event:` + `data:` frames (to_json_oaicompat_resp_stream
and server_task_result_cmpl_partial::to_json_oaicompat_resp; format_oai_resp_sse). Upstream keeps
no responses, so `previous_response_id` is refused, as there. A mid-stream error is the OpenAI
`data: {"error": ...}` frame, and the stream has no [DONE].
Imports: `engine`, `errors`, the chat and completion protocols.
"""

from __future__ import annotations

import time

import orjson

from pyllama.engine import FinishEvent, ProgressEvent, TokenEvent
from pyllama.errors import InvalidRequestError
from pyllama.server.protocol.base import ProtocolContext, Task, random_id
from pyllama.server.protocol.chat import ChatCall, ChatStream, chat_tasks, count_tokens, render
from pyllama.server.protocol.completions import progress_fields, timings_dict
from pyllama.server.protocol.params import parses_body


def _is_str(obj, key: str) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get(key), str)


def _is_list(obj, key: str) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get(key), list)


def _input_message(item: dict) -> dict:
    # #responses_create-input-input_item_list-item-input_message
    content = []
    for part in item["content"]:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_text":
            if "text" not in part:
                raise InvalidRequestError("'Input text' requires 'text'")
            content.append({"text": part["text"], "type": "text"})
        elif kind == "input_image":
            # `detail` is marked as required, but has a default ("auto") and may be left out
            if "image_url" not in part:
                raise InvalidRequestError("'image_url' is required")
            content.append({"image_url": {"url": part["image_url"]}, "type": "image_url"})
        elif kind == "input_file":
            raise InvalidRequestError("'input_file' is not supported by llamacpp at this moment")
        else:
            raise InvalidRequestError("'type' must be one of 'input_text', 'input_image', or 'input_file'")
    out = {k: v for k, v in item.items() if k not in ("type", "status")}
    out["content"] = content
    return out


def _output_content(item: dict) -> list:
    # #responses_create-input-input_item_list-item-output_message (string content was made
    # an input_text part already)
    content = []
    for part in item.get("content") if isinstance(item.get("content"), list) else ():
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("output_text", "input_text"):
            if not _is_str(part, "text"):
                raise InvalidRequestError("'Output text' requires 'text'")
            content.append({"text": part["text"], "type": "text"})
        elif kind == "refusal":
            if not _is_str(part, "refusal"):
                raise InvalidRequestError("'Refusal' requires 'refusal'")
            content.append({"refusal": part["refusal"], "type": "refusal"})
        else:
            raise InvalidRequestError("'type' must be one of 'output_text' or 'refusal'")
    return content


def _tool_output(item: dict) -> dict:
    # #responses_create-input-input_item_list-item-function_tool_call_output
    output = item["output"]
    if not isinstance(output, str):
        parts = []
        for part in output:
            if not isinstance(part, dict) or "type" not in part:
                raise InvalidRequestError("Output of tool call missing 'type' field")
            kind = part["type"]
            if kind not in ("input_text", "input_image"):
                raise InvalidRequestError("Output of tool call should be 'Input text' or 'Input image'")
            part = dict(part)
            if kind == "input_text":
                part["type"] = "text"
            else:
                if "image_url" not in part:
                    raise InvalidRequestError("'image_url' is required")
                part["type"] = "image_url"
                part["image_url"] = {"url": part["image_url"]}
            parts.append(part)
        output = parts
    return {"content": output, "role": "tool", "tool_call_id": item["call_id"]}


def _messages(input_value, messages: list) -> None:
    if isinstance(input_value, str):  # #responses_create-input-text_input
        messages.append({"role": "user", "content": input_value})
        return
    if not isinstance(input_value, list):
        raise InvalidRequestError("'input' must be a string or array of objects")
    for item in input_value:  # #responses_create-input-input_item_list
        merge_prev = bool(messages) and messages[-1].get("role") == "assistant"
        if _is_str(item, "content"):
            # only an input message has string content: as a part list, it is handled like
            # the input and output message items below
            item = {**item, "content": [{"text": item["content"], "type": "input_text"}]}
        role = item.get("role") if isinstance(item, dict) else None
        kind = item.get("type") if isinstance(item, dict) else None
        if _is_list(item, "content") and role in ("user", "system", "developer"):
            messages.append(_input_message(item))
        elif role == "assistant" and kind == "message":
            content = _output_content(item)
            if merge_prev:
                prev = messages[-1]
                if not isinstance(prev.get("content"), list):
                    prev["content"] = []
                prev["content"] += content
            else:
                out = {k: v for k, v in item.items() if k not in ("status", "type")}
                out["content"] = content
                messages.append(out)
        elif kind == "function_call" and all(_is_str(item, k) for k in ("arguments", "call_id", "name")):
            # #responses_create-input-input_item_list-item-function_tool_call
            call = {"function": {"arguments": item["arguments"], "name": item["name"]},
                    "id": item["call_id"], "type": "function"}
            if merge_prev:
                prev = messages[-1]
                if not isinstance(prev.get("tool_calls"), list):
                    prev["tool_calls"] = []
                prev["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "tool_calls": [call]})
        elif kind == "function_call_output" and _is_str(item, "call_id") and \
                isinstance(item.get("output"), (str, list)):
            messages.append(_tool_output(item))
        elif kind == "reasoning" and _is_list(item, "summary"):
            # #responses_create-input-input_item_list-item-reasoning
            if not _is_list(item, "content"):
                raise InvalidRequestError("item['content'] is not an array")
            if not item["content"]:
                raise InvalidRequestError("item['content'] is empty")
            if not _is_str(item["content"][0], "text"):
                raise InvalidRequestError("item['content']['text'] is not a string")
            text = item["content"][0]["text"]
            if merge_prev:
                messages[-1]["reasoning_content"] = text
            else:
                messages.append({"role": "assistant", "content": [], "reasoning_content": text})
        else:
            raise InvalidRequestError("Cannot determine type of 'item'")


def to_chat(body: dict) -> dict:
    """A Responses body as an OpenAI chat body (server_chat_convert_responses_to_chatcmpl).

    Every field it does not convert passes through to the chat request, as upstream's does.

    Raises:
        InvalidRequestError: a missing `input`, a `previous_response_id`, an unknown item.
    """
    if "input" not in body:
        raise InvalidRequestError("'input' is required", param="input")
    previous = body.get("previous_response_id")
    if isinstance(previous, str) and previous:
        raise InvalidRequestError("llama.cpp does not support 'previous_response_id'.",
                                  param="previous_response_id")
    chat = {k: v for k, v in body.items() if k != "input"}
    messages: list = []
    if "instructions" in body:
        instructions = body["instructions"]
        messages.append({"role": "system", "content": instructions if isinstance(instructions, str) else ""})
        del chat["instructions"]
    _messages(body["input"], messages)
    chat["messages"] = messages
    if "tools" in body:
        if not isinstance(body["tools"], list):
            raise InvalidRequestError("'tools' must be an array of objects", param="tools")
        tools = []
        for tool in body["tools"]:
            if not isinstance(tool, dict) or tool.get("type") != "function":
                continue  # non-function Responses tools have no Chat Completions equivalent
            function = {k: v for k, v in tool.items() if k != "type"}
            function.setdefault("strict", True)
            tools.append({"type": "function", "function": function})
        del chat["tools"]
        if tools:
            chat["tools"] = tools
    if "max_output_tokens" in body:
        del chat["max_output_tokens"]
        chat["max_tokens"] = body["max_output_tokens"]
    if "reasoning" in body:  # only "effort" is handled, as upstream
        reasoning = body["reasoning"]
        if isinstance(reasoning, dict) and "effort" in reasoning:
            chat["reasoning_effort"] = reasoning["effort"]
        del chat["reasoning"]
    return chat


# --- the output ---------------------------------------------------------------------------
def _usage(event: FinishEvent) -> dict:
    n_out = len(event.tokens)
    return {"input_tokens": event.n_prompt_tokens, "output_tokens": n_out,
            "total_tokens": n_out + event.n_prompt_tokens,
            "input_tokens_details": {"cached_tokens": event.timings.cache_n}}


def _reasoning_item(item_id: str, text: str) -> dict:
    return {"id": item_id, "summary": [], "type": "reasoning",
            "content": [{"text": text, "type": "reasoning_text"}], "encrypted_content": ""}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _call_item(call: dict) -> dict:
    fn = call.get("function") or {}
    return {"id": "fc_" + call.get("id", ""), "type": "function_call", "status": "completed",
            "arguments": fn.get("arguments", ""), "call_id": "call_" + call.get("id", ""),
            "name": fn.get("name", "")}


def _event(name: str, data: dict) -> dict:
    return {"event": name, "data": data}


class _Items:
    """Which output items a stream has opened (task_result_state's block flags)."""

    __slots__ = ("thinking", "text", "fc_id")

    def __init__(self) -> None:
        self.thinking = False
        self.text = False
        self.fc_id = ""


class ResponsesCall(ChatCall):
    """An OpenAI `response` object, or its stream of events, over the chat diffs.

    `chunks()` gives upstream's event objects ({"event": name, "data": {...}}); `frames()`
    writes them as `event: name` and `data: json` lines.
    """

    done = b""

    def __init__(self, tasks: list[Task], body: dict, ctx: ProtocolContext) -> None:
        super().__init__(tasks[:1], body, ctx)
        # task_result_state's ids: one response, one reasoning item, one message per request
        self.id = "resp_" + random_id()
        self.reasoning_id = "rs_" + random_id()
        self.message_id = "msg_" + random_id()

    def response(self):
        # to_json_oaicompat_resp
        task = self.tasks[0]
        stream: ChatStream = task.state
        stream.finish(task.result.chat_text, task.result.text)
        msg = stream.message or {}
        if not (msg.get("content") or msg.get("reasoning_content") or msg.get("tool_calls")):
            msg = {"content": task.result.text}  # an empty parse: the raw text, as upstream
        output = []
        if msg.get("reasoning_content"):
            output.append({**_reasoning_item("rs_" + random_id(), msg["reasoning_content"]),
                           "status": "completed"})
        if msg.get("content"):
            output.append({"content": [_text_part(msg["content"])], "id": "msg_" + random_id(),
                           "role": "assistant", "status": "completed", "type": "message"})
        for call in msg.get("tool_calls") or ():
            output.append(_call_item(call))
        t = int(time.time())
        return {"completed_at": t, "created_at": t, "id": self.id, "model": self.model_name,
                "object": "response", "output": output, "status": "completed",
                "usage": _usage(task.result)}

    def frames(self, task: Task, event) -> bytes:
        # format_oai_resp_sse
        return b"".join(b"event: " + e["event"].encode() + b"\ndata: " + orjson.dumps(e["data"]) + b"\n\n"
                        for e in self.chunks(task, event))

    def _status(self, name: str) -> dict:
        return _event(name, {"type": name, "response": {"id": self.id, "object": "response",
                                                       "status": "in_progress"}})

    def chunks(self, task: Task, event) -> list:
        stream: ChatStream = task.state
        out: list = []
        if not stream.started:  # the request's first result: its first token or progress
            stream.started = True
            stream.blocks = _Items()
            out += [self._status("response.created"), self._status("response.in_progress")]
        elif isinstance(event, ProgressEvent):
            out.append(self._status("response.in_progress"))
        items: _Items = stream.blocks
        if isinstance(event, ProgressEvent):
            out[-1]["data"].update(progress_fields(task, event))  # timings too, with timings_per_token
        elif isinstance(event, TokenEvent):
            if event.text:
                for delta in stream.update(event.text):
                    self._deltas(items, delta, out)
            if event.timings is not None and out:
                out[-1]["data"]["timings"] = timings_dict(event.timings)
        elif isinstance(event, FinishEvent):
            # the last diffs are not streamed: the done events carry the whole message
            stream.finish(event.chat_text, event.text)
            out += self._final(stream.message or {}, event)
        return out

    def _deltas(self, items: _Items, delta: dict, out: list) -> None:
        # server_task_result_cmpl_partial::to_json_oaicompat_resp, one diff
        if delta.get("reasoning_content"):
            if not items.thinking:
                items.thinking = True
                out.append(_event("response.output_item.added", {"type": "response.output_item.added", "item": {
                    "id": self.reasoning_id, "summary": [], "type": "reasoning", "content": [],
                    "encrypted_content": "", "status": "in_progress"}}))
            out.append(_event("response.reasoning_text.delta", {
                "type": "response.reasoning_text.delta", "delta": delta["reasoning_content"],
                "item_id": self.reasoning_id}))
        if delta.get("content"):
            if not items.text:
                items.text = True
                out.append(_event("response.output_item.added", {"type": "response.output_item.added", "item": {
                    "content": [], "id": self.message_id, "role": "assistant", "status": "in_progress",
                    "type": "message"}}))
                out.append(_event("response.content_part.added", {
                    "type": "response.content_part.added", "item_id": self.message_id,
                    "part": {"type": "output_text", "text": ""}}))
            out.append(_event("response.output_text.delta", {
                "type": "response.output_text.delta", "item_id": self.message_id, "delta": delta["content"]}))
        for call in delta.get("tool_calls") or ():
            fn = call.get("function") or {}
            if fn.get("name"):
                items.fc_id = call.get("id", "")
                out.append(_event("response.output_item.added", {"type": "response.output_item.added", "item": {
                    "id": "fc_" + items.fc_id, "arguments": "", "call_id": "call_" + items.fc_id,
                    "name": fn["name"], "type": "function_call", "status": "in_progress"}}))
            if fn.get("arguments"):
                out.append(_event("response.function_call_arguments.delta", {
                    "type": "response.function_call_arguments.delta", "delta": fn["arguments"],
                    "item_id": "fc_" + items.fc_id}))

    def _final(self, msg: dict, event: FinishEvent) -> list:
        # server_task_result_cmpl_final::to_json_oaicompat_resp_stream
        out, output = [], []
        if msg.get("reasoning_content"):
            item = _reasoning_item(self.reasoning_id, msg["reasoning_content"])
            out.append(_event("response.output_item.done", {"type": "response.output_item.done", "item": item}))
            output.append(item)
        if msg.get("content"):
            out.append(_event("response.output_text.done", {
                "type": "response.output_text.done", "item_id": self.message_id, "text": msg["content"]}))
            part = _text_part(msg["content"])
            out.append(_event("response.content_part.done", {
                "type": "response.content_part.done", "item_id": self.message_id, "part": part}))
            item = {"type": "message", "status": "completed", "id": self.message_id, "content": [part],
                    "role": "assistant"}
            out.append(_event("response.output_item.done", {"type": "response.output_item.done", "item": item}))
            output.append(item)
        for call in msg.get("tool_calls") or ():
            item = _call_item(call)
            out.append(_event("response.output_item.done", {"type": "response.output_item.done", "item": item}))
            output.append(item)
        out.append(_event("response.completed", {"type": "response.completed", "response": {
            "id": self.id, "object": "response", "created_at": int(time.time()), "status": "completed",
            "model": self.model_name, "output": output, "usage": _usage(event)},
            "timings": timings_dict(event.timings)}))
        return out


@parses_body
def parse(body: dict, ctx: ProtocolContext) -> ResponsesCall:
    """A /v1/responses body -> its Call."""
    chat = to_chat(body)
    return ResponsesCall(chat_tasks(render(chat, ctx), ctx), chat, ctx)


@parses_body
def count_input_tokens(body: dict, ctx: ProtocolContext) -> dict:
    """/v1/responses/input_tokens (handle_count_tokens)."""
    return {"input_tokens": count_tokens(to_chat(body), ctx), "object": "response.input_tokens"}
