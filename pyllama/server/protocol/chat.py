"""/v1/chat/completions (OpenAI chat) and /apply-template, both directions.

The template, tool-call grammar and output parsing come from llama.cpp's common chat code
(server/templates.py): a chat body is rendered into a prompt and native completion fields
(upstream's oaicompat_chat_params_parse), and each request's output goes through its own
stateful ChatParser, which hands back only the message diffs (task_result_state).
Imports: `engine`, `errors`, `server.sse`, the completion protocol, the chat templates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import orjson

from pyllama.engine import FinishEvent, FinishReason, ProgressEvent, TokenEvent
from pyllama.errors import InvalidRequestError
from pyllama.server import sse
from pyllama.server.protocol.base import Call, ProtocolContext, Task
from pyllama.server.protocol.media import load_content_media
from pyllama.server.protocol.params import check_fits, generation_prompt_tokens, parses_body
from pyllama.server.protocol.completions import (
    completion_id,
    completion_tasks,
    probs_list,
    progress_fields,
    timings_dict,
    usage,
    verbose_view,
)
from pyllama.server.protocol.schema import check_json_schema


@dataclass
class ChatPrompt:
    """A rendered chat request: the prompt, the native completion fields, the parser's."""

    prompt: str
    native: dict  # the completion fields of the request (sampling, stop, grammar, ...)
    parser: dict  # ChatParser parameters
    prefill: tuple  # the generation prompt's tokens, for a grammar (common_sampler_init)
    files: list = None  # media files' bytes, one per marker in `prompt`
    names: list = None  # what each file's part is called in errors


def reasoning_budget_fields(body: dict, params: dict, ctx: ProtocolContext) -> dict:
    """The native reasoning_budget_* fields of a chat (oaicompat_chat_params_parse): only for
    a template with thinking end tags; the budget from the body (reasoning_budget_tokens or
    thinking_budget_tokens) or --reasoning-budget, the message from the body or
    --reasoning-budget-message."""
    if not params.get("thinking_end_tags"):
        return {}
    budget = body.get("reasoning_budget_tokens", body.get("thinking_budget_tokens", -1))
    if budget is None or budget == -1:
        budget = ctx.defaults.sampling.reasoning_budget_tokens
    return {"reasoning_budget_tokens": budget,
            "reasoning_budget_start_tag": params.get("thinking_start_tag", ""),
            "reasoning_budget_end_tags": params["thinking_end_tags"],
            "reasoning_budget_message": body.get("reasoning_budget_message", ctx.defaults.reasoning_budget_message),
            "reasoning_control": body.get("reasoning_control", False)}


def check_schemas(body: dict, field: str) -> None:
    """Bound the grammars the chat layer would build from the body's schemas (json_schema, from
    `field`; each tool's parameters) before the template runs: see protocol/schema.py."""
    if body.get("json_schema") is not None:
        check_json_schema(body["json_schema"], field)
    tools = body.get("tools")
    if isinstance(tools, list) and body.get("tool_choice", "auto") != "none":
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(function, dict) and isinstance(function.get("parameters"), (dict, bool)):
                check_json_schema(function["parameters"], "tools")


def render(body: dict, ctx: ProtocolContext) -> ChatPrompt:
    """An OpenAI chat body -> the rendered prompt and the fields generation needs. HTTP thread."""
    if ctx.chat is None:
        raise InvalidRequestError("chat is not available on an embedding server")
    body = dict(body)
    if body.get("json_schema") is not None and body.get("grammar"):
        raise InvalidRequestError("Cannot use both json_schema and grammar", param="grammar")
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict):
            raise InvalidRequestError("response_format must be an object", param="response_format")
        kind = response_format.get("type", "")
        if kind == "json_object":
            if "schema" in response_format or body.get("json_schema") is None:
                body["json_schema"] = response_format.get("schema") or {}
        elif kind == "json_schema":
            wrapper = response_format.get("json_schema") or {}
            body["json_schema"] = wrapper.get("schema", {}) if isinstance(wrapper, dict) else {}
        elif kind and kind != "text":
            raise InvalidRequestError(
                f'response_format type must be one of "text" or "json_object", but got: {kind}',
                param="response_format")
    if body.get("json_schema") == {}:
        body["json_schema"] = {"type": "object"}
    if body.get("tools") and body.get("tool_choice", "auto") != "none" and "grammar" in body:
        raise InvalidRequestError("Cannot use custom grammar constraints with tools.", param="grammar")
    if body.get("logprobs") is True:
        if body.get("tools") and body.get("stream"):
            raise InvalidRequestError("logprobs is not supported with tools + stream", param="logprobs")
        top = body.get("top_logprobs")
        body["n_probs"] = 20 if top is None else top
    elif body.get("top_logprobs") is not None:
        raise InvalidRequestError("top_logprobs requires logprobs to be set to true", param="top_logprobs")

    check_schemas(body, "json_schema" if response_format is None else "response_format")
    files: list = []
    names: list = []
    if isinstance(body.get("messages"), list):
        body["messages"], files, names = load_content_media(body["messages"], ctx.media, ctx.media_path)
    params = ctx.chat.apply(body)
    native = {k: v for k, v in body.items() if k not in ("messages", "tools", "response_format")}
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        raise InvalidRequestError("Field 'stop': expected a string or an array of strings", param="stop")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    native["stop"] = stop + list(params.get("additional_stops") or [])
    native["generation_prompt"] = params.get("generation_prompt", "")
    native["message_delimiters"] = params.get("message_delimiters") or []
    native.update(reasoning_budget_fields(body, params, ctx))
    prefill: tuple = ()
    if params.get("grammar"):
        native["grammar"] = params["grammar"]
        native.pop("json_schema", None)
        native["grammar_lazy"] = params.get("grammar_lazy", False)
        native["grammar_triggers"] = params.get("grammar_triggers") or []
        prefill = generation_prompt_tokens(ctx.model, params.get("generation_prompt", ""))
    elif body.get("json_schema") is not None:
        native["json_schema"] = body["json_schema"]
    parser = {"format": params.get("format", 0),
              "reasoning_format": body.get("reasoning_format") or ctx.chat.reasoning_format,
              "generation_prompt": params.get("generation_prompt", ""),
              "parse_tool_calls": bool(body.get("tools")) and body.get("tool_choice", "auto") != "none",
              "parser": params.get("parser", "")}
    return ChatPrompt(params["prompt"], native, parser, prefill, files, names)


def chat_tasks(chat: ChatPrompt, ctx: ProtocolContext) -> list[Task]:
    """The engine requests of a rendered chat, each with its own output parser."""
    check_fits(ctx.model, chat.prompt, ctx.n_ctx_slot, add_special=True)
    media = None
    if chat.files:
        tokens, media = ctx.media.tokenize(chat.prompt, chat.files, chat.names)
    else:
        tokens = ctx.model.tokenize(chat.prompt, add_special=True, parse_special=True)
    tasks = completion_tasks(chat.native, ctx, prompt=tokens, grammar_prefill=chat.prefill, media=media)
    for task in tasks:
        task.state = ChatStream(ctx.chat.parser(chat.parser))
        task.source_prompt = chat.prompt
    return tasks


class ChatStream:
    """One request's chat output state: its parser, and whether the role chunk went out.

    PERF(pyllama): a parser that takes the whole output as content (`pure_content`: no
    reasoning or tool-call syntax in the template) is not run per token: the message is the
    text, and the deltas below are what the full parse and upstream's compute_diffs give.
    """

    __slots__ = ("parser", "started", "message", "blocks", "pure", "pieces")

    def __init__(self, parser, fast_path: bool = True) -> None:
        self.parser = parser
        self.started = False
        self.message: dict | None = None
        self.pure = fast_path and parser.pure_content
        self.pieces: list = []  # the output so far (pure content only), joined at the finish

    def update_json(self, text: str) -> list[bytes]:
        """The deltas that new output text adds to the message, as JSON texts."""
        if self.pure:
            if not text:
                return []
            self.pieces.append(text)
            return [b'{"content":' + orjson.dumps(text) + b"}"]
        out = self.parser.update(text, True)
        return out.split(b"\n") if out else []

    def update(self, text: str) -> list[dict]:
        """The deltas that new output text adds to the message."""
        return [orjson.loads(d) for d in self.update_json(text)]

    def finish(self, text: str, raw: str = "") -> list[dict]:
        """The last deltas, parsing the whole output as complete; sets `message`.

        `text` is what the parser reads (FinishEvent.chat_text); `raw` the whole output, the
        message's content where the parse leaves the message empty (upstream's
        to_json_oaicompat_chat falls back to the raw content then).
        """
        if self.pure:
            prev = "".join(self.pieces)
            self.pieces = [text or prev]  # an empty output parses as no message: keep the last
            self.message = {"role": "assistant", "content": text or prev or raw}
            if not text or text == prev:
                return []
            if text.startswith(prev):
                return [{"content": text[len(prev):]}]
            return [{}] if prev.startswith(text) else []
        out = self.parser.update(text, False, True)
        self.message = orjson.loads(self.parser.message_json())
        if raw and not (self.message.get("content") or self.message.get("reasoning_content")
                        or self.message.get("tool_calls")):
            self.message = {"role": "assistant", "content": raw}
        return [orjson.loads(d) for d in out.split(b"\n")] if out else []


def finish_reason(event: FinishEvent, message: dict) -> str:
    if event.reason == FinishReason.LIMIT:
        return "length"
    return "tool_calls" if message.get("tool_calls") else "stop"


def assistant_message(message: dict) -> dict:
    """The parsed message as the chat.completion `message` object."""
    out = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("reasoning_content"):
        out["reasoning_content"] = message["reasoning_content"]
    if message.get("tool_calls"):
        out["tool_calls"] = [{"type": "function", "function": c.get("function", {}), "id": c.get("id", "")}
                             for c in message["tool_calls"]]
    return out


class ChatCall(Call):
    """An OpenAI chat completion: chat.completion, or chat.completion.chunk frames."""

    done = sse.DONE

    def __init__(self, tasks: list[Task], body: dict, ctx: ProtocolContext) -> None:
        super().__init__(tasks, bool(body.get("stream", False)))
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
        self.id = completion_id()
        self.model_name = ctx.model_name
        self.fingerprint = ctx.fingerprint
        self._tail: bytes | None = None
        self.verbose = verbose_view(tasks, body, ctx)  # upstream's __verbose

    def response(self):
        choices = []
        for task in self.tasks:
            stream: ChatStream = task.state
            stream.finish(task.result.chat_text, task.result.text)
            choice = {"index": task.index, "finish_reason": finish_reason(task.result, stream.message),
                      "message": assistant_message(stream.message)}
            if task.request.sampling.n_probs:
                choice["logprobs"] = {"content": probs_list(task, task.probs)}
            choices.append(choice)
        first = self.tasks[0].result
        out = {"id": self.id, "object": "chat.completion", "created": int(time.time()),
               "model": self.model_name, "system_fingerprint": self.fingerprint, "choices": choices,
               "usage": usage(first.n_prompt_tokens, len(first.tokens), first.timings.cache_n),
               "timings": timings_dict(first.timings)}
        if self.verbose is not None:
            out["__verbose"] = self.verbose.native_json(self.tasks[0], first)
        return out

    def frames(self, task: Task, event) -> bytes:
        # PERF(pyllama): the per-token path: the parser's delta JSON goes into the chunk bytes
        # as it is (the same bytes orjson would write for the chunk dict), no dicts on the way.
        if type(event) is not TokenEvent or not task.state.started or event.probs or event.timings:
            return sse.frames(self.chunks(task, event))
        if not event.text:
            return b""
        deltas = task.state.update_json(event.text)
        if not deltas:
            return b""
        head = b'data: {"choices":[{"finish_reason":null,"index":%d,"delta":' % task.index
        tail = b'}],"created":%d,%s\n\n' % (int(time.time()), self._chunk_tail)
        return b"".join(head + d + tail for d in deltas)

    @property
    def _chunk_tail(self) -> bytes:
        if self._tail is None:
            self._tail = orjson.dumps({"id": self.id, "model": self.model_name,
                                       "system_fingerprint": self.fingerprint,
                                       "object": "chat.completion.chunk"})[1:]
        return self._tail

    def _chunk(self, index: int, delta: dict, finish: str | None = None, **extra) -> dict:
        return {"choices": [{"finish_reason": finish, "index": index, "delta": delta}],
                "created": int(time.time()), "id": self.id, "model": self.model_name,
                "system_fingerprint": self.fingerprint, "object": "chat.completion.chunk", **extra}

    def chunks(self, task: Task, event) -> list:
        stream: ChatStream = task.state
        if isinstance(event, ProgressEvent):
            # every progress event repeats the role delta and carries prompt_progress
            return [self._chunk(task.index, {"role": "assistant", "content": None},
                                **progress_fields(task, event))]
        out = []
        if not stream.started:
            stream.started = True
            out.append(self._chunk(task.index, {"role": "assistant", "content": None}))
        if isinstance(event, TokenEvent):
            deltas = stream.update(event.text) if event.text else []
            for i, delta in enumerate(deltas):
                chunk = self._chunk(task.index, delta)
                if i == len(deltas) - 1 and event.probs:
                    chunk["choices"][0]["logprobs"] = {"content": probs_list(task, event.probs)}
                out.append(chunk)
            if event.timings is not None and out:  # timings_per_token: on the last delta
                out[-1]["timings"] = timings_dict(event.timings)
        elif isinstance(event, FinishEvent):
            start = len(out)
            for delta in stream.finish(event.chat_text, event.text):
                out.append(self._chunk(task.index, delta))
            final = self._chunk(task.index, {}, finish_reason(event, stream.message))
            timings = timings_dict(event.timings)
            if self.include_usage:
                out.append(final)
                out.append({"choices": [], "created": int(time.time()), "id": self.id,
                            "model": self.model_name, "system_fingerprint": self.fingerprint,
                            "object": "chat.completion.chunk",
                            "usage": usage(event.n_prompt_tokens, len(event.tokens), event.timings.cache_n),
                            "timings": timings})
            else:
                final["timings"] = timings
                out.append(final)
            if self.verbose is not None:  # on the final result's first chunk (deltas.front())
                out[start]["__verbose"] = self.verbose.native_json(task, event)
        return out


@parses_body
def parse(body: dict, ctx: ProtocolContext) -> ChatCall:
    """A /v1/chat/completions body -> its Call."""
    return ChatCall(chat_tasks(render(body, ctx), ctx), body, ctx)


@parses_body
def parse_control(body: dict) -> str:
    """The completion id of a /v1/chat/completions/control body (its only action:
    reasoning_end)."""
    cmpl_id = body.get("id") if isinstance(body.get("id"), str) else ""
    if not cmpl_id:
        raise InvalidRequestError("missing completion id")
    if body.get("action") != "reasoning_end":
        raise InvalidRequestError("unknown control action")
    return cmpl_id


_CONTROL_MESSAGES = {"not_running": "no active completion for this id",
                     "not_enabled": "reasoning control not enabled for this completion"}


def control_result(answer: str) -> dict:
    """server_task_result_control's JSON."""
    if answer == "ok":
        return {"success": True}
    return {"success": False, "message": _CONTROL_MESSAGES.get(answer, "unknown control action")}


@parses_body
def apply_template(body: dict, ctx: ProtocolContext) -> dict:
    """/apply-template: the rendered prompt, no inference."""
    return {"prompt": render(body, ctx).prompt}


@parses_body
def count_tokens(body: dict, ctx: ProtocolContext) -> int:
    """Tokens of the rendered chat prompt, as the completion would tokenize it."""
    chat = render(body, ctx)
    if chat.files:  # media tokens count as the completion counts them
        return len(ctx.media.tokenize(chat.prompt, chat.files, chat.names)[0])
    return len(ctx.model.tokenize(chat.prompt, add_special=True, parse_special=True))
