"""Running generation requests for a resource: submit, gather, or stream with late commit.

One HTTP call may carry several requests (a prompt batch); their events share one queue.
A stream sends its status and headers only once the first event is in, so an early failure is
a plain JSON error with its real status (handle_completions_impl's first-result rule). A client
that goes away closes the generator, which cancels its requests in the engine.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field

import falcon

from pyllama.engine import ErrorEvent, FinishEvent, Request, TokenEvent
from pyllama.errors import EngineError
from pyllama.server import sse
from pyllama.server.errors import body_for


@dataclass
class Task:
    """One request of an HTTP call and what the resource needs to format its results."""

    index: int
    request: Request
    prompt_text: str = ""
    pieces: list = field(default_factory=list)  # streamed text, joined only when read
    tokens: list = field(default_factory=list)
    probs: list = field(default_factory=list)
    result: FinishEvent | None = None
    extra: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The text streamed so far."""
        if len(self.pieces) > 1:
            self.pieces[:] = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""


class Run:
    """The engine side of one HTTP call."""

    def __init__(self, state, tasks: list[Task]) -> None:
        self.state = state
        self.engine = state.require_ready()
        self.tasks = tasks
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.handles = []
        try:
            for t in tasks:
                self.handles.append(self.engine.submit(t.request, self.events, t.index))
        except BaseException:
            self.cancel()
            raise
        self.open = len(tasks)

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    def next(self, timeout: float | None, block: bool = True):
        """(task, event), or None when none came within `timeout` (at once with block=False).
        Raises the error of an ErrorEvent."""
        try:
            tag, event = self.events.get(block, timeout)
        except queue.Empty:
            return None
        task = self.tasks[tag]
        if isinstance(event, ErrorEvent):
            self.open = 0
            self.cancel()
            raise event.error
        if isinstance(event, TokenEvent):
            task.pieces.append(event.text)
            task.tokens += event.tokens
            if event.probs:
                task.probs += event.probs
        elif isinstance(event, FinishEvent):
            task.result = event
            self.state.metrics.record(event)
            self.open -= 1
        return task, event

    def gather(self) -> list[Task]:
        """Wait for every request to finish."""
        try:
            while self.open:
                self.next(None)
        except BaseException:
            self.cancel()
            raise
        return self.tasks


def stream_response(resp: falcon.Response, run: Run, first_frames, later_frames, done: bytes = b"",
                    ping_interval: int = 30) -> None:
    """Commit `resp` as an SSE stream once the first event has arrived.

    `first_frames(task, event)` and `later_frames(task, event)` return bytes for one event;
    `done` is written after the last one ([DONE] for OpenAI routes).
    """
    timeout = ping_interval if ping_interval and ping_interval > 0 else None
    pending = []
    try:
        while True:  # wait for the first real event; errors here are plain JSON errors
            item = run.next(timeout)
            if item is not None:
                pending.append(first_frames(*item))
                break
    except BaseException:
        run.cancel()
        raise

    def body():
        try:
            yield b"".join(pending)
            while run.open:
                chunks = []
                try:
                    item = run.next(timeout)
                    if item is None:
                        yield sse.PING
                        continue
                    # events that queued meanwhile (a slow reader) leave in the same write
                    while item is not None:
                        chunks.append(later_frames(*item))
                        item = run.next(None, block=False) if run.open else None
                except Exception as exc:  # mid-stream: one error frame, no [DONE]
                    chunks.append(sse.frame(body_for(exc)[1]))
                    yield b"".join(chunks)
                    return
                data = b"".join(chunks)
                if data:
                    yield data
            if done:
                yield done
        finally:
            if run.open:
                run.cancel()  # the client went away

    resp.status = falcon.HTTP_200
    resp.content_type = "text/event-stream"
    resp.set_header("Cache-Control", "no-cache")
    resp.set_header("X-Accel-Buffering", "no")
    resp.stream = body()


def require(condition: bool, message: str) -> None:
    if not condition:
        raise EngineError(message)
