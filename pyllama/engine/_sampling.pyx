# cython: language_level=3, embedsignature=True
"""SamplerChain: one llama.cpp sampler chain (llama_sampler_chain_*) built from parameters.

The chain order follows upstream's common_sampler_init (common/sampling.cpp) for the samplers
built here; a chain with temperature <= 0 is greedy, as in llama-server.
Imports: `_llama`, `_model`, `errors`. A chain belongs to one thread at a time.
"""

from libc.stdint cimport uint32_t

from pyllama cimport _llama as L
from pyllama.engine._model cimport Model

from pyllama.errors import InvalidRequestError

DEFAULT_SEED = L.LLAMA_DEFAULT_SEED


cdef class SamplerChain:
    """A llama.cpp sampler chain for one sequence.

    Args:
        model: the model whose vocabulary the chain samples from.
        temperature: <= 0 samples greedily (the most likely token).
        top_k: keep the k most likely tokens; <= 0 disables.
        top_p: nucleus sampling; 1.0 disables.
        min_p: drop tokens below min_p times the top probability; 0 disables.
        seed: RNG seed; -1 (or 0xFFFFFFFF) picks a random one.
        min_keep: tokens every truncating sampler keeps at least.

    Raises:
        InvalidRequestError: a parameter is out of range.
    """

    def __cinit__(self, Model model, *, float temperature=0.8, int top_k=40, float top_p=0.95,
                  float min_p=0.05, long long seed=-1, int min_keep=0):
        self.ptr = NULL
        self.model = model
        if not (0.0 <= top_p <= 1.0):
            raise InvalidRequestError(f"top_p must be between 0 and 1, got {top_p}", param="top_p")
        if not (0.0 <= min_p <= 1.0):
            raise InvalidRequestError(f"min_p must be between 0 and 1, got {min_p}", param="min_p")
        if min_keep < 0:
            raise InvalidRequestError("min_keep must be >= 0", param="min_keep")
        cdef uint32_t c_seed = DEFAULT_SEED if seed < 0 else <uint32_t>(seed & 0xFFFFFFFF)
        self.params = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                           seed=seed, min_keep=min_keep)

        cdef L.llama_sampler_chain_params cparams = L.llama_sampler_chain_default_params()
        cparams.no_perf = True
        self.ptr = L.llama_sampler_chain_init(cparams)
        if temperature <= 0.0:
            L.llama_sampler_chain_add(self.ptr, L.llama_sampler_init_greedy())
            return
        if top_k > 0:
            L.llama_sampler_chain_add(self.ptr, L.llama_sampler_init_top_k(top_k))
        if top_p < 1.0:
            L.llama_sampler_chain_add(self.ptr, L.llama_sampler_init_top_p(top_p, min_keep))
        if min_p > 0.0:
            L.llama_sampler_chain_add(self.ptr, L.llama_sampler_init_min_p(min_p, min_keep))
        L.llama_sampler_chain_add(self.ptr, L.llama_sampler_init_temp(temperature))
        L.llama_sampler_chain_add(self.ptr, L.llama_sampler_init_dist(c_seed))

    @staticmethod
    def greedy(Model model):
        """Return a chain that always picks the most likely token."""
        return SamplerChain(model, temperature=0.0)

    def __dealloc__(self):
        if self.ptr != NULL:
            L.llama_sampler_free(self.ptr)
            self.ptr = NULL

    def reset(self):
        """Forget accepted tokens and restart the RNG stream state."""
        L.llama_sampler_reset(self.ptr)

    @property
    def names(self):
        """The names of the samplers in the chain, in order."""
        cdef int i
        return [(<bytes>L.llama_sampler_name(L.llama_sampler_chain_get(self.ptr, i))).decode()
                for i in range(L.llama_sampler_chain_n(self.ptr))]

    cdef L.llama_token sample_c(self, L.llama_context * ctx, int idx) noexcept nogil:
        # Samples from the logits of output row `idx` of the last decode and accepts the token.
        # Engine thread, GIL not needed.
        return L.llama_sampler_sample(self.ptr, ctx, idx)
