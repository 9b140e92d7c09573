"""Running a protocol Call against the engine: submit, gather, or stream with late commit.

One HTTP call may carry several requests (a prompt batch, n > 1); their events share one
queue. A stream sends its status and headers only once the first event is in, so an early
failure is a plain JSON error with its real status (handle_completions_impl's first-result
rule); after that an error is the call's own error frame and the stream ends. A client that
goes away closes the generator, which cancels its requests in the engine.
Imports: the protocol base, `server.sse`, falcon.
"""

from __future__ import annotations

import falcon
import orjson

from pyllama.server import sse
from pyllama.server.protocol.base import Call, Run


def respond(resp: falcon.Response, engine, call: Call, metrics=None, ping_interval: int = 30) -> None:
    """Run `call` and write its JSON response or its SSE stream into `resp`."""
    run = Run(engine, call, metrics)
    if not call.stream:
        run.gather()
        write_json(resp, call.response())
        return
    timeout = ping_interval if ping_interval and ping_interval > 0 else None
    try:
        while True:  # wait for the first real event; errors here are plain JSON errors
            item = run.next(timeout)
            if item is not None:
                first = call.frames(*item)
                break
    except BaseException:
        run.cancel()
        raise

    def body():
        try:
            yield first
            while run.open:
                chunks = []
                try:
                    item = run.next(timeout)
                    if item is None:
                        yield sse.PING
                        continue
                    # events that queued meanwhile (a slow reader) leave in the same write
                    while item is not None:
                        chunks.append(call.frames(*item))
                        item = run.next(None, block=False) if run.open else None
                except Exception as exc:  # mid-stream: the call's error frame, nothing after it
                    chunks.append(call.error_frame(exc))
                    yield b"".join(chunks)
                    return
                data = b"".join(chunks)
                if data:
                    yield data
            if call.done:
                yield call.done
        finally:
            if run.open:
                run.cancel()  # the client went away

    resp.status = falcon.HTTP_200
    resp.content_type = "text/event-stream"
    resp.set_header("Cache-Control", "no-cache")
    resp.set_header("X-Accel-Buffering", "no")
    resp.stream = body()


def write_json(resp: falcon.Response, obj, status=falcon.HTTP_200) -> None:
    resp.status = status
    resp.content_type = "application/json; charset=utf-8"
    resp.data = orjson.dumps(obj)
