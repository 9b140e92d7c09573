"""Settings: every llama-server flag pyllama supports, with its default and help text.

Each field carries its command-line names, its LLAMA_ARG_* environment variable and its kind in
`metadata`; cli.py builds the parser from this table, so flags, env vars and docs line up.
Field names are the long flag with underscores (`--ctx-size` -> `ctx_size`).
Imports: stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


def _flag(default, names, help, *, env=None, kind=None, neg=(), choices=None, metavar=None):
    return field(default=default, metadata=dict(names=tuple(names), env=env, help=help,
                                                kind=kind, neg=tuple(neg), choices=choices,
                                                metavar=metavar))


@dataclass(frozen=True)
class Settings:
    """The server's configuration, as llama-server's flags set it."""

    # --- model, context ----------------------------------------------------------------------
    model: str = _flag("", ["-m", "--model"], "model path (default: the bundled gemma-3-270m Q4_K_M)",
                       env="LLAMA_ARG_MODEL", metavar="FNAME")
    alias: str = _flag("", ["-a", "--alias"], "comma-separated model names for the API (default: the file name)",
                       env="LLAMA_ARG_ALIAS")
    tags: str = _flag("", ["--tags"], "comma-separated informational tags, shown in /v1/models",
                      env="LLAMA_ARG_TAGS")
    check_tensors: bool = _flag(False, ["--check-tensors"], "validate tensor data while loading", kind="flag")
    ctx_size: int = _flag(0, ["-c", "--ctx-size"], "size of the prompt context (0 = from model)",
                          env="LLAMA_ARG_CTX_SIZE")
    n_predict: int = _flag(-1, ["-n", "--predict", "--n-predict"],
                           "tokens to predict when a request sets none (-1 = infinity)",
                           env="LLAMA_ARG_N_PREDICT")
    keep: int = _flag(0, ["--keep"], "tokens to keep from the initial prompt on a context shift (-1 = all)")
    rope_scaling: str = _flag("", ["--rope-scaling"], "RoPE frequency scaling: none, linear, yarn",
                              env="LLAMA_ARG_ROPE_SCALING_TYPE", choices=["", "none", "linear", "yarn"])
    rope_scale: float = _flag(0.0, ["--rope-scale"], "RoPE context scaling factor (expands the context N times)",
                              env="LLAMA_ARG_ROPE_SCALE")
    rope_freq_base: float = _flag(0.0, ["--rope-freq-base"], "RoPE base frequency (0 = from model)",
                                  env="LLAMA_ARG_ROPE_FREQ_BASE")
    rope_freq_scale: float = _flag(0.0, ["--rope-freq-scale"], "RoPE frequency scaling factor (0 = from model)",
                                   env="LLAMA_ARG_ROPE_FREQ_SCALE")
    yarn_orig_ctx: int = _flag(0, ["--yarn-orig-ctx"], "YaRN: original context size (0 = from model)",
                               env="LLAMA_ARG_YARN_ORIG_CTX")
    yarn_ext_factor: float = _flag(-1.0, ["--yarn-ext-factor"], "YaRN: extrapolation mix factor",
                                   env="LLAMA_ARG_YARN_EXT_FACTOR")
    yarn_attn_factor: float = _flag(-1.0, ["--yarn-attn-factor"], "YaRN: attention magnitude scale",
                                    env="LLAMA_ARG_YARN_ATTN_FACTOR")
    yarn_beta_slow: float = _flag(-1.0, ["--yarn-beta-slow"], "YaRN: high correction dim",
                                  env="LLAMA_ARG_YARN_BETA_SLOW")
    yarn_beta_fast: float = _flag(-1.0, ["--yarn-beta-fast"], "YaRN: low correction dim",
                                  env="LLAMA_ARG_YARN_BETA_FAST")
    override_kv: tuple = _flag((), ["--override-kv"], "KEY=TYPE:VALUE,... metadata overrides (int, float, bool, str)",
                               kind="keys")
    lora: tuple = _flag((), ["--lora"], "LoRA adapter(s) at scale 1.0, comma-separated or repeated", kind="keys")
    lora_scaled: tuple = _flag((), ["--lora-scaled"], "LoRA adapter(s) with a scale: FNAME:SCALE,...", kind="keys")
    control_vector: tuple = _flag((), ["--control-vector"], "add control vector(s), comma-separated", kind="keys",
                                  metavar="FNAME")
    control_vector_scaled: tuple = _flag((), ["--control-vector-scaled"],
                                         "add control vector(s) with a scale: FNAME:SCALE,...", kind="keys")
    control_vector_layer_range: tuple = _flag((0, 0), ["--control-vector-layer-range"],
                                              "layers to apply the control vector(s) to: START END, inclusive",
                                              kind="pair", metavar="START END")
    lora_init_without_apply: bool = _flag(False, ["--lora-init-without-apply"],
                                          "load adapters at scale 0 until POST /lora-adapters", kind="flag")
    threads: int = _flag(-1, ["-t", "--threads"], "CPU threads for generation (-1 = all)",
                         env="LLAMA_ARG_THREADS")
    threads_batch: int = _flag(-1, ["-tb", "--threads-batch"], "threads for prompt processing (-1 = --threads)")
    cpu_mask: str = _flag("", ["-C", "--cpu-mask"], "CPU affinity mask: arbitrarily long hex (with --cpu-range)")
    cpu_range: str = _flag("", ["-Cr", "--cpu-range"], "range of CPUs for affinity: lo-hi (with --cpu-mask)")
    cpu_strict: int = _flag(0, ["--cpu-strict"], "strict CPU placement: 0 or 1")
    prio: int = _flag(0, ["--prio"], "process/thread priority: low(-1), normal(0), medium(1), high(2), realtime(3)")
    poll: int = _flag(50, ["--poll"], "polling level to wait for work: 0 (none) - 100")
    cpu_mask_batch: str = _flag("", ["-Cb", "--cpu-mask-batch"], "CPU affinity mask for prompt processing "
                                "(default: --cpu-mask)")
    cpu_range_batch: str = _flag("", ["-Crb", "--cpu-range-batch"], "CPU range for prompt processing")
    cpu_strict_batch: int = _flag(0, ["--cpu-strict-batch"], "strict CPU placement for prompt processing")
    prio_batch: int = _flag(0, ["--prio-batch"], "thread priority for prompt processing: 0-3")
    poll_batch: int = _flag(50, ["--poll-batch"], "polling for prompt processing (default: --poll)")
    perf: bool = _flag(True, ["--perf"], "libllama's internal performance timings", env="LLAMA_ARG_PERF",
                       neg=["--no-perf"])
    batch_size: int = _flag(2048, ["-b", "--batch-size"], "logical maximum batch size", env="LLAMA_ARG_BATCH")
    ubatch_size: int = _flag(512, ["-ub", "--ubatch-size"], "physical maximum batch size",
                             env="LLAMA_ARG_UBATCH")
    parallel: int = _flag(-1, ["-np", "--parallel"], "number of server slots (-1 = auto: 4, with unified KV)",
                          env="LLAMA_ARG_N_PARALLEL")
    cont_batching: bool = _flag(True, ["-cb", "--cont-batching"], "continuous batching",
                                env="LLAMA_ARG_CONT_BATCHING", neg=["-nocb", "--no-cont-batching"])
    flash_attn: str = _flag("auto", ["-fa", "--flash-attn"], "Flash Attention: on, off or auto",
                            env="LLAMA_ARG_FLASH_ATTN", kind="tristate")
    cache_type_k: str = _flag("f16", ["-ctk", "--cache-type-k"], "KV cache type for K",
                              env="LLAMA_ARG_CACHE_TYPE_K",
                              choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"])
    cache_type_v: str = _flag("f16", ["-ctv", "--cache-type-v"], "KV cache type for V",
                              env="LLAMA_ARG_CACHE_TYPE_V",
                              choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"])
    kv_unified: bool | None = _flag(None, ["-kvu", "--kv-unified"], "one KV buffer for all slots",
                                    env="LLAMA_ARG_KV_UNIFIED", neg=["-no-kvu", "--no-kv-unified"])
    kv_unified_per_slot: int = _flag(0, ["--kv-unified-per-slot"],
                                     "cap each slot's context; without -c the pool is parallel x N",
                                     env="LLAMA_ARG_KV_UNIFIED_PER_SLOT")
    swa_full: bool = _flag(False, ["--swa-full"], "full-size SWA cache", env="LLAMA_ARG_SWA_FULL", kind="flag")
    cache_prompt: bool = _flag(True, ["--cache-prompt"], "reuse the KV cache of a previous prompt (default for requests)",
                               env="LLAMA_ARG_CACHE_PROMPT", neg=["--no-cache-prompt"])
    cache_reuse: int = _flag(0, ["--cache-reuse"], "min chunk size to attempt reusing from the cache via KV "
                             "shifting, requires prompt caching to be enabled (default for requests)",
                             env="LLAMA_ARG_CACHE_REUSE", metavar="N")
    defrag_thold: float = _flag(-1.0, ["-dt", "--defrag-thold"], "deprecated, no effect (as upstream)",
                                env="LLAMA_ARG_DEFRAG_THOLD")
    context_shift: bool = _flag(False, ["--context-shift"], "shift the context when it fills up",
                                env="LLAMA_ARG_CONTEXT_SHIFT", neg=["--no-context-shift"])
    slot_prompt_similarity: float = _flag(0.1, ["-sps", "--slot-prompt-similarity"],
                                          "prompt similarity needed to reuse a slot's cache (0 = off)")
    cache_ram: int = _flag(8192, ["-cram", "--cache-ram"],
                           "maximum host-RAM prompt cache size in MiB (-1 = no limit, 0 = disable)",
                           env="LLAMA_ARG_CACHE_RAM", metavar="N")
    cache_idle_slots: bool = _flag(True, ["--cache-idle-slots"],
                                   "save idle slots to the prompt cache on a new task, and clear them "
                                   "with a unified KV cache (requires --cache-ram)",
                                   env="LLAMA_ARG_CACHE_IDLE_SLOTS", neg=["--no-cache-idle-slots"])
    ctx_checkpoints: int = _flag(32, ["-ctxcp", "--ctx-checkpoints", "--swa-checkpoints"],
                                 "max number of context checkpoints to create per slot", metavar="N",
                                 env="LLAMA_ARG_CTX_CHECKPOINTS")
    checkpoint_min_step: int = _flag(8192, ["-cms", "--checkpoint-min-step"],
                                     "minimum spacing between context checkpoints in tokens (0 = no minimum)",
                                     metavar="N", env="LLAMA_ARG_CHECKPOINT_MIN_SPACING_NT")
    mmap: bool = _flag(True, ["--mmap"], "memory-map the model", env="LLAMA_ARG_MMAP", neg=["--no-mmap"])
    mlock: bool = _flag(False, ["--mlock"], "keep the model in RAM", env="LLAMA_ARG_MLOCK", kind="flag")
    repack: bool = _flag(True, ["--repack"], "repack weights for the CPU backend", env="LLAMA_ARG_REPACK",
                         neg=["-nr", "--no-repack"])
    n_gpu_layers: str = _flag("auto", ["-ngl", "--gpu-layers", "--n-gpu-layers"],
                              "layers to offload to the GPU: a number, auto or all", env="LLAMA_ARG_N_GPU_LAYERS")
    load_mode: str = _flag("", ["-lm", "--load-mode"], "model loading: auto, none, mmap, mlock, mmap+mlock, dio",
                           env="LLAMA_ARG_LOAD_MODE", choices=["", "auto", "none", "mmap", "mlock", "mmap+mlock", "dio"])
    lazy_mode: str = _flag("auto", ["-lzm", "--lazy-mode"], "on-demand tensor reads: on, off, auto",
                           env="LLAMA_ARG_LAZY_MODE", kind="tristate")
    numa: str = _flag("", ["--numa"], "NUMA strategy: distribute, isolate, numactl", env="LLAMA_ARG_NUMA",
                      choices=["", "distribute", "isolate", "numactl"])
    split_mode: str = _flag("layer", ["-sm", "--split-mode"], "multi-GPU split: none, layer, row, tensor",
                            env="LLAMA_ARG_SPLIT_MODE", choices=["none", "layer", "row", "tensor"])
    tensor_split: str = _flag("", ["-ts", "--tensor-split"], "model proportions per GPU, e.g. 3,1",
                              env="LLAMA_ARG_TENSOR_SPLIT")
    main_gpu: int = _flag(0, ["-mg", "--main-gpu"], "GPU for split-mode none", env="LLAMA_ARG_MAIN_GPU")
    device: str = _flag("", ["-dev", "--device"], "comma-separated list of devices to use for offloading (none = don't offload); "
                        "use --list-devices to see a list of available devices",
                        env="LLAMA_ARG_DEVICE")
    rpc: str = _flag("", ["--rpc"], "comma-separated list of RPC servers (host:port)", env="LLAMA_ARG_RPC",
                     metavar="SERVERS")
    kv_offload: bool = _flag(True, ["-kvo", "--kv-offload"], "keep the KV cache on the GPU",
                             env="LLAMA_ARG_KV_OFFLOAD", neg=["-nkvo", "--no-kv-offload"])
    op_offload: bool = _flag(True, ["--op-offload"], "offload host tensor operations", neg=["--no-op-offload"])
    no_host: bool = _flag(False, ["--no-host"], "bypass the host buffer", env="LLAMA_ARG_NO_HOST", kind="flag")
    override_tensor: tuple = _flag((), ["-ot", "--override-tensor"],
                                   "<tensor name pattern>=<buffer type>,... override tensor buffer types",
                                   env="LLAMA_ARG_OVERRIDE_TENSOR", kind="keys")
    cpu_moe: bool = _flag(False, ["-cmoe", "--cpu-moe"], "keep all Mixture of Experts (MoE) weights in the CPU",
                          env="LLAMA_ARG_CPU_MOE", kind="flag")
    n_cpu_moe: int = _flag(0, ["-ncmoe", "--n-cpu-moe"],
                           "keep the MoE weights of the first N layers in the CPU", env="LLAMA_ARG_N_CPU_MOE")
    n_cpu_ffn: int = _flag(0, ["-ncffn", "--n-cpu-ffn"],
                           "keep the dense FFN weights of the first N layers in the CPU", env="LLAMA_ARG_N_CPU_FFN")
    fit: str = _flag("on", ["-fit", "--fit"], "adjust unset arguments to fit in device memory: on or off",
                     env="LLAMA_ARG_FIT", kind="tristate")
    fit_target: str = _flag("1024", ["-fitt", "--fit-target"],
                            "MiB to leave free per device for --fit, comma-separated (one = every device)",
                            env="LLAMA_ARG_FIT_TARGET")
    fit_ctx: int = _flag(4096, ["-fitc", "--fit-ctx"], "minimum ctx size that --fit may set", env="LLAMA_ARG_FIT_CTX")
    warmup: bool = _flag(True, ["--warmup"], "run a warm-up decode at load", neg=["--no-warmup"])
    # --- sampling defaults ----------------------------------------------------------------
    samplers: str = _flag("penalties;dry;top_n_sigma;top_k;typ_p;top_p;min_p;xtc;temperature", ["--samplers"],
                          "sampler order, ';'-separated")
    sampling_seq: str = _flag("", ["--sampling-seq", "--sampler-seq"], "sampler order as letters (edskypmxt)")
    seed: int = _flag(-1, ["-s", "--seed"], "RNG seed (-1 = random)")
    temp: float = _flag(0.8, ["--temp", "--temperature"], "temperature", env="LLAMA_ARG_TEMPERATURE")
    top_k: int = _flag(40, ["--top-k"], "top-k sampling (0 = off)", env="LLAMA_ARG_TOP_K")
    top_p: float = _flag(0.95, ["--top-p"], "top-p sampling (1.0 = off)", env="LLAMA_ARG_TOP_P")
    min_p: float = _flag(0.05, ["--min-p"], "min-p sampling (0 = off)", env="LLAMA_ARG_MIN_P")
    top_nsigma: float = _flag(-1.0, ["--top-nsigma", "--top-n-sigma"], "top-n-sigma sampling (< 0 = off)")
    xtc_probability: float = _flag(0.0, ["--xtc-probability"], "XTC probability")
    xtc_threshold: float = _flag(0.1, ["--xtc-threshold"], "XTC threshold")
    typical: float = _flag(1.0, ["--typical", "--typical-p"], "locally typical sampling (1 = off)")
    repeat_last_n: int = _flag(64, ["--repeat-last-n"], "tokens considered for penalties (0 = off)")
    repeat_penalty: float = _flag(1.0, ["--repeat-penalty"], "repeat penalty (1 = off)",
                                  env="LLAMA_ARG_REPEAT_PENALTY")
    presence_penalty: float = _flag(0.0, ["--presence-penalty"], "presence penalty",
                                    env="LLAMA_ARG_PRESENCE_PENALTY")
    frequency_penalty: float = _flag(0.0, ["--frequency-penalty"], "frequency penalty",
                                     env="LLAMA_ARG_FREQUENCY_PENALTY")
    dry_multiplier: float = _flag(0.0, ["--dry-multiplier"], "DRY multiplier (0 = off)")
    dry_base: float = _flag(1.75, ["--dry-base"], "DRY base")
    dry_allowed_length: int = _flag(2, ["--dry-allowed-length"], "DRY allowed length")
    dry_penalty_last_n: int = _flag(64, ["--dry-penalty-last-n"], "DRY window")
    dry_sequence_breaker: tuple = _flag((), ["--dry-sequence-breaker"], "DRY sequence breaker (repeatable; 'none')",
                                        kind="append")
    dynatemp_range: float = _flag(0.0, ["--dynatemp-range"], "dynamic temperature range")
    dynatemp_exp: float = _flag(1.0, ["--dynatemp-exp"], "dynamic temperature exponent")
    adaptive_target: float = _flag(-1.0, ["--adaptive-target"],
                                   "adaptive-p: select tokens near this probability (0.0 to 1.0; negative = disabled)",
                                   metavar="N")
    adaptive_decay: float = _flag(0.9, ["--adaptive-decay"],
                                  "adaptive-p: decay rate of the target's adaptation (0.0 to 0.99)", metavar="N")
    mirostat: int = _flag(0, ["--mirostat"], "Mirostat: 0 off, 1, 2")
    mirostat_lr: float = _flag(0.1, ["--mirostat-lr"], "Mirostat learning rate (eta)")
    mirostat_ent: float = _flag(5.0, ["--mirostat-ent"], "Mirostat target entropy (tau)")
    logit_bias: tuple = _flag((), ["-l", "--logit-bias"], "TOKEN_ID(+/-)BIAS, repeatable", kind="append")
    ignore_eos: bool = _flag(False, ["--ignore-eos"], "ignore end of stream tokens", kind="flag")
    grammar: str = _flag("", ["--grammar"], "default GBNF grammar")
    grammar_file: str = _flag("", ["--grammar-file"], "file with the default GBNF grammar")
    json_schema: str = _flag("", ["-j", "--json-schema"], "default JSON schema (turned into a grammar)")
    json_schema_file: str = _flag("", ["-jf", "--json-schema-file"], "file with the default JSON schema")
    reverse_prompt: tuple = _flag((), ["-r", "--reverse-prompt"], "default stop string (repeatable)", kind="append")
    escape: bool = _flag(True, ["-e", "--escape"],
                         "process escape sequences (\\n, \\r, \\t, \\', \\\", \\\\, \\xNN) in -r and "
                         "--dry-sequence-breaker", neg=["--no-escape"])
    special: bool = _flag(False, ["-sp", "--special"], "render special tokens in the output", kind="flag")
    backend_sampling: bool = _flag(False, ["-bs", "--backend-sampling"],
                                   "sample inside the decode graph (on the GPU with GPU builds)",
                                   env="LLAMA_ARG_BACKEND_SAMPLING", kind="flag")
    # --- speculative decoding (common_params_speculative; engine.SpecConfig) -----------------
    spec_type: tuple = _flag((), ["--spec-type"], "comma-separated speculative decoding types: none, draft-simple, "
                             "ngram-simple, ngram-map-k, ngram-map-k4v, ngram-mod, ngram-cache (draft-eagle3, "
                             "draft-mtp, draft-dflash, draft-dspark: refused at load) (default: none)",
                             env="LLAMA_ARG_SPEC_TYPE", kind="keys")
    spec_draft_model: str = _flag("", ["--spec-draft-model", "-md", "--model-draft"],
                                  "draft model for speculative decoding (with --spec-type draft-simple)",
                                  env="LLAMA_ARG_SPEC_DRAFT_MODEL", metavar="FNAME")
    spec_draft_hf: str = _flag("", ["--spec-draft-hf", "-hfd", "-hfrd", "--hf-repo-draft"],
                               "same as --hf-repo, for the draft model", env="LLAMA_ARG_SPEC_DRAFT_HF_REPO")
    spec_draft_n_max: int = _flag(3, ["--spec-draft-n-max"], "tokens to draft for speculative decoding",
                                  env="LLAMA_ARG_SPEC_DRAFT_N_MAX")
    spec_draft_n_min: int = _flag(0, ["--spec-draft-n-min"], "least draft tokens to use for speculative decoding",
                                  env="LLAMA_ARG_SPEC_DRAFT_N_MIN")
    spec_draft_p_split: float = _flag(0.1, ["--spec-draft-p-split", "--draft-p-split"],
                                      "speculative decoding split probability", env="LLAMA_ARG_SPEC_DRAFT_P_SPLIT")
    spec_draft_p_min: float = _flag(0.0, ["--spec-draft-p-min", "--draft-p-min"],
                                    "minimum speculative decoding probability (greedy)",
                                    env="LLAMA_ARG_SPEC_DRAFT_P_MIN")
    spec_draft_backend_sampling: bool = _flag(True, ["--spec-draft-backend-sampling"],
                                              "offload draft sampling to the backend",
                                              env="LLAMA_ARG_SPEC_DRAFT_BACKEND_SAMPLING",
                                              neg=["--no-spec-draft-backend-sampling"])
    spec_synth_len: str = _flag("", ["--spec-synth-len"], "target mean synthetic acceptance length, including the "
                                "target token (benchmarking only)", env="LLAMA_ARG_SPEC_SYNTH_LEN", metavar="L")
    spec_synth_rates: str = _flag("", ["--spec-synth-rates"], "comma-separated per-position synthetic acceptance "
                                  "probabilities (benchmarking only)", env="LLAMA_ARG_SPEC_SYNTH_RATES",
                                  metavar="P0,P1,...")
    spec_draft_threads: int = _flag(0, ["--spec-draft-threads", "-td", "--threads-draft"],
                                    "draft model threads for generation (default: --threads; <= 0 all CPUs when given)")
    spec_draft_threads_batch: int = _flag(0, ["--spec-draft-threads-batch", "-tbd", "--threads-batch-draft"],
                                          "draft model threads for prompts (default: --threads-draft)")
    spec_draft_cpu_mask: str = _flag("", ["--spec-draft-cpu-mask", "-Cd", "--cpu-mask-draft"],
                                     "draft CPU affinity mask (checked; upstream's server does not apply it)")
    spec_draft_cpu_range: str = _flag("", ["--spec-draft-cpu-range", "-Crd", "--cpu-range-draft"],
                                      "draft CPU range (checked; not applied, as upstream)")
    spec_draft_cpu_strict: int = _flag(0, ["--spec-draft-cpu-strict", "--cpu-strict-draft"],
                                       "draft strict CPU placement (not applied, as upstream)")
    spec_draft_prio: int = _flag(0, ["--spec-draft-prio", "--prio-draft"], "draft thread priority 0-3 "
                                 "(checked; not applied, as upstream)")
    spec_draft_poll: int = _flag(50, ["--spec-draft-poll", "--poll-draft"], "draft polling (not applied, as upstream)")
    spec_draft_cpu_mask_batch: str = _flag("", ["--spec-draft-cpu-mask-batch", "-Cbd", "--cpu-mask-batch-draft"],
                                           "draft prompt CPU mask (checked; not applied, as upstream)")
    spec_draft_cpu_strict_batch: int = _flag(0, ["--spec-draft-cpu-strict-batch", "--cpu-strict-batch-draft"],
                                             "draft prompt strict placement (not applied, as upstream)")
    spec_draft_prio_batch: int = _flag(0, ["--spec-draft-prio-batch", "--prio-batch-draft"],
                                       "draft prompt thread priority 0-3 (checked; not applied, as upstream)")
    spec_draft_poll_batch: int = _flag(50, ["--spec-draft-poll-batch", "--poll-batch-draft"],
                                       "draft prompt polling (not applied, as upstream)")
    spec_draft_type_k: str = _flag("f16", ["--spec-draft-type-k", "-ctkd", "--cache-type-k-draft"],
                                   "KV cache type for K of the draft model", env="LLAMA_ARG_SPEC_DRAFT_CACHE_TYPE_K",
                                   choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"])
    spec_draft_type_v: str = _flag("f16", ["--spec-draft-type-v", "-ctvd", "--cache-type-v-draft"],
                                   "KV cache type for V of the draft model", env="LLAMA_ARG_SPEC_DRAFT_CACHE_TYPE_V",
                                   choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"])
    spec_draft_override_tensor: tuple = _flag((), ["--spec-draft-override-tensor", "-otd", "--override-tensor-draft"],
                                              "<tensor name pattern>=<buffer type>,... for the draft model",
                                              kind="keys")
    spec_draft_cpu_moe: bool = _flag(False, ["--spec-draft-cpu-moe", "-cmoed", "--cpu-moe-draft"],
                                     "keep all MoE weights of the draft model in the CPU",
                                     env="LLAMA_ARG_SPEC_DRAFT_CPU_MOE", kind="flag")
    spec_draft_n_cpu_moe: int = _flag(0, ["--spec-draft-n-cpu-moe", "--spec-draft-ncmoe", "-ncmoed",
                                          "--n-cpu-moe-draft"],
                                      "keep the MoE weights of the draft's first N layers in the CPU",
                                      env="LLAMA_ARG_SPEC_DRAFT_N_CPU_MOE")
    spec_draft_device: str = _flag("", ["--spec-draft-device", "-devd", "--device-draft"],
                                   "devices for the draft model (default: --device)")
    spec_draft_ngl: str = _flag("auto", ["--spec-draft-ngl", "-ngld", "--gpu-layers-draft", "--n-gpu-layers-draft"],
                                "draft model layers in VRAM: a number, auto or all",
                                env="LLAMA_ARG_N_GPU_LAYERS_DRAFT")
    spec_ngram_mod_n_min: int = _flag(48, ["--spec-ngram-mod-n-min"], "ngram-mod: least draft tokens (0-1024)")
    spec_ngram_mod_n_max: int = _flag(64, ["--spec-ngram-mod-n-max"], "ngram-mod: most draft tokens (0-1024)")
    spec_ngram_mod_n_match: int = _flag(24, ["--spec-ngram-mod-n-match"], "ngram-mod: lookup length (1-1024)")
    spec_ngram_simple_size_n: int = _flag(12, ["--spec-ngram-simple-size-n"], "ngram-simple: lookup n-gram length")
    spec_ngram_simple_size_m: int = _flag(48, ["--spec-ngram-simple-size-m"], "ngram-simple: draft m-gram length")
    spec_ngram_simple_min_hits: int = _flag(1, ["--spec-ngram-simple-min-hits"], "ngram-simple: least hits")
    spec_ngram_map_k_size_n: int = _flag(12, ["--spec-ngram-map-k-size-n"], "ngram-map-k: lookup n-gram length")
    spec_ngram_map_k_size_m: int = _flag(48, ["--spec-ngram-map-k-size-m"], "ngram-map-k: draft m-gram length")
    spec_ngram_map_k_min_hits: int = _flag(1, ["--spec-ngram-map-k-min-hits"], "ngram-map-k: least hits")
    spec_ngram_map_k4v_size_n: int = _flag(12, ["--spec-ngram-map-k4v-size-n"], "ngram-map-k4v: lookup n-gram length")
    spec_ngram_map_k4v_size_m: int = _flag(48, ["--spec-ngram-map-k4v-size-m"], "ngram-map-k4v: draft m-gram length")
    spec_ngram_map_k4v_min_hits: int = _flag(1, ["--spec-ngram-map-k4v-min-hits"], "ngram-map-k4v: least hits")
    lookup_cache_static: str = _flag("", ["-lcs", "--lookup-cache-static"],
                                     "static lookup cache for ngram-cache (not updated by generation)", metavar="FNAME")
    lookup_cache_dynamic: str = _flag("", ["-lcd", "--lookup-cache-dynamic"],
                                      "dynamic lookup cache for ngram-cache", metavar="FNAME")
    # removed upstream: refused with upstream's message (arg_removed)
    draft_max: int = _flag(0, ["--draft", "--draft-n", "--draft-max"],
                           "use --spec-draft-n-max or --spec-ngram-mod-n-max", env="LLAMA_ARG_DRAFT_MAX", kind="removed")
    draft_min: int = _flag(0, ["--draft-min", "--draft-n-min"], "use --spec-draft-n-min or --spec-ngram-mod-n-min",
                           env="LLAMA_ARG_DRAFT_MIN", kind="removed")
    spec_ngram_size_n: int = _flag(0, ["--spec-ngram-size-n"], "use the respective --spec-ngram-*-size-n",
                                   kind="removed")
    spec_ngram_size_m: int = _flag(0, ["--spec-ngram-size-m"], "use the respective --spec-ngram-*-size-m",
                                   kind="removed")
    spec_ngram_min_hits: int = _flag(0, ["--spec-ngram-min-hits"], "use the respective --spec-ngram-*-min-hits",
                                     kind="removed")
    # --- network, security ----------------------------------------------------------------
    host: str = _flag("127.0.0.1", ["--host"], "addresses to listen on, comma-separated (a path ending in .sock = UNIX socket)",
                      env="LLAMA_ARG_HOST")
    port: int = _flag(8080, ["--port"], "port to listen on", env="LLAMA_ARG_PORT")
    api_key: tuple = _flag((), ["--api-key"], "API key(s), comma-separated or repeated", env="LLAMA_API_KEY",
                           kind="keys")
    api_key_file: str = _flag("", ["--api-key-file"], "file with API keys, one per line",
                              env="LLAMA_ARG_API_KEY_FILE")
    ssl_key_file: str = _flag("", ["--ssl-key-file"], "PEM private key for HTTPS", env="LLAMA_ARG_SSL_KEY_FILE")
    ssl_cert_file: str = _flag("", ["--ssl-cert-file"], "PEM certificate for HTTPS", env="LLAMA_ARG_SSL_CERT_FILE")
    timeout: int = _flag(3600, ["-to", "--timeout"], "socket read/write timeout in seconds", env="LLAMA_ARG_TIMEOUT")
    threads_http: int = _flag(-1, ["--threads-http"], "fixed HTTP threads, plus up to 1024 on demand (-1 = max(slots + 4, CPUs - 1))",
                              env="LLAMA_ARG_THREADS_HTTP")
    sse_ping_interval: int = _flag(30, ["--sse-ping-interval"], "seconds of silence before an SSE ping (-1 = never)",
                                   env="LLAMA_ARG_SSE_PING_INTERVAL")
    # --- router mode (started without -m, with --models-dir and/or --models-preset) ---------------
    models_dir: str = _flag("", ["--models-dir"], "directory containing models for the router server",
                            env="LLAMA_ARG_MODELS_DIR", metavar="PATH")
    models_preset: str = _flag("", ["--models-preset"], "path to INI file containing model presets for the "
                               "router server", env="LLAMA_ARG_MODELS_PRESET", metavar="PATH")
    models_max: int = _flag(4, ["--models-max"], "for router server, maximum number of models to load "
                            "simultaneously (0 = unlimited)", env="LLAMA_ARG_MODELS_MAX", metavar="N")
    models_autoload: bool = _flag(True, ["--models-autoload"], "for router server, whether to automatically "
                                  "load models", env="LLAMA_ARG_MODELS_AUTOLOAD", neg=["--no-models-autoload"])
    sleep_idle_seconds: int = _flag(-1, ["--sleep-idle-seconds"], "number of seconds of idleness after which the "
                                    "server will sleep (default: -1; -1 = disabled)", metavar="SECONDS")
    reuse_port: bool = _flag(False, ["--reuse-port"], "allow several sockets to bind the same port",
                             env="LLAMA_ARG_REUSE_PORT", kind="flag")
    cors_origins: str = _flag("*", ["--cors-origins"], "allowed origins: *, localhost, or a literal value",
                              env="LLAMA_ARG_CORS_ORIGINS")
    cors_methods: str = _flag("GET, POST, DELETE, OPTIONS", ["--cors-methods"], "preflight Allow-Methods",
                              env="LLAMA_ARG_CORS_METHODS")
    cors_headers: str = _flag("*", ["--cors-headers"], "preflight Allow-Headers", env="LLAMA_ARG_CORS_HEADERS")
    cors_credentials: bool = _flag(True, ["--cors-credentials"], "allow credentials (echo the Origin for *)",
                                   env="LLAMA_ARG_CORS_CREDENTIALS", neg=["--no-cors-credentials"])
    api_prefix: str = _flag("", ["--api-prefix"], "prefix for every route", env="LLAMA_ARG_API_PREFIX")
    webui: bool = _flag(True, ["--ui", "--webui"], "llama-server's web UI at / (built by vendor/fetch.py --ui)",
                        env="LLAMA_ARG_UI", neg=["--no-ui", "--no-webui"])
    ui_config: str = _flag("", ["--ui-config", "--webui-config"], "UI defaults (JSON object), echoed in /props ui_settings",
                           env="LLAMA_ARG_UI_CONFIG")
    ui_config_file: str = _flag("", ["--ui-config-file", "--webui-config-file"], "file with the UI defaults", env="LLAMA_ARG_UI_CONFIG_FILE")
    path: str = _flag("", ["--path"], "folder of static files served at / instead of the built-in UI (UI on)",
                      env="LLAMA_ARG_STATIC_PATH", metavar="PATH")
    media_path: str = _flag("", ["--media-path"], "folder for local media files, read through file:// URLs "
                            "with relative paths (default: disabled)", metavar="PATH")
    max_body_mb: int = _flag(64, ["--max-body-mb"], "pyllama: largest request body in MiB (413 beyond)")
    # --- multimodal input (libmtmd) ----------------------------------------------------------
    mmproj: str = _flag("", ["-mm", "--mmproj"], "path to a multimodal projector file; with -hf it can be "
                        "omitted", env="LLAMA_ARG_MMPROJ", metavar="FILE")
    mmproj_url: str = _flag("", ["-mmu", "--mmproj-url"], "URL to a multimodal projector file",
                            env="LLAMA_ARG_MMPROJ_URL", metavar="URL")
    mmproj_auto: bool = _flag(True, ["--mmproj-auto"], "with -hf, use the repository's multimodal projector "
                              "if it has one", env="LLAMA_ARG_MMPROJ_AUTO", neg=["--no-mmproj", "--no-mmproj-auto"])
    mmproj_offload: bool = _flag(True, ["--mmproj-offload"], "offload the multimodal projector to the GPU",
                                 env="LLAMA_ARG_MMPROJ_OFFLOAD", neg=["--no-mmproj-offload"])
    mmproj_device: str = _flag("", ["-mmdev", "--mmproj-device"], "device for the multimodal projector (none = "
                               "don't offload; default: follows --device)", env="MTMD_BACKEND_DEVICE",
                               metavar="DEVICE")
    image_min_tokens: int = _flag(-1, ["--image-min-tokens"], "minimum tokens per image, for vision models with "
                                  "dynamic resolution (default: read from model)", env="LLAMA_ARG_IMAGE_MIN_TOKENS")
    image_max_tokens: int = _flag(-1, ["--image-max-tokens"], "maximum tokens per image, for vision models with "
                                  "dynamic resolution (default: read from model)", env="LLAMA_ARG_IMAGE_MAX_TOKENS")
    mtmd_batch_max_tokens: int = _flag(1024, ["--mtmd-batch-max-tokens"], "maximum image tokens per batch when "
                                       "encoding images", env="LLAMA_ARG_MTMD_BATCH_MAX_TOKENS")
    video_fps: float = _flag(4.0, ["--video-fps"], "target video frame rate", env="LLAMA_ARG_VIDEO_FPS")
    video_timestamp_interval: int = _flag(5000, ["--video-timestamp-interval"], "interval in milliseconds "
                                          "between text timestamps", env="LLAMA_ARG_VIDEO_TIMESTAMP_INTERVAL")
    video_ffmpeg_dir: str = _flag("", ["--video-ffmpeg-dir"], "directory containing ffmpeg and ffprobe "
                                  "(default: search in PATH)", env="LLAMA_ARG_VIDEO_FFMPEG_DIR", metavar="DIR")
    # --- features -------------------------------------------------------------------------
    embedding: bool = _flag(False, ["--embedding", "--embeddings"], "embedding endpoints only",
                            env="LLAMA_ARG_EMBEDDINGS", kind="flag")
    reranking: bool = _flag(False, ["--reranking", "--rerank"], "rerank endpoint (implies embeddings, pooling rank)",
                            env="LLAMA_ARG_RERANKING", kind="flag")
    pooling: str = _flag("", ["--pooling"], "embedding pooling: none, mean, cls, last, rank",
                         env="LLAMA_ARG_POOLING", choices=["", "none", "mean", "cls", "last", "rank"])
    embd_normalize: int = _flag(2, ["--embd-normalize"], "embedding normalisation: -1, 0, 1, 2, >2")
    metrics: bool = _flag(False, ["--metrics"], "enable /metrics", env="LLAMA_ARG_ENDPOINT_METRICS", kind="flag")
    slots: bool = _flag(True, ["--slots"], "enable GET /slots", env="LLAMA_ARG_ENDPOINT_SLOTS",
                        neg=["--no-slots"])
    props: bool = _flag(False, ["--props"], "enable POST /props", env="LLAMA_ARG_ENDPOINT_PROPS", kind="flag")
    slot_save_path: str = _flag("", ["--slot-save-path"], "folder for slot save/restore")
    spm_infill: bool = _flag(False, ["--spm-infill"], "suffix/prefix/middle order for /infill", kind="flag")
    # --- chat -----------------------------------------------------------------------------
    jinja: bool = _flag(True, ["--jinja"], "use the Jinja template engine", env="LLAMA_ARG_JINJA",
                        neg=["--no-jinja"])
    chat_template: str = _flag("", ["--chat-template"], "chat template: a built-in name or Jinja text",
                               env="LLAMA_ARG_CHAT_TEMPLATE")
    chat_template_file: str = _flag("", ["--chat-template-file"], "file with the chat template",
                                    env="LLAMA_ARG_CHAT_TEMPLATE_FILE")
    chat_template_kwargs: str = _flag("", ["--chat-template-kwargs"], "extra template variables (JSON object)",
                                      env="LLAMA_ARG_CHAT_TEMPLATE_KWARGS")
    reasoning_format: str = _flag("auto", ["--reasoning-format"], "reasoning output: none, auto, deepseek, deepseek-legacy",
                                  env="LLAMA_ARG_THINK", choices=["none", "auto", "deepseek", "deepseek-legacy"])
    reasoning_effort: str = _flag("default", ["--reasoning-effort"],
                                  "reasoning effort given to the chat template: 'default' keeps the template's, "
                                  "or a level such as minimal, low, medium, high, xhigh, max",
                                  env="LLAMA_ARG_REASONING_EFFORT", metavar="LEVEL")
    reasoning: str = _flag("auto", ["-rea", "--reasoning"],
                           "use reasoning/thinking in the chat: on, off or auto (detect from the template)",
                           env="LLAMA_ARG_REASONING", kind="tristate")
    reasoning_budget: int = _flag(-1, ["--reasoning-budget"],
                                  "token budget for thinking: -1 unrestricted, 0 immediate end, N>0 a budget",
                                  env="LLAMA_ARG_THINK_BUDGET")
    reasoning_budget_message: str = _flag("", ["--reasoning-budget-message"],
                                          "message injected before the end-of-thinking tag when the budget "
                                          "is exhausted", env="LLAMA_ARG_THINK_BUDGET_MESSAGE", metavar="MESSAGE")
    reasoning_preserve: bool | None = _flag(None, ["--reasoning-preserve"],
                                            "preserve the reasoning trace in the full history, not just the last "
                                            "assistant message (templates with supports_preserve_reasoning; "
                                            "default: enabled)", env="LLAMA_ARG_REASONING_PRESERVE",
                                            neg=["--no-reasoning-preserve"])
    skip_chat_parsing: bool = _flag(False, ["--skip-chat-parsing"],
                                    "a pure content parser even with a Jinja template: reasoning and tool calls "
                                    "stay in the content", env="LLAMA_ARG_SKIP_CHAT_PARSING",
                                    neg=["--no-skip-chat-parsing"])
    prefill_assistant: bool = _flag(True, ["--prefill-assistant"], "continue a trailing assistant message",
                                    env="LLAMA_ARG_PREFILL_ASSISTANT", neg=["--no-prefill-assistant"])
    # --- logging --------------------------------------------------------------------------
    verbose: bool = _flag(False, ["-v", "--verbose", "--log-verbose"], "log everything", kind="flag")
    verbosity: int = _flag(3, ["-lv", "--verbosity", "--log-verbosity"],
                           "verbosity threshold: 0 output, 1 error, 2 warning, 3 info, 4 trace, 5 debug",
                           env="LLAMA_ARG_LOG_VERBOSITY", metavar="N")
    log_disable: bool = _flag(False, ["--log-disable"], "no log output", kind="flag")
    log_file: str = _flag("", ["--log-file"], "log to this file too", env="LLAMA_ARG_LOG_FILE", metavar="FNAME")
    log_prompts_dir: str = _flag("", ["--log-prompts-dir"], "write each generation prompt to this folder "
                                 "(created if missing; for debugging)", metavar="PATH")
    log_colors: str = _flag("auto", ["--log-colors"], "coloured logging: on, off, auto (when stderr is a terminal)",
                            env="LLAMA_ARG_LOG_COLORS", choices=["on", "off", "auto"])
    log_prefix: bool = _flag(True, ["--log-prefix"], "level letter (and time) before each log line",
                             env="LLAMA_ARG_LOG_PREFIX", neg=["--no-log-prefix"])
    log_timestamps: bool = _flag(True, ["--log-timestamps"], "time since start before each log line",
                                 env="LLAMA_ARG_LOG_TIMESTAMPS", neg=["--no-log-timestamps"])
    log_jsonl: bool = _flag(False, ["--log-jsonl"], "log as JSON lines on stdout (no colours)",
                            env="LLAMA_ARG_LOG_JSONL", neg=["--no-log-jsonl"])
    offline: bool = _flag(False, ["--offline"], "offline mode: use the download cache only, no network access",
                          env="LLAMA_ARG_OFFLINE", kind="flag")
    # --- model downloads (pyllama/downloads.py; presets: pyllama/presets.py) -----------------
    model_url: str = _flag("", ["-mu", "--model-url"], "model download URL", env="LLAMA_ARG_MODEL_URL",
                           metavar="MODEL_URL")
    docker_repo: str = _flag("", ["-dr", "--docker-repo"], "Docker Hub model repository [<repo>/]<model>[:quant] "
                             "(repo default ai/, quant default latest)", env="LLAMA_ARG_DOCKER_REPO")
    hf_repo: str = _flag("", ["-hf", "-hfr", "--hf-repo"], "Hugging Face model repository <user>/<model>[:quant]; "
                         "quant is case-insensitive, default Q4_K_M, else the first GGUF",
                         env="LLAMA_ARG_HF_REPO")
    hf_file: str = _flag("", ["-hff", "--hf-file"], "Hugging Face model file (overrides the quant of --hf-repo)",
                         env="LLAMA_ARG_HF_FILE", metavar="FILE")
    hf_token: str = _flag("", ["-hft", "--hf-token"], "Hugging Face access token", env="HF_TOKEN",
                          metavar="TOKEN")
    cache_list: bool = _flag(False, ["-cl", "--cache-list"], "show the models in the cache and exit", kind="flag")
    embd_gemma_default: bool = _flag(False, ["--embd-gemma-default"], "use the default EmbeddingGemma model "
                                     "(downloads weights)", kind="preset")
    fim_qwen_1_5b_default: bool = _flag(False, ["--fim-qwen-1.5b-default"], "use Qwen 2.5 Coder 1.5B "
                                        "(downloads weights)", kind="preset")
    fim_qwen_3b_default: bool = _flag(False, ["--fim-qwen-3b-default"], "use Qwen 2.5 Coder 3B (downloads weights)",
                                      kind="preset")
    fim_qwen_7b_default: bool = _flag(False, ["--fim-qwen-7b-default"], "use Qwen 2.5 Coder 7B (downloads weights)",
                                      kind="preset")
    fim_qwen_7b_spec: bool = _flag(False, ["--fim-qwen-7b-spec"], "use Qwen 2.5 Coder 7B + 0.5B draft for "
                                   "speculative decoding (downloads weights)", kind="preset")
    fim_qwen_14b_spec: bool = _flag(False, ["--fim-qwen-14b-spec"], "use Qwen 2.5 Coder 14B + 0.5B draft for "
                                    "speculative decoding (downloads weights)", kind="preset")
    fim_qwen_30b_default: bool = _flag(False, ["--fim-qwen-30b-default"], "use Qwen 3 Coder 30B A3B Instruct "
                                       "(downloads weights)", kind="preset")
    gpt_oss_20b_default: bool = _flag(False, ["--gpt-oss-20b-default"], "use gpt-oss-20b (downloads weights)",
                                      kind="preset")
    gpt_oss_120b_default: bool = _flag(False, ["--gpt-oss-120b-default"], "use gpt-oss-120b (downloads weights)",
                                       kind="preset")
    vision_gemma_4b_default: bool = _flag(False, ["--vision-gemma-4b-default"], "use Gemma 3 4B QAT, text only "
                                          "(downloads weights)", kind="preset")
    vision_gemma_12b_default: bool = _flag(False, ["--vision-gemma-12b-default"], "use Gemma 3 12B QAT, text only "
                                           "(downloads weights)", kind="preset")
    spec_default: bool = _flag(False, ["--spec-default"], "enable default speculative decoding config "
                               "(ngram-mod)", kind="preset")


def _kv_override_map(self) -> dict:
    """--override-kv items (KEY=TYPE:VALUE) as {key: value} (upstream's string_parse_kv_override).

    Raises:
        ValueError: an item that does not parse.
    """
    overrides = {}
    for item in self.override_kv:
        key, eq, rest = item.partition("=")
        kind, colon, raw = rest.partition(":")
        if not (key and eq and colon) or kind not in ("int", "float", "bool", "str") or \
                (kind == "bool" and raw not in ("true", "false")):
            raise ValueError(f"Invalid type for KV override: {item}")
        try:
            overrides[key] = {"int": int, "float": float, "str": str,
                              "bool": lambda v: v == "true"}[kind](raw)
        except ValueError:
            raise ValueError(f"Invalid type for KV override: {item}") from None
    return overrides


Settings.kv_override_map = _kv_override_map


def _lora_list(self) -> list:
    """[(path, scale)] from --lora then --lora-scaled, in order (the adapter ids).

    Raises:
        ValueError: a --lora-scaled item without a numeric scale.
    """
    out = [(path, 1.0) for path in self.lora]
    for item in self.lora_scaled:
        path, colon, scale = item.rpartition(":")
        try:
            if not colon or not path:
                raise ValueError
            out.append((path, float(scale)))
        except ValueError:
            raise ValueError(f"invalid --lora-scaled {item!r}: expected FNAME:SCALE") from None
    return out


Settings.lora_list = _lora_list


def settings_fields():
    """The Settings fields, in order (what the parser and --help are built from)."""
    return fields(Settings)
