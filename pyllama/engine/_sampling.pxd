# cython: language_level=3
from libc.stdint cimport int32_t

from pyllama cimport _llama as L
from pyllama.engine._model cimport Model


cdef struct SamplerState:
    # One request's sampling state. Owned by a SamplerChain; used by one thread at a time.
    L.llama_sampler * chain
    L.llama_sampler * grammar        # NULL without a grammar
    L.llama_sampler * rbudget        # common's reasoning budget sampler; NULL without a budget
    bint grammar_lazy                # a lazy grammar waits while the budget counts
    L.llama_token_data * cur         # n_vocab candidates, reused every token
    L.llama_token_data_array cur_p   # the candidates after the last sample (post-sampling probs)
    int32_t n_vocab
    # When every sampler before top_k is a no-op, only the top_k candidates (by biased logit)
    # are loaded, sorted: the chain then does the same with k entries instead of n_vocab.
    int32_t prefilter_k              # 0: load every candidate
    int32_t n_bias
    L.llama_logit_bias * bias        # the chain's logit biases, to rank candidates as it will
    unsigned char * biased           # n_vocab flags: the token has a bias


cdef L.llama_token sampler_sample(SamplerState * s, const float * logits) noexcept nogil
cdef void sampler_accept(SamplerState * s, L.llama_token token) noexcept nogil


cdef class SamplerChain:
    cdef SamplerState * state
    cdef readonly Model model
    cdef readonly object params

    cdef L.llama_token sample_c(self, L.llama_context * ctx, int idx) noexcept nogil
    cdef void _accept_budget_prefill(self) noexcept
