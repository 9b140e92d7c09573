"""/chat/completions, /v1/chat/completions (OpenAI chat) and /apply-template.

The template, tool-call grammar and output parsing come from llama.cpp's common chat code
(server/templates.py); this module maps OpenAI fields to the native ones and formats results
(upstream's oaicompat_chat_params_parse and the chat result/chunk writers).
"""

from __future__ import annotations

import time

from pyllama.engine import FinishEvent, FinishReason, ProgressEvent, TokenEvent
from pyllama.errors import EngineError, InvalidRequestError
from pyllama.server import sse
from pyllama.server.protocol import completions as fmt
from pyllama.server.resources.body import read_json, write_json
from pyllama.server.resources.completions import make_tasks
from pyllama.server.resources.generation import Run, stream_response
from pyllama.server.templates import message_diffs, random_id


def prefill_tokens(model, generation_prompt: str) -> list[int]:
    """The generation prompt as tokens for the grammar (common_sampler_init's prefill)."""
    tokens = model.tokenize(generation_prompt, add_special=False, parse_special=True) if generation_prompt else []
    if tokens and not generation_prompt[0].isspace():
        first = model.token_to_piece(tokens[0], special=True)
        if first[:1].isspace():  # some tokenizers put a space before the first special token
            tokens = tokens[1:]
    return tokens


def prepare_chat(state, body: dict) -> tuple[dict, dict]:
    """OpenAI chat body -> (native completion body, parser params). HTTP thread."""
    state.require_ready()
    if state.chat is None:
        raise InvalidRequestError("chat is not available on an embedding server")
    body = dict(body)
    if body.get("json_schema") is not None and body.get("grammar"):
        raise EngineError("Cannot use both json_schema and grammar")
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict):
            raise InvalidRequestError("response_format must be an object")
        kind = response_format.get("type", "")
        if kind == "json_object":
            if "schema" in response_format or body.get("json_schema") is None:
                body["json_schema"] = response_format.get("schema") or {}
        elif kind == "json_schema":
            wrapper = response_format.get("json_schema") or {}
            body["json_schema"] = wrapper.get("schema", {}) if isinstance(wrapper, dict) else {}
        elif kind and kind != "text":
            raise InvalidRequestError(
                f'response_format type must be one of "text" or "json_object", but got: {kind}')
    if body.get("json_schema") == {}:
        body["json_schema"] = {"type": "object"}
    if body.get("tools") and body.get("tool_choice", "auto") != "none" and "grammar" in body:
        raise InvalidRequestError("Cannot use custom grammar constraints with tools.")
    if body.get("logprobs") is True:
        if body.get("tools") and body.get("stream"):
            raise InvalidRequestError("logprobs is not supported with tools + stream")
        top = body.get("top_logprobs")
        body["n_probs"] = 20 if top is None else top
    elif body.get("top_logprobs") is not None:
        raise InvalidRequestError("top_logprobs requires logprobs to be set to true")

    params = state.chat.apply(body)
    native = {k: v for k, v in body.items() if k not in ("messages", "tools", "response_format")}
    native["prompt"] = params["prompt"]
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    native["stop"] = stop + list(params.get("additional_stops") or [])
    if params.get("grammar"):
        native["grammar"] = params["grammar"]
        native.pop("json_schema", None)
        native["grammar_lazy"] = params.get("grammar_lazy", False)
        native["grammar_triggers"] = params.get("grammar_triggers") or []
        native["_grammar_prefill"] = prefill_tokens(state.engine.model, params.get("generation_prompt", ""))
    elif body.get("json_schema") is not None:
        native["json_schema"] = body["json_schema"]
    parser = {"format": params.get("format", 0),
              "reasoning_format": body.get("reasoning_format") or state.chat.reasoning_format,
              "generation_prompt": params.get("generation_prompt", ""),
              "parse_tool_calls": bool(body.get("tools")) and body.get("tool_choice", "auto") != "none",
              "parser": params.get("parser", "")}
    return native, parser


class ChatResource:
    """POST /chat/completions and /v1/chat/completions."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        body = read_json(req, self.state.settings.max_body_mb << 20)
        native, parser = prepare_chat(self.state, body)
        tasks = make_tasks(self.state, native)
        stream = bool(body.get("stream", False))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
        run = Run(self.state, tasks)
        chat = self.state.chat
        cid = fmt.completion_id()
        name, fp = self.state.model_name, self.state.build_info

        def finish_of(task, msg):
            if task.result.reason == FinishReason.LIMIT:
                return "length"
            return "tool_calls" if msg.get("tool_calls") else "stop"

        def logprobs_of(task):
            if not task.request.sampling.n_probs:
                return None
            post = task.request.sampling.post_sampling_probs
            return {"content": [fmt.prob_element(c, top, post) for c, top in task.probs]}

        if not stream:
            done = run.gather()
            choices = []
            for task in done:
                msg = chat.parse(task.result.text, False, parser)
                message = {"role": "assistant", "content": msg.get("content") or ""}
                if msg.get("reasoning_content"):
                    message["reasoning_content"] = msg["reasoning_content"]
                if msg.get("tool_calls"):
                    message["tool_calls"] = [{"type": "function", "function": c.get("function", {}),
                                              "id": c.get("id") or random_id()} for c in msg["tool_calls"]]
                choice = {"index": task.index, "finish_reason": finish_of(task, msg), "message": message}
                if task.request.sampling.n_probs:
                    choice["logprobs"] = logprobs_of(task)
                choices.append(choice)
            first = done[0].result
            write_json(resp, {
                "id": cid, "object": "chat.completion", "created": int(time.time()), "model": name,
                "system_fingerprint": fp, "choices": choices,
                "usage": fmt.usage(first.n_prompt_tokens, len(first.tokens), first.timings.cache_n),
                "timings": fmt.timings_dict(first.timings)})
            return

        def chunk(index, delta, finish=None, **extra):
            return {"choices": [{"finish_reason": finish, "index": index, "delta": delta}],
                    "created": int(time.time()), "id": cid, "model": name, "system_fingerprint": fp,
                    "object": "chat.completion.chunk", **extra}

        def frames(task, event, first=False):
            out = []
            state = task.extra
            if isinstance(event, ProgressEvent):
                # every progress event repeats the role delta and carries prompt_progress
                return sse.frame(chunk(task.index, {"role": "assistant", "content": None},
                                       prompt_progress=fmt.progress_dict(event)))
            if "msg" not in state:
                state["msg"] = {}
                out.append(chunk(task.index, {"role": "assistant", "content": None}))
            if isinstance(event, TokenEvent):
                msg = chat.parse(task.text, True, parser)
                deltas = message_diffs(state["msg"], msg)
                state["msg"] = msg
                for i, delta in enumerate(deltas):
                    c = chunk(task.index, delta)
                    if i == len(deltas) - 1 and event.probs:
                        post = task.request.sampling.post_sampling_probs
                        c["choices"][0]["logprobs"] = {
                            "content": [fmt.prob_element(ch, top, post) for ch, top in event.probs]}
                    out.append(c)
            elif isinstance(event, FinishEvent):
                msg = chat.parse(event.text, False, parser)
                for delta in message_diffs(state["msg"], msg):
                    out.append(chunk(task.index, delta))
                final = chunk(task.index, {}, finish_of(task, msg))
                usage = fmt.usage(event.n_prompt_tokens, len(event.tokens), event.timings.cache_n)
                timings = fmt.timings_dict(event.timings)
                if include_usage:
                    out.append(final)
                    out.append({"choices": [], "created": int(time.time()), "id": cid, "model": name,
                                "system_fingerprint": fp, "object": "chat.completion.chunk",
                                "usage": usage, "timings": timings})
                else:
                    final["timings"] = timings
                    out.append(final)
            return sse.frames(out)

        stream_response(resp, run, frames, frames, done=sse.DONE,
                        ping_interval=self.state.settings.sse_ping_interval)


class ApplyTemplateResource:
    """POST /apply-template: the rendered prompt, no inference."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        body = read_json(req, self.state.settings.max_body_mb << 20)
        native, _ = prepare_chat(self.state, body)
        write_json(resp, {"prompt": native["prompt"]})
