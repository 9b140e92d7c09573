"""JSON schemas from requests (json_schema, response_format, tool parameters): bounded first.

llama.cpp's json-schema-to-grammar (common/json-schema-to-grammar.cpp, `SchemaConverter`)
names every rule after the path to it ("root-a-b-c-kv") and writes each name about four times,
so a schema that nests properties deep under long keys makes a grammar quadratic in its size;
and `_build_object_rule`'s `get_recursive_refs` takes time cubic in an object's optional
properties. Upstream answers a 280 KB schema of that kind with a 750 MB response and 5.9 GB of
RSS, or minutes of work on an HTTP thread. `check_json_schema` estimates both costs from the
schema in one linear walk and refuses a schema over SCHEMA_GRAMMAR_MAX or
SCHEMA_OPTIONAL_MAX with a 400 naming the field, before anything is converted.

A body parses up to orjson's 1024 levels of nesting, deeper than json.dumps or orjson.dumps
can write back: `dumps` writes any parsed value without recursion.

Runs on HTTP threads. Imports: errors only.
"""

from __future__ import annotations

import json

import orjson

from pyllama.errors import InvalidRequestError

SCHEMA_GRAMMAR_MAX = 4 << 20  # bytes of grammar the converter would write, estimated
SCHEMA_OPTIONAL_MAX = 1000  # optional properties, over all objects (as the cube root of the work)

# the keys whose values map names to subschemas (each child rule is named after its key)
_NAMED = frozenset(("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"))


def dumps(value) -> str:
    """json.dumps(value) for a value nested to any depth (iterative)."""
    out: list[str] = []
    stack: list = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, tuple):  # text to write as is (a parsed body holds no tuples)
            out.append(item[0])
        elif isinstance(item, dict):
            out.append("{")
            stack.append(("}",))
            entries = list(item.items())
            for i in range(len(entries) - 1, -1, -1):
                key, child = entries[i]
                stack.append(child)
                stack.append(((", " if i else "") + json.dumps(str(key)) + ": ",))
        elif isinstance(item, list):
            out.append("[")
            stack.append(("]",))
            for i in range(len(item) - 1, -1, -1):
                stack.append(item[i])
                if i:
                    stack.append((", ",))
        else:
            out.append(json.dumps(item))
    return "".join(out)


def schema_cost(schema) -> tuple[int, int]:
    """Estimate what converting `schema` to a grammar costs: (grammar bytes, optional-property
    work), the work being the sum over objects of (optional properties)**3."""
    grammar = work = 0
    stack = [(schema, 4)]  # (node, length of the rule name it gets); the first is "root"
    while stack:
        node, name = stack.pop()
        if isinstance(node, list):
            for i, item in enumerate(node):
                if isinstance(item, (dict, list)):
                    stack.append((item, name + 1 + len(str(i))))
            continue
        if not isinstance(node, dict):
            continue
        grammar += 4 * name + 64
        for key, value in node.items():
            if key in _NAMED and isinstance(value, dict):
                for sub, child in value.items():
                    stack.append((child, name + 1 + len(str(sub))))
            elif isinstance(value, (dict, list)):
                stack.append((value, name + 1 + len(str(key))))
        optional = _optional_properties(node)
        if isinstance(node.get("allOf"), list):  # allOf's objects merge into one rule
            optional += sum(_optional_properties(part) for part in node["allOf"])
        work += optional ** 3
    return grammar, work


def _optional_properties(node) -> int:
    if not isinstance(node, dict) or not isinstance(node.get("properties"), dict):
        return 0
    required = node.get("required")
    names = {r for r in required if isinstance(r, str)} if isinstance(required, list) else set()
    n = sum(1 for k in node["properties"] if k not in names)
    return n + (node.get("additionalProperties") not in (None, False))


def check_json_schema(schema, field: str = "json_schema") -> str:
    """Check that a schema's grammar stays within bounds; return the schema as JSON text.

    Args:
        schema: the parsed schema (object or boolean), or its JSON text.
        field: the request field it came from, for the error.

    Raises:
        InvalidRequestError: the grammar would be larger than SCHEMA_GRAMMAR_MAX, or take
            more optional-property work than SCHEMA_OPTIONAL_MAX allows.
    """
    parsed = schema
    if isinstance(schema, str):
        try:
            parsed = orjson.loads(schema)
        except orjson.JSONDecodeError:
            return schema  # the converter says what is wrong with it
    grammar, work = schema_cost(parsed)
    if grammar > SCHEMA_GRAMMAR_MAX:
        raise InvalidRequestError(
            f"\"{field}\": the grammar for this schema would take about {grammar >> 20} MB, more than "
            f"the {SCHEMA_GRAMMAR_MAX >> 20} MB allowed (properties nested too deep under names too long)",
            param=field)
    if work > SCHEMA_OPTIONAL_MAX ** 3:
        raise InvalidRequestError(
            f"\"{field}\": too many optional properties to build a grammar for (about "
            f"{round(work ** (1 / 3))} in one object; at most {SCHEMA_OPTIONAL_MAX}): list more of "
            "them in \"required\"", param=field)
    return schema if isinstance(schema, str) else dumps(schema)
