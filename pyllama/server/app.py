"""create_app(): the Falcon app, its shared state, and the route table (as server.cpp lists it).

The model loads in a background thread of the worker, after the fork; until it is ready every
route but /health answers 503 "Loading model".
Imports: public `engine` names, `errors`, `settings`, falcon, and the server modules.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
import time

import falcon

from pyllama.engine import CpuPlacement, Engine, EngineConfig, SamplingParams, SpecConfig
from pyllama.engine.types import DEFAULT_DRY_BREAKERS, parse_samplers
from pyllama.errors import UnavailableError
from pyllama.server import errors as server_errors
from pyllama.server.connection import ConnectionWatch
from pyllama.server import health
from pyllama.server.hooks import GenerationHooks
from pyllama.server.metrics import HttpMetrics, RequestMetrics
from pyllama.server.middleware import CorsAndAuth, JSONBody
from pyllama.server.protocol.base import ProtocolContext
from pyllama.server.protocol import info as info_json
from pyllama.server.protocol.info import build_info
from pyllama.server.protocol.params import Defaults
from pyllama.server.routing import MethodRouting, RequestLine
from pyllama.server.sleep import SleepGuard
from pyllama.server import ui
from pyllama.server.static import ServiceWorkerResource, StaticFiles
from pyllama.server.stream_store import StreamStore
from pyllama.server.streaming import respond
from pyllama.server.templates import ChatFormatter
from pyllama.server.vertex import GcpParams
from pyllama.settings import Settings

logger = logging.getLogger(__name__)


class Metrics:
    """Counters behind /metrics (llama-server's names). Thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.prompt_tokens_total = 0
        self.prompt_tokens_cached_total = 0
        self.prompt_seconds_total = 0.0
        self.tokens_predicted_total = 0
        self.tokens_predicted_seconds_total = 0.0
        self.n_tokens_max = 0
        self.window_prompt_tokens = 0
        self.window_prompt_seconds = 0.0
        self.window_predicted_tokens = 0
        self.window_predicted_seconds = 0.0
        self.requests: RequestMetrics | None = None  # the pyllama:* histograms, with --metrics

    def record(self, event) -> None:
        t = event.timings
        with self.lock:
            self.prompt_tokens_total += t.prompt_n
            self.prompt_tokens_cached_total += t.cache_n
            self.prompt_seconds_total += t.prompt_ms / 1e3
            self.tokens_predicted_total += t.predicted_n
            self.tokens_predicted_seconds_total += t.predicted_ms / 1e3
            self.n_tokens_max = max(self.n_tokens_max, event.tokens_cached)
            self.window_prompt_tokens += t.prompt_n
            self.window_prompt_seconds += t.prompt_ms / 1e3
            self.window_predicted_tokens += max(0, t.predicted_n - 1)
            self.window_predicted_seconds += t.predicted_ms / 1e3


def sampling_defaults(s: Settings) -> SamplingParams:
    samplers = parse_samplers(s.sampling_seq) if s.sampling_seq else parse_samplers(s.samplers.split(";"))
    breakers = DEFAULT_DRY_BREAKERS
    if s.dry_sequence_breaker:
        breakers = () if list(s.dry_sequence_breaker) == ["none"] else tuple(s.dry_sequence_breaker)
    bias = []
    for item in s.logit_bias:  # TOKEN_ID(+/-)BIAS, e.g. 15043+1 or 15043-inf
        match = re.fullmatch(r"(\d+)([+-](?:inf|\d*\.?\d+(?:[eE][+-]?\d+)?))", item.strip())
        if not match:
            raise ValueError(f"invalid --logit-bias {item!r}: expected TOKEN_ID(+/-)BIAS")
        bias.append((int(match.group(1)), float(match.group(2))))
    return SamplingParams(
        temperature=max(0.0, s.temp), dynatemp_range=s.dynatemp_range, dynatemp_exponent=s.dynatemp_exp,
        top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, typical_p=s.typical, top_n_sigma=s.top_nsigma,
        xtc_probability=s.xtc_probability, xtc_threshold=s.xtc_threshold, repeat_last_n=s.repeat_last_n,
        repeat_penalty=s.repeat_penalty, presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty, dry_multiplier=s.dry_multiplier, dry_base=s.dry_base,
        dry_allowed_length=s.dry_allowed_length, dry_penalty_last_n=s.dry_penalty_last_n,
        dry_sequence_breakers=breakers, mirostat=s.mirostat, mirostat_tau=s.mirostat_ent,
        mirostat_eta=s.mirostat_lr, adaptive_target=s.adaptive_target, adaptive_decay=s.adaptive_decay,
        seed=s.seed, logit_bias=tuple(bias), ignore_eos=s.ignore_eos,
        samplers=samplers, grammar=s.grammar, json_schema=s.json_schema or None,
        backend_sampling=s.backend_sampling, reasoning_budget_tokens=s.reasoning_budget)


# common.h's FFN offload patterns (--cpu-moe, --n-cpu-moe, --n-cpu-ffn)
FFN_EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"
FFN_DENSE_REGEX = r"\.ffn_(up|down|gate)\."


def tensor_overrides(s: Settings) -> tuple:
    """-ot's pattern=buffer pairs, then what --cpu-moe / --n-cpu-moe / --n-cpu-ffn add."""
    out = [tuple(item.split("=", 1)) for item in s.override_tensor]
    if s.cpu_moe:
        out.append((FFN_EXPS_REGEX, "CPU"))
    out += [(rf"blk\.{i}{FFN_EXPS_REGEX}", "CPU") for i in range(s.n_cpu_moe)]
    out += [(rf"blk\.{i}{FFN_DENSE_REGEX}", "CPU") for i in range(s.n_cpu_ffn)]
    return tuple(out)


def spec_config(s: Settings) -> SpecConfig | None:
    """--spec-type, -md and the --spec-* flags (common_params_speculative), or None without a type."""
    if not s.spec_type:
        return None
    ngl = {"auto": -1, "all": -2}.get(s.spec_draft_ngl)
    overrides = [tuple(item.split("=", 1)) for item in s.spec_draft_override_tensor]
    if s.spec_draft_cpu_moe:
        overrides.append((FFN_EXPS_REGEX, "CPU"))
    overrides += [(rf"blk\.{i}{FFN_EXPS_REGEX}", "CPU") for i in range(s.spec_draft_n_cpu_moe)]
    # common_base_params_to_speculative: only the draft's thread counts replace the target's
    threads = s.spec_draft_threads if s.spec_draft_threads > 0 else None
    threads_batch = s.spec_draft_threads_batch if s.spec_draft_threads_batch > 0 else None
    rates = tuple(float(v) for v in s.spec_synth_rates.split(",")) if s.spec_synth_rates else ()
    return SpecConfig(
        types=tuple(s.spec_type), draft_model=s.spec_draft_model,
        draft_n_gpu_layers=int(s.spec_draft_ngl) if ngl is None else ngl,
        draft_devices=tuple(s.spec_draft_device.split(",")) if s.spec_draft_device else None,
        draft_tensor_overrides=tuple(overrides), draft_type_k=s.spec_draft_type_k, draft_type_v=s.spec_draft_type_v,
        draft_n_threads=threads, draft_n_threads_batch=threads_batch,
        n_max=s.spec_draft_n_max, n_min=s.spec_draft_n_min, p_split=s.spec_draft_p_split, p_min=s.spec_draft_p_min,
        backend_sampling=s.spec_draft_backend_sampling,
        ngram_simple=(s.spec_ngram_simple_size_n, s.spec_ngram_simple_size_m, s.spec_ngram_simple_min_hits),
        ngram_map_k=(s.spec_ngram_map_k_size_n, s.spec_ngram_map_k_size_m, s.spec_ngram_map_k_min_hits),
        ngram_map_k4v=(s.spec_ngram_map_k4v_size_n, s.spec_ngram_map_k4v_size_m, s.spec_ngram_map_k4v_min_hits),
        ngram_mod=(s.spec_ngram_mod_n_match, s.spec_ngram_mod_n_max, s.spec_ngram_mod_n_min),
        lookup_cache_static=s.lookup_cache_static, lookup_cache_dynamic=s.lookup_cache_dynamic,
        synth_len=float(s.spec_synth_len) if s.spec_synth_len else -1.0, synth_rates=rates)


def spec_types_name(s: Settings) -> str:
    """The "speculative.types" of a request's params: common_speculative_type_name_str of the
    server's types, which --spec-type appends to the default {none} (e.g. "none,ngram-mod")."""
    if not s.spec_type or "none" in s.spec_type:
        return "none"
    return ",".join(("none",) + tuple(s.spec_type))


def engine_config(s: Settings) -> EngineConfig:
    """The engine options of a command line: the one place flags become engine fields."""
    ngl = {"auto": -1, "all": -2}.get(s.n_gpu_layers)  # -1 is what --fit may lower
    n_ctx = s.ctx_size
    if s.kv_unified_per_slot > 0 and n_ctx == 0:
        n_ctx = s.parallel * s.kv_unified_per_slot
    return EngineConfig(
        n_parallel=s.parallel, n_ctx=n_ctx, n_ctx_slot_max=s.kv_unified_per_slot,
        n_batch=s.ubatch_size if s.embedding else s.batch_size, n_ubatch=s.ubatch_size,
        n_threads=None if s.threads < 0 else s.threads or os.cpu_count(),
        n_threads_batch=None if s.threads_batch < 0 else s.threads_batch or os.cpu_count(),
        cpu=CpuPlacement(s.cpu_mask, s.cpu_range, bool(s.cpu_strict), s.prio, s.poll),
        cpu_batch=CpuPlacement(s.cpu_mask_batch, s.cpu_range_batch, bool(s.cpu_strict_batch),
                               s.prio_batch, s.poll_batch),
        perf=s.perf, warmup=s.warmup, tensor_overrides=tensor_overrides(s),
        fit=s.fit == "on", fit_target_mib=tuple(int(v) for v in s.fit_target.replace("/", ",").split(",") if v),
        fit_ctx_min=s.fit_ctx, sleep_idle_seconds=s.sleep_idle_seconds,
        control_vectors=tuple((p, 1.0) for p in s.control_vector) + tuple(
            (item.partition(":")[0], float(item.partition(":")[2])) for item in s.control_vector_scaled),
        control_vector_layers=s.control_vector_layer_range,
        flash_attn=s.flash_attn, type_k=s.cache_type_k, type_v=s.cache_type_v,
        kv_unified=bool(s.kv_unified), swa_full=s.swa_full,
        n_gpu_layers=int(s.n_gpu_layers) if ngl is None else ngl, use_mmap=s.mmap, use_mlock=s.mlock,
        repack=s.repack, n_predict=-1, ctx_shift=s.context_shift,
        slot_prompt_similarity=s.slot_prompt_similarity, embeddings=s.embedding,
        cache_ram_mib=s.cache_ram, cache_idle_slots=s.cache_idle_slots, n_cache_reuse=s.cache_reuse,
        n_ctx_checkpoints=s.ctx_checkpoints, checkpoint_min_step=s.checkpoint_min_step,
        pooling=s.pooling or None, kv_overrides=s.kv_override_map(), load_mode=s.load_mode or None,
        check_tensors=s.check_tensors, lazy_mode=s.lazy_mode, split_mode=s.split_mode,
        main_gpu=s.main_gpu,
        tensor_split=tuple(float(x) for x in s.tensor_split.replace("/", ",").split(","))
        if s.tensor_split else None,
        no_host=s.no_host, devices=tuple(s.device.split(",")) if s.device else None,
        rpc_servers=tuple(x for x in s.rpc.split(",") if x),
        lora=tuple(s.lora_list()), lora_init_without_apply=s.lora_init_without_apply,
        rope_scaling=s.rope_scaling or None, rope_freq_base=s.rope_freq_base,
        rope_freq_scale=1.0 / s.rope_scale if s.rope_scale else s.rope_freq_scale,
        yarn_orig_ctx=s.yarn_orig_ctx, yarn_ext_factor=s.yarn_ext_factor,
        yarn_attn_factor=s.yarn_attn_factor, yarn_beta_slow=s.yarn_beta_slow,
        yarn_beta_fast=s.yarn_beta_fast, offload_kqv=s.kv_offload, op_offload=s.op_offload,
        speculative=spec_config(s),
        # -mmdev wins over --mmproj-offload: "none" keeps the projector on the CPU, a device
        # name offloads it there (arg.cpp's -mmdev handler)
        mmproj=s.mmproj, mmproj_use_gpu=s.mmproj_offload if not s.mmproj_device else s.mmproj_device != "none",
        mmproj_device=s.mmproj_device or None, image_min_tokens=s.image_min_tokens,
        image_max_tokens=s.image_max_tokens, mtmd_batch_max_tokens=s.mtmd_batch_max_tokens,
        media_marker=info_json.media_marker(), video_fps=s.video_fps,
        video_timestamp_interval_ms=s.video_timestamp_interval, video_ffmpeg_dir=s.video_ffmpeg_dir)


class ServerState:
    """What every resource shares: settings, the engine once loaded, templates, metrics."""

    def __init__(self, settings: Settings, model_path: str) -> None:
        self.settings = settings
        self.model_path = model_path
        self.model_name = sorted(a for a in settings.alias.split(",") if a)[0] if settings.alias else \
            (settings.model or os.path.basename(model_path))
        self.aliases = sorted(a for a in settings.alias.split(",") if a)
        self.engine: Engine | None = None
        self.chat: ChatFormatter | None = None
        self.protocol: ProtocolContext | None = None  # set once the model is loaded
        # --sleep-idle-seconds: /props and /models while the model is unloaded, as taken just
        # before it was (server_routes::update_cached_responses)
        self.cached_props: dict | None = None
        self.cached_models: dict | None = None
        self.defaults = Defaults(sampling=sampling_defaults(settings), n_predict=settings.n_predict,
                                 n_keep=settings.keep, cache_prompt=settings.cache_prompt,
                                 stop=tuple(settings.reverse_prompt), special=settings.special,
                                 reasoning_budget_message=settings.reasoning_budget_message,
                                 spec_types=spec_types_name(settings))
        self.defaults.verbose = settings.verbose or settings.verbosity > 9  # -v is every level
        self.metrics = Metrics()
        if settings.metrics:
            self.metrics.requests = RequestMetrics()
        self.liveness_timeout = health.liveness_timeout()  # /health's stall bound (server/health.py)
        self.live_calls: dict = {}  # completion id -> the Call, while it runs (control)
        self.ready = threading.Event()
        self.start_us = time.monotonic_ns() // 1000
        self.created = int(time.time())
        self.build_info = build_info()  # upstream's llama_build_info(): b<build>-<commit>
        self.streams = StreamStore()  # X-Conversation-Id sessions (server/stream_store.py)

    @property
    def model(self):
        return self.engine.model

    def require_ready(self) -> Engine:
        if not self.ready.is_set():
            raise UnavailableError("Loading model")
        return self.engine

    def respond(self, resp: falcon.Response, call) -> None:
        """Run a protocol Call on the engine and write its response or stream into `resp`."""
        cmpl_id = getattr(call, "id", None)
        if not cmpl_id:
            respond(resp, self.engine, call, self.metrics, self.settings.sse_ping_interval)
            return
        self.live_calls[cmpl_id] = call  # for /v1/chat/completions/control, until it ends
        forget = functools.partial(self.live_calls.pop, cmpl_id, None)
        try:
            respond(resp, self.engine, call, self.metrics, self.settings.sse_ping_interval, on_end=forget)
        finally:
            if resp.stream is None:
                forget()

    def end_reasoning(self, cmpl_id: str) -> str:
        """Force the end of thinking in a live completion: the engine's answer for its first
        running request ("ok", "not_enabled", "not_running")."""
        call = self.live_calls.get(cmpl_id)
        answer = "not_running"
        for task in call.tasks if call is not None else ():
            answer = self.engine.end_reasoning(task.request.id)
            if answer != "not_running":
                break
        return answer

    def make_chat(self, model) -> ChatFormatter:
        """The chat templates the flags ask for, over a loaded model's vocabulary."""
        s = self.settings
        kwargs = json.loads(s.chat_template_kwargs) if s.chat_template_kwargs else {}
        if s.reasoning_effort != "default":  # a default template kwarg, as upstream's flag sets it
            kwargs["reasoning_effort"] = s.reasoning_effort
        if s.reasoning != "auto":  # -rea on/off: also the enable_thinking kwarg (arg.cpp)
            kwargs["enable_thinking"] = s.reasoning == "on"
        # upstream sets preserve_reasoning unless it was given (common_params_parse_ex)
        kwargs.setdefault("preserve_reasoning", True if s.reasoning_preserve is None else s.reasoning_preserve)
        chat = ChatFormatter(model, s.chat_template or "", use_jinja=s.jinja,
                             reasoning_format=s.reasoning_format, template_kwargs=kwargs,
                             prefill_assistant=s.prefill_assistant, force_pure_content=s.skip_chat_parsing,
                             enable_reasoning=s.reasoning != "off")
        caps = chat.caps
        if caps.get("supports_preserve_reasoning"):  # upstream's start-up hints
            if s.reasoning_preserve is None:
                logger.warning("chat template supports preserving reasoning, it is enabled by default "
                               "(may use more tokens, disable via --no-reasoning-preserve)")
            if not kwargs.get("preserve_reasoning"):
                logger.info("chat template supports preserving reasoning, consider enabling it via "
                            "--reasoning-preserve")
        elif s.reasoning_preserve:
            logger.warning("chat template does NOT support preserving reasoning, --reasoning-preserve has no effect")
        return chat

    def make_protocol(self) -> ProtocolContext:
        """The protocol context over the loaded engine and chat templates."""
        s, engine = self.settings, self.engine
        return ProtocolContext(
            model=engine.model, n_slots=engine.n_slots, n_ctx_slot=engine.n_ctx_slot,
            defaults=self.defaults, chat=self.chat, model_name=self.model_name,
            fingerprint=self.build_info, n_batch=s.batch_size, spm_infill=s.spm_infill,
            embd_normalize=s.embd_normalize, embeddings=engine.embeddings,
            pooling=engine.embedder.pooling_name if engine.embeddings else "",
            n_ubatch=engine.embedder.n_ubatch if engine.embeddings else 0,
            media=engine.media, media_path=s.media_path)

    def load(self) -> None:
        """Load the model and start the engine (worker process, background thread)."""
        s = self.settings
        if s.numa:
            from pyllama.engine import numa_init

            numa_init(s.numa)
        self.engine = Engine(self.model_path, engine_config(s))
        if self.metrics.requests is not None:
            self.metrics.requests.bind(self.model_name, self.engine.n_ctx_slot)
        # /metrics' Process-Start-Time-Unix: ggml_time_us() (CLOCK_MONOTONIC) when the model is
        # loaded, as server_context's metrics.init() in load_model
        self.start_us = time.monotonic_ns() // 1000
        embeddings = s.embedding
        with self.engine.using():  # --sleep-idle-seconds: the model stays loaded meanwhile
            if not embeddings:
                self.chat = self.make_chat(self.engine.model)
            self.protocol = self.make_protocol()
            self.engine.on_sleeping_state(self._on_sleeping_state)
        self.ready.set()
        logger.info("model loaded: %s, %d slots of %d tokens", self.model_name, self.engine.n_slots,
                    self.engine.n_ctx_slot)

    def _on_sleeping_state(self, sleeping: bool) -> None:
        # Engine thread (Engine.on_sleeping_state). Going to sleep, the model still loaded: keep
        # what /props and /models answer meanwhile (update_cached_responses). Woken: a protocol
        # context over the reloaded model; the chat templates stay, as upstream's chat_params
        # ("reused across sleeping / resuming states").
        if sleeping:
            self.cached_props = dict(info_json.props(self.protocol, self.settings, self.model_path),
                                     is_sleeping=True)
            self.cached_models = info_json.models(self.engine, self.protocol, self.aliases, self.settings.tags)
        else:
            self.protocol = self.make_protocol()

    def props(self) -> dict:
        """GET /props: live while the model is loaded, else the answer kept when it went to sleep
        (get_props; reading it neither wakes the model nor restarts the idle period)."""
        return self._live_or_kept(lambda: info_json.props(self.protocol, self.settings, self.model_path),
                                  "cached_props")

    def models(self) -> dict:
        """GET /models, /v1/models: as props(), live or kept (get_models)."""
        return self._live_or_kept(
            lambda: info_json.models(self.engine, self.protocol, self.aliases, self.settings.tags), "cached_models")

    def _live_or_kept(self, live, kept: str) -> dict:
        if self.settings.sleep_idle_seconds < 0:
            return live()
        with self.engine.using(wake=False) as awake:  # the model is not unloaded meanwhile
            if awake:
                return live()
        return getattr(self, kept)

    def close(self) -> None:
        self.streams.stop()
        if self.engine is not None:
            self.engine.close(timeout=30)


def start_loading(state: ServerState, on_failure=None) -> threading.Thread:
    def run():
        try:
            state.load()
        except BaseException as exc:
            logger.error("failed to load the model: %s", exc)
            if on_failure is not None:
                on_failure(exc)

    thread = threading.Thread(target=run, name="pyllama-loader", daemon=True)
    thread.start()
    return thread


def create_app(state: ServerState) -> falcon.App:
    """The WSGI app over a ServerState (the model may still be loading)."""
    from pyllama.server.resources import (anthropic, chat, completions, embeddings, features, info, responses,
                                          streams, tokenize, vertex)
    from pyllama.server.resources import transcriptions as transcriptions_resource

    s = state.settings
    static = [StaticFiles(s.path, s.api_prefix)] if s.path and s.webui else []  # --path, UI on
    requests = state.metrics.requests
    counted = [HttpMetrics(requests)] if requests is not None else []  # first: sees every answer
    app = falcon.App(middleware=[*counted, RequestLine(), CorsAndAuth(state), MethodRouting(), *static,
                                 SleepGuard(state), JSONBody(state.settings.max_body_mb << 20), GenerationHooks(state),
                                 ConnectionWatch()],
                     cors_enable=False)
    app.req_options.strip_url_path_trailing_slash = True
    app.resp_options.default_media_type = "application/json; charset=utf-8"
    server_errors.register(app)
    prefix = state.settings.api_prefix.rstrip("/")

    health = info.HealthResource(state)
    models = info.ModelsResource(state)
    completion = completions.CompletionResource(state)
    oai_completion = completions.OAICompletionResource(state)
    chat_resource = chat.ChatResource(state)
    embedding = embeddings.EmbeddingResource(state)
    rerank = embeddings.RerankResource(state)
    responses_resource = responses.ResponsesResource(state)
    responses_tokens = responses.ResponsesInputTokensResource(state)
    # The route table (tools/server/server.cpp).
    routes = [
        ("/health", health), ("/v1/health", health),
        ("/models", models), ("/v1/models", models),
        ("/props", info.PropsResource(state)),
        ("/slots", info.SlotsResource(state)),
        ("/slots/{id_slot}", info.SlotActionResource(state)),
        ("/metrics", info.MetricsResource(state)),
        ("/completion", completion), ("/completions", completion),
        ("/v1/completions", oai_completion),
        ("/infill", completions.InfillResource(state)),
        ("/chat/completions", chat_resource), ("/v1/chat/completions", chat_resource),
        ("/v1/chat/completions/control", chat.ChatControlResource(state)),
        ("/chat/completions/input_tokens", chat.ChatInputTokensResource(state)),
        ("/v1/chat/completions/input_tokens", chat.ChatInputTokensResource(state)),
        ("/v1/messages", anthropic.MessagesResource(state)),
        ("/v1/messages/count_tokens", anthropic.CountTokensResource(state)),
        ("/v1/responses", responses_resource), ("/responses", responses_resource),
        ("/responses/input_tokens", responses_tokens), ("/v1/responses/input_tokens", responses_tokens),
        ("/apply-template", chat.ApplyTemplateResource(state)),
        ("/lora-adapters", info.LoraAdaptersResource(state)),
        ("/tokenize", tokenize.TokenizeResource(state)),
        ("/detokenize", tokenize.DetokenizeResource(state)),
        ("/embedding", embedding), ("/embeddings", embedding),
        ("/v1/embeddings", embeddings.OAIEmbeddingResource(state)),
        ("/rerank", rerank), ("/reranking", rerank), ("/v1/rerank", rerank), ("/v1/reranking", rerank),
    ]
    transcriptions = transcriptions_resource.TranscriptionsResource(state)  # 501 without an audio projector
    routes += [
        ("/v1/audio/transcriptions", transcriptions), ("/audio/transcriptions", transcriptions),
        ("/v1/stream", streams.StreamResource(state)),  # GET replays, DELETE stops
        ("/v1/streams/lookup", streams.StreamsLookupResource(state)),
    ]
    for path, resource in routes:
        app.add_route(prefix + path, resource)
    # After the table, as server.cpp: Vertex AI's routes (register_gcp_compat), which reach
    # every route above and no later one; the features that are off; the UI's /sw.js.
    gcp = GcpParams.from_env()
    if gcp.enabled:
        table = {re.sub(r"\{(\w+)\}", r":\1", path): next(m for m in ("GET", "POST", "DELETE")
                                                         if hasattr(resource, "on_" + m.lower()))
                 for path, resource in routes}
        if gcp.path_predict in table:
            logger.error("AIP_PREDICT_ROUTE=%s conflicts with an existing llama-server route", gcp.path_predict)
            raise SystemExit(3)  # gunicorn's WORKER_BOOT_ERROR: the arbiter stops (upstream exits)
        if gcp.path_health and gcp.path_health not in table:
            app.add_route(prefix + gcp.path_health, health)
        app.add_route(prefix + gcp.path_predict, vertex.PredictResource(app, table, prefix))
    disabled = features.DisabledFeatureResource()  # no --ui-mcp-proxy, --tools, MCP servers: 403
    app.add_route(prefix + "/cors-proxy", disabled)
    app.add_route(prefix + "/tools", disabled)
    # The built-in UI (server/ui.py); while it is off or replaced by --path, a browser that used
    # it gets a service worker that removes itself (a sw.js in --path's folder is served first).
    ui.log_startup(s)
    if ui.serves_builtin(s):
        ui.add_routes(app, prefix, ui.bundle())
    if not s.webui or s.path:
        app.add_route(prefix + "/sw.js", ServiceWorkerResource())
    return app
