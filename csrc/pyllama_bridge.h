// C++ glue over llama.cpp's `common` library, for what Cython cannot reach directly
// (common's C++ types). Declared for Cython in pyllama/_bridge.pxd.
#pragma once

#include <string>

// Turn a JSON schema (as JSON text) into a GBNF grammar with upstream's own converter
// (common/json-schema-to-grammar.cpp), as llama-server does for "json_schema".
// Throws std::exception with upstream's message when the schema is not valid JSON or cannot
// be converted. Pure function: thread-safe.
std::string pyllama_json_schema_to_grammar(const std::string & schema_json);
