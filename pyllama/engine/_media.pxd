# cython: language_level=3
from pyllama cimport _llama as L
from pyllama cimport _mtmd as M


cdef class MediaChunk:
    cdef M.mtmd_input_chunk * ptr  # owned copy (mtmd_input_chunk_copy), freed in __dealloc__
    cdef readonly int n_tokens
    cdef readonly int n_pos
    cdef readonly str id
    cdef readonly str kind  # "image" or "audio"
    cdef readonly int placeholder  # the negative value standing for its tokens in a prompt


cdef class MediaContext:
    cdef M.mtmd_context * ptr
    cdef M.mtmd_helper_init_opt opt
    cdef bytes ffmpeg_dir  # what opt.video_params.ffmpeg_bin_dir points into
    cdef bytes marker_c
    cdef readonly str path
    cdef readonly str marker
    cdef readonly object model  # the Model: it must outlive this context
    cdef readonly long long n_evals  # media chunks encoded and decoded (tests read it)

    cdef int _require_open(self) except -1

    cdef int eval_chunk(self, L.llama_context * lctx, MediaChunk chunk, L.llama_pos n_past,
                        L.llama_seq_id seq_id, int n_batch, L.llama_pos * new_n_past) noexcept nogil
