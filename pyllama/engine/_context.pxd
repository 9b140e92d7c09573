# cython: language_level=3
from pyllama cimport _llama as L
from pyllama.engine._model cimport Model


cdef class ContextParams:
    cdef L.llama_context_params params
    cdef bytes pools_json  # the threadpools' settings, for pyllama_threadpools_attach
    cdef tuple control_vectors  # ((path, scale), ...)
    cdef tuple control_vector_layers  # (start, end); <= 0: upstream's defaults


cdef class Context:
    cdef L.llama_context * ptr
    cdef L.llama_batch batch
    # the CPU backend's threadpools (a pyllama_threadpools *; void here so that modules
    # cimporting Context need not see the bridge), freed after ptr
    cdef void * pools
    cdef readonly Model model
    cdef readonly bint embeddings
    cdef readonly bint kv_unified  # one KV stream for all sequences
    cdef readonly bint swa_full    # full-size cache for sliding-window layers

    cdef void _free(self) noexcept
    cdef int _require_open(self) except -1
    cdef int decode_c(self, int n_tokens) except -1
    cdef int set_lora_c(self, list adapters, tuple scales) except -1
    cdef void _batch_set(self, int i, L.llama_token token, L.llama_pos pos,
                         L.llama_seq_id seq_id, bint logits) noexcept


cdef int check_decode(int rc, int n_tokens=*, int n_ctx=*) except -1
