"""CORS, the Server header, the loading check and API keys, before any resource runs.

Mirrors llama-server: OPTIONS always passes (200, empty body); /health is public; the loading
check (503) comes before the key check; keys come from `Authorization` (a leading "Bearer "
removed) or, when that is empty, `X-Api-Key`, and are compared in constant time.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

import falcon

from pyllama.errors import AuthenticationError, UnavailableError

PUBLIC = {"/health", "/v1/health", "/"}


class CorsAndAuth:
    def __init__(self, state) -> None:
        self.state = state
        self.keys = [k.encode() for k in state.settings.api_key]
        self.prefix = state.settings.api_prefix.rstrip("/")

    def _allow_origin(self, origin: str | None) -> str | None:
        # server.cpp's CORS rule: * echoes the Origin (with credentials), localhost echoes only
        # local origins, anything else is sent verbatim.
        s = self.state.settings
        if s.cors_origins == "*":
            return origin if s.cors_credentials and origin else "*" if not s.cors_credentials else None
        if s.cors_origins == "localhost":
            if origin:
                host = urlsplit(origin).hostname or ""
                if host in ("localhost", "127.0.0.1", "::1"):
                    return origin
            return None
        return s.cors_origins

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        allow = self._allow_origin(req.get_header("Origin"))
        if allow:
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
        if path in ("/health", "/v1/health"):
            return
        if not self.state.ready.is_set():
            raise UnavailableError("Loading model")
        if self.keys and path not in PUBLIC:
            key = req.get_header("Authorization") or ""
            if key.startswith("Bearer "):
                key = key[len("Bearer "):]
            if not key:
                key = req.get_header("X-Api-Key") or ""
            given = key.encode()
            # compare against every key, in constant time each
            if not any([hmac.compare_digest(given, k) for k in self.keys]):
                raise AuthenticationError("Invalid API Key")
