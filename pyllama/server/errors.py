"""Exceptions -> HTTP error responses: Falcon's error handlers and serializer.

The JSON shape itself comes from pyllama.errors.error_json (upstream's format_error_response),
which the protocol layer also uses for SSE error frames; Falcon's own HTTPErrors (unknown
route, a body over the limit) get the same shape here.
"""

from __future__ import annotations

import logging

import falcon
import orjson

from pyllama.errors import PyllamaError, error_json

logger = logging.getLogger(__name__)

_FALCON_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 413: "invalid_request_error", 501: "not_supported_error",
                 503: "unavailable_error"}


def error_body(status: int, message: str, type_: str, **extra) -> dict:
    return {"error": {"code": status, "message": message, "type": type_, **extra}}


# server-http.cpp's error handler body, in its key order
NOT_FOUND = {"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}


def body_for(exc: BaseException) -> tuple[int, dict]:
    """Status and JSON body for any exception: pyllama.errors.error_json, plus Falcon's own
    HTTP errors (unknown route, body too large).

    Every 404 gets upstream's "File Not Found" body, whoever raised it: server-http.cpp's
    set_error_handler rewrites each 404 response, a route's own included. A known route asked
    with a method it does not take is a 404 too (cpp-httplib routes by method, no 405).
    """
    if isinstance(exc, falcon.HTTPMethodNotAllowed):
        return 404, NOT_FOUND
    if isinstance(exc, falcon.HTTPError):
        status = exc.status_code
        if status == 404:
            return 404, NOT_FOUND
        message = exc.description or exc.title
        return status, error_body(status, message, _FALCON_TYPES.get(status, "server_error"))
    status, body = error_json(exc)
    return (404, NOT_FOUND) if status == 404 else (status, body)


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
