"""/v1/stream (GET: replay and follow, DELETE: stop) and /v1/streams/lookup."""

from __future__ import annotations

import falcon

from pyllama.server.protocol import streams
from pyllama.server.streaming import write_json


class StreamResource:
    """GET /v1/stream?conv_id=ID&from=N, DELETE /v1/stream?conv_id=ID."""

    sleep_bypass = ("GET", "DELETE")  # the buffers need no model (server/sleep.py)

    def __init__(self, state) -> None:
        self.state = state

    def on_get(self, req, resp):
        session = streams.session_for(self.state.streams, req.get_param("conv_id"))
        offset = streams.replay_from(session, req.get_param("from"))
        resp.status = falcon.HTTP_200
        resp.content_type = "text/event-stream"
        resp.set_header("X-Accel-Buffering", "no")
        resp.stream = session.replay(offset)

    def on_delete(self, req, resp):
        # idempotent: 204 whether or not there was a session
        self.state.streams.evict_and_cancel(streams.conversation_id(req.get_param("conv_id")))
        resp.status = falcon.HTTP_204  # upstream also names a Content-Type, which WSGI forbids here


class StreamsLookupResource:
    """POST /v1/streams/lookup: the sessions of the conversations the caller names."""

    json_body = "raw"  # an unparseable body is this route's own 400
    sleep_bypass = ("POST",)

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        write_json(resp, streams.lookup(self.state.streams, req.context.raw_body))
