"""Running a protocol Call against the engine: submit, gather, or stream with late commit.

One HTTP call may carry several requests (a prompt batch, n > 1); their events share one
queue. A stream sends its status and headers only once the first event is in, so an early
failure is a plain JSON error with its real status (handle_completions_impl's first-result
rule); after that an error is the call's own error frame and the stream ends. A client that
goes away closes the generator, which cancels its requests in the engine.
Imports: the protocol base, `server.sse`, falcon.
"""

from __future__ import annotations

import logging
import time

import falcon
import orjson

from pyllama.server import sse
from pyllama.server.connection import POLL_SECONDS
from pyllama.server.protocol.base import Call, Run

logger = logging.getLogger(__name__)


def respond(resp: falcon.Response, engine, call: Call, metrics=None, ping_interval: int = 30,
            on_end=None) -> None:
    """Run `call` and write its JSON response or its SSE stream into `resp`.

    `resp.context.before_generation` (server/hooks.py: --log-prompts-dir, X-Conversation-Id)
    sees the call first and may hand back a tee (server.stream_store.Producer): it gets a copy
    of the stream and keeps it going when the client leaves; a call that fails before
    streaming, or does not stream, abandons it. `on_end` is called once a stream's generation
    is over (not for a call that does not stream).
    """
    hook = resp.context.get("before_generation")
    if hook is not None:
        resp.context.before_generation = None
        tee = hook(call)
        if tee is not None:
            try:
                respond(resp, engine, call, metrics, ping_interval, on_end)
            except BaseException:
                tee.abandon()
                raise
            if resp.stream is None:
                tee.abandon()
            else:
                resp.stream = tee.tee(resp.stream)
            return
    requests = getattr(metrics, "requests", None)  # --metrics: the pyllama:* histograms
    run = Run(engine, call, metrics) if requests is None else \
        requests.run(engine, call, metrics, resp.context.get("t_arrival"))
    client_gone = getattr(resp.context, "client_gone", None)  # server.connection
    if not call.stream:
        if gather(run, client_gone):
            write_json(resp, call.response())
        return
    timeout = ping_interval if ping_interval and ping_interval > 0 else None
    try:
        while True:  # wait for the first real event; errors here are plain JSON errors
            item = run.next(POLL_SECONDS if client_gone else timeout)
            if item is not None:
                first = call.frames(*item)
                break
            if client_gone and client_gone():
                _cancel_gone(run)
                return
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
            if on_end is not None:
                on_end()

    resp.status = falcon.HTTP_200
    resp.content_type = "text/event-stream"
    resp.set_header("X-Accel-Buffering", "no")  # the only header upstream adds to a stream
    resp.stream = body()


def gather(run: Run, client_gone=None) -> bool:
    """Wait for every request of `run` to finish; False if the client left first.

    With `client_gone` (server.connection) the wait checks the client every POLL_SECONDS
    and cancels the requests once it has gone, freeing their slots, as upstream's
    `rd.wait_for_all(req.should_stop)`; nothing is written then.
    """
    if client_gone is None:
        run.gather()
        return True
    # the engine sends every token, also to a request that does not stream (upstream sends it
    # nothing before the end and checks at each 1 s timeout): check once per POLL_SECONDS
    check_at = time.monotonic() + POLL_SECONDS
    try:
        while run.open:
            run.next(POLL_SECONDS)
            if time.monotonic() >= check_at:
                if client_gone():
                    _cancel_gone(run)
                    return False
                check_at = time.monotonic() + POLL_SECONDS
    except BaseException:
        run.cancel()
        raise
    return True


def _cancel_gone(run: Run) -> None:
    logger.warning("client disconnected, cancelling %d request(s)", len(run.handles))
    run.cancel()


def write_json(resp: falcon.Response, obj, status=falcon.HTTP_200) -> None:
    resp.status = status
    resp.content_type = "application/json; charset=utf-8"
    resp.data = orjson.dumps(obj)
