// C++ glue over llama.cpp's `common` library, for what Cython cannot reach directly
// (common's C++ types). Declared for Cython in pyllama/_bridge.pxd.
// JSON text crosses the boundary once each way: Python writes it with orjson, this side reads
// it with common_json::parse and writes its answer with one dump.
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
// force_pure_content (--skip-chat-parsing), chat_template_kwargs (an object; each value
// reaches the template as its JSON text).
// Returns common_chat_params as JSON text.
// Throws std::exception with upstream's message on bad input.
std::string pyllama_chat_apply(const pyllama_chat * chat, const std::string & inputs_json);

// The chat half of upstream's task_result_state (tools/server/server-task.h): the parser
// parameters loaded once per request, the text generated so far and the last parsed message
// kept here, and only the message diffs handed back. One per request; not thread-safe (the
// HTTP thread that streams the request owns it). Free with pyllama_chat_parser_free.
struct pyllama_chat_parser;

// `params_json` holds format, reasoning_format, reasoning_in_content, generation_prompt,
// parse_tool_calls, is_continuation, parser (a serialised PEG arena from pyllama_chat_apply).
// Throws std::exception when the parameters do not load.
pyllama_chat_parser * pyllama_chat_parser_new(const std::string & params_json);
void pyllama_chat_parser_free(pyllama_chat_parser * parser);

// Append `text` (or, with `replace`, take it as the whole output), parse the output so far
// (common_chat_parse; output its format cannot read stays plain content) and return the diffs
// against the previous message as OpenAI delta objects, one JSON text per line (update_chat_msg
// + server_chat_msg_diff_to_json_oaicompat), so each can go into its chunk as it is. Tool
// calls keep the ids they first got.
std::string pyllama_chat_parser_update(pyllama_chat_parser * parser, const std::string & text, bool is_partial,
                                       bool replace);

// Whether the parser takes the whole output as content (no reasoning or tool-call syntax, the
// generation prompt at most): its message is then the output text itself.
bool pyllama_chat_parser_is_pure_content(const pyllama_chat_parser * parser);

// The last parsed message, OpenAI-shaped (common_chat_msg::to_json_oaicompat), as JSON text.
std::string pyllama_chat_parser_message(const pyllama_chat_parser * parser);

// --- CPU placement (common's threadpool utilities, as common_init_from_params uses them) ---

struct llama_context;
struct pyllama_threadpools;

// Threads for generation when -t is not given: common_cpu_get_num_math(), upstream's default
// (the physical cores; the performance cores of a hybrid CPU).
int pyllama_cpu_default_threads();

// Check a -C/--cpu-mask (hex) or -Cr/--cpu-range (lo-hi) value with common's parsers; throws
// std::invalid_argument with upstream's message ("invalid cpumask", "invalid range").
void pyllama_cpu_check(const std::string & mask, const std::string & range);

// Create the generation and batch threadpools of `ctx` and attach them, after setting the
// process priority, as common_init_from_params does. `params_json`:
// {"gen": P, "batch": P} with P = {"n_threads", "mask", "range", "strict", "prio", "poll"};
// batch n_threads < 0 takes every gen value (postprocess_cpu_params). Returns nullptr when
// no CPU backend is loaded. Free after llama_free(ctx) with pyllama_threadpools_free.
pyllama_threadpools * pyllama_threadpools_attach(llama_context * ctx, const std::string & params_json);
void pyllama_threadpools_free(pyllama_threadpools * pools);

// --fit: adjust the parameters left at their defaults to free device memory before loading
// (common_fit_params): mparams' GPU layers / tensor split / overrides (written into the
// given buffers of llama_max_devices and llama_max_tensor_buft_overrides entries) and
// cparams->n_ctx when 0. `margins` (bytes per device) is --fit-target. Returns
// common_params_fit_status (0 success, 1 failure, 2 error); logs as upstream (libllama's
// lines of the trial loads only at -lv 5 and above).
#include <cstdint>
#include <vector>
struct llama_model_params;
struct llama_context_params;
struct llama_model_tensor_buft_override;
int pyllama_fit(const char * path, llama_model_params * mparams, llama_context_params * cparams,
                float * tensor_split, llama_model_tensor_buft_override * overrides,
                std::vector<size_t> margins, uint32_t n_ctx_min);

// common's own log (the COM_* / LOG_* lines of common: threadpools, fit, chat templates) in the
// format the logging flags ask for, as common_params_parse sets it up: prefix, timestamps,
// colours (-1 auto, 0 off, 1 on), JSONL, the verbosity threshold; paused with --log-disable.
// Not thread-safe: call once at start-up.
void pyllama_common_log_configure(bool prefix, bool timestamps, int colors, bool jsonl, int verbosity,
                                  bool disable);

// --control-vector(-scaled) and --control-vector-layer-range: load the vectors with
// common_control_vector_load (scaled and summed) and apply them to `ctx` between the layers
// (<= 0: upstream's defaults, 1 and the model's layer count). Throws std::runtime_error when
// no valid vector loads or libllama refuses them (common's log says why).
#include <string>
void pyllama_control_vectors_apply(llama_context * ctx, const std::vector<std::string> & paths,
                                   const std::vector<float> & scales, int layer_start, int layer_end);
