# cython: language_level=3, embedsignature=True
"""Context: one llama_context over a Model, its reusable batch, and single-sequence generation.

`check_decode` is the one place where llama_decode's return codes become exceptions.
Imports: `_llama`, `_model`, `_sampling`, `errors`. A Context belongs to one thread at a time.
"""

import os

import orjson

from libc.stdint cimport int32_t
from libcpp.string cimport string

from pyllama cimport _bridge as B
from pyllama cimport _llama as L
from pyllama.engine._model cimport LoraAdapter, Model, ModelParams
from libcpp.vector cimport vector
from pyllama.engine._sampling cimport SamplerChain

from pyllama.errors import (
    ContextCreationError,
    ContextLengthExceededError,
    DecodeError,
    InvalidRequestError,
    ModelLoadError,
)

# Cache types llama-server accepts for --cache-type-k / --cache-type-v (common/arg.cpp).
KV_CACHE_TYPES = {
    "f32": L.GGML_TYPE_F32,
    "f16": L.GGML_TYPE_F16,
    "bf16": L.GGML_TYPE_BF16,
    "q8_0": L.GGML_TYPE_Q8_0,
    "q4_0": L.GGML_TYPE_Q4_0,
    "q4_1": L.GGML_TYPE_Q4_1,
    "iq4_nl": L.GGML_TYPE_IQ4_NL,
    "q5_0": L.GGML_TYPE_Q5_0,
    "q5_1": L.GGML_TYPE_Q5_1,
}
FLASH_ATTN = {
    "auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
ROPE_SCALING = {
    None: L.LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED,
    "none": L.LLAMA_ROPE_SCALING_TYPE_NONE,
    "linear": L.LLAMA_ROPE_SCALING_TYPE_LINEAR,
    "yarn": L.LLAMA_ROPE_SCALING_TYPE_YARN,
}
POOLING = {
    None: L.LLAMA_POOLING_TYPE_UNSPECIFIED,
    "none": L.LLAMA_POOLING_TYPE_NONE,
    "mean": L.LLAMA_POOLING_TYPE_MEAN,
    "cls": L.LLAMA_POOLING_TYPE_CLS,
    "last": L.LLAMA_POOLING_TYPE_LAST,
    "rank": L.LLAMA_POOLING_TYPE_RANK,
}


def default_threads():
    """llama-server's default thread count: the physical cores (performance cores on a hybrid
    CPU), common_cpu_get_num_math()."""
    return max(1, B.pyllama_cpu_default_threads())


def check_cpu_placement(cpu) -> None:
    """Raise InvalidRequestError when a CpuPlacement's mask or range does not parse as
    upstream parses -C / -Cr."""
    if cpu is None:
        return
    try:
        B.pyllama_cpu_check(cpu.mask.encode(), cpu.range.encode())
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="cpu") from None
    if not -1 <= cpu.prio <= 3:
        raise InvalidRequestError("invalid value", param="prio")


def _cpu_json(cpu, n_threads: int) -> dict:
    if cpu is None:
        return {"n_threads": n_threads}
    return {"n_threads": n_threads, "mask": cpu.mask, "range": cpu.range, "strict": bool(cpu.strict),
            "prio": int(cpu.prio), "poll": int(cpu.poll)}


cdef int check_decode(int rc, int n_tokens=0, int n_ctx=0) except -1:
    # The one translation of llama_decode / llama_encode return codes (llama.h), with
    # upstream's messages (server_context::decode). rc 1 (no room in the KV cache) is a
    # request too large for what is left: n_tokens is what it holds or asked for, n_ctx the
    # KV cells a sequence may use. Any thread; raises with the GIL held.
    if rc == 0:
        return 0
    if rc == 1:
        raise ContextLengthExceededError("Context size has been exceeded.",
                                         n_prompt_tokens=n_tokens, n_ctx=n_ctx)
    if rc == 2:
        raise DecodeError("Decode aborted.", code=rc)
    if rc == -1:
        raise DecodeError("Invalid input batch.", code=rc)
    raise DecodeError("Compute error.", code=rc)


cdef class ContextParams:
    """llama_context_params built from Context's options (see Context), and the threadpool
    settings that go with them. Built apart from the Context so that --fit can adjust n_ctx
    before the model loads.

    Raises:
        InvalidRequestError: an option is out of range.
    """

    def __init__(self, *, int n_ctx=0, int n_batch=2048, int n_ubatch=512,
                 int n_seq_max=1, n_threads=None, n_threads_batch=None, flash_attn="auto",
                 str type_k="f16", str type_v="f16", bint embeddings=False, pooling=None,
                 bint kv_unified=False, bint swa_full=False, bint offload_kqv=True,
                 rope_scaling=None, float rope_freq_base=0.0, float rope_freq_scale=0.0,
                 float yarn_ext_factor=-1.0, float yarn_attn_factor=-1.0, float yarn_beta_slow=-1.0,
                 float yarn_beta_fast=-1.0, int yarn_orig_ctx=0, bint op_offload=True,
                 cpu=None, cpu_batch=None, bint perf=True, control_vectors=(), control_vector_layers=(0, 0)):
        if n_ctx < 0 or n_batch < 1 or n_ubatch < 1 or n_seq_max < 1:
            raise InvalidRequestError("n_ctx must be >= 0 and n_batch, n_ubatch, n_seq_max >= 1")
        if n_seq_max > L.llama_max_parallel_sequences():
            raise InvalidRequestError(
                f"n_seq_max must be <= {L.llama_max_parallel_sequences()}", param="n_seq_max")
        if isinstance(flash_attn, bool):
            flash_attn = "on" if flash_attn else "off"
        if flash_attn not in FLASH_ATTN:
            raise InvalidRequestError(f"flash_attn must be on, off or auto, got {flash_attn!r}")
        for name, value in (("type_k", type_k), ("type_v", type_v)):
            if value not in KV_CACHE_TYPES:
                raise InvalidRequestError(
                    f"{name} must be one of {', '.join(KV_CACHE_TYPES)}, got {value!r}", param=name)
        if rope_scaling not in ROPE_SCALING:
            raise InvalidRequestError("rope_scaling must be none, linear or yarn", param="rope_scaling")
        if pooling not in POOLING:
            raise InvalidRequestError(f"pooling must be one of none, mean, cls, last, rank")
        threads = default_threads() if n_threads is None else int(n_threads)
        threads_batch = threads if n_threads_batch is None else int(n_threads_batch)
        if threads < 1 or threads_batch < 1:
            raise InvalidRequestError("n_threads must be >= 1")
        check_cpu_placement(cpu)
        check_cpu_placement(cpu_batch)
        # the batch pool takes every generation setting unless its thread count was given
        # (upstream's postprocess_cpu_params)
        self.pools_json = orjson.dumps({
            "gen": _cpu_json(cpu, threads),
            "batch": _cpu_json(cpu_batch, -1 if n_threads_batch is None else threads_batch)})

        self.params = L.llama_context_default_params()
        cdef L.llama_context_params * params = &self.params
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_ubatch, n_batch)
        params.n_seq_max = n_seq_max
        params.n_threads = threads
        params.n_threads_batch = threads_batch
        params.flash_attn_type = FLASH_ATTN[flash_attn]
        params.type_k = KV_CACHE_TYPES[type_k]
        params.type_v = KV_CACHE_TYPES[type_v]
        params.embeddings = embeddings
        params.pooling_type = POOLING[pooling]
        params.kv_unified = kv_unified
        params.swa_full = swa_full
        params.offload_kqv = offload_kqv
        params.op_offload = op_offload
        params.rope_scaling_type = ROPE_SCALING[rope_scaling]
        params.rope_freq_base = rope_freq_base
        params.rope_freq_scale = rope_freq_scale
        params.yarn_ext_factor = yarn_ext_factor
        params.yarn_attn_factor = yarn_attn_factor
        params.yarn_beta_slow = yarn_beta_slow
        params.yarn_beta_fast = yarn_beta_fast
        params.yarn_orig_ctx = yarn_orig_ctx
        params.no_perf = not perf
        self.control_vectors = tuple((os.fspath(p), float(s)) for p, s in control_vectors)
        for path, _ in self.control_vectors:
            if not os.path.isfile(path):
                raise InvalidRequestError(f"control vector not found: {path}", param="control_vectors")
        self.control_vector_layers = tuple(int(v) for v in control_vector_layers)

    @property
    def n_ctx(self):
        return self.params.n_ctx


def fit_params(path, ModelParams model, ContextParams context, margins_mib=(1024,), int n_ctx_min=4096):
    """Fit the unset model and context parameters to free device memory before loading, as
    llama-server's --fit does (common_fit_params): the GPU layers, tensor split and overrides
    the user left at their defaults, and n_ctx when it is 0. `margins_mib` is --fit-target
    (one value is used for every device). Returns upstream's status: 0 fitted, 1 could not
    fit, 2 an error (the parameters are then as they were, and loading proceeds as upstream)."""
    cdef vector[size_t] margins
    margins.resize(L.llama_max_devices())
    values = list(margins_mib) or [1024]
    for i in range(margins.size()):
        margins[i] = <size_t> (values[i] if len(values) > 1 and i < len(values) else values[0]) * 1024 * 1024
    cdef bytes cpath = os.fsencode(path)
    cdef int status
    status = B.pyllama_fit(cpath, &model.params, &context.params, model.split.data(),
                           model.tensor_overrides.data(), margins, n_ctx_min)
    return status


cdef class Context:
    """A llama_context: KV cache, compute buffers and a reusable batch.

    Args:
        model: the loaded model.
        n_ctx: total context in tokens; 0 takes the model's training context.
        n_batch: most tokens one decode call takes.
        n_ubatch: physical micro-batch size.
        n_seq_max: sequences (parallel slots) the context holds.
        n_threads: threads for generation; None = the physical cores (llama-server's default).
        n_threads_batch: threads for prompt processing; None = n_threads.
        flash_attn: "on", "off" or "auto".
        type_k, type_v: KV cache types ("f16", "q8_0", ...).
        embeddings: compute embeddings instead of logits.
        pooling: None (the model's), "none", "mean", "cls", "last" or "rank".
        kv_unified: one KV buffer shared by all sequences.
        swa_full: full-size cache for sliding-window attention layers.
        offload_kqv: keep the KV cache on the GPU (GPU builds).
        rope_scaling: None (the model's), "none", "linear" or "yarn".
        rope_freq_base, rope_freq_scale: RoPE overrides (0 = the model's).
        yarn_ext_factor, yarn_attn_factor, yarn_beta_slow, yarn_beta_fast, yarn_orig_ctx: YaRN
            tuning (negative / 0 = the model's).
        cpu, cpu_batch: CpuPlacement (pyllama.engine.config) of the generation and prompt
            threads: affinity mask / range, strict placement, priority, polling; None =
            upstream's defaults. cpu_batch is used only with n_threads_batch (as -Cb with -tb).
        perf: keep libllama's internal performance timings (llama_perf_context).
        control_vectors: ((path, scale), ...) control vector GGUFs applied to this context,
            summed (--control-vector, --control-vector-scaled);
            control_vector_layers: (start, end) layers they apply to, inclusive (<= 0: 1 and
            the model's layer count).

    Raises:
        InvalidRequestError: a parameter is out of range.
        ContextCreationError: libllama could not create the context.

    Not thread-safe: one thread owns a Context.
    """

    def __cinit__(self, Model model, *, ContextParams params=None, **options):
        self.ptr = NULL
        self.pools = NULL
        self.batch.token = NULL
        self.model = model
        if model.ptr == NULL:
            raise ModelLoadError("model is closed")
        if params is None:
            params = ContextParams(**options)
        elif options:
            raise TypeError("pass either params or options, not both")
        self.embeddings = params.params.embeddings
        self.kv_unified = params.params.kv_unified
        self.swa_full = params.params.swa_full
        with nogil:
            self.ptr = L.llama_init_from_model(model.ptr, params.params)
        if self.ptr == NULL:
            raise ContextCreationError(
                "failed to create the llama context (see the pyllama.llama_cpp log)")
        try:  # as common_init_from_params: process priority, then the threadpools
            self.pools = <void *> B.pyllama_threadpools_attach(self.ptr, params.pools_json)
        except ValueError as exc:
            self._free()
            raise InvalidRequestError(str(exc), param="cpu") from None
        cdef vector[string] cv_paths
        cdef vector[float] cv_scales
        if params.control_vectors:  # as common_init_from_params, once the context exists
            for path, scale in params.control_vectors:
                cv_paths.push_back(os.fsencode(path))
                cv_scales.push_back(scale)
            try:
                B.pyllama_control_vectors_apply(self.ptr, cv_paths, cv_scales, params.control_vector_layers[0],
                                                params.control_vector_layers[1])
            except RuntimeError as exc:
                self._free()
                raise ModelLoadError(f"{exc} (see the log)") from None
        self.batch = L.llama_batch_init(L.llama_n_batch(self.ptr), 0, 1)

    def __dealloc__(self):
        self._free()

    cdef void _free(self) noexcept:
        if self.batch.token != NULL:
            L.llama_batch_free(self.batch)
            self.batch.token = NULL
        if self.ptr != NULL:
            L.llama_free(self.ptr)
            self.ptr = NULL
        if self.pools != NULL:
            B.pyllama_threadpools_free(<B.pyllama_threadpools *> self.pools)
            self.pools = NULL

    def close(self):
        """Free the context and its batch."""
        self._free()

    def warmup(self):
        """An empty run through the model, as llama-server's --warmup (common_init_from_params):
        BOS and EOS (or token 0) encoded and/or decoded in sequence 0, then the memory cleared
        and the perf counters reset, so the first request finds weights paged in and the
        compute buffers allocated. Owner thread; returns the number of tokens run."""
        self._require_open()
        cdef const L.llama_vocab * vocab = L.llama_model_get_vocab(self.model.ptr)
        cdef L.llama_token bos = L.llama_vocab_bos(vocab)
        cdef L.llama_token eos = L.llama_vocab_eos(vocab)
        tokens = [t for t in (bos, eos) if t != L.LLAMA_TOKEN_NULL] or [0]
        cdef int i, n
        cdef L.llama_token start
        if L.llama_model_has_encoder(self.model.ptr):
            for i in range(len(tokens)):
                self._batch_set(i, tokens[i], i, 0, i == len(tokens) - 1)
            self.batch.n_tokens = len(tokens)
            with nogil:
                L.llama_encode(self.ptr, self.batch)  # a failed warm-up is not an error upstream
            start = L.llama_model_decoder_start_token(self.model.ptr)
            tokens = [bos if start == L.LLAMA_TOKEN_NULL else start]
        n = 0
        if L.llama_model_has_decoder(self.model.ptr):
            n = min(len(tokens), L.llama_n_batch(self.ptr))
            for i in range(n):
                self._batch_set(i, tokens[i], i, 0, i == n - 1)
            self.batch.n_tokens = n
            with nogil:
                L.llama_decode(self.ptr, self.batch)
        with nogil:
            L.llama_memory_clear(L.llama_get_memory(self.ptr), True)
            L.llama_synchronize(self.ptr)
            L.llama_perf_context_reset(self.ptr)
        return n

    def perf(self):
        """libllama's own counters (llama_perf_context): prompt and generation time in ms
        (0 with perf=False), evaluated token counts, and how often a compute graph was reused."""
        self._require_open()
        cdef L.llama_perf_context_data d = L.llama_perf_context(self.ptr)
        return {"t_p_eval_ms": d.t_p_eval_ms, "t_eval_ms": d.t_eval_ms, "n_p_eval": d.n_p_eval,
                "n_eval": d.n_eval, "n_reused": d.n_reused}

    cdef int _require_open(self) except -1:
        if self.ptr == NULL:
            raise ContextCreationError("context is closed")
        return 0

    @property
    def n_ctx(self):
        self._require_open()
        return L.llama_n_ctx(self.ptr)

    @property
    def n_ctx_seq(self):
        """Context available to each sequence."""
        self._require_open()
        return L.llama_n_ctx_seq(self.ptr)

    @property
    def n_batch(self):
        self._require_open()
        return L.llama_n_batch(self.ptr)

    @property
    def n_ubatch(self):
        self._require_open()
        return L.llama_n_ubatch(self.ptr)

    @property
    def n_seq_max(self):
        self._require_open()
        return L.llama_n_seq_max(self.ptr)

    @property
    def n_threads(self):
        self._require_open()
        return L.llama_n_threads(self.ptr)

    @property
    def n_threads_batch(self):
        self._require_open()
        return L.llama_n_threads_batch(self.ptr)

    def clear(self):
        """Empty the KV cache of every sequence."""
        self._require_open()
        L.llama_memory_clear(L.llama_get_memory(self.ptr), True)

    def seq_pos_max(self, int seq_id=0):
        """Largest position stored for a sequence, -1 when it is empty."""
        self._require_open()
        return L.llama_memory_seq_pos_max(L.llama_get_memory(self.ptr), seq_id)

    cdef int set_lora_c(self, list adapters, tuple scales) except -1:
        # Applies LoRA adapters with these scales to the next decodes (owner thread).
        cdef vector[L.llama_adapter_lora *] ptrs
        cdef vector[float] cscales
        cdef LoraAdapter adapter
        for adapter, scale in zip(adapters, scales):
            if scale != 0.0:
                ptrs.push_back(adapter.ptr)
                cscales.push_back(scale)
        if L.llama_set_adapters_lora(self.ptr, ptrs.data(), ptrs.size(), cscales.data()) != 0:
            raise DecodeError("failed to apply the LoRA adapters", code=-1)
        return 0

    def set_lora(self, adapters, scales):
        """Apply LoRA adapters (LoraAdapter list) with scales to the next decodes."""
        self._require_open()
        self.set_lora_c(list(adapters), tuple(float(s) for s in scales))

    cdef int decode_c(self, int n_tokens) except -1:
        # Decodes the first n_tokens entries of self.batch. Owner thread; releases the GIL.
        cdef int rc
        self.batch.n_tokens = n_tokens
        with nogil:
            rc = L.llama_decode(self.ptr, self.batch)
        return check_decode(rc, n_tokens, L.llama_n_ctx_seq(self.ptr))

    def generate(self, prompt, SamplerChain sampler, *, int max_tokens=-1, int seq_id=0,
                 bint stop_at_eog=True):
        """Run a prompt through the model and yield sampled token ids.

        The sequence's KV cells are cleared first, and the sampler is reset, so the same
        prompt and seed give the same tokens on every call.

        Args:
            prompt: token ids (see Model.tokenize).
            sampler: the chain that picks each token.
            max_tokens: most tokens to generate; -1 runs until an end-of-generation token or
                the end of the context.
            seq_id: the sequence to use.
            stop_at_eog: stop (without yielding it) at an end-of-generation token.

        Yields:
            Token ids. The generator's return value is the stop reason: "eos", "limit"
            (max_tokens) or "context" (the sequence's context is full).

        Raises:
            InvalidRequestError: empty prompt or bad arguments.
            InvalidTokenError: a prompt token outside the vocabulary.
            ContextLengthExceededError: the prompt does not fit the sequence's context.
            DecodeError: libllama failed to decode.
        """
        self._require_open()
        if sampler.model is not self.model:
            raise InvalidRequestError("the sampler was built for another model")
        if seq_id < 0 or seq_id >= <int>L.llama_n_seq_max(self.ptr):
            raise InvalidRequestError(f"seq_id must be in [0, {L.llama_n_seq_max(self.ptr)})")
        tokens = list(prompt)
        cdef int n_prompt = len(tokens)
        cdef int n_ctx_seq = L.llama_n_ctx_seq(self.ptr)
        cdef int n_batch = L.llama_n_batch(self.ptr)
        if n_prompt == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        for t in tokens:
            self.model.check_token(t)
        if n_prompt >= n_ctx_seq:
            raise ContextLengthExceededError(
                f"the prompt has {n_prompt} tokens, which does not fit the context of "
                f"{n_ctx_seq} tokens", n_prompt_tokens=n_prompt, n_ctx=n_ctx_seq)

        L.llama_memory_seq_rm(L.llama_get_memory(self.ptr), seq_id, -1, -1)
        sampler.reset()

        cdef int pos = 0, i, n_chunk
        while pos < n_prompt:
            n_chunk = min(n_batch, n_prompt - pos)
            for i in range(n_chunk):
                self._batch_set(i, tokens[pos + i], pos + i, seq_id, pos + i == n_prompt - 1)
            self.decode_c(n_chunk)
            pos += n_chunk

        cdef L.llama_token tok
        cdef int n_generated = 0
        cdef const L.llama_vocab * vocab = self.model.vocab
        while True:
            with nogil:
                tok = sampler.sample_c(self.ptr, -1)
            if stop_at_eog and L.llama_vocab_is_eog(vocab, tok):
                return "eos"
            yield tok
            n_generated += 1
            if max_tokens >= 0 and n_generated >= max_tokens:
                return "limit"
            if pos >= n_ctx_seq:
                return "context"
            self._batch_set(0, tok, pos, seq_id, True)
            self.decode_c(1)
            pos += 1

    cdef void _batch_set(self, int i, L.llama_token token, L.llama_pos pos,
                                L.llama_seq_id seq_id, bint logits) noexcept:
        self.batch.token[i] = token
        self.batch.pos[i] = pos
        self.batch.n_seq_id[i] = 1
        self.batch.seq_id[i][0] = seq_id
        self.batch.logits[i] = logits
