# cython: language_level=3
from pyllama cimport _llama as L
from pyllama.engine._model cimport Model


cdef class SamplerChain:
    cdef L.llama_sampler * ptr
    cdef readonly Model model
    cdef readonly dict params

    cdef L.llama_token sample_c(self, L.llama_context * ctx, int idx) noexcept nogil
