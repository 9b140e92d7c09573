# cython: language_level=3
"""C++ declarations of csrc/pyllama_bridge.h: our glue over llama.cpp's common library."""

from libcpp cimport bool as cbool
from libcpp.string cimport string

from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t
from libcpp.vector cimport vector
from libcpp.string cimport string as cstring

from pyllama._llama cimport (
    llama_context,
    llama_pos,
    llama_seq_id,
    llama_context_params,
    llama_model,
    llama_sampler,
    llama_token,
    llama_vocab,
    llama_model_params,
    llama_model_tensor_buft_override,
)


cdef extern from "pyllama_bridge.h" nogil:
    string pyllama_json_schema_to_grammar(const string & schema_json) except +


cdef extern from "pyllama_bridge.h" nogil:
    struct pyllama_chat
    pyllama_chat * pyllama_chat_init(const llama_model * model, const string & template_override) except +
    void pyllama_chat_free(pyllama_chat * chat)
    string pyllama_chat_info(const pyllama_chat * chat) except +
    string pyllama_chat_apply(const pyllama_chat * chat, const string & inputs_json) except +

    struct pyllama_chat_parser
    pyllama_chat_parser * pyllama_chat_parser_new(const string & params_json) except +
    cbool pyllama_chat_parser_is_pure_content(const pyllama_chat_parser * parser)
    void pyllama_chat_parser_free(pyllama_chat_parser * parser)
    string pyllama_chat_parser_update(pyllama_chat_parser * parser, const string & text, cbool is_partial,
                                      cbool replace) except +
    string pyllama_chat_parser_message(const pyllama_chat_parser * parser) except +


cdef extern from "pyllama_bridge.h" nogil:
    struct pyllama_threadpools
    int pyllama_cpu_default_threads()
    void pyllama_cpu_check(const string & mask, const string & range) except +
    pyllama_threadpools * pyllama_threadpools_attach(llama_context * ctx, const string & params_json) except +
    void pyllama_threadpools_free(pyllama_threadpools * pools)
    int pyllama_fit(const char * path, llama_model_params * mparams, llama_context_params * cparams,
                    float * tensor_split, llama_model_tensor_buft_override * overrides,
                    vector[size_t] margins, uint32_t n_ctx_min)
    void pyllama_common_log_configure(cbool prefix, cbool timestamps, int colors, cbool jsonl, int verbosity,
                                      cbool disable)
    void pyllama_control_vectors_apply(llama_context * ctx, const vector[cstring] & paths,
                                       const vector[float] & scales, int layer_start, int layer_end) except +


cdef extern from "reasoning-budget.h" nogil:
    # common's reasoning budget sampler (common/reasoning-budget.h), used as common_sampler does
    cdef enum common_reasoning_budget_state:
        REASONING_BUDGET_IDLE
        REASONING_BUDGET_COUNTING
        REASONING_BUDGET_FORCING
        REASONING_BUDGET_WAITING_UTF8
        REASONING_BUDGET_DONE

    llama_sampler * common_reasoning_budget_init(const llama_vocab * vocab,
                                                 const vector[vector[llama_token]] & start_seqs,
                                                 const vector[vector[llama_token]] & end_seqs,
                                                 const vector[llama_token] & forced_tokens,
                                                 int32_t budget) except +
    common_reasoning_budget_state common_reasoning_budget_get_state(const llama_sampler * smpl)
    const vector[llama_token] * common_reasoning_budget_get_end_match(const llama_sampler * smpl)
    cbool common_reasoning_budget_force(llama_sampler * smpl)


cdef extern from "common.h" nogil:
    # what a context can remove from a sequence (common_context_can_seq_rm clears its memory)
    cdef enum common_context_seq_rm_type:
        COMMON_CONTEXT_SEQ_RM_TYPE_NO
        COMMON_CONTEXT_SEQ_RM_TYPE_PART
        COMMON_CONTEXT_SEQ_RM_TYPE_FULL
        COMMON_CONTEXT_SEQ_RM_TYPE_RS

    common_context_seq_rm_type common_context_can_seq_rm(llama_context * ctx)

    # a context checkpoint: the part of a sequence's memory that cannot be rolled back (SWA
    # cells, recurrent state), as llama-server keeps them per slot
    cdef cppclass common_prompt_checkpoint:
        int64_t n_tokens
        int id_task
        llama_pos pos_min
        llama_pos pos_max
        size_t size()
        cbool empty()
        void update_pos(int64_t n_tokens, llama_pos pos_min, llama_pos pos_max)
        void update_tgt(llama_context * ctx, llama_seq_id seq_id, uint32_t flags)
        void load_tgt(llama_context * ctx, llama_seq_id seq_id, uint32_t flags)


cdef extern from "pyllama_spec.h" nogil:
    # speculative decoding over common/speculative.h, one state per EngineCore (csrc/pyllama_spec.h)
    struct pyllama_spec
    pyllama_spec * pyllama_spec_init(const string & params_json, llama_context * ctx_tgt, llama_context * ctx_dft,
                                     uint32_t n_seq) except +
    void pyllama_spec_free(pyllama_spec * spec)
    int32_t pyllama_spec_n_max(const pyllama_spec * spec)
    cbool pyllama_spec_has_synth(const pyllama_spec * spec)
    double pyllama_spec_synth_prob(const pyllama_spec * spec, int32_t i)
    void pyllama_spec_begin(pyllama_spec * spec, llama_seq_id seq_id, const llama_token * prompt, size_t n_prompt)
    void pyllama_spec_request(pyllama_spec * spec, llama_seq_id seq_id, const vector[llama_token] * prompt,
                              llama_token id_last, int32_t n_max, vector[llama_token] * result)
    cbool pyllama_spec_draft(pyllama_spec * spec)
    cbool pyllama_spec_prefill(pyllama_spec * spec, llama_seq_id seq_id, const vector[llama_token] * tokens)
    void pyllama_spec_accept(pyllama_spec * spec, llama_seq_id seq_id, uint16_t n_accepted)
    void pyllama_spec_clear(pyllama_spec * spec, llama_seq_id seq_id)
