// Speculative decoding over llama.cpp's common/speculative.{h,cpp}, for the engine loop
// (pyllama/engine/_core.pyx). Declared for Cython in pyllama/_bridge.pxd.
//
// One pyllama_spec per EngineCore: common's multi-sequence speculative state (one sequence per
// slot), and the mirror of what the draft context (if any) holds per sequence, so that a draft
// model follows the target's cache however the engine changed it (prompt cache, checkpoints,
// slot restore, context shift): before drafting, each sequence's draft KV is cut back to its
// common prefix with the target's tokens and the rest is evaluated through
// common_speculative_process. Not thread-safe: the engine thread owns it; every call may run
// without the GIL.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "llama.h"

struct pyllama_spec;

// `params_json`: {"types": ["ngram-simple", ...], "draft": {"n_max", "n_min", "p_split",
// "p_min", "backend_sampling"}, "ngram_simple" / "ngram_map_k" / "ngram_map_k4v":
// {"size_n", "size_m", "min_hits"}, "ngram_mod": {"n_match", "n_max", "n_min"},
// "ngram_cache": {"static", "dynamic"}, "synth_len", "synth_rates"}: the fields of
// common_params_speculative; a missing one keeps common's default. `ctx_dft` is the draft
// model's context (nullptr without -md); it must have n_seq sequences.
// Returns nullptr when no implementation is enabled (types none). Throws std::exception with
// common's message when common_speculative_init refuses (an incompatible draft vocabulary, a
// draft type without a draft context, an unknown type name).
pyllama_spec * pyllama_spec_init(const std::string & params_json, llama_context * ctx_tgt, llama_context * ctx_dft,
                                 uint32_t n_seq);
void pyllama_spec_free(pyllama_spec * spec);

// The most tokens one draft may hold (common_speculative_n_max of the implementations).
int32_t pyllama_spec_n_max(const pyllama_spec * spec);

// Whether the per-position synthetic acceptance (--spec-synth-*) is on.
bool pyllama_spec_has_synth(const pyllama_spec * spec);
// The conditional acceptance probability of draft position i (synthetic acceptance only).
double pyllama_spec_synth_prob(const pyllama_spec * spec, int32_t i);

// A new generation starts on `seq_id` with `prompt` evaluated (common_speculative_begin).
void pyllama_spec_begin(pyllama_spec * spec, llama_seq_id seq_id, const llama_token * prompt, size_t n_prompt);

// A prompt was evaluated on `seq_id`: the draft context (if any) evaluates what it lacks of
// `tokens` now, so that the draft model's prompt costs fall in the prompt's time, as upstream's
// common_speculative_process after each prompt batch. Returns false when it had no room (the
// next draft retries).
bool pyllama_spec_prefill(pyllama_spec * spec, llama_seq_id seq_id, const std::vector<llama_token> * tokens);

// Ask for a draft of `seq_id` in the next pyllama_spec_draft: `prompt` is what the target's KV
// holds for it (borrowed until then), `id_last` the token sampled after it, at most `n_max`
// tokens into `result` (cleared here).
void pyllama_spec_request(pyllama_spec * spec, llama_seq_id seq_id, const std::vector<llama_token> * prompt,
                          llama_token id_last, int32_t n_max, std::vector<llama_token> * result);

// Bring the draft context up to date for every requested sequence, then draft them all at
// once (common_speculative_draft). Returns false when the draft context could not take the
// catch-up (no room); those drafts are then empty.
bool pyllama_spec_draft(pyllama_spec * spec);

// The target accepted n_accepted tokens of the last draft of `seq_id` (common_speculative_accept).
void pyllama_spec_accept(pyllama_spec * spec, llama_seq_id seq_id, uint16_t n_accepted);

// Forget what the draft context holds for `seq_id` (its sequence is emptied).
void pyllama_spec_clear(pyllama_spec * spec, llama_seq_id seq_id);
