"""The one place where exceptions become llama-server's JSON error object.

`{"error": {"code": <status>, "message": ..., "type": ...}}`, with n_prompt_tokens and n_ctx
for context errors (upstream's format_error_response, tools/server/server-common.cpp).
"""

from __future__ import annotations

import logging

import falcon
import orjson

from pyllama.errors import ContextLengthExceededError, PyllamaError

logger = logging.getLogger(__name__)

_FALCON_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 413: "invalid_request_error", 501: "not_supported_error",
                 503: "unavailable_error"}


def error_body(status: int, message: str, type_: str, **extra) -> dict:
    return {"error": {"code": status, "message": message, "type": type_, **extra}}


def body_for(exc: BaseException) -> tuple[int, dict]:
    """Status and JSON body for any exception (used for plain responses and SSE error frames)."""
    if isinstance(exc, PyllamaError):
        extra = {}
        if isinstance(exc, ContextLengthExceededError):
            extra = {"n_prompt_tokens": exc.n_prompt_tokens, "n_ctx": exc.n_ctx}
        return exc.status, error_body(exc.status, exc.message, exc.type, **extra)
    if isinstance(exc, falcon.HTTPError):
        status = exc.status_code
        message = exc.description or exc.title
        if status == 404:
            message = "File Not Found"
        return status, error_body(status, message, _FALCON_TYPES.get(status, "server_error"))
    return 500, error_body(500, str(exc) or type(exc).__name__, "server_error")


def _write(resp: falcon.Response, exc: BaseException) -> None:
    status, body = body_for(exc)
    resp.status = status
    resp.content_type = "application/json; charset=utf-8"
    resp.data = orjson.dumps(body)


def handle_pyllama_error(req, resp, exc, params):
    _write(resp, exc)


def handle_http_error(req, resp, exc, params):
    _write(resp, exc)


def handle_unexpected(req, resp, exc, params):
    if isinstance(exc, falcon.HTTPError):
        _write(resp, exc)
        return
    logger.exception("unhandled error on %s %s", req.method, req.path)
    _write(resp, exc)


def register(app: falcon.App) -> None:
    """Install the handlers; later registrations take precedence in Falcon 4 by specificity."""
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(PyllamaError, handle_pyllama_error)
