"""What every protocol shares: the context a body is parsed against, and the Call base class.

A Call is built on the HTTP thread by a family's `parse()`; a Run (server/streaming.py, or
pyllama.Llama in-process) submits `call.requests`, feeds every engine event back through
`call.feed()`, and asks the call for stream chunks (`chunks`; as SSE: `frames`, `error_frame`,
`done`) or, once every request has finished, for the response JSON (`response`).
Imports: public `engine` names, `errors`, `server.sse`.
"""

from __future__ import annotations

import queue
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from pyllama.engine import ErrorEvent, EventChannel, FinishEvent, Request, TokenEvent
from pyllama.errors import error_json
from pyllama.server import sse
from pyllama.server.protocol.params import Defaults


_ALNUM = string.ascii_letters + string.digits


def random_id() -> str:
    """32 random letters and digits (upstream's random_string), from one urandom read."""
    return "".join(_ALNUM[b % 62] for b in secrets.token_bytes(32))


@dataclass
class ProtocolContext:
    """What parsing and formatting need from the server: vocabulary, limits, defaults, chat.

    Built once the model is loaded. `model` is used only through its thread-safe vocabulary
    functions (tokenize, detokenize, token_to_piece, ...).
    """

    model: Any
    n_slots: int
    n_ctx_slot: int
    defaults: Defaults = field(default_factory=Defaults)
    chat: Any = None  # server.templates.ChatFormatter; None on an embedding server
    model_name: str = ""
    fingerprint: str = ""
    n_batch: int = 2048
    spm_infill: bool = False
    embd_normalize: int = 2
    embeddings: bool = False
    pooling: str = ""  # the embedding engine's pooling type name
    n_ubatch: int = 0  # the embedding engine's largest input in tokens (its physical batch)
    media: Any = None  # engine.MediaContext with --mmproj (tokenize() is thread-safe), else None
    media_path: str = ""  # --media-path: the folder file:// media URLs are read from


@dataclass
class Task:
    """One engine request of a call and what its results need: index, text so far, tokens."""

    index: int
    request: Request
    prompt_text: str = ""
    source_prompt: Any = None  # the prompt as upstream's handler sees it (--log-prompts-dir)
    pieces: list = field(default_factory=list)  # streamed text, joined only when read
    tokens: list = field(default_factory=list)
    probs: list = field(default_factory=list)
    result: FinishEvent | None = None
    state: Any = None  # the family's per-request stream state (e.g. a chat parser)

    @property
    def text(self) -> str:
        """The text streamed so far."""
        if len(self.pieces) > 1:
            self.pieces[:] = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""


class Call:
    """The requests of one HTTP call and how their events become the family's JSON.

    Subclasses implement `chunks()` (streaming) and `response()` (non-streaming), and may
    override `frames()`, `error_frame()` and `done` for their wire format.
    """

    done: bytes = b""  # written after the last event of a stream ([DONE] for OpenAI routes)

    def __init__(self, tasks: list[Task], stream: bool) -> None:
        self.tasks = tasks
        self.stream = stream

    @property
    def requests(self) -> list[Request]:
        return [t.request for t in self.tasks]

    def feed(self, index: int, event) -> Task:
        """Record an engine event of request `index`; raises the error of an ErrorEvent."""
        task = self.tasks[index]
        if isinstance(event, TokenEvent):
            task.pieces.append(event.text)
            task.tokens += event.tokens
            if event.probs:
                task.probs += event.probs
        elif isinstance(event, FinishEvent):
            task.result = event
        elif isinstance(event, ErrorEvent):
            raise event.error
        return task

    def chunks(self, task: Task, event) -> list:
        """The stream chunks (JSON values) one event produces; the in-process API yields these."""
        raise NotImplementedError

    def frames(self, task: Task, event) -> bytes:
        """SSE bytes for one event of a stream."""
        return sse.frames(self.chunks(task, event))

    def response(self):
        """The JSON value answering a non-streaming call, once every request has finished."""
        raise NotImplementedError

    def error_frame(self, exc: BaseException) -> bytes:
        """The SSE frame that ends a stream after a mid-stream error (OpenAI style)."""
        return sse.frame(error_json(exc)[1])


class Run:
    """The engine side of one Call: its submitted requests and their shared event queue."""

    def __init__(self, engine, call: Call, metrics=None) -> None:
        self.call = call
        self.metrics = metrics
        self.events = EventChannel()
        self.handles = []
        try:
            for task in call.tasks:
                self.handles.append(engine.submit(task.request, self.events, task.index))
        except BaseException:
            self.cancel()
            raise
        self.open = len(call.tasks)

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    def next(self, timeout: float | None, block: bool = True):
        """(task, event), or None when none came within `timeout` (at once with block=False).
        Raises the error of an ErrorEvent."""
        if not block and self.events.empty():  # the common case of a drain: no exception
            return None
        try:
            index, event = self.events.get(block, timeout)
        except queue.Empty:
            return None
        try:
            task = self.call.feed(index, event)
        except BaseException:
            self.open = 0
            self.cancel()
            raise
        if isinstance(event, FinishEvent):
            if self.metrics is not None:
                self.metrics.record(event)
            self.open -= 1
        return task, event

    def gather(self) -> None:
        """Wait for every request to finish."""
        try:
            while self.open:
                self.next(None)
        except BaseException:
            self.cancel()
            raise
