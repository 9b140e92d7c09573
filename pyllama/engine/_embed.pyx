# cython: language_level=3, embedsignature=True
"""EmbeddingCore: embeddings and rerank scores, many inputs per decode.

Each input takes one sequence of the context; as many inputs as fit (sequences and n_batch)
go into one batch, every token marked for output, then the pooled vector of each sequence
(or every token's vector with pooling "none") is read and the sequences are cleared. Mirrors
upstream's send_embedding / send_rerank (tools/server/server-context.cpp) and
common_embd_normalize (common/common.cpp).
Engine thread only. Imports: `_llama`, `_context`, `_model`, `errors`.
"""

import time

from libc.math cimport fabs, pow, sqrt
from libc.stdint cimport int32_t

from pyllama cimport _llama as L
from pyllama.engine._context cimport Context
from pyllama.engine._model cimport Model

from pyllama.errors import ContextLengthExceededError, EngineError, InvalidRequestError


cdef list _normalized(const float * v, int n, int norm):
    # common_embd_normalize: -1 none, 0 max-abs scaled to int16, 1 taxicab, 2 euclidean, >2 p-norm.
    cdef double total = 0.0
    cdef int i
    if norm == -1:
        total = 1.0
    elif norm == 0:
        for i in range(n):
            total = max(total, fabs(v[i]))
        total = total / 32760.0
    elif norm == 2:
        for i in range(n):
            total += v[i] * v[i]
        total = sqrt(total)
    else:
        for i in range(n):
            total += pow(fabs(v[i]), norm)
        total = pow(total, 1.0 / norm)
    cdef double scale = 1.0 / total if total > 0.0 else 0.0
    return [<float>(v[i] * scale) for i in range(n)]


cdef class EmbeddingCore:
    """Embeds token inputs with a Context created with embeddings=True."""

    cdef readonly Context context
    cdef readonly Model model
    cdef readonly int n_seq
    cdef readonly int n_batch
    cdef readonly int n_ubatch
    cdef readonly int n_ctx_seq
    cdef readonly int n_embd
    cdef readonly int pooling
    cdef readonly bint causal
    # upstream's llamacpp:* metrics count embedding work too: prompt tokens, decodes, seconds
    cdef readonly long long n_decode_calls
    cdef readonly long long n_prompt_tokens
    cdef readonly double t_decode

    def __cinit__(self, Context context):
        if not context.embeddings:
            raise InvalidRequestError("the context was not created with embeddings=True")
        self.context = context
        self.model = context.model
        self.n_seq = L.llama_n_seq_max(context.ptr)
        self.n_batch = L.llama_n_batch(context.ptr)
        self.n_ubatch = L.llama_n_ubatch(context.ptr)
        self.n_ctx_seq = L.llama_n_ctx_seq(context.ptr)
        self.n_embd = L.llama_model_n_embd(self.model.ptr)
        self.pooling = L.llama_get_pooling_type(context.ptr)
        self.causal = not L.llama_model_has_encoder(self.model.ptr)

    @property
    def pooling_name(self):
        return {L.LLAMA_POOLING_TYPE_NONE: "none", L.LLAMA_POOLING_TYPE_MEAN: "mean",
                L.LLAMA_POOLING_TYPE_CLS: "cls", L.LLAMA_POOLING_TYPE_LAST: "last",
                L.LLAMA_POOLING_TYPE_RANK: "rank"}.get(self.pooling, "unspecified")

    def check_input(self, tokens):
        """Raise if one input cannot be embedded (empty, too long, bad token ids)."""
        cdef int n = len(tokens)
        if n == 0:
            raise InvalidRequestError("input is empty", param="input")
        for t in tokens:
            self.model.check_token(t)
        if n > self.n_ctx_seq:
            raise ContextLengthExceededError(
                f"input ({n} tokens) exceeds the available context size ({self.n_ctx_seq} tokens)",
                n_prompt_tokens=n, n_ctx=self.n_ctx_seq)
        if n > self.n_ubatch:
            # upstream: pooled embeddings need the whole input in one physical batch
            raise InvalidRequestError(
                f"input ({n} tokens) is too large to process. increase the physical batch "
                f"size (current batch size: {self.n_ubatch})", param="input")

    def embed(self, list inputs, int normalize=2):
        """Embed token lists; returns, per input, a vector (or a list of per-token vectors
        with pooling "none", or a [score] with pooling "rank").

        Raises:
            InvalidRequestError, ContextLengthExceededError: an input cannot be embedded.
            DecodeError: libllama failed.
        """
        for tokens in inputs:
            self.check_input(tokens)
        results = [None] * len(inputs)
        cdef int start = 0, n, n_tok, i, j, seq
        cdef Context ctx = self.context
        cdef L.llama_memory_t mem = L.llama_get_memory(ctx.ptr)
        while start < len(inputs):
            # pack inputs: one sequence each, at most n_batch tokens
            n = 0
            n_tok = 0
            while start + n < len(inputs) and n < self.n_seq and \
                    n_tok + len(inputs[start + n]) <= self.n_batch:
                n_tok += len(inputs[start + n])
                n += 1
            j = 0
            offsets = []
            for seq in range(n):
                offsets.append(j)
                tokens = inputs[start + seq]
                for i in range(len(tokens)):
                    ctx._batch_set(j, tokens[i], i, seq, True)
                    j += 1
            try:
                t0 = time.perf_counter()
                ctx.decode_c(j)
                self.t_decode += time.perf_counter() - t0
                self.n_decode_calls += 1
                self.n_prompt_tokens += j
                for seq in range(n):
                    results[start + seq] = self._read(seq, offsets[seq], len(inputs[start + seq]), normalize)
            finally:
                for seq in range(n):
                    L.llama_memory_seq_rm(mem, seq, -1, -1)
            start += n
        return results

    def stats(self):
        """Counters since start: decodes, prompt tokens embedded, seconds in decode."""
        return dict(n_decode_calls=self.n_decode_calls, n_embd_prompt_tokens=self.n_prompt_tokens,
                    t_embd_prompt=self.t_decode, t_decode=self.t_decode)

    cdef object _read(self, int seq, int offset, int n_tokens, int normalize):
        cdef const float * v
        cdef int i, n_out
        if self.pooling == L.LLAMA_POOLING_TYPE_NONE:
            out = []
            for i in range(n_tokens):
                v = L.llama_get_embeddings_ith(self.context.ptr, offset + i)
                if v == NULL:
                    raise EngineError("failed to get token embeddings")
                out.append(_normalized(v, self.n_embd, normalize))
            return out
        v = L.llama_get_embeddings_seq(self.context.ptr, seq)
        if v == NULL:
            raise EngineError("failed to get sequence embeddings")
        if self.pooling == L.LLAMA_POOLING_TYPE_RANK:
            n_out = max(1, L.llama_model_n_cls_out(self.model.ptr))
            return [v[i] for i in range(n_out)]
        return _normalized(v, self.n_embd, normalize)
