# cython: language_level=3
"""C declarations of libmtmd (llama.cpp's tools/mtmd: mtmd.h, mtmd-helper.h) that pyllama uses.

The only `cdef extern from "mtmd.h"` / "mtmd-helper.h" in the project, beside `_llama.pxd`.
Names and order follow upstream's headers so a bump of vendor/pin.toml can be reviewed line
by line against them. The audio-generation API (mtmd_gen_*, mtmd_helper_gen_audio_*) is left out.
Imports: libc and `_llama` only.
"""

from libc.stdint cimport int32_t, int64_t, uint32_t

from pyllama._llama cimport (
    ggml_backend_dev_t,
    ggml_log_callback,
    llama_context,
    llama_flash_attn_type,
    llama_model,
    llama_pos,
    llama_seq_id,
    llama_token,
)


cdef extern from "mtmd.h" nogil:
    cdef enum mtmd_input_chunk_type:
        MTMD_INPUT_CHUNK_TYPE_TEXT
        MTMD_INPUT_CHUNK_TYPE_IMAGE
        MTMD_INPUT_CHUNK_TYPE_AUDIO

    # opaque types
    ctypedef struct mtmd_context:
        pass
    ctypedef struct mtmd_bitmap:
        pass
    ctypedef struct mtmd_image_tokens:
        pass
    ctypedef struct mtmd_input_chunk:
        pass
    ctypedef struct mtmd_input_chunks:
        pass
    ctypedef struct mtmd_batch:
        pass

    ctypedef struct mtmd_input_text:
        const char * text
        size_t text_len
        bint add_special
        bint parse_special

    ctypedef bint (*mtmd_progress_callback)(float progress, void * user_data) noexcept
    ctypedef bint (*ggml_backend_sched_eval_callback)(void * t, bint ask, void * user_data) noexcept

    cdef struct mtmd_context_params:
        bint use_gpu
        ggml_backend_dev_t device
        bint print_timings
        int n_threads
        const char * image_marker  # deprecated, use media_marker instead
        const char * media_marker
        llama_flash_attn_type flash_attn_type
        bint warmup
        int image_min_tokens
        int image_max_tokens
        ggml_backend_sched_eval_callback cb_eval
        void * cb_eval_user_data
        int32_t batch_max_tokens
        mtmd_progress_callback progress_callback
        void * progress_callback_user_data

    const char * mtmd_default_marker()
    mtmd_context_params mtmd_context_params_default()
    mtmd_context * mtmd_init_from_file(const char * mmproj_fname, const llama_model * text_model,
                                       const mtmd_context_params ctx_params)
    void mtmd_free(mtmd_context * ctx)
    bint mtmd_decode_use_non_causal(const mtmd_context * ctx, const mtmd_input_chunk * chunk)
    bint mtmd_decode_use_mrope(const mtmd_context * ctx)
    bint mtmd_support_vision(const mtmd_context * ctx)
    bint mtmd_support_audio(const mtmd_context * ctx)
    int mtmd_get_audio_sample_rate(const mtmd_context * ctx)
    const char * mtmd_get_marker(const mtmd_context * ctx)

    # mtmd_bitmap
    mtmd_bitmap * mtmd_bitmap_init(uint32_t nx, uint32_t ny, const unsigned char * data)
    mtmd_bitmap * mtmd_bitmap_init_from_audio(size_t n_samples, const float * data)
    uint32_t mtmd_bitmap_get_nx(const mtmd_bitmap * bitmap)
    uint32_t mtmd_bitmap_get_ny(const mtmd_bitmap * bitmap)
    const unsigned char * mtmd_bitmap_get_data(const mtmd_bitmap * bitmap)
    size_t mtmd_bitmap_get_n_bytes(const mtmd_bitmap * bitmap)
    bint mtmd_bitmap_is_audio(const mtmd_bitmap * bitmap)
    void mtmd_bitmap_free(mtmd_bitmap * bitmap)
    const char * mtmd_bitmap_get_id(const mtmd_bitmap * bitmap)
    void mtmd_bitmap_set_id(mtmd_bitmap * bitmap, const char * id)

    # mtmd_input_chunks
    mtmd_input_chunks * mtmd_input_chunks_init()
    size_t mtmd_input_chunks_size(const mtmd_input_chunks * chunks)
    const mtmd_input_chunk * mtmd_input_chunks_get(const mtmd_input_chunks * chunks, size_t idx)
    void mtmd_input_chunks_free(mtmd_input_chunks * chunks)

    # mtmd_input_chunk
    mtmd_input_chunk_type mtmd_input_chunk_get_type(const mtmd_input_chunk * chunk)
    const llama_token * mtmd_input_chunk_get_tokens_text(const mtmd_input_chunk * chunk,
                                                         size_t * n_tokens_output)
    const mtmd_image_tokens * mtmd_input_chunk_get_tokens_image(const mtmd_input_chunk * chunk)
    size_t mtmd_input_chunk_get_n_tokens(const mtmd_input_chunk * chunk)
    const char * mtmd_input_chunk_get_id(const mtmd_input_chunk * chunk)
    llama_pos mtmd_input_chunk_get_n_pos(const mtmd_input_chunk * chunk)
    mtmd_input_chunk * mtmd_input_chunk_copy(const mtmd_input_chunk * chunk)
    void mtmd_input_chunk_free(mtmd_input_chunk * chunk)

    # tokenize: the prompt's media markers become media chunks (thread-safe, shared ctx)
    int32_t mtmd_tokenize(const mtmd_context * ctx, mtmd_input_chunks * output,
                          const mtmd_input_text * text, const mtmd_bitmap * const * bitmaps,
                          size_t n_bitmaps)
    int32_t mtmd_encode_chunk(mtmd_context * ctx, const mtmd_input_chunk * chunk)
    float * mtmd_get_output_embd(mtmd_context * ctx)

    void mtmd_log_set(ggml_log_callback log_callback, void * user_data)

    cdef struct mtmd_caps:
        bint inp_vision
        bint inp_audio
    mtmd_caps mtmd_get_cap_from_file(const char * mmproj_fname)


cdef extern from "mtmd-helper.h" nogil:
    ctypedef struct mtmd_helper_video:
        pass

    cdef struct mtmd_helper_video_init_params:
        float fps_target
        const char * ffmpeg_bin_dir
        int64_t timestamp_interval_ms

    mtmd_helper_video_init_params mtmd_helper_video_init_params_default()

    cdef struct mtmd_helper_init_opt:
        mtmd_helper_video_init_params video_params

    mtmd_helper_init_opt mtmd_helper_init_opt_default()
    void mtmd_helper_log_set(ggml_log_callback log_callback, void * user_data)
    bint mtmd_helper_support_video(const mtmd_context * ctx)

    cdef struct mtmd_helper_bitmap_wrapper:
        mtmd_bitmap * bitmap
        mtmd_helper_video * video_ctx

    mtmd_helper_bitmap_wrapper mtmd_helper_bitmap_init_from_buf(
        const mtmd_context * ctx, const unsigned char * buf, size_t len, bint placeholder,
        mtmd_helper_init_opt opt)
    size_t mtmd_helper_get_n_tokens(const mtmd_input_chunks * chunks)
    llama_pos mtmd_helper_get_n_pos(const mtmd_input_chunks * chunks)
    int32_t mtmd_helper_eval_chunk_single(mtmd_context * ctx, llama_context * lctx,
                                          const mtmd_input_chunk * chunk, llama_pos n_past,
                                          llama_seq_id seq_id, int32_t n_batch, bint logits_last,
                                          llama_pos * new_n_past)
    void mtmd_helper_video_free(mtmd_helper_video * ctx)
