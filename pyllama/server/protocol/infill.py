"""/infill: fill-in-the-middle for models with FIM tokens (upstream's format_prompt_infill).

The FIM prompt is built from the body's prefix, suffix and extra chunks; the rest of the body is
a native completion, answered as /completion answers.
Imports: `errors`, the completion protocol.
"""

from __future__ import annotations

from pyllama.errors import InvalidRequestError, NotSupportedError
from pyllama.server.protocol.base import ProtocolContext
from pyllama.server.protocol.completions import NativeCompletionCall, completion_tasks
from pyllama.server.protocol.params import parses_body, tokenize_end

_SNIPPET = "\n\n--- snippet ---\n\n"


def _mixed(model, value, n_keep: int, tail: bool) -> list[int]:
    if isinstance(value, str):
        return tokenize_end(model, value, n_keep, tail=tail)
    if isinstance(value, list):
        out = []
        for part in value:
            out += [part] if isinstance(part, int) else model.tokenize(str(part), add_special=False,
                                                                     parse_special=False)
        return out
    raise InvalidRequestError("\"input_prefix\" and \"input_suffix\" must be strings")


def infill_tokens(model, body: dict, n_batch: int, n_predict: int, n_ctx: int, spm: bool = False) -> list[int]:
    fim = model.fim_tokens
    if "input_prefix" not in body or "input_suffix" not in body:
        raise InvalidRequestError("\"input_prefix\" and \"input_suffix\" are required")
    extra_chunks = body.get("input_extra") or []
    if not isinstance(extra_chunks, list) or not all(
            isinstance(c, dict) and isinstance(c.get("text"), str) and
            isinstance(c.get("filename", ""), str) for c in extra_chunks):
        raise InvalidRequestError("\"input_extra\" must be an array of {\"filename\": string, \"text\": string}")
    prompt = body.get("prompt")
    prompt_tokens = model.tokenize(prompt, add_special=False, parse_special=False) if isinstance(prompt, str) else []
    # only the prefix's last and the suffix's first tokens are used, and the extra chunks' last
    prefix = _mixed(model, body["input_prefix"], 3 * (n_batch // 4), tail=True)
    suffix = _mixed(model, body["input_suffix"], n_batch // 4, tail=False)
    extra = []
    if fim["rep"] is not None:
        extra += [fim["rep"]] + model.tokenize("myproject\n", add_special=False, parse_special=False)
    for chunk in extra_chunks:
        if fim["sep"] is not None:
            extra += [fim["sep"]] + model.tokenize(chunk.get("filename", "tmp") + "\n", add_special=False,
                                                   parse_special=False)
        else:
            extra += model.tokenize(_SNIPPET, add_special=False, parse_special=False)
        extra += tokenize_end(model, chunk["text"], n_ctx, tail=True)
    if fim["sep"] is not None:
        extra += [fim["sep"]] + model.tokenize("filename\n", add_special=False, parse_special=False)
    n_prefix = min(len(prefix), 3 * (n_batch // 4))
    n_suffix = min(len(suffix), max(0, n_batch // 4 - (2 + len(prompt_tokens))))
    n_extra = min(max(0, n_ctx - n_batch - 2 * n_predict), len(extra))
    prefix = [fim["pre"]] + prefix[len(prefix) - n_prefix:] + prompt_tokens
    suffix = [fim["suf"]] + suffix[:n_suffix]
    head, tail = (suffix, prefix) if spm else (prefix, suffix)
    if model.add_bos and model.token_bos is not None:
        head = [model.token_bos] + head
    return extra[len(extra) - n_extra:] + head + tail + [fim["mid"]]


@parses_body
def parse(body: dict, ctx: ProtocolContext) -> NativeCompletionCall:
    """An /infill body -> its Call (a native completion of the FIM prompt)."""
    model = ctx.model
    fim = model.fim_tokens
    if fim["pre"] is None or fim["suf"] is None or fim["mid"] is None:
        raise NotSupportedError("Infill is not supported by this model: prefix, suffix, or middle tokens are missing.")
    tokens = infill_tokens(model, body, ctx.n_batch, max(0, ctx.defaults.n_predict), ctx.n_ctx_slot,
                           spm=ctx.spm_infill)
    return NativeCompletionCall(completion_tasks(body, ctx, prompt=tokens), body, ctx)
