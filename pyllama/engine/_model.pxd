# cython: language_level=3
from libc.stdint cimport int32_t

from libcpp.vector cimport vector

from pyllama cimport _llama as L


# libllama's log callback (logs into the `pyllama.llama_cpp` logger); libmtmd logs through it too
cdef void _log_callback(L.ggml_log_level level, const char * text, void * user_data) noexcept nogil


cdef class ModelParams:
    cdef L.llama_model_params params
    # storage the params point into: it lives as long as the params
    cdef vector[float] split
    cdef vector[L.ggml_backend_dev_t] devices
    cdef vector[L.llama_model_kv_override] kv_overrides
    cdef vector[L.llama_model_tensor_buft_override] tensor_overrides
    cdef list patterns  # the tensor-override patterns' bytes


cdef class Model:
    cdef L.llama_model * ptr
    cdef const L.llama_vocab * vocab
    cdef readonly int32_t n_vocab
    cdef readonly str path
    cdef vector[L.llama_token] eog_ids  # every end-of-generation token, found once at load
    cdef dict special_texts  # special_text_tokens' cache: text -> tuple of token ids

    cdef int _require_open(self) except -1
    cdef int check_token(self, L.llama_token token) except -1
    cdef bytes piece_c(self, L.llama_token token, bint special)


cdef class LoraAdapter:
    cdef L.llama_adapter_lora * ptr
    cdef readonly Model model
    cdef readonly str path
