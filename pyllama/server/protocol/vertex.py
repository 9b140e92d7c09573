"""The Vertex AI predict protocol: {"instances": [...]} in, {"predictions": [...]} out.

server-http.cpp's register_gcp_compat: each instance names the route it is for in
`@requestFormat`, either a camelCase alias of a route ("/v1/chat/completions" ->
"chatCompletions", "/apply-template" -> "applyTemplate") or the route's path itself; the rest
of the instance is that route's body, never streamed. Each prediction is the route's JSON
answer (an error object included: the route's status is not kept), its text when it is not
JSON, or null when empty; a bad instance is an error object in its place. At most 128.
Imports: `errors`.
"""

from __future__ import annotations

import orjson

from pyllama.errors import InvalidRequestError, error_json

MAX_INSTANCES = 128

# Where two routes share an alias, the one upstream's handler table (an unordered_map) yields
# first wins; these are the shared aliases whose routes differ, as upstream's Linux builds
# resolve them (checked against llama-server at the pin). Others: the first registered.
ALIAS_WINNERS = {"completions": "/v1/completions", "embeddings": "/v1/embeddings", "slots": "/slots"}


def path_to_format(path: str) -> str:
    """path_to_gcp_format: drop a leading /v1 and /, camelCase on / - _, stop at a :param."""
    s = path[3:] if len(path) > 3 and path.startswith("/v1") else path
    s = s[1:] if s.startswith("/") else s
    out, cap = [], False
    for c in s:
        if c == ":":
            break
        if c in "/-_":
            cap = True
        else:
            out.append(c.upper() if cap else c)
            cap = False
    return "".join(out)


def aliases(paths: list) -> dict:
    """camelCase alias -> route path, for routes in registration order."""
    out: dict = {}
    for path in paths:
        out.setdefault(path_to_format(path), path)
    for alias, path in ALIAS_WINNERS.items():
        if alias in out and path in paths:
            out[alias] = path
    return out


def parse_instances(raw: bytes) -> list:
    """The body's instances; 400 for a body upstream refuses as a whole."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"[json.exception.parse_error.101] parse error: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    instances = data.get("instances")
    if not isinstance(instances, list):
        raise InvalidRequestError("request body must include an array field named instances")
    if len(instances) > MAX_INSTANCES:
        raise InvalidRequestError(f"instances array exceeds maximum size of {MAX_INSTANCES}")
    return instances


def route_of(instance, alias_map: dict, paths) -> tuple[str, dict]:
    """(route path, body) one instance asks for; InvalidRequestError for a bad instance."""
    if not isinstance(instance, dict):
        raise InvalidRequestError("each instance must be a JSON object")
    fmt = instance.get("@requestFormat")
    if not isinstance(fmt, str):
        raise InvalidRequestError("each instance must include a string @requestFormat")
    payload = {k: v for k, v in instance.items() if k != "@requestFormat"}
    if "stream" in payload:  # the predict route answers whole bodies only
        payload["stream"] = False
    if fmt in alias_map:
        return alias_map[fmt], payload
    if fmt in paths:
        return fmt, payload
    raise InvalidRequestError(f"no handler registered for @requestFormat: {fmt}")


def prediction(content_type: str, body: bytes):
    """A route's answer as a prediction (parse_gcp_predict_response)."""
    if content_type.startswith("text/event-stream"):
        raise InvalidRequestError("predict route does not support streaming responses")
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")


def error_prediction(exc: BaseException) -> dict:
    """A failed instance's place in the predictions: {"error": {...}} (500 for the unexpected)."""
    return error_json(exc)[1]
