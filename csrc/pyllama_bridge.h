// C++ glue over llama.cpp's `common` library, for what Cython cannot reach directly
// (common's C++ types). Declared for Cython in pyllama/_bridge.pxd.
#pragma once

#include <string>

// Turn a JSON schema (as JSON text) into a GBNF grammar with upstream's own converter
// (common/json-schema-to-grammar.cpp), as llama-server does for "json_schema".
// Throws std::exception with upstream's message when the schema is not valid JSON or cannot
// be converted. Pure function: thread-safe.
std::string pyllama_json_schema_to_grammar(const std::string & schema_json);

struct llama_model;
struct pyllama_chat;

// Chat templates of a model (or an override: a built-in name such as "chatml", or Jinja
// source), through common_chat_templates_init. Throws std::exception when the template does
// not parse. Free with pyllama_chat_free. Thread-safe to use from several threads at once.
pyllama_chat * pyllama_chat_init(const llama_model * model, const std::string & template_override);
void pyllama_chat_free(pyllama_chat * chat);

// {"source": ..., "tool_use_source": ..., "explicit": bool, "caps": {...}} as JSON text.
std::string pyllama_chat_info(const pyllama_chat * chat);

// Apply the template (common_chat_templates_apply). `inputs_json` holds the OpenAI-style
// fields: messages, tools, tool_choice, json_schema (text), grammar, add_generation_prompt,
// continue_final_message, use_jinja, parallel_tool_calls, reasoning_format, enable_thinking,
// chat_template_kwargs (values as JSON text). Returns common_chat_params as JSON text.
// Throws std::exception with upstream's message on bad input.
std::string pyllama_chat_apply(const pyllama_chat * chat, const std::string & inputs_json);

// Parse model output into an OpenAI-style message (common_chat_parse). `params_json` holds
// format, reasoning_format, reasoning_in_content, generation_prompt, parse_tool_calls,
// is_continuation, parser. Returns the message as JSON text.
std::string pyllama_chat_parse(const std::string & text, bool is_partial, const std::string & params_json);
