"""The server's own routes: /models, /props, /slots (and slot actions), /metrics, /lora-adapters.

JSON (and Prometheus text) in llama-server's shapes, from engine facts and the settings.
Imports: public `engine` names, `errors`, `settings`, the completion protocol.
"""

from __future__ import annotations

import os
import re
import time

import orjson

from pyllama.engine import Request, llama_build_commit
from pyllama.errors import InvalidRequestError
from pyllama.server.protocol.base import ProtocolContext, random_id
from pyllama.server.protocol.completions import generation_settings


# The build number of the pinned commit (vendor/pin.toml's build_number): `git rev-list --count`
# there, which upstream's cmake/build-info.cmake makes LLAMA_BUILD_NUMBER.
LLAMA_BUILD_NUMBER = 11312


def build_info() -> str:
    """llama_build_info(): "b<build number>-<commit>" of the pinned llama.cpp (system_fingerprint)."""
    return f"b{LLAMA_BUILD_NUMBER}-{llama_build_commit()}"


_media_marker: str | None = None


def media_marker() -> str:
    """get_media_marker(): LLAMA_MEDIA_MARKER, or "<__media_" + 32 random characters + "__>",
    fixed for the life of the process."""
    global _media_marker
    if _media_marker is None:
        _media_marker = os.environ.get("LLAMA_MEDIA_MARKER") or f"<__media_{random_id()}__>"
    return _media_marker


# llama_ftype_name's names (src/llama-model-loader.cpp), "(guessed) " first when guessed
FTYPE_NAMES = ("all F32", "F16", "BF16", "Q1_0", "Q2_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
               "MXFP4 MoE", "NVFP4", "Q2_K - Medium", "Q2_K - Small", "Q3_K - Small",
               "Q3_K - Medium", "Q3_K - Large", "Q4_K - Small", "Q4_K - Medium", "Q5_K - Small",
               "Q5_K - Medium", "Q6_K", "TQ1_0 - 1.69 bpw ternary", "TQ2_0 - 2.06 bpw ternary",
               "IQ2_XXS - 2.0625 bpw", "IQ2_XS - 2.3125 bpw", "IQ2_S - 2.5 bpw", "IQ2_M - 2.7 bpw",
               "IQ3_XS - 3.3 bpw", "IQ3_XXS - 3.0625 bpw", "IQ1_S - 1.5625 bpw", "IQ1_M - 1.75 bpw",
               "IQ4_NL - 4.5 bpw", "IQ4_XS - 4.25 bpw", "IQ3_S - 3.4375 bpw", "IQ3_S mix - 3.66 bpw",
               "unknown, may not work")


def model_ftype(model) -> str:
    """llama_ftype_name(llama_model_ftype(model)): the end of the model's description
    ("<arch> <type> <ftype>"), found by name since a type name may hold a space."""
    desc = model.description or ""
    names = [f"(guessed) {n}" for n in FTYPE_NAMES] + list(FTYPE_NAMES)
    found = [n for n in names if desc == n or desc.endswith(" " + n)]
    return max(found, key=len) if found else desc.split(" ", 2)[-1]


def models(engine, ctx: ProtocolContext, aliases: list, tags: str) -> dict:
    """GET /models, /v1/models: the OpenAI list plus the Ollama-style `models` entry."""
    model = ctx.model
    name = ctx.model_name
    meta = {"vocab_type": int(model.meta("tokenizer.ggml.model") != "llama") + 1,
            "n_vocab": model.n_vocab, "n_ctx": ctx.n_ctx_slot, "n_ctx_train": model.n_ctx_train,
            "n_embd": model.n_embd, "n_params": model.n_params, "size": model.size,
            "ftype": model_ftype(model)}
    capabilities = ["embedding"] if ctx.embeddings else ["completion"]
    if ctx.media is not None:
        capabilities.append("multimodal")
    return {
        "models": [{"name": name, "model": name, "modified_at": "", "size": "", "digest": "",
                    "type": "model", "description": "", "tags": [""], "capabilities": capabilities,
                    "parameters": "",
                    "details": {"parent_model": "", "format": "gguf", "family": "", "families": [""],
                                "parameter_size": "", "quantization_level": ""}}],
        "object": "list",
        "data": [{"id": name, "aliases": aliases, "tags": [t for t in tags.split(",") if t],
                  "object": "model", "created": int(time.time()), "owned_by": "llamacpp", "meta": meta}],
    }


def default_params(ctx: ProtocolContext) -> dict:
    """/props' default_generation_settings.params: get_res_props reports a default task_params
    with only the sampling from the flags (so n_predict -1 and n_keep 0 whatever -n/--keep say)."""
    return generation_settings(Request(prompt=[], sampling=ctx.defaults.sampling), False, full=False)


def props(ctx: ProtocolContext, settings, model_path: str) -> dict:
    """GET /props."""
    model, chat = ctx.model, ctx.chat
    out = {
        "default_generation_settings": {"params": default_params(ctx), "n_ctx": ctx.n_ctx_slot},
        "total_slots": ctx.n_slots,
        "model_alias": ctx.model_name,
        "model_ftype": model_ftype(model),
        "model_path": settings.model or model_path,
        "modalities": {"vision": bool(ctx.media is not None and ctx.media.vision),
                       "video": bool(ctx.media is not None and ctx.media.video),
                       "audio": bool(ctx.media is not None and ctx.media.audio)},
        "media_marker": ctx.media.marker if ctx.media is not None else media_marker(),
        "endpoint_slots": settings.slots,
        "endpoint_props": settings.props,
        "endpoint_metrics": settings.metrics,
        "ui": settings.webui,  # params.ui, as get_res_props (true with --path too)
        "ui_settings": orjson.loads(settings.ui_config) if settings.ui_config else {},
        "chat_template": chat.info["source"] if chat else "",
        "chat_template_caps": chat.caps if chat else {},
        "bos_token": model.token_text(model.token_bos) if model.token_bos is not None else "",
        "eos_token": model.token_text(model.token_eos) if model.token_eos is not None else "",
        "build_info": ctx.fingerprint,
        "is_sleeping": False,
        "cors_proxy_enabled": False,
    }
    if chat and settings.jinja and chat.info.get("tool_use_source"):
        out["chat_template_tool_use"] = chat.info["tool_use_source"]
    return out


def slots(engine, ctx: ProtocolContext) -> list:
    """GET /slots: one object per slot (server_slot::to_json)."""
    if ctx.embeddings:
        return [{"id": i, "n_ctx": ctx.n_ctx_slot, "speculative": False, "is_processing": False}
                for i in range(ctx.n_slots)]
    out = []
    for info in engine.slot_info():
        item = {"id": info["id"], "n_ctx": info["n_ctx"], "speculative": info.get("speculative", False),
                "is_processing": info["is_processing"]}
        if info["is_processing"]:
            item.update({
                "id_task": info["id_task"], "n_prompt_tokens": info["n_tokens"],
                "n_prompt_tokens_processed": info["n_prompt_tokens_processed"],
                "n_prompt_tokens_cache": info["n_prompt_tokens_cache"],
                "params": generation_settings(info["request"], False, full=False),
                "next_token": [{"has_next_token": True, "has_new_line": info["has_new_line"],
                                "n_remain": info["n_remain"], "n_decoded": info["n_decoded"]}]})
            if info.get("draft_n"):  # pyllama: the request's drafted / accepted tokens so far
                item.update({"draft_n": info["draft_n"], "draft_n_accepted": info["draft_n_accepted"]})
        out.append(item)
    return out


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


def slot_action(engine, ctx: ProtocolContext, folder: str, id_slot: str, action, body: dict) -> dict:
    """POST /slots/{id}?action=save|restore|erase (handle_slots_save / _restore / _erase)."""
    try:
        slot_id = int(id_slot) % ctx.n_slots
    except ValueError:
        raise InvalidRequestError("Invalid slot ID") from None
    if action not in ("save", "restore", "erase"):
        raise InvalidRequestError("Invalid action", param="action")
    if action == "erase":
        return {"id_slot": slot_id, "n_erased": engine.erase_slot(slot_id)}
    filename = body.get("filename")
    if not isinstance(filename, str) or not _SAFE_NAME.match(filename) or ".." in filename:
        raise InvalidRequestError("Invalid filename", param="filename")
    path = os.path.join(folder, filename)
    t0 = time.perf_counter()
    if action == "save":
        n_tokens, n_bytes = engine.save_slot(slot_id, path)
        return {"id_slot": slot_id, "filename": filename, "n_saved": n_tokens, "n_written": n_bytes,
                "timings": {"save_ms": (time.perf_counter() - t0) * 1e3}}
    if not os.path.isfile(path):
        raise InvalidRequestError(f"Unable to restore slot: {filename} does not exist", param="filename")
    n_tokens, n_bytes = engine.restore_slot(slot_id, path)
    return {"id_slot": slot_id, "filename": filename, "n_restored": n_tokens, "n_read": n_bytes,
            "timings": {"restore_ms": (time.perf_counter() - t0) * 1e3}}


def _num(value) -> str:
    # C++ default stream formatting: 6 significant digits
    return f"{value:.6g}"


def metrics_text(metrics, stats: dict) -> str:
    """GET /metrics: Prometheus text with llama-server's llamacpp:* names, and ours."""
    m = metrics
    with m.lock:
        prompt_tps = m.window_prompt_tokens / m.window_prompt_seconds if m.window_prompt_seconds else 0.0
        predicted_tps = m.window_predicted_tokens / m.window_predicted_seconds if m.window_predicted_seconds else 0.0
        m.window_prompt_tokens = m.window_predicted_tokens = 0
        m.window_prompt_seconds = m.window_predicted_seconds = 0.0
        n_decode = stats.get("n_decode_calls", 0)
        counters = [
            # embedding inputs are prompt tokens too (upstream counts every task's prompt)
            ("prompt_tokens_total", "Number of prompt tokens processed.",
             m.prompt_tokens_total + stats.get("n_embd_prompt_tokens", 0)),
            ("prompt_tokens_cached_total", "Number of prompt tokens reused from the cache.",
             m.prompt_tokens_cached_total),
            ("prompt_seconds_total", "Prompt process time", m.prompt_seconds_total + stats.get("t_embd_prompt", 0.0)),
            ("tokens_predicted_total", "Number of generation tokens processed.", m.tokens_predicted_total),
            ("tokens_predicted_seconds_total", "Predict process time", m.tokens_predicted_seconds_total),
            ("n_decode_total", "Total number of llama_decode() calls", n_decode),
            ("n_tokens_max", "Largest observed n_tokens.", m.n_tokens_max),
            ("spec_decode_num_draft_tokens_total", "Number of draft tokens.", stats.get("n_draft_tokens", 0)),
            ("spec_decode_num_accepted_tokens_total", "Number of accepted draft tokens.",
             stats.get("n_draft_accepted", 0)),
            ("spec_decode_num_drafts_total", "Number of drafts.", stats.get("n_draft_verif_steps", 0)),
        ]
        gauges = [
            ("prompt_tokens_seconds", "Average prompt throughput in tokens/s.", prompt_tps),
            ("predicted_tokens_seconds", "Average generation throughput in tokens/s.", predicted_tps),
            ("requests_processing", "Number of requests processing.", stats.get("n_busy", 0)),
            ("requests_deferred", "Number of requests deferred.", stats.get("n_pending", 0)),
            ("n_busy_slots_per_decode", "Average number of busy slots per llama_decode() call",
             stats.get("n_tokens_predicted", 0) / n_decode if n_decode else 0.0),
        ]
    # ours, beside upstream's: where the engine thread's time goes
    engine_counters = [
        ("engine_busy_seconds_total", "Engine thread time not spent waiting for work.", stats.get("t_busy", 0.0)),
        ("engine_decode_seconds_total", "Engine thread time inside llama_decode().", stats.get("t_decode", 0.0)),
        ("engine_steps_total", "Engine steps (one llama_decode() batch each).", stats.get("n_steps", 0)),
        ("engine_tokens_predicted_total", "Tokens sampled by the engine.", stats.get("n_tokens_predicted", 0)),
    ]
    lines = []
    for prefix, kind, items in (("llamacpp", "counter", counters), ("llamacpp", "gauge", gauges),
                                ("pyllama", "counter", engine_counters)):
        for name, help_text, value in items:
            lines += [f"# HELP {prefix}:{name} {help_text}", f"# TYPE {prefix}:{name} {kind}",
                      f"{prefix}:{name} {_num(value)}"]
    return "\n".join(lines) + "\n"


def lora_list(engine) -> list:
    """GET /lora-adapters."""
    scales = engine.lora_scales() if engine.lora_paths else ()
    return [{"id": i, "path": path, "scale": scale, "task_name": "", "prompt_prefix": ""}
            for i, (path, scale) in enumerate(zip(engine.lora_paths, scales))]


def parse_lora(value, n_adapters: int) -> tuple:
    """[{id, scale}] -> one scale per adapter; unlisted adapters get 0 (upstream's parse_lora_request)."""
    if not isinstance(value, list):
        raise InvalidRequestError("Request body must be an array")
    scales = [0.0] * n_adapters
    for entry in value:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or \
                isinstance(entry.get("scale", 0.0), bool) or not isinstance(entry.get("scale", 0.0), (int, float)):
            raise InvalidRequestError("Invalid adapter entry: expected {\"id\": int, \"scale\": number}")
        if not 0 <= entry["id"] < n_adapters:
            raise InvalidRequestError(f"invalid adapter id: {entry['id']}")
        scales[entry["id"]] = float(entry.get("scale", 0.0))
    return tuple(scales)
