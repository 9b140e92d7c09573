// See pyllama_spec.h.
#include "pyllama_spec.h"

#include "common.h"
#include "json.h"
#include "log.h"
#include "speculative.h"

#include <algorithm>
#include <stdexcept>

struct pyllama_spec {
    common_params_speculative params;
    common_speculative * spec = nullptr;
    llama_context * ctx_tgt = nullptr;
    llama_context * ctx_dft = nullptr;
    // per sequence: the tokens the draft context holds, from position 0
    std::vector<std::vector<llama_token>> dft_tokens;
    std::vector<bool> requested;

    ~pyllama_spec() { common_speculative_free(spec); }
};

template <typename T>
static void read(const common_json & j, const char * key, T & out) {
    if (j.contains(key) && !j.at(key).is_null()) {
        out = j.at(key).get<T>();
    }
}

// common_json reads the wider integer types only
static void read_u16(const common_json & j, const char * key, uint16_t & out) {
    int v = out;
    read(j, key, v);
    out = (uint16_t) v;
}

static void read_map(const common_json & j, const char * key, common_params_speculative_ngram_map & m) {
    if (!j.contains(key)) {
        return;
    }
    const auto & o = j.at(key);
    read_u16(o, "size_n", m.size_n);
    read_u16(o, "size_m", m.size_m);
    read_u16(o, "min_hits", m.min_hits);
}

pyllama_spec * pyllama_spec_init(const std::string & params_json, llama_context * ctx_tgt, llama_context * ctx_dft,
                                 uint32_t n_seq) {
    const common_json in = common_json::parse(params_json);
    auto * s = new pyllama_spec();
    auto & p = s->params;
    try {
        std::vector<std::string> names;
        read(in, "types", names);
        // --spec-type appends to the default {none} (common/arg.cpp)
        auto types = common_speculative_types_from_names(names);
        p.types.insert(p.types.end(), types.begin(), types.end());
        if (in.contains("draft")) {
            const auto & d = in.at("draft");
            read(d, "n_max", p.draft.n_max);
            read(d, "n_min", p.draft.n_min);
            read(d, "p_split", p.draft.p_split);
            read(d, "p_min", p.draft.p_min);
            read(d, "backend_sampling", p.draft.backend_sampling);
        }
        read_map(in, "ngram_simple", p.ngram_simple);
        read_map(in, "ngram_map_k", p.ngram_map_k);
        read_map(in, "ngram_map_k4v", p.ngram_map_k4v);
        if (in.contains("ngram_mod")) {
            const auto & m = in.at("ngram_mod");
            read(m, "n_match", p.ngram_mod.n_match);
            read(m, "n_max", p.ngram_mod.n_max);
            read(m, "n_min", p.ngram_mod.n_min);
        }
        if (in.contains("ngram_cache")) {
            read(in.at("ngram_cache"), "static", p.ngram_cache.lookup_cache_static);
            read(in.at("ngram_cache"), "dynamic", p.ngram_cache.lookup_cache_dynamic);
        }
        read(in, "synth_len", p.synth_len);
        std::vector<float> rates;
        read(in, "synth_rates", rates);
        p.synth_rates.assign(rates.begin(), rates.end());
        p.draft.ctx_tgt = ctx_tgt;
        p.draft.ctx_dft = ctx_dft;
        s->ctx_tgt = ctx_tgt;
        s->ctx_dft = ctx_dft;
        s->spec = common_speculative_init(p, n_seq);
    } catch (...) {
        delete s;
        throw;
    }
    if (s->spec == nullptr) {
        delete s;
        return nullptr;
    }
    s->dft_tokens.resize(n_seq);
    s->requested.assign(n_seq, false);
    return s;
}

void pyllama_spec_free(pyllama_spec * spec) {
    delete spec;
}

int32_t pyllama_spec_n_max(const pyllama_spec * spec) {
    return common_speculative_n_max(spec->spec);
}

bool pyllama_spec_has_synth(const pyllama_spec * spec) {
    return !common_speculative_get_synth_probs(spec->spec).empty();
}

double pyllama_spec_synth_prob(const pyllama_spec * spec, int32_t i) {
    const auto & probs = common_speculative_get_synth_probs(spec->spec);
    return i >= 0 && (size_t) i < probs.size() ? probs[i] : 0.0;
}

void pyllama_spec_begin(pyllama_spec * spec, llama_seq_id seq_id, const llama_token * prompt, size_t n_prompt) {
    common_speculative_begin(spec->spec, seq_id, llama_tokens(prompt, prompt + n_prompt));
}

void pyllama_spec_request(pyllama_spec * spec, llama_seq_id seq_id, const std::vector<llama_token> * prompt,
                          llama_token id_last, int32_t n_max, std::vector<llama_token> * result) {
    result->clear();
    auto & dp = common_speculative_get_draft_params(spec->spec, seq_id);
    dp.drafting = true;
    dp.n_max = n_max;
    dp.pos0 = (llama_pos) prompt->size();
    dp.id_last = id_last;
    dp.prompt = prompt;
    dp.result = result;
    spec->requested[seq_id] = true;
}

void pyllama_spec_clear(pyllama_spec * spec, llama_seq_id seq_id) {
    if (spec->ctx_dft != nullptr) {
        llama_memory_seq_rm(llama_get_memory(spec->ctx_dft), seq_id, -1, -1);
    }
    spec->dft_tokens[seq_id].clear();
}

// The draft context's sequences are cut back to their common prefix with the target's tokens,
// and the rest goes through common_speculative_process, in batches of n_batch for all
// sequences at once. Returns false when a batch found no room.
static bool spec_catch_up(pyllama_spec * s, const std::vector<const llama_tokens *> & targets) {
    llama_memory_t mem = llama_get_memory(s->ctx_dft);
    const int32_t n_batch = (int32_t) llama_n_batch(s->ctx_dft);
    const int n_seq = (int) s->dft_tokens.size();
    std::vector<size_t> next(n_seq, 0);
    bool pending = false;
    for (int i = 0; i < n_seq; ++i) {
        if (targets[i] == nullptr) {
            continue;
        }
        const auto & tgt = *targets[i];
        auto & dft = s->dft_tokens[i];
        size_t lcp = 0;
        while (lcp < dft.size() && lcp < tgt.size() && dft[lcp] == tgt[lcp]) {
            lcp++;
        }
        if (lcp < dft.size()) {
            if (!llama_memory_seq_rm(mem, i, (llama_pos) lcp, -1)) {
                llama_memory_seq_rm(mem, i, -1, -1);
                lcp = 0;
            }
            dft.resize(lcp);
        }
        next[i] = lcp;
        pending |= lcp < tgt.size();
    }
    common_batch batch(s->ctx_dft);
    bool retried = false;
    while (pending) {
        batch.clear();
        std::vector<size_t> took(n_seq, 0);
        for (int i = 0; i < n_seq && batch.size() < n_batch; ++i) {
            if (targets[i] == nullptr) {
                continue;
            }
            const auto & tgt = *targets[i];
            while (next[i] + took[i] < tgt.size() && batch.size() < n_batch) {
                const size_t k = next[i] + took[i];
                batch.add(tgt[k], (llama_pos) k, i, false);
                took[i]++;
            }
        }
        if (!common_speculative_process(s->spec, batch)) {
            // no room: with one KV buffer for every sequence, drop the idle sequences' caches once
            if (retried) {
                return false;
            }
            retried = true;
            for (int i = 0; i < n_seq; ++i) {
                if (targets[i] == nullptr) {
                    pyllama_spec_clear(s, i);
                }
            }
            continue;
        }
        pending = false;
        for (int i = 0; i < n_seq; ++i) {
            if (targets[i] == nullptr) {
                continue;
            }
            const auto & tgt = *targets[i];
            s->dft_tokens[i].insert(s->dft_tokens[i].end(), tgt.begin() + next[i], tgt.begin() + next[i] + took[i]);
            next[i] += took[i];
            pending |= next[i] < tgt.size();
        }
    }
    return true;
}

bool pyllama_spec_draft(pyllama_spec * s) {
    bool ok = true;
    const int n_seq = (int) s->dft_tokens.size();
    std::vector<const llama_tokens *> targets(n_seq, nullptr);
    for (int i = 0; i < n_seq; ++i) {
        if (s->requested[i]) {
            targets[i] = common_speculative_get_draft_params(s->spec, i).prompt;
        }
    }
    if (s->ctx_dft != nullptr && !spec_catch_up(s, targets)) {
        ok = false;
        for (int i = 0; i < n_seq; ++i) {
            if (s->requested[i]) {
                common_speculative_get_draft_params(s->spec, i).drafting = false;
                pyllama_spec_clear(s, i);
            }
        }
    }
    if (ok) {
        common_speculative_draft(s->spec);
    }
    if (s->ctx_dft != nullptr && ok) {
        // The draft context now holds id_last and a prefix of the draft after the prompt:
        // keep it (the target accepts a prefix of the same tokens), cut what is unknown.
        llama_memory_t mem = llama_get_memory(s->ctx_dft);
        for (int i = 0; i < n_seq; ++i) {
            if (!s->requested[i]) {
                continue;
            }
            auto & dp = common_speculative_get_draft_params(s->spec, i);
            auto & dft = s->dft_tokens[i];
            const llama_pos pos0 = dp.pos0;
            const llama_pos pos_max = llama_memory_seq_pos_max(mem, i);
            std::vector<llama_token> known;
            known.push_back(dp.id_last);
            known.insert(known.end(), dp.result->begin(), dp.result->end());
            int64_t n_dec = std::max<int64_t>(0, (int64_t) pos_max - pos0 + 1);
            if (n_dec > (int64_t) known.size()) {
                llama_memory_seq_rm(mem, i, pos0 + (llama_pos) known.size(), -1);
                n_dec = (int64_t) known.size();
            }
            dft.insert(dft.end(), known.begin(), known.begin() + n_dec);
        }
    }
    for (int i = 0; i < n_seq; ++i) {
        if (s->requested[i]) {
            auto & dp = common_speculative_get_draft_params(s->spec, i);
            dp.drafting = false;
            dp.prompt = nullptr;
            dp.result = nullptr;
        }
        s->requested[i] = false;
    }
    return ok;
}

bool pyllama_spec_prefill(pyllama_spec * s, llama_seq_id seq_id, const std::vector<llama_token> * tokens) {
    if (s->ctx_dft == nullptr) {
        return true;
    }
    std::vector<const llama_tokens *> targets(s->dft_tokens.size(), nullptr);
    targets[seq_id] = tokens;
    return spec_catch_up(s, targets);
}

void pyllama_spec_accept(pyllama_spec * spec, llama_seq_id seq_id, uint16_t n_accepted) {
    common_speculative_accept(spec->spec, seq_id, n_accepted);
}
