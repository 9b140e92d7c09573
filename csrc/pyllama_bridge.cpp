#include "pyllama_bridge.h"

#include "json-schema-to-grammar.h"

std::string pyllama_json_schema_to_grammar(const std::string & schema_json) {
    return json_schema_to_grammar(common_json::parse(schema_json));
}
