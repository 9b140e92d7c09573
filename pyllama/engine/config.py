"""EngineConfig: every option of an Engine, its model and its context, spelled once.

Each field says where it goes: the Model (llama_model_params), the Context
(llama_context_params) or the engine loop itself. `Engine` builds its Model and Context from
`model_options()` and `context_options()`, so a new libllama parameter is added here once.
Imports: stdlib only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

_MODEL = "model"
_CONTEXT = "context"
_ENGINE = "engine"


def _to(target: str, default, **kwargs):
    return field(default=default, metadata={"to": target}, **kwargs)


@dataclass(frozen=True)
class CpuPlacement:
    """Where and how the CPU backend's threads run (llama-server's -C/-Cr/--cpu-strict/--prio/
    --poll, and their -batch twins): common_cpu_params.

    mask: hex affinity mask ("" = any CPU); range: "lo-hi" CPUs added to the mask;
    strict: one CPU per thread in mask order; prio: -1 low, 0 normal, 1 medium, 2 high,
    3 realtime; poll: 0-100, how long idle threads busy-wait for work.
    """

    mask: str = ""
    range: str = ""
    strict: bool = False
    prio: int = 0
    poll: int = 50


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding, as llama-server's --spec-* flags set it (common_params_speculative).

    types: the --spec-type names ("draft-simple", "ngram-simple", "ngram-map-k",
        "ngram-map-k4v", "ngram-mod", "ngram-cache"; "none" or none: off).
    draft_model: the draft model's path (-md); draft-simple needs one.
    draft_n_gpu_layers, draft_devices, draft_tensor_overrides: the draft model's placement
        (-ngld, -devd, -otd / -cmoed / -ncmoed); None devices = the target's.
    draft_type_k, draft_type_v: the draft context's KV cache types (-ctkd, -ctvd).
    draft_n_threads, draft_n_threads_batch, draft_cpu, draft_cpu_batch: its threads
        (-td, -tbd, -Cd/-Crd/..., -Cbd/...); None = the target's.
    n_max, n_min, p_split, p_min, backend_sampling: the draft model's draft length bounds,
        split and least probability (--spec-draft-*).
    ngram_simple, ngram_map_k, ngram_map_k4v: (size_n, size_m, min_hits) of each n-gram type.
    ngram_mod: (n_match, n_max, n_min) of ngram-mod.
    lookup_cache_static, lookup_cache_dynamic: ngram-cache's files (-lcs, -lcd).
    synth_len, synth_rates: synthetic acceptance for benchmarks (--spec-synth-*).
    """

    types: tuple = ()
    draft_model: str = ""
    draft_n_gpu_layers: int = -1
    draft_devices: tuple | None = None
    draft_tensor_overrides: tuple = ()
    draft_type_k: str = "f16"
    draft_type_v: str = "f16"
    draft_n_threads: int | None = None
    draft_n_threads_batch: int | None = None
    draft_cpu: CpuPlacement | None = None
    draft_cpu_batch: CpuPlacement | None = None
    n_max: int = 3
    n_min: int = 0
    p_split: float = 0.1
    p_min: float = 0.0
    backend_sampling: bool = True
    ngram_simple: tuple = (12, 48, 1)
    ngram_map_k: tuple = (12, 48, 1)
    ngram_map_k4v: tuple = (12, 48, 1)
    ngram_mod: tuple = (24, 64, 48)
    lookup_cache_static: str = ""
    lookup_cache_dynamic: str = ""
    synth_len: float = -1.0
    synth_rates: tuple = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("types", "draft_tensor_overrides", "ngram_simple", "ngram_map_k", "ngram_map_k4v",
                     "ngram_mod", "synth_rates"):
            set_(self, name, tuple(tuple(v) if isinstance(v, list) else v for v in getattr(self, name)))
        if self.draft_devices is not None:
            set_(self, "draft_devices", tuple(self.draft_devices))

    @property
    def enabled(self) -> bool:
        """Whether any type is asked for ("none" anywhere turns every type off, as upstream)."""
        return bool(self.types) and "none" not in self.types

    @property
    def needs_draft_model(self) -> bool:
        return self.enabled and "draft-simple" in self.types

    def bridge_params(self) -> dict:
        """The JSON object of csrc/pyllama_spec.h's pyllama_spec_init."""
        def ngram_map(v):
            return {"size_n": int(v[0]), "size_m": int(v[1]), "min_hits": int(v[2])}
        out = {
            "types": list(self.types),
            "draft": {"n_max": self.n_max, "n_min": self.n_min, "p_split": self.p_split, "p_min": self.p_min,
                      "backend_sampling": self.backend_sampling},
            "ngram_simple": ngram_map(self.ngram_simple), "ngram_map_k": ngram_map(self.ngram_map_k),
            "ngram_map_k4v": ngram_map(self.ngram_map_k4v),
            "ngram_mod": {"n_match": int(self.ngram_mod[0]), "n_max": int(self.ngram_mod[1]),
                          "n_min": int(self.ngram_mod[2])},
            "ngram_cache": {"static": self.lookup_cache_static, "dynamic": self.lookup_cache_dynamic},
            "synth_len": self.synth_len,
            "synth_rates": list(self.synth_rates),
        }
        return out


@dataclass(frozen=True)
class EngineConfig:
    """The options of one Engine; defaults equal Model's, Context's and llama-server's.

    Engine loop:
        n_parallel: slots (sequences) served at once; the context's n_seq_max.
        n_predict: default cap for requests that set none (-1 = unlimited).
        ctx_shift: shift the context instead of stopping when a slot fills.
        slot_prompt_similarity: prefix share needed to pick a slot by its cache.
        cache_ram_mib: host-RAM prompt cache size limit in MiB; -1 no limit, 0 no cache
            (--cache-ram).
        cache_idle_slots: save idle slots to the prompt cache when a request starts, and clear
            them with kv_unified (--cache-idle-slots; needs the prompt cache).
        n_cache_reuse: the least chunk of a slot's cache, past the common prefix, that a
            request reuses by shifting its KV cells into place (--cache-reuse; 0 = off). A
            request's own n_cache_reuse wins.
        n_ctx_checkpoints: context checkpoints kept per slot (--ctx-checkpoints; 0 = none),
            made while a prompt is processed where the memory cannot be cut back (SWA or
            recurrent layers), so a later prompt that diverges inside the window resumes there.
        checkpoint_min_step: least tokens between checkpoints (--checkpoint-min-step).
        n_threads_sampling: threads sampling slots in parallel (None = the context's n_threads).
        lora: ((path, scale), ...) LoRA adapters to load; their ids are their positions.
        lora_init_without_apply: start every adapter at scale 0 (until set_lora_scales).
        n_ctx_slot_max: cap each slot's context (llama-server's --kv-unified-per-slot); 0 = none.
        warmup: run BOS/EOS through the model once before serving (--warmup / --no-warmup).
        fit, fit_target_mib, fit_ctx_min: fit the options left at their defaults (GPU layers,
            tensor split, overrides, n_ctx = 0) to free device memory before loading, leaving
            that many MiB free per device, with n_ctx no lower than fit_ctx_min (--fit,
            --fit-target, --fit-ctx).
        mmproj: the multimodal projector GGUF (--mmproj); "" none. Loaded after the model
            with libmtmd (MediaContext): images / audio in prompts (Request.media).
        mmproj_use_gpu, mmproj_device: offload the projector (--mmproj-offload), and to
            which device (-mmdev; None follows the model's first device).
        image_min_tokens, image_max_tokens: tokens per image for dynamic-resolution vision
            models (-1: the model's; --image-min-tokens / --image-max-tokens).
        mtmd_batch_max_tokens: media tokens per encode batch (--mtmd-batch-max-tokens).
        media_marker: the text that stands for one media file in a prompt ("" libmtmd's).
        video_fps, video_timestamp_interval_ms, video_ffmpeg_dir: video decoding through
            ffmpeg (--video-*; -1 / "" the defaults).
        sleep_idle_seconds: unload the model, context, KV and prompt cache after that many
            seconds without work and load them again on the next use; -1 never
            (--sleep-idle-seconds; see Engine.acquire).
        speculative: SpecConfig (--spec-type, -md, --spec-*), or None for none.

    Model (see `Model`):
        n_gpu_layers: layers to offload; -1 all.
        use_mmap, use_mlock: map the file / keep it in RAM (load_mode, when set, wins).
        repack: let the CPU backend repack weights (--repack).
        check_tensors: validate tensor data while loading.
        kv_overrides: {key: value} metadata overrides (--override-kv).
        load_mode: None or auto, none, mmap, mlock, mmap+mlock, dio.
        lazy_mode: on, off or auto.
        split_mode, main_gpu, tensor_split, no_host: multi-GPU placement.
        devices: device names to offload to; None every device, ("none",) none.
        rpc_servers: ("host:port", ...) ggml RPC servers whose devices are registered before
            the load (--rpc): remote devices RPC0, RPC1, ... for devices / tensor_split.
        tensor_overrides: ((regex, buffer type), ...) placement of matching tensors (-ot).

    Context (see `Context`):
        n_ctx: total context; 0 = the model's training context. Each slot gets n_ctx /
            n_parallel, or the whole n_ctx with kv_unified.
        n_batch, n_ubatch: logical and physical batch sizes.
        n_threads, n_threads_batch: generation and prompt threads (None = the physical cores).
        cpu, cpu_batch: CpuPlacement of those threads (None = upstream's defaults).
        perf: libllama's internal performance timings (--perf / --no-perf).
        control_vectors, control_vector_layers: ((path, scale), ...) and (start, end): control
            vectors and the layers they steer (--control-vector*).
        flash_attn: "auto", "on" or "off" (a bool is accepted).
        type_k, type_v: KV cache types ("f16", "q8_0", ...).
        kv_unified: one KV buffer shared by every slot.
        swa_full: full-size cache for sliding-window attention layers.
        embeddings: an embedding engine (`Engine.embed()`), not a generation one.
        pooling: with embeddings: None (the model's), "none", "mean", "cls", "last", "rank".
        offload_kqv, op_offload: keep the KV cache / host-tensor ops on the GPU.
        rope_scaling, rope_freq_base, rope_freq_scale, yarn_orig_ctx, yarn_ext_factor,
            yarn_attn_factor, yarn_beta_slow, yarn_beta_fast: RoPE / YaRN overrides
            (None / 0 / negative = the model's).
    """

    # --- the engine loop ---
    n_parallel: int = _to(_ENGINE, 1)
    n_predict: int = _to(_ENGINE, -1)
    ctx_shift: bool = _to(_ENGINE, False)
    slot_prompt_similarity: float = _to(_ENGINE, 0.1)
    cache_ram_mib: int = _to(_ENGINE, 8192)
    cache_idle_slots: bool = _to(_ENGINE, True)
    n_cache_reuse: int = _to(_ENGINE, 0)
    n_ctx_checkpoints: int = _to(_ENGINE, 32)
    checkpoint_min_step: int = _to(_ENGINE, 8192)
    n_threads_sampling: int | None = _to(_ENGINE, None)
    lora: tuple = _to(_ENGINE, ())
    lora_init_without_apply: bool = _to(_ENGINE, False)
    n_ctx_slot_max: int = _to(_ENGINE, 0)
    warmup: bool = _to(_ENGINE, True)
    fit: bool = _to(_ENGINE, True)
    fit_target_mib: tuple = _to(_ENGINE, (1024,))
    fit_ctx_min: int = _to(_ENGINE, 4096)
    sleep_idle_seconds: int = _to(_ENGINE, -1)
    speculative: SpecConfig | None = _to(_ENGINE, None)
    # --- the multimodal projector (libmtmd) ---
    mmproj: str = _to(_ENGINE, "")
    mmproj_use_gpu: bool = _to(_ENGINE, True)
    mmproj_device: str | None = _to(_ENGINE, None)
    image_min_tokens: int = _to(_ENGINE, -1)
    image_max_tokens: int = _to(_ENGINE, -1)
    mtmd_batch_max_tokens: int = _to(_ENGINE, 1024)
    media_marker: str = _to(_ENGINE, "")
    video_fps: float = _to(_ENGINE, -1.0)
    video_timestamp_interval_ms: int = _to(_ENGINE, -1)
    video_ffmpeg_dir: str = _to(_ENGINE, "")
    # --- the model ---
    n_gpu_layers: int = _to(_MODEL, -1)
    use_mmap: bool = _to(_MODEL, True)
    use_mlock: bool = _to(_MODEL, False)
    repack: bool = _to(_MODEL, True)
    check_tensors: bool = _to(_MODEL, False)
    kv_overrides: dict | None = _to(_MODEL, None)
    load_mode: str | None = _to(_MODEL, None)
    lazy_mode: str = _to(_MODEL, "auto")
    split_mode: str = _to(_MODEL, "layer")
    main_gpu: int = _to(_MODEL, 0)
    tensor_split: tuple | None = _to(_MODEL, None)
    no_host: bool = _to(_MODEL, False)
    devices: tuple | None = _to(_MODEL, None)
    rpc_servers: tuple = _to(_ENGINE, ())
    tensor_overrides: tuple = _to(_MODEL, ())
    # --- the context ---
    n_ctx: int = _to(_CONTEXT, 4096)
    n_batch: int = _to(_CONTEXT, 2048)
    n_ubatch: int = _to(_CONTEXT, 512)
    n_threads: int | None = _to(_CONTEXT, None)
    n_threads_batch: int | None = _to(_CONTEXT, None)
    flash_attn: str = _to(_CONTEXT, "auto")
    type_k: str = _to(_CONTEXT, "f16")
    type_v: str = _to(_CONTEXT, "f16")
    kv_unified: bool = _to(_CONTEXT, False)
    swa_full: bool = _to(_CONTEXT, False)
    embeddings: bool = _to(_CONTEXT, False)
    pooling: str | None = _to(_CONTEXT, None)
    offload_kqv: bool = _to(_CONTEXT, True)
    op_offload: bool = _to(_CONTEXT, True)
    rope_scaling: str | None = _to(_CONTEXT, None)
    rope_freq_base: float = _to(_CONTEXT, 0.0)
    rope_freq_scale: float = _to(_CONTEXT, 0.0)
    yarn_orig_ctx: int = _to(_CONTEXT, 0)
    yarn_ext_factor: float = _to(_CONTEXT, -1.0)
    yarn_attn_factor: float = _to(_CONTEXT, -1.0)
    yarn_beta_slow: float = _to(_CONTEXT, -1.0)
    yarn_beta_fast: float = _to(_CONTEXT, -1.0)
    cpu: CpuPlacement | None = _to(_CONTEXT, None)
    cpu_batch: CpuPlacement | None = _to(_CONTEXT, None)
    perf: bool = _to(_CONTEXT, True)
    control_vectors: tuple = _to(_CONTEXT, ())
    control_vector_layers: tuple = _to(_CONTEXT, (0, 0))

    def __post_init__(self) -> None:
        # Sequences become tuples, so a config is a value (lists given by callers are copied).
        set_ = object.__setattr__
        set_(self, "lora", tuple((str(path), float(scale)) for path, scale in self.lora))
        set_(self, "tensor_overrides", tuple(tuple(o) for o in self.tensor_overrides))
        set_(self, "rpc_servers", tuple(self.rpc_servers))
        set_(self, "fit_target_mib", tuple(self.fit_target_mib))
        set_(self, "control_vectors", tuple((str(p), float(s)) for p, s in self.control_vectors))
        set_(self, "control_vector_layers", tuple(self.control_vector_layers))
        for name in ("tensor_split", "devices"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, tuple(value))
        if self.kv_overrides is not None:
            set_(self, "kv_overrides", dict(self.kv_overrides))

    @classmethod
    def field_names(cls) -> frozenset[str]:
        """The names `replace()` and `Engine(**options)` accept."""
        return frozenset(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes) -> "EngineConfig":
        """Return a copy with `changes` applied.

        Raises:
            TypeError: a name that is not an EngineConfig field.
        """
        unknown = sorted(set(changes) - self.field_names())
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def model_options(self) -> dict:
        """Keyword arguments for `Model(path, **options)`."""
        return self._for(_MODEL)

    def context_options(self) -> dict:
        """Keyword arguments for `Context(model, **options)` (n_seq_max = n_parallel)."""
        return dict(self._for(_CONTEXT), n_seq_max=self.n_parallel)

    def _for(self, target: str) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["to"] == target}
