// See pyllama_bridge.h.
#include "pyllama_bridge.h"

#include "chat.h"
#include "common.h"
#include "fit.h"
#include "log.h"
#include "json-schema-to-grammar.h"
#include "json.h"

#include <random>

struct pyllama_chat {
    common_chat_templates_ptr tmpls;
};

std::string pyllama_json_schema_to_grammar(const std::string & schema_json) {
    return json_schema_to_grammar(common_json::parse(schema_json));
}

pyllama_chat * pyllama_chat_init(const llama_model * model, const std::string & template_override) {
    auto * chat = new pyllama_chat();
    try {
        chat->tmpls = common_chat_templates_init(model, template_override);
    } catch (...) {
        delete chat;
        throw;
    }
    return chat;
}

void pyllama_chat_free(pyllama_chat * chat) {
    delete chat;
}

std::string pyllama_chat_info(const pyllama_chat * chat) {
    common_json caps = common_json::object();
    for (const auto & [name, value] : common_chat_templates_get_caps(chat->tmpls.get())) {
        caps[name] = value;
    }
    common_json out = common_json::object();
    out["source"] = common_chat_templates_source(chat->tmpls.get());
    out["tool_use_source"] = common_chat_templates_source(chat->tmpls.get(), "tool_use");
    out["explicit"] = common_chat_templates_was_explicit(chat->tmpls.get());
    out["supports_enable_thinking"] = common_chat_templates_support_enable_thinking(chat->tmpls.get());
    out["caps"] = caps;
    return out.dump();
}

template <typename T>
static T value_or(const common_json & j, const char * key, T fallback) {
    return (!j.contains(key) || j.at(key).is_null()) ? fallback : j.at(key).get<T>();
}

static bool present(const common_json & j, const char * key) {
    return j.contains(key) && !j.at(key).is_null();
}

std::string pyllama_chat_apply(const pyllama_chat * chat, const std::string & inputs_json) {
    const common_json in = common_json::parse(inputs_json);
    common_chat_templates_inputs inputs;
    inputs.messages = common_chat_msgs_parse_oaicompat(in.at("messages"));
    if (present(in, "tools")) {
        inputs.tools = common_chat_tools_parse_oaicompat(in.at("tools"));
    }
    inputs.tool_choice = common_chat_tool_choice_parse_oaicompat(value_or<std::string>(in, "tool_choice", "auto"));
    inputs.json_schema = value_or<std::string>(in, "json_schema", "");
    inputs.grammar = value_or<std::string>(in, "grammar", "");
    inputs.use_jinja = value_or<bool>(in, "use_jinja", true);
    inputs.add_generation_prompt = value_or<bool>(in, "add_generation_prompt", true);
    if (present(in, "continue_final_message")) {
        inputs.continue_final_message = common_chat_continuation_parse(in.at("continue_final_message"));
    }
    inputs.parallel_tool_calls = value_or<bool>(in, "parallel_tool_calls", false);
    inputs.reasoning_format = common_reasoning_format_from_name(value_or<std::string>(in, "reasoning_format", "auto"));
    inputs.enable_thinking = value_or<bool>(in, "enable_thinking", true);
    inputs.force_pure_content = value_or<bool>(in, "force_pure_content", false);
    if (present(in, "chat_template_kwargs")) {
        for (const auto & item : in.at("chat_template_kwargs").items()) {
            inputs.chat_template_kwargs[item.key()] = item.value().dump();
        }
    }

    const auto params = common_chat_templates_apply(chat->tmpls.get(), inputs);

    common_json triggers = common_json::array();
    for (const auto & t : params.grammar_triggers) {
        common_json trigger = common_json::object();
        trigger["type"] = (int) t.type;
        trigger["value"] = t.value;
        trigger["token"] = t.token;
        triggers.push_back(trigger);
    }
    common_json out = common_json::object();
    out["prompt"] = params.prompt;
    out["format"] = (int) params.format;
    out["format_name"] = common_chat_format_name(params.format);
    out["grammar"] = params.grammar;
    out["grammar_lazy"] = params.grammar_lazy;
    out["grammar_triggers"] = triggers;
    out["preserved_tokens"] = params.preserved_tokens;
    out["additional_stops"] = params.additional_stops;
    out["generation_prompt"] = params.generation_prompt;
    out["supports_thinking"] = params.supports_thinking;
    out["thinking_start_tag"] = params.thinking_start_tag;
    out["thinking_end_tags"] = params.thinking_end_tags;
    out["parser"] = params.parser;
    out["message_delimiters"] = params.message_delimiters.to_json();
    return out.dump_safe();
}

struct pyllama_chat_parser {
    common_chat_parser_params params;
    common_chat_msg msg;
    std::string text;
    std::vector<std::string> tool_call_ids;
    bool pure_content = false;  // the parser takes the whole output as content
};

// Whether a serialised PEG arena is only "the generation prompt, then everything as content"
// (what templates without reasoning or tool syntax give, and what an empty parser means in
// common_chat_peg_parse): its message is then the output text itself, so the caller may skip
// parsing it again for every token.
static bool is_pure_content_parser(const std::string & arena_json, const std::string & generation_prompt) {
    if (arena_json.empty()) {
        return true;
    }
    const common_json arena = common_json::parse(arena_json);
    if (!arena.contains("parsers") || (arena.contains("rules") && !arena.at("rules").empty())) {
        return false;
    }
    int n_content = 0, n_until = 0;
    for (const auto & node : arena.at("parsers")) {
        const std::string type = node.value("type", std::string());
        if (type == "until") {
            n_until++;
            if (!node.contains("delimiters") || !node.at("delimiters").empty()) {
                return false;
            }
        } else if (type == "tag") {
            n_content++;
            if (node.value("tag", std::string()) != "content") {
                return false;
            }
        } else if (type == "literal") {
            // only the generation prompt, which common_chat_peg_parse puts before the output
            if (node.value("literal", std::string()) != generation_prompt) {
                return false;
            }
        } else if (type != "epsilon" && type != "end" && type != "sequence") {
            return false;
        }
    }
    return n_content == 1 && n_until == 1;
}

pyllama_chat_parser * pyllama_chat_parser_new(const std::string & params_json) {
    const common_json in = common_json::parse(params_json);
    auto * p = new pyllama_chat_parser();
    try {
        p->params.format = (common_chat_format) value_or<int>(in, "format", 0);
        p->params.reasoning_format =
            common_reasoning_format_from_name(value_or<std::string>(in, "reasoning_format", "auto"));
        p->params.reasoning_in_content = value_or<bool>(in, "reasoning_in_content", false);
        p->params.generation_prompt = value_or<std::string>(in, "generation_prompt", "");
        p->params.parse_tool_calls = value_or<bool>(in, "parse_tool_calls", true);
        p->params.is_continuation = value_or<bool>(in, "is_continuation", false);
        const auto parser = value_or<std::string>(in, "parser", "");
        if (!parser.empty()) {
            p->params.parser.load(parser);  // once per request, not once per token
        }
        p->pure_content = is_pure_content_parser(parser, p->params.generation_prompt);
    } catch (...) {
        delete p;
        throw;
    }
    p->msg.role = "assistant";
    return p;
}

void pyllama_chat_parser_free(pyllama_chat_parser * parser) {
    delete parser;
}

// upstream's gen_tool_call_id (tools/server/server-common.cpp random_string)
static std::string random_tool_call_id() {
    static const char chars[] = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    thread_local std::mt19937 rng{std::random_device{}()};
    std::uniform_int_distribution<size_t> pick(0, sizeof(chars) - 2);
    std::string id(32, ' ');
    for (auto & c : id) {
        c = chars[pick(rng)];
    }
    return id;
}

static common_json diff_to_json_oaicompat(const common_chat_msg_diff & diff) {
    // server_chat_msg_diff_to_json_oaicompat (tools/server/server-chat.cpp)
    common_json delta = common_json::object();
    if (!diff.reasoning_content_delta.empty()) {
        delta["reasoning_content"] = diff.reasoning_content_delta;
    }
    if (!diff.content_delta.empty()) {
        delta["content"] = diff.content_delta;
    }
    if (diff.tool_call_index != std::string::npos) {
        common_json tool_call = common_json::object();
        tool_call["index"] = diff.tool_call_index;
        if (!diff.tool_call_delta.id.empty()) {
            tool_call["id"] = diff.tool_call_delta.id;
            tool_call["type"] = "function";
        }
        if (!diff.tool_call_delta.name.empty() || !diff.tool_call_delta.arguments.empty()) {
            common_json function = common_json::object();
            if (!diff.tool_call_delta.name.empty()) {
                function["name"] = diff.tool_call_delta.name;
            }
            if (!diff.tool_call_delta.arguments.empty()) {
                function["arguments"] = diff.tool_call_delta.arguments;
            }
            tool_call["function"] = function;
        }
        common_json calls = common_json::array();
        calls.push_back(tool_call);
        delta["tool_calls"] = calls;
    }
    return delta;
}

std::string pyllama_chat_parser_update(pyllama_chat_parser * p, const std::string & text, bool is_partial,
                                       bool replace) {
    // task_result_state::update_chat_msg (tools/server/server-task.cpp)
    if (replace) {
        p->text = text;
    } else {
        p->text += text;
    }
    common_chat_msg parsed;
    try {
        parsed = common_chat_parse(p->text, is_partial, p->params);
    } catch (const std::exception &) {
        parsed = common_chat_msg();  // output the format cannot read stays plain content
        parsed.role = "assistant";
        parsed.content = p->text;
    }
    std::string out;
    if (parsed.empty()) {
        return out;
    }
    parsed.set_tool_call_ids(p->tool_call_ids, random_tool_call_id);
    std::vector<common_chat_msg_diff> diffs;
    try {
        diffs = common_chat_msg_diff::compute_diffs(p->msg, parsed);
    } catch (const std::exception &) {
        // a re-parse that is not an extension of the last one (e.g. a partial marker that
        // turned out to be text): nothing to send for this step
    }
    p->msg = std::move(parsed);
    for (const auto & diff : diffs) {
        if (!out.empty()) {
            out += '\n';  // never inside a dump: JSON escapes newlines
        }
        out += diff_to_json_oaicompat(diff).dump_safe();
    }
    return out;
}

bool pyllama_chat_parser_is_pure_content(const pyllama_chat_parser * p) {
    return p->pure_content;
}

std::string pyllama_chat_parser_message(const pyllama_chat_parser * p) {
    return p->msg.to_json_oaicompat().dump_safe();
}

// --- CPU placement -------------------------------------------------------------------------

struct pyllama_threadpools {
    common_threadpools pools;
};

int pyllama_cpu_default_threads() {
    return common_cpu_get_num_math();
}

static void cpu_mask_from(const std::string & mask, const std::string & range, common_cpu_params & cpu) {
    // as arg.cpp's -C and -Cr handlers: each sets mask_valid and adds its CPUs to the mask
    if (!mask.empty()) {
        cpu.mask_valid = true;
        if (!parse_cpu_mask(mask, cpu.cpumask)) {
            throw std::invalid_argument("invalid cpumask");
        }
    }
    if (!range.empty()) {
        cpu.mask_valid = true;
        bool ok = false;
        try {
            ok = parse_cpu_range(range, cpu.cpumask);
        } catch (const std::exception &) {  // std::stoull on a non-number
        }
        if (!ok) {
            throw std::invalid_argument("invalid range");
        }
    }
}

void pyllama_cpu_check(const std::string & mask, const std::string & range) {
    common_cpu_params cpu;
    cpu_mask_from(mask, range, cpu);
}

static common_cpu_params cpu_params_from(const common_json & j) {
    common_cpu_params cpu;
    cpu.n_threads  = value_or<int>(j, "n_threads", -1);
    cpu_mask_from(value_or<std::string>(j, "mask", ""), value_or<std::string>(j, "range", ""), cpu);
    cpu.strict_cpu = value_or<bool>(j, "strict", false);
    cpu.priority   = (enum ggml_sched_priority) value_or<int>(j, "prio", GGML_SCHED_PRIO_NORMAL);
    cpu.poll       = value_or<uint32_t>(j, "poll", 50);
    return cpu;
}

pyllama_threadpools * pyllama_threadpools_attach(llama_context * ctx, const std::string & params_json) {
    const auto j = common_json::parse(params_json);
    common_params params;
    params.cpuparams       = cpu_params_from(j.at("gen"));
    params.cpuparams_batch = cpu_params_from(j.at("batch"));
    postprocess_cpu_params(params.cpuparams, nullptr);
    postprocess_cpu_params(params.cpuparams_batch, &params.cpuparams);
    if (!ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)) {
        return nullptr;
    }
    set_process_priority(params.cpuparams.priority);
    auto * out = new pyllama_threadpools();
    out->pools.init(ctx, params);
    return out;
}

void pyllama_threadpools_free(pyllama_threadpools * pools) {
    delete pools;
}

int pyllama_fit(const char * path, llama_model_params * mparams, llama_context_params * cparams,
                float * tensor_split, llama_model_tensor_buft_override * overrides,
                std::vector<size_t> margins, uint32_t n_ctx_min) {
    return common_fit_params(path, mparams, cparams, tensor_split, overrides, margins.data(), n_ctx_min,
                             nullptr,
                             common_log_get_verbosity_thold() >= LOG_LEVEL_DEBUG ? GGML_LOG_LEVEL_DEBUG
                                                                                 : GGML_LOG_LEVEL_ERROR);
}

void pyllama_common_log_configure(bool prefix, bool timestamps, int colors, bool jsonl, int verbosity,
                                  bool disable) {
    auto * log = common_log_main();
    common_log_set_prefix(log, prefix);
    common_log_set_timestamps(log, timestamps);
    common_log_set_colors(log, (log_colors) colors);
    common_log_set_jsonl(jsonl);
    common_log_set_verbosity_thold(verbosity);
    if (disable) {
        common_log_pause(log);
    }
}

void pyllama_control_vectors_apply(llama_context * ctx, const std::vector<std::string> & paths,
                                   const std::vector<float> & scales, int layer_start, int layer_end) {
    std::vector<common_control_vector_load_info> infos;
    for (size_t i = 0; i < paths.size(); i++) {
        infos.push_back({ scales[i], paths[i] });
    }
    if (layer_start <= 0) {
        layer_start = 1;
    }
    if (layer_end <= 0) {
        layer_end = llama_model_n_layer(llama_get_model(ctx));
    }
    const auto cvec = common_control_vector_load(infos);
    if (cvec.n_embd == -1) {
        throw std::runtime_error("failed to load the control vector(s)");
    }
    if (llama_set_adapter_cvec(ctx, cvec.data.data(), cvec.data.size(), cvec.n_embd, layer_start, layer_end)) {
        throw std::runtime_error("failed to apply the control vector(s)");
    }
}
