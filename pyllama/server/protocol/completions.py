"""/completion (native) and /v1/completions (OpenAI text completion), both directions.

Bodies -> engine Requests (upstream's params_from_json_cmpl, §3.1-3.2) and engine events ->
native results and chunks (§3.3-3.7), OpenAI text completions (§4.5), timings, probabilities
and generation_settings. The chat and infill families build on these.
"""

from __future__ import annotations

import math
import struct
import sys
import time
from dataclasses import replace

from pyllama.engine import FinishEvent, FinishReason, ProgressEvent, Request, Timings, TokenEvent
from pyllama.errors import InvalidRequestError
from pyllama.server import sse
from pyllama.server.protocol.media import tokenize_multimodal
from pyllama.server.protocol.base import Call, ProtocolContext, Task, random_id
from pyllama.server.protocol.params import (
    build_request,
    get_bool,
    get_int,
    parse_sampling,
    parse_stop,
    parses_body,
    split_prompts,
    tokenize_prompt,
    user_message_starts,
)

STOP_TYPES = {FinishReason.EOS: "eos", FinishReason.WORD: "word", FinishReason.LIMIT: "limit",
              FinishReason.CANCELLED: "none", FinishReason.ERROR: "none"}
LOWEST = -sys.float_info.max
def completion_id() -> str:
    return "chatcmpl-" + random_id()


def finish_reason(event: FinishEvent) -> str:
    return "length" if event.reason == FinishReason.LIMIT else "stop"


def timings_dict(t: Timings) -> dict:
    out = {
        "cache_n": t.cache_n,
        "prompt_n": t.prompt_n,
        "prompt_ms": t.prompt_ms,
        "prompt_per_token_ms": t.prompt_per_token_ms,
        "prompt_per_second": t.prompt_per_second,
        "predicted_n": t.predicted_n,
        "predicted_ms": t.predicted_ms,
        "predicted_per_token_ms": t.predicted_per_token_ms,
        "predicted_per_second": t.predicted_per_second,
    }
    if t.draft_n > 0:  # result_timings::to_json: only once something was drafted
        out["draft_n"] = t.draft_n
        out["draft_n_accepted"] = t.draft_n_accepted
    return out


def _token_text(piece: bytes) -> str:
    # the valid UTF-8 prefix of a token's bytes
    for cut in range(len(piece), max(-1, len(piece) - 4), -1):
        try:
            return piece[:cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return ""


def _logprob(p: float) -> float:
    return math.log(p) if p > 0 else LOWEST


def prob_element(chosen, top, post_sampling: bool) -> dict:
    """One completion_probabilities element (§3.4)."""
    if post_sampling:
        return {"id": chosen.id, "token": _token_text(chosen.piece), "bytes": list(chosen.piece),
                "prob": chosen.prob,
                "top_probs": [{"id": c.id, "token": _token_text(c.piece), "bytes": list(c.piece),
                               "prob": c.prob} for c in top]}
    return {"id": chosen.id, "token": _token_text(chosen.piece), "bytes": list(chosen.piece),
            "logprob": _logprob(chosen.prob),
            "top_logprobs": [{"id": c.id, "token": _token_text(c.piece), "bytes": list(c.piece),
                              "logprob": _logprob(c.prob)} for c in top]}


def f32(x: float) -> float:
    """`x` as the sampler holds it (a C float), the value upstream's JSON reports."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # beyond FLT_MAX: what the C conversion gives
        return math.copysign(math.inf, x)


def grammar_triggers(s) -> list:
    """sampling.grammar_triggers as server_grammar_trigger::to_json writes them."""
    return [{"type": 1, "value": w} for w in s.grammar_trigger_words]  # COMMON_GRAMMAR_TRIGGER_TYPE_WORD


def generation_settings(request: Request, stream: bool, full: bool = True, eog: tuple = ()) -> dict:
    """The effective settings of a request: upstream's task_params::to_json (`full=False`:
    to_json(only_metrics), /props and /slots). Floats as the sampler holds them (float32);
    with ignore_eos the logit biases include the EOG tokens' -inf (`eog`: the model's EOG
    ids), as params_from_json's ignore_eos handler adds them."""
    s = request.sampling
    out = {
        "seed": s.seed, "temperature": f32(s.temperature), "dynatemp_range": f32(s.dynatemp_range),
        "dynatemp_exponent": f32(s.dynatemp_exponent), "top_k": s.top_k, "top_p": f32(s.top_p),
        "min_p": f32(s.min_p), "top_n_sigma": f32(s.top_n_sigma),
        "xtc_probability": f32(s.xtc_probability), "xtc_threshold": f32(s.xtc_threshold),
        "typical_p": f32(s.typical_p), "repeat_last_n": s.repeat_last_n,
        "repeat_penalty": f32(s.repeat_penalty), "presence_penalty": f32(s.presence_penalty),
        "frequency_penalty": f32(s.frequency_penalty), "dry_multiplier": f32(s.dry_multiplier),
        "dry_base": f32(s.dry_base), "dry_allowed_length": s.dry_allowed_length,
        "dry_penalty_last_n": s.dry_penalty_last_n, "mirostat": s.mirostat,
        "mirostat_tau": f32(s.mirostat_tau), "mirostat_eta": f32(s.mirostat_eta),
        "adaptive_target": f32(s.adaptive_target), "adaptive_decay": f32(s.adaptive_decay),
        "max_tokens": request.n_predict, "n_predict": request.n_predict, "n_keep": request.n_keep,
        "n_discard": request.n_discard, "ignore_eos": s.ignore_eos, "stream": stream,
        "n_probs": s.n_probs, "min_keep": s.min_keep, "chat_format": "Content-only",
        "reasoning_format": "auto", "reasoning_in_content": False, "generation_prompt": "",
        "samplers": list(s.samplers), "speculative.types": request.spec_types,  # common_speculative_type_name_str
        "timings_per_token": request.timings_per_token,
        "post_sampling_probs": s.post_sampling_probs, "backend_sampling": s.backend_sampling, "lora": [],
    }
    if full:
        bias = list(s.logit_bias) + ([(t, -math.inf) for t in eog] if s.ignore_eos else [])
        out.update({
            "dry_sequence_breakers": list(s.dry_sequence_breakers), "stop": list(request.stop),
            "logit_bias": [{"bias": f32(b) if math.isfinite(b) else None, "token": t} for t, b in bias],
            "grammar": s.grammar, "grammar_lazy": s.grammar_lazy, "grammar_triggers": grammar_triggers(s),
            "preserved_tokens": [],
        })
    return out


def native_final(index: int, event: FinishEvent, request: Request, model_name: str, prompt_text: str,
                 stream: bool, return_tokens: bool, probs: list | None, eog: tuple = ()) -> dict:
    """The final native result (§3.3); streaming sends it with empty content and tokens."""
    out = {
        "index": index,
        "content": "" if stream else event.text,
        "tokens": [] if stream or not return_tokens else event.tokens,
        "id_slot": event.id_slot,
        "stop": True,
        "model": model_name,
        "tokens_predicted": len(event.tokens),
        "tokens_evaluated": event.n_prompt_tokens,
        "generation_settings": generation_settings(request, stream, eog=eog),
        "prompt": prompt_text,
        "has_new_line": "\n" in event.text,
        "truncated": event.truncated,
        "stop_type": STOP_TYPES[event.reason],
        "stopping_word": event.stopping_word,
        "tokens_cached": event.tokens_cached,
        "timings": timings_dict(event.timings),
    }
    if probs is not None and not stream:
        out["completion_probabilities"] = probs
    return out


def native_partial(index: int, text: str, tokens: list[int], n_predicted: int, n_prompt: int,
                   probs: list | None) -> dict:
    out = {"index": index, "content": text, "tokens": tokens, "stop": False, "id_slot": -1,
           "tokens_predicted": n_predicted, "tokens_evaluated": n_prompt}
    if probs is not None:
        out["completion_probabilities"] = probs
    return out


def progress_dict(event) -> dict:
    return {"total": event.total, "cache": event.cache, "processed": event.processed,
            "time_ms": int(event.time_ms)}  # whole milliseconds, as t_elapsed_us() / 1000


def progress_timings(event) -> dict:
    """The slot's timings at a prompt-progress event (server_slot_stats::to_json mid-prompt):
    the prompt tokens processed so far after the cached ones, in the time since the slot
    started, none generated yet; before the first prompt batch 0 tokens in 0 ms, as upstream."""
    n = event.processed - event.cache
    return timings_dict(Timings(prompt_n=n, prompt_ms=event.time_ms if n > 0 else 0.0, cache_n=event.cache))


def progress_fields(task: Task, event) -> dict:
    """What every family's prompt-progress chunk adds (send_partial_response with is_progress):
    `timings` when the request asked for timings_per_token (upstream copies the slot's stats
    into the result then), and `prompt_progress`."""
    out = {"timings": progress_timings(event)} if task.request.timings_per_token else {}
    out["prompt_progress"] = progress_dict(event)
    return out


def nested_fields(paths: list, obj: dict) -> dict:
    """response_fields: keep only these paths; "a/b" pulls out obj["a"]["b"] under the key "a/b"
    (json_get_nested_values); missing paths are skipped."""
    out = {}
    for path in paths:
        current, ok = obj, True
        for key in str(path).split("/"):
            if ok and isinstance(current, dict) and key in current:
                current = current[key]
            else:
                ok = False
        if ok:
            out[path] = current
    return out


def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"completion_tokens": completion_tokens, "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def oai_completion(cid: str, model_name: str, fingerprint: str, results: list) -> dict:
    """OpenAI text completion (non-stream) from [(index, FinishEvent, probs)]."""
    choices = []
    n_prompt = n_completion = cached = 0
    timings = {}
    for index, event, probs in results:
        choices.append({"text": event.text, "index": index,
                        "logprobs": {"content": probs} if probs is not None else None,
                        "finish_reason": finish_reason(event)})
        n_prompt += event.n_prompt_tokens
        n_completion += len(event.tokens)
        cached += event.timings.cache_n
        timings = timings or timings_dict(event.timings)
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model_name,
            "system_fingerprint": fingerprint, "choices": choices,
            "usage": usage(n_prompt, n_completion, cached), "timings": timings}


def oai_completion_chunk(cid: str, model_name: str, fingerprint: str, index: int, text: str,
                         finish: str | None = None, probs: list | None = None) -> dict:
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model_name,
            "system_fingerprint": fingerprint,
            "choices": [{"text": text, "index": index,
                         "logprobs": {"content": probs} if probs else None, "finish_reason": finish}]}


def probs_list(task: Task, probs) -> list | None:
    """completion_probabilities for (chosen, top) pairs, in the request's probability form."""
    if not task.request.sampling.n_probs:
        return None
    post = task.request.sampling.post_sampling_probs
    return [prob_element(chosen, top, post) for chosen, top in probs]


def completion_tasks(body: dict, ctx: ProtocolContext, prompt=None, grammar_prefill: tuple = (),
                     media: dict | None = None) -> list[Task]:
    """One Task per prompt and per `n_cmpl` child (§3.1, §3.2). HTTP thread.

    `prompt` replaces the body's prompt (e.g. tokens rendered by chat or infill);
    `grammar_prefill` are tokens the grammar accepts before the first generated one;
    `media` the media chunks in `prompt` (MediaContext.tokenize).
    """
    model = ctx.model
    if prompt is None:
        if body.get("prompt") is None:
            raise InvalidRequestError("\"prompt\" is required", param="prompt")
        prompts = split_prompts(body["prompt"])
        if body["prompt"] == [] or not prompts:
            raise InvalidRequestError("\"prompt\" must not be empty", param="prompt")
    else:
        prompts = [prompt]
    sampling = parse_sampling(body, ctx.defaults, model, grammar_prefill)
    stop = parse_stop(body, ctx.defaults)
    n_cmpl = get_int(body, "n_cmpl", get_int(body, "n", 1), lo=1, hi=ctx.n_slots)
    tasks = []
    n_vocab = model.n_vocab
    source = body["prompt"] if prompt is None else prompt
    for index, p in enumerate(prompts):
        p_media = media if prompt is not None else None
        if prompt is None and isinstance(p, dict) and "multimodal_data" in p:
            tokens, p_media = tokenize_multimodal(p, ctx.media, index)
        else:
            tokens = p if prompt is not None and isinstance(p, list) else tokenize_prompt(model, p, ctx.n_ctx_slot)
        if p_media:
            if any(t >= n_vocab or (t < 0 and not _in_media(p_media, i)) for i, t in enumerate(tokens)):
                raise InvalidRequestError("Prompt contains invalid tokens", param="prompt")
        elif tokens and (min(tokens) < 0 or max(tokens) >= n_vocab):
            raise InvalidRequestError("Prompt contains invalid tokens", param="prompt")
        user_starts = user_message_starts(model, body.get("message_delimiters"), tokens)
        for child in range(n_cmpl):
            child_sampling = sampling
            if child and sampling.seed != 0xFFFFFFFF:
                child_sampling = replace(sampling, seed=(sampling.seed + child) & 0xFFFFFFFF)
            request = build_request(body, tokens, child_sampling, ctx.defaults, stop, user_starts)
            request.media = p_media or None
            tasks.append(Task(index=len(tasks), request=request, source_prompt=source))
    return tasks


def _in_media(media: dict, i: int) -> bool:
    return any(start <= i < start + chunk.n_tokens for start, chunk in media.items())


class NativeCompletionCall(Call):
    """/completion, /completions and /infill: llama-server's native result and chunks."""

    def __init__(self, tasks: list[Task], body: dict, ctx: ProtocolContext) -> None:
        super().__init__(tasks, get_bool(body, "stream", False))
        self.return_tokens = get_bool(body, "return_tokens", False)
        fields = body.get("response_fields")
        self.response_fields = fields if isinstance(fields, list) and fields else None
        self.model_name = ctx.model_name
        self.eog = tuple(ctx.model.eog_tokens)  # ignore_eos' logit biases in generation_settings
        for t in tasks:
            # media positions are left out, as server_tokens::detokenize
            text_tokens = [tok for tok in t.request.prompt if tok >= 0] if t.request.media else t.request.prompt
            t.prompt_text = ctx.model.detokenize(text_tokens, unparse_special=True)

    def _final(self, task: Task) -> dict:
        out = native_final(task.index, task.result, task.request, self.model_name, task.prompt_text,
                           self.stream, self.return_tokens, probs_list(task, task.probs), self.eog)
        return nested_fields(self.response_fields, out) if self.response_fields else out

    def response(self):
        results = [self._final(t) for t in self.tasks]
        return results[0] if len(results) == 1 else results

    def chunks(self, task: Task, event) -> list:
        if isinstance(event, TokenEvent):
            chunk = native_partial(task.index, event.text, event.tokens, len(task.tokens),
                                   len(task.request.prompt), probs_list(task, event.probs) if event.probs else None)
            if event.timings is not None:
                chunk["timings"] = timings_dict(event.timings)
            return [chunk]
        if isinstance(event, FinishEvent):
            return [self._final(task)]
        if isinstance(event, ProgressEvent):
            return [{"index": task.index, "content": "", "tokens": [], "stop": False, "id_slot": -1,
                     "tokens_predicted": 0, "tokens_evaluated": len(task.request.prompt),
                     **progress_fields(task, event)}]
        return []

    def native_json(self, task: Task, event) -> dict:
        """One event's native JSON (to_json_non_oaicompat): what `__verbose` carries."""
        return self._final(task) if isinstance(event, FinishEvent) else self.chunks(task, event)[0]


def verbose_view(tasks: list[Task], body: dict, ctx: ProtocolContext) -> NativeCompletionCall | None:
    """The native view of an OpenAI call's requests when the body asks for `verbose`.

    Upstream's task_params.verbose (default: -v, or -lv above 9) adds the native JSON of the
    result as `__verbose`: to every /v1/completions result and chunk, to a chat completion,
    and to the first chunk of a chat stream's final result (server_task_result_cmpl_*::
    to_json_oaicompat*). None when not asked for.
    """
    if not get_bool(body, "verbose", ctx.defaults.verbose):
        return None
    return NativeCompletionCall(tasks, body, ctx)


class OAICompletionCall(Call):
    """/v1/completions: OpenAI's text completion over the native parser (§4.5)."""

    done = sse.DONE

    def __init__(self, tasks: list[Task], body: dict, ctx: ProtocolContext) -> None:
        super().__init__(tasks, get_bool(body, "stream", False))
        self.id = completion_id()
        self.model_name = ctx.model_name
        self.fingerprint = ctx.fingerprint
        self.verbose = verbose_view(tasks, body, ctx)

    def response(self):
        out = oai_completion(self.id, self.model_name, self.fingerprint,
                             [(t.index, t.result, probs_list(t, t.probs)) for t in self.tasks])
        if self.verbose is not None:  # the first result's, as upstream merges the choices
            out["__verbose"] = self.verbose.native_json(self.tasks[0], self.tasks[0].result)
        return out

    def chunks(self, task: Task, event) -> list:
        out = self._chunks(task, event)
        if self.verbose is not None and out:
            out[0]["__verbose"] = self.verbose.native_json(task, event)
        return out

    def _chunks(self, task: Task, event) -> list:
        if isinstance(event, TokenEvent):
            probs = probs_list(task, event.probs) if event.probs else None
            chunk = oai_completion_chunk(self.id, self.model_name, self.fingerprint, task.index,
                                         event.text, probs=probs)
            if event.timings is not None:  # timings_per_token (to_json_oaicompat)
                chunk["timings"] = timings_dict(event.timings)
            return [chunk]
        if isinstance(event, ProgressEvent):  # return_progress: an empty choice and the progress
            chunk = oai_completion_chunk(self.id, self.model_name, self.fingerprint, task.index, "")
            chunk.update(progress_fields(task, event))
            return [chunk]
        if isinstance(event, FinishEvent):
            chunk = oai_completion_chunk(self.id, self.model_name, self.fingerprint, task.index, "",
                                         finish_reason(event))
            chunk["usage"] = usage(event.n_prompt_tokens, len(event.tokens), event.timings.cache_n)
            chunk["timings"] = timings_dict(event.timings)
            return [chunk]
        return []


@parses_body
def parse_native(body: dict, ctx: ProtocolContext) -> NativeCompletionCall:
    """A /completion body -> its Call (`logprobs` stands for n_probs when that is absent)."""
    if body.get("n_probs") is None and body.get("logprobs") is not None:
        value = body["logprobs"]
        if not isinstance(value, (bool, int)):
            raise InvalidRequestError("Field 'logprobs': expected an integer", param="logprobs")
        body = {**body, "n_probs": int(value)}  # true counts as 1, as nlohmann's get<int>
    return NativeCompletionCall(completion_tasks(body, ctx), body, ctx)


@parses_body
def parse_oai(body: dict, ctx: ProtocolContext) -> OAICompletionCall:
    """A /v1/completions body -> its Call (`logprobs: N` is n_probs)."""
    if body.get("logprobs") is not None and not isinstance(body["logprobs"], bool):
        body = {**body, "n_probs": body.get("n_probs", body["logprobs"])}
    return OAICompletionCall(completion_tasks(body, ctx), body, ctx)
