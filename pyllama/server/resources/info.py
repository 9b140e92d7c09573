"""/health, /models, /props, /slots (and slot actions), /metrics."""

from __future__ import annotations

import json
import os
import re
import time

import falcon

from pyllama.engine import Retry
from pyllama.errors import InvalidRequestError, NotSupportedError, UnavailableError
from pyllama.server.protocol.completions import generation_settings
from pyllama.server.protocol.params import Defaults
from pyllama.server.resources.body import read_json, write_json


class HealthResource:
    def __init__(self, state) -> None:
        self.state = state

    def on_get(self, req, resp):
        self.state.require_ready()
        write_json(resp, {"status": "ok"})


class ModelsResource:
    def __init__(self, state) -> None:
        self.state = state

    def on_get(self, req, resp):
        engine = self.state.require_ready()
        model = engine.model
        name = self.state.model_name
        meta = {"vocab_type": int(model.meta("tokenizer.ggml.model") != "llama") + 1,
                "n_vocab": model.n_vocab, "n_ctx": engine.n_ctx_slot, "n_ctx_train": model.n_ctx_train,
                "n_embd": model.n_embd, "n_params": model.n_params, "size": model.size,
                "ftype": model.description.split(" ", 2)[-1] if model.description else ""}
        capabilities = ["embedding"] if engine.embeddings else ["completion"]
        write_json(resp, {
            "models": [{"name": name, "model": name, "modified_at": "", "size": "", "digest": "",
                        "type": "model", "description": "", "tags": [""], "capabilities": capabilities,
                        "parameters": "",
                        "details": {"parent_model": "", "format": "gguf", "family": "", "families": [""],
                                    "parameter_size": "", "quantization_level": ""}}],
            "object": "list",
            "data": [{"id": name, "aliases": self.state.aliases,
                      "tags": [t for t in self.state.settings.tags.split(",") if t], "object": "model",
                      "created": int(time.time()), "owned_by": "llamacpp", "meta": meta}],
        })


def _default_params(state) -> dict:
    from pyllama.engine import Request

    d: Defaults = state.defaults
    return generation_settings(Request(prompt=[], sampling=d.sampling, n_predict=d.n_predict,
                                       n_keep=d.n_keep, stop=d.stop), False, full=False)


class PropsResource:
    def __init__(self, state) -> None:
        self.state = state

    def on_get(self, req, resp):
        engine = self.state.require_ready()
        model = engine.model
        chat = self.state.chat
        out = {
            "default_generation_settings": {"params": _default_params(self.state), "n_ctx": engine.n_ctx_slot},
            "total_slots": engine.n_slots,
            "model_alias": self.state.model_name,
            "model_path": self.state.settings.model or self.state.model_path,
            "modalities": {"vision": False, "video": False, "audio": False},
            "endpoint_slots": self.state.settings.slots,
            "endpoint_props": self.state.settings.props,
            "endpoint_metrics": self.state.settings.metrics,
            "ui": False,
            "ui_settings": json.loads(self.state.settings.ui_config) if self.state.settings.ui_config else {},
            "chat_template": chat.info["source"] if chat else "",
            "chat_template_caps": chat.caps if chat else {},
            "bos_token": model.token_text(model.token_bos) if model.token_bos is not None else "",
            "eos_token": model.token_text(model.token_eos) if model.token_eos is not None else "",
            "build_info": self.state.build_info,
            "is_sleeping": False,
            "cors_proxy_enabled": False,
        }
        if chat and self.state.settings.jinja and chat.info.get("tool_use_source"):
            out["chat_template_tool_use"] = chat.info["tool_use_source"]
        write_json(resp, out)

    def on_post(self, req, resp):
        if not self.state.settings.props:
            raise NotSupportedError("This server does not support changing global properties. Start it with `--props`")
        read_json(req, self.state.settings.max_body_mb << 20)
        write_json(resp, {"success": True})


class SlotsResource:
    def __init__(self, state) -> None:
        self.state = state

    def on_get(self, req, resp):
        if not self.state.settings.slots:
            raise NotSupportedError("This server does not support slots endpoint. Start it with `--slots`")
        engine = self.state.require_ready()
        if engine.embeddings:
            infos = [{"id": i, "n_ctx": engine.n_ctx_slot, "speculative": False, "is_processing": False}
                     for i in range(engine.n_slots)]
        else:
            infos = []
            for info in engine.call(lambda core: core.slot_info(), timeout=60):
                item = {"id": info["id"], "n_ctx": info["n_ctx"], "speculative": False,
                        "is_processing": info["is_processing"]}
                if info["is_processing"]:
                    item.update({
                        "id_task": info["id_task"], "n_prompt_tokens": info["n_tokens"],
                        "n_prompt_tokens_processed": info["n_prompt_tokens_processed"],
                        "n_prompt_tokens_cache": info["n_prompt_tokens_cache"],
                        "params": generation_settings(info["request"], False, full=False),
                        "next_token": [{"has_next_token": True, "has_new_line": info["has_new_line"],
                                        "n_remain": info["n_remain"], "n_decoded": info["n_decoded"]}]})
                infos.append(item)
        if req.get_param("fail_on_no_slot") is not None and all(i["is_processing"] for i in infos):
            raise UnavailableError("no slot available")
        write_json(resp, infos)


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


class SlotActionResource:
    """POST /slots/{id}?action=save|restore|erase (needs --slot-save-path)."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp, id_slot):
        folder = self.state.settings.slot_save_path
        if not folder:
            raise NotSupportedError("This server does not support slots action. Start it with `--slot-save-path`")
        engine = self.state.require_ready()
        try:
            slot_id = int(id_slot) % engine.n_slots
        except ValueError:
            raise InvalidRequestError("Invalid slot ID") from None
        action = req.get_param("action")
        if action not in ("save", "restore", "erase"):
            raise InvalidRequestError("Invalid action")
        body = read_json(req, self.state.settings.max_body_mb << 20)

        def when_idle(fn):
            def run(core):
                if core.slots[slot_id].busy:
                    raise Retry()  # upstream defers the task until the slot is idle
                return fn(core)
            return engine.call(run)

        if action == "erase":
            n = when_idle(lambda core: core.erase_slot(slot_id))
            write_json(resp, {"id_slot": slot_id, "n_erased": n})
            return
        filename = body.get("filename")
        if not isinstance(filename, str) or not _SAFE_NAME.match(filename) or ".." in filename:
            raise InvalidRequestError("Invalid filename")
        path = os.path.join(folder, filename)
        t0 = time.perf_counter()
        if action == "save":
            n_tokens, n_bytes = when_idle(lambda core: core.save_slot(slot_id, path))
            write_json(resp, {"id_slot": slot_id, "filename": filename, "n_saved": n_tokens,
                              "n_written": n_bytes, "timings": {"save_ms": (time.perf_counter() - t0) * 1e3}})
        else:
            if not os.path.isfile(path):
                raise InvalidRequestError(f"Unable to restore slot: {filename} does not exist")
            n_tokens, n_bytes = when_idle(lambda core: core.restore_slot(slot_id, path))
            write_json(resp, {"id_slot": slot_id, "filename": filename, "n_restored": n_tokens,
                              "n_read": n_bytes, "timings": {"restore_ms": (time.perf_counter() - t0) * 1e3}})


def _num(value) -> str:
    # C++ default stream formatting: 6 significant digits
    return f"{value:.6g}"


class MetricsResource:
    """GET /metrics: Prometheus text with llama-server's llamacpp:* names (only with --metrics)."""

    def __init__(self, state) -> None:
        self.state = state

    def on_get(self, req, resp):
        if not self.state.settings.metrics:
            raise NotSupportedError("This server does not support metrics endpoint. Start it with `--metrics`")
        engine = self.state.require_ready()
        m = self.state.metrics
        stats = engine.stats()
        with m.lock:
            prompt_tps = m.window_prompt_tokens / m.window_prompt_seconds if m.window_prompt_seconds else 0.0
            predicted_tps = m.window_predicted_tokens / m.window_predicted_seconds if m.window_predicted_seconds else 0.0
            m.window_prompt_tokens = m.window_predicted_tokens = 0
            m.window_prompt_seconds = m.window_predicted_seconds = 0.0
            n_decode = stats.get("n_decode_calls", 0)
            counters = [
                ("prompt_tokens_total", "Number of prompt tokens processed.", m.prompt_tokens_total),
                ("prompt_tokens_cached_total", "Number of prompt tokens reused from the cache.",
                 m.prompt_tokens_cached_total),
                ("prompt_seconds_total", "Prompt process time", m.prompt_seconds_total),
                ("tokens_predicted_total", "Number of generation tokens processed.", m.tokens_predicted_total),
                ("tokens_predicted_seconds_total", "Predict process time", m.tokens_predicted_seconds_total),
                ("n_decode_total", "Total number of llama_decode() calls", n_decode),
                ("n_tokens_max", "Largest observed n_tokens.", m.n_tokens_max),
                ("spec_decode_num_draft_tokens_total", "Number of draft tokens.", 0),
                ("spec_decode_num_accepted_tokens_total", "Number of accepted draft tokens.", 0),
                ("spec_decode_num_drafts_total", "Number of drafts.", 0),
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
        resp.status = falcon.HTTP_200
        resp.content_type = "text/plain; version=0.0.4"
        resp.set_header("Process-Start-Time-Unix", str(self.state.start_us))
        resp.text = "\n".join(lines) + "\n"


class LoraAdaptersResource:
    """GET/POST /lora-adapters: the adapters loaded with --lora and their server-wide scales."""

    def __init__(self, state) -> None:
        self.state = state

    def on_get(self, req, resp):
        engine = self.state.require_ready()
        scales = engine.lora_scales() if engine.lora_paths else ()
        write_json(resp, [{"id": i, "path": path, "scale": scale, "task_name": "", "prompt_prefix": ""}
                          for i, (path, scale) in enumerate(zip(engine.lora_paths, scales))])

    def on_post(self, req, resp):
        engine = self.state.require_ready()
        import orjson

        try:
            body = orjson.loads(req.bounded_stream.read() or b"null")
        except orjson.JSONDecodeError:
            raise InvalidRequestError("Request body must be an array") from None
        engine.set_lora_scales(parse_lora(body, len(engine.lora_paths)))
        write_json(resp, {"success": True})


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
