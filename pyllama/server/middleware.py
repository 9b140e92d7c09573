"""Before any resource runs: CORS, the loading check and API keys; then the JSON body, once.

Mirrors llama-server: OPTIONS always passes (200, empty body); /health is public; the loading
check (503) comes before the key check; the web UI's files (`/` and each built asset, upstream's
frontend_paths) are public and served while the model loads; keys come from `Authorization` (a leading "Bearer "
removed) or, when that is empty, `X-Api-Key`, and are compared in constant time.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

import falcon
import orjson

from pyllama.errors import AuthenticationError, InvalidRequestError, RequestTimeoutError, UnavailableError
from pyllama.server import ui

HEALTH = {"/health", "/v1/health"}


class CorsAndAuth:
    def __init__(self, state) -> None:
        self.state = state
        self.keys = [k.encode() for k in state.settings.api_key]
        self.prefix = state.settings.api_prefix.rstrip("/")
        self.frontend = ui.frontend_paths(ui.bundle())

    def _allow_origin(self, origin: str | None) -> str | None:
        # server-http.cpp's CORS rule: * echoes the Origin (with credentials; an empty value when
        # the request has none, as upstream sends it), localhost echoes only local origins,
        # anything else is sent verbatim.
        s = self.state.settings
        if s.cors_origins == "*" and s.cors_credentials:
            return origin or ""
        if s.cors_origins == "localhost":
            if origin:
                host = urlsplit(origin).hostname or ""
                if host in ("localhost", "127.0.0.1", "::1"):
                    return origin
            return None
        return s.cors_origins

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        allow = self._allow_origin(req.get_header("Origin"))
        if allow is not None:
            resp.set_header("Access-Control-Allow-Origin", allow)
        if req.method == "OPTIONS":
            s = self.state.settings
            resp.set_header("Access-Control-Allow-Credentials", "true" if s.cors_credentials else "false")
            resp.set_header("Access-Control-Allow-Methods", s.cors_methods)
            resp.set_header("Access-Control-Allow-Headers", s.cors_headers)
            resp.status = falcon.HTTP_200
            resp.content_type = "text/html"
            resp.text = ""
            resp.complete = True
            return
        path = req.path[len(self.prefix):] if self.prefix and req.path.startswith(self.prefix) else req.path
        if path in HEALTH:
            return
        if not self.state.ready.is_set() and path not in self.frontend:
            raise UnavailableError("Loading model")
        if self.keys and path not in self.frontend:
            key = req.get_header("Authorization") or ""
            if key.startswith("Bearer "):
                key = key[len("Bearer "):]
            if not key:
                key = req.get_header("X-Api-Key") or ""
            given = key.encode()
            # compare against every key, in constant time each
            if not any([hmac.compare_digest(given, k) for k in self.keys]):
                raise AuthenticationError("Invalid API Key")


class BadJSONError(InvalidRequestError):
    """An unparseable body (bad syntax or escapes, lone surrogates, invalid UTF-8, a number
    beyond a double, nesting past the parser's depth): a 400 in upstream's words.

    NOTE(pyllama): upstream's handlers let json::parse throw, which its exception wrapper
    answers as a 500 server_error; the body is the client's mistake, so this is a 400
    invalid_request_error with nlohmann's prefix and what the parser found.
    """


class JSONBody:
    """Read every POST body once, within the body limit, into `req.context.body`.

    A resource that takes any JSON value (e.g. /lora-adapters' array) sets `json_body = "any"`;
    one that answers a bad body its own way sets `json_body = "raw"` and gets the bytes in
    `req.context.raw_body`; every other one gets an object. An empty body is `{}`, as
    upstream's parsers see it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource, params) -> None:
        if req.method != "POST" or resource is None:
            return
        length = req.content_length
        if length is not None and length > self.limit:
            raise falcon.HTTPContentTooLarge(description=f"request body larger than {self.limit} bytes")
        try:
            data = req.bounded_stream.read(self.limit + 1)
        except (BlockingIOError, TimeoutError):  # the worker's read deadline (server/worker.py)
            resp.set_header("Connection", "close")  # the rest of the body may still come
            raise RequestTimeoutError("timed out waiting for the request body") from None
        if len(data) > self.limit:
            raise falcon.HTTPContentTooLarge(description=f"request body larger than {self.limit} bytes")
        if getattr(resource, "json_body", "object") == "raw":  # the resource parses it itself
            req.context.raw_body = data
            return
        try:
            body = orjson.loads(data or b"{}")
        except orjson.JSONDecodeError as exc:
            raise BadJSONError(f"[json.exception.parse_error.101] parse error: {exc}") from None
        if not isinstance(body, dict) and getattr(resource, "json_body", "object") != "any":
            raise InvalidRequestError("the request body must be a JSON object")
        req.context.body = body
