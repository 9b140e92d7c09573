// See pyllama_bridge.h. JSON text crosses the boundary, so Cython sees only std::string.
#include "pyllama_bridge.h"

#include "chat.h"
#include "json-schema-to-grammar.h"

#include <nlohmann/json.hpp>

using ojson = nlohmann::ordered_json;

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
    ojson caps = ojson::object();
    for (const auto & [name, value] : common_chat_templates_get_caps(chat->tmpls.get())) {
        caps[name] = value;
    }
    return ojson{
        {"source", common_chat_templates_source(chat->tmpls.get())},
        {"tool_use_source", common_chat_templates_source(chat->tmpls.get(), "tool_use")},
        {"explicit", common_chat_templates_was_explicit(chat->tmpls.get())},
        {"supports_enable_thinking", common_chat_templates_support_enable_thinking(chat->tmpls.get())},
        {"caps", caps},
    }.dump();
}

template <typename T>
static T value_or(const ojson & j, const char * key, T fallback) {
    auto it = j.find(key);
    return (it == j.end() || it->is_null()) ? fallback : it->get<T>();
}

std::string pyllama_chat_apply(const pyllama_chat * chat, const std::string & inputs_json) {
    const ojson in = ojson::parse(inputs_json);
    common_chat_templates_inputs inputs;
    inputs.messages = common_chat_msgs_parse_oaicompat(common_json::parse(in.at("messages").dump()));
    if (in.contains("tools") && !in.at("tools").is_null()) {
        inputs.tools = common_chat_tools_parse_oaicompat(common_json::parse(in.at("tools").dump()));
    }
    inputs.tool_choice = common_chat_tool_choice_parse_oaicompat(value_or<std::string>(in, "tool_choice", "auto"));
    inputs.json_schema = value_or<std::string>(in, "json_schema", "");
    inputs.grammar = value_or<std::string>(in, "grammar", "");
    inputs.use_jinja = value_or<bool>(in, "use_jinja", true);
    inputs.add_generation_prompt = value_or<bool>(in, "add_generation_prompt", true);
    if (in.contains("continue_final_message") && !in.at("continue_final_message").is_null()) {
        inputs.continue_final_message =
            common_chat_continuation_parse(common_json::parse(in.at("continue_final_message").dump()));
    }
    inputs.parallel_tool_calls = value_or<bool>(in, "parallel_tool_calls", false);
    inputs.reasoning_format = common_reasoning_format_from_name(value_or<std::string>(in, "reasoning_format", "auto"));
    inputs.enable_thinking = value_or<bool>(in, "enable_thinking", true);
    if (in.contains("chat_template_kwargs")) {
        for (const auto & item : in.at("chat_template_kwargs").items()) {
            inputs.chat_template_kwargs[item.key()] = item.value().get<std::string>();
        }
    }

    const auto params = common_chat_templates_apply(chat->tmpls.get(), inputs);

    ojson triggers = ojson::array();
    for (const auto & t : params.grammar_triggers) {
        triggers.push_back({{"type", (int) t.type}, {"value", t.value}, {"token", t.token}});
    }
    return ojson{
        {"prompt", params.prompt},
        {"format", (int) params.format},
        {"format_name", common_chat_format_name(params.format)},
        {"grammar", params.grammar},
        {"grammar_lazy", params.grammar_lazy},
        {"grammar_triggers", triggers},
        {"preserved_tokens", params.preserved_tokens},
        {"additional_stops", params.additional_stops},
        {"generation_prompt", params.generation_prompt},
        {"supports_thinking", params.supports_thinking},
        {"thinking_start_tag", params.thinking_start_tag},
        {"thinking_end_tags", params.thinking_end_tags},
        {"parser", params.parser},
    }.dump();
}

std::string pyllama_chat_parse(const std::string & text, bool is_partial, const std::string & params_json) {
    const ojson in = ojson::parse(params_json);
    common_chat_parser_params params;
    params.format = (common_chat_format) value_or<int>(in, "format", 0);
    params.reasoning_format = common_reasoning_format_from_name(value_or<std::string>(in, "reasoning_format", "auto"));
    params.reasoning_in_content = value_or<bool>(in, "reasoning_in_content", false);
    params.generation_prompt = value_or<std::string>(in, "generation_prompt", "");
    params.parse_tool_calls = value_or<bool>(in, "parse_tool_calls", true);
    params.is_continuation = value_or<bool>(in, "is_continuation", false);
    const auto parser = value_or<std::string>(in, "parser", "");
    if (!parser.empty()) {
        params.parser.load(parser);
    }
    return common_chat_parse(text, is_partial, params).to_json_oaicompat().dump_safe();
}
