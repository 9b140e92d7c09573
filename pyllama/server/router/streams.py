"""The resumable stream routes in router mode (server-models.cpp router_stream_get,
router_streams_lookup, router_stream_delete).

The sessions live in the children (server/stream_store.py); the router finds the child that
holds a conversation's session through the conversation -> model map that relaying a POST
with X-Conversation-Id fills (models.ConvModelTracker), never by asking every child:

- GET /v1/stream?conv_id=&from= is relayed to that child as it streams; 503 while its model
  is still loading (the session appears once the request reaches the child), else 404;
- POST /v1/streams/lookup asks only the children that own some of the ids, each for its own
  ids, and joins their answers (a child that does not answer in 250 ms is left out);
- DELETE /v1/stream is passed to the owner, and the map entry is dropped, which also cancels
  a request still waiting for its model to load. Always 204.

Imports: `errors`, falcon, orjson, stdlib, the router's models and app (relay) modules.
"""

from __future__ import annotations

import http.client
import logging
from urllib.parse import quote

import falcon
import orjson

from pyllama.errors import InvalidRequestError, NotFoundError, UnavailableError
from pyllama.server.router.models import CHILD_ADDR, DOWNLOADED, DOWNLOADING, LOADING

logger = logging.getLogger(__name__)

LOOKUP_TIMEOUT = 0.25  # STREAM_LOOKUP_TIMEOUT_MS: the router to child loopback budget


def _encode(value: str) -> str:
    """encode_qs: percent-encode everything but unreserved characters."""
    return quote(value, safe="-_.~")


def _conv_id(req: falcon.Request) -> str:
    conv_id = req.get_param("conv_id") or ""
    if not conv_id:
        raise InvalidRequestError("Missing conversation id in path")
    return conv_id


def resolve_child_for_conv(models, conv_id: str):
    """The metadata of the ready model that serves `conv_id`'s session, or None."""
    if not conv_id:
        return None
    tracked = models.conv_models.lookup(conv_id)
    if tracked is None:
        return None
    meta = models.get_meta(tracked)
    return meta if meta is not None and meta.is_ready() else None


def _child_request(port: int, method: str, path: str, body: bytes | None = None):
    """One short request to a child: (status, body), or None when it does not answer in time."""
    conn = http.client.HTTPConnection(CHILD_ADDR, port, timeout=LOOKUP_TIMEOUT)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        res = conn.getresponse()
        return res.status, res.read()
    except (OSError, http.client.HTTPException) as exc:
        logger.debug("child on port %d: %s %s: %s", port, method, path, exc)
        return None
    finally:
        conn.close()


class RouterStreamResource:
    """GET /v1/stream (router_stream_get), DELETE /v1/stream (router_stream_delete)."""

    def __init__(self, state, relay) -> None:
        self.state = state
        self.relay = relay

    def on_get(self, req, resp):
        models = self.state.models
        conv_id = _conv_id(req)
        owner = resolve_child_for_conv(models, conv_id)
        if owner is None:
            # a registered conversation whose model is still coming up: retry later
            tracked = models.conv_models.lookup(conv_id)
            meta = models.get_meta(tracked) if tracked is not None else None
            if meta is not None and meta.status in (LOADING, DOWNLOADING, DOWNLOADED):
                raise UnavailableError("Stream owner model is loading, retry later")
            raise NotFoundError("Stream not found or expired")
        path = "/v1/stream?conv_id=" + _encode(conv_id)
        offset = req.get_param("from") or ""
        if offset:
            path += "&from=" + offset
        self.relay(self.state, resp, owner.port, "GET", path, dict(req.headers), b"")

    def on_delete(self, req, resp):
        models = self.state.models
        conv_id = _conv_id(req)
        owner = resolve_child_for_conv(models, conv_id)
        if owner is not None:
            # idempotent on the child, which logs its own miss
            _child_request(owner.port, "DELETE", "/v1/stream?conv_id=" + _encode(conv_id))
        elif (tracked := models.conv_models.lookup(conv_id)) is not None:
            logger.info("router stop for conv_id=%s while model name=%s is loading, cancelling the pending "
                        "request", conv_id, tracked)
        else:
            logger.warning("router stop for unknown conv_id=%s, no owning child in the conv map", conv_id)
        models.conv_models.forget(conv_id)  # the session is being torn down
        resp.status = falcon.HTTP_204


class RouterStreamsLookupResource:
    """POST /v1/streams/lookup (router_streams_lookup)."""

    json_body = "raw"

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        try:
            body = orjson.loads(req.context.raw_body or b"")
        except orjson.JSONDecodeError:
            body = None  # upstream answers an unparseable body with []
        requested = []
        if isinstance(body, dict) and isinstance(body.get("conversation_ids"), list):
            requested = [v for v in body["conversation_ids"] if isinstance(v, str) and v]
        per_child: dict = {}
        for conv_id in requested:
            owner = resolve_child_for_conv(self.state.models, conv_id)
            if owner is not None:
                per_child.setdefault(owner.port, []).append(conv_id)
        aggregated = []
        for port, ids in per_child.items():
            answer = _child_request(port, "POST", "/v1/streams/lookup", orjson.dumps({"conversation_ids": ids}))
            if answer is None or answer[0] != 200:
                continue
            try:
                entries = orjson.loads(answer[1])
            except orjson.JSONDecodeError:
                continue
            if isinstance(entries, list):
                aggregated += [e for e in entries if isinstance(e, dict)]
        resp.media = aggregated
