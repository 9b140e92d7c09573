"""Engine results -> llama-server's JSON: native completion results and chunks (§3.3-3.7),
OpenAI text completions (§4.5), timings, probabilities and generation_settings.
"""

from __future__ import annotations

import math
import secrets
import string
import sys
import time

from pyllama.engine import FinishEvent, FinishReason, Request, Timings

STOP_TYPES = {FinishReason.EOS: "eos", FinishReason.WORD: "word", FinishReason.LIMIT: "limit",
              FinishReason.CANCELLED: "none", FinishReason.ERROR: "none"}
LOWEST = -sys.float_info.max
_ALNUM = string.ascii_letters + string.digits


def completion_id() -> str:
    return "chatcmpl-" + "".join(secrets.choice(_ALNUM) for _ in range(32))


def finish_reason(event: FinishEvent) -> str:
    return "length" if event.reason == FinishReason.LIMIT else "stop"


def timings_dict(t: Timings) -> dict:
    return {
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


def generation_settings(request: Request, stream: bool, full: bool = True) -> dict:
    s = request.sampling
    out = {
        "seed": s.seed, "temperature": s.temperature, "dynatemp_range": s.dynatemp_range,
        "dynatemp_exponent": s.dynatemp_exponent, "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p,
        "top_n_sigma": s.top_n_sigma, "xtc_probability": s.xtc_probability,
        "xtc_threshold": s.xtc_threshold, "typical_p": s.typical_p, "repeat_last_n": s.repeat_last_n,
        "repeat_penalty": s.repeat_penalty, "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty, "dry_multiplier": s.dry_multiplier,
        "dry_base": s.dry_base, "dry_allowed_length": s.dry_allowed_length,
        "dry_penalty_last_n": s.dry_penalty_last_n, "mirostat": s.mirostat,
        "mirostat_tau": s.mirostat_tau, "mirostat_eta": s.mirostat_eta,
        "adaptive_target": s.adaptive_target, "adaptive_decay": s.adaptive_decay,
        "max_tokens": request.n_predict, "n_predict": request.n_predict, "n_keep": request.n_keep,
        "n_discard": request.n_discard, "ignore_eos": s.ignore_eos, "stream": stream,
        "n_probs": s.n_probs, "min_keep": s.min_keep, "chat_format": "Content-only",
        "reasoning_format": "auto", "reasoning_in_content": False, "generation_prompt": "",
        "samplers": list(s.samplers), "speculative.types": [], "timings_per_token": request.timings_per_token,
        "post_sampling_probs": s.post_sampling_probs, "backend_sampling": s.backend_sampling, "lora": [],
    }
    if full:
        out.update({
            "dry_sequence_breakers": list(s.dry_sequence_breakers), "stop": list(request.stop),
            "logit_bias": [{"bias": b if math.isfinite(b) else None, "token": t} for t, b in s.logit_bias],
            "grammar": s.grammar, "grammar_lazy": s.grammar_lazy, "grammar_triggers": [],
            "preserved_tokens": [],
        })
    return out


def native_final(index: int, event: FinishEvent, request: Request, model_name: str, prompt_text: str,
                 stream: bool, return_tokens: bool, probs: list | None) -> dict:
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
        "generation_settings": generation_settings(request, stream),
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
            "time_ms": event.time_ms}


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
