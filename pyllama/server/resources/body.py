"""Reading JSON request bodies (orjson), with upstream's quirks."""

from __future__ import annotations

import falcon
import orjson

from pyllama.errors import InvalidRequestError, PyllamaError


class BadJSONError(PyllamaError):
    """An unparseable body: upstream answers 500 server_error (its parser throws)."""

    status = 500
    type = "server_error"


def read_json(req: falcon.Request, limit: int) -> dict:
    length = req.content_length
    if length is not None and length > limit:
        raise falcon.HTTPContentTooLarge(description=f"request body larger than {limit} bytes")
    data = req.bounded_stream.read(limit + 1)
    if len(data) > limit:
        raise falcon.HTTPContentTooLarge(description=f"request body larger than {limit} bytes")
    try:
        body = orjson.loads(data or b"{}")
    except orjson.JSONDecodeError as exc:
        raise BadJSONError(f"[json.exception.parse_error.101] parse error: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return body


def write_json(resp: falcon.Response, obj, status=falcon.HTTP_200) -> None:
    resp.status = status
    resp.content_type = "application/json; charset=utf-8"
    resp.data = orjson.dumps(obj)
