# cython: language_level=3
from libc.stdint cimport int64_t, uint8_t
from libcpp.vector cimport vector

from pyllama cimport _llama as L
from pyllama._bridge cimport common_prompt_checkpoint


cdef class Checkpoint:
    cdef common_prompt_checkpoint c    # common's checkpoint: positions and the partial state bytes

    @staticmethod
    cdef Checkpoint create(L.llama_context * ctx, L.llama_seq_id seq_id, int64_t n_tokens,
                           L.llama_pos pos_min, L.llama_pos pos_max, int id_task)
    cdef void restore(self, L.llama_context * ctx, L.llama_seq_id seq_id) except *


cdef class PromptState:
    cdef vector[L.llama_token] tokens  # what the saved sequence held
    cdef uint8_t * data                # llama_state_seq_get_data_ext's bytes; owned, freed here
    cdef size_t n_data
    cdef readonly tuple lora           # the LoRA scales the tokens were computed with
    cdef readonly list checkpoints     # the slot's context checkpoints (Checkpoint), saved with it
    cdef size_t n_checkpoints_data     # their bytes


cdef class PromptCache:
    cdef readonly list states          # PromptState, oldest first (upstream's std::list)
    cdef readonly size_t limit_size    # bytes, 0 = no limit
    cdef readonly size_t limit_tokens  # 0 = no limit
    cdef size_t total_size
    cdef size_t total_tokens
    cdef readonly int64_t n_saved
    cdef readonly int64_t n_loaded

    cdef void _push(self, PromptState state) except *
    cdef void _pop(self, Py_ssize_t i) except *
    cdef PromptState _alloc(self, vector[L.llama_token] & tokens, tuple lora, list checkpoints, size_t size)
    cdef bint save(self, L.llama_context * ctx, L.llama_seq_id seq_id,
                   vector[L.llama_token] & tokens, tuple lora, list checkpoints) except -1
    cdef int load(self, L.llama_context * ctx, L.llama_seq_id seq_id,
                  vector[L.llama_token] & tokens, tuple tokens_lora, list checkpoints,
                  vector[L.llama_token] & tokens_new, tuple lora) except -2
    cpdef void update(self) except *
