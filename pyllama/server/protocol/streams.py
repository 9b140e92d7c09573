"""/v1/stream and /v1/streams/lookup: the resumable stream routes' requests and JSON.

Upstream's server_stream_make_get_handler / _lookup_handler / _delete_handler
(tools/server/server-stream.cpp): the conversation id travels in the `conv_id` query parameter
(it may embed a model name with slashes), `from` is a byte offset parsed as std::stoull does;
the lookup answers only for the ids it is asked about, each matching the exact key and any
"<id>::<model>" variant.
Imports: `errors`, the stream store.
"""

from __future__ import annotations

import orjson

from pyllama.errors import InvalidRequestError, NotFoundError
from pyllama.server.stream_store import StreamSession, StreamStore

_U64 = 1 << 64


class LookupBodyError(InvalidRequestError):
    """An unparseable lookup body: upstream writes this 400 by hand, without "code"."""

    code_in_body = False


def conversation_id(value: str | None) -> str:
    """The `conv_id` query parameter (the last, when repeated); 400 when absent or empty."""
    if not value:
        raise InvalidRequestError("Missing conversation id in path")
    return value


def stoull(text: str) -> int:
    """std::stoull: leading blanks, a sign, decimal digits, the rest ignored; "-n" wraps."""
    s = text.lstrip(" \t\n\v\f\r")
    sign = 1
    if s and s[0] in "+-":
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    digits = len(s) - len(s.lstrip("0123456789"))
    if not digits:
        raise ValueError("no conversion")
    value = int(s[:digits])
    if value >= _U64:
        raise ValueError("out of range")
    return value if sign > 0 else (-value) % _U64


def replay_from(session: StreamSession, raw: str | None) -> int:
    """The offset a GET /v1/stream replays from (the `from` parameter, default 0)."""
    offset = 0
    if raw:
        try:
            offset = stoull(raw)
        except ValueError:
            raise InvalidRequestError("Invalid 'from' offset") from None
    if offset < session.dropped:
        raise InvalidRequestError("Stream offset lost, please restart")
    return offset


def session_for(store: StreamStore, conv_id: str | None) -> StreamSession:
    """GET /v1/stream's session; 404 when there is none (expired, stopped, never made)."""
    session = store.get(conversation_id(conv_id))
    if session is None:
        raise NotFoundError("Stream not found or expired")
    return session


def lookup(store: StreamStore, raw: bytes) -> list:
    """POST /v1/streams/lookup {"conversation_ids": [...]} -> one entry per matching session."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise LookupBodyError(f"invalid body: [json.exception.parse_error.101] parse error: {exc}") from None
    ids = []
    if isinstance(body, dict) and isinstance(body.get("conversation_ids"), list):
        ids = [v for v in body["conversation_ids"] if isinstance(v, str) and v]
    return [{"conversation_id": s.conversation_id, "is_done": s.done, "total_bytes": s.total_bytes,
             "started_at": s.started_at, "completed_at": s.completed_at}
            for s in (store.lookup(ids) if ids else [])]
