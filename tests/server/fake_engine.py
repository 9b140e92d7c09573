"""FakeEngine: the engine interface the server uses, replaying scripted events.

Fast server unit tests drive the real Falcon app (falcon.testing) over a FakeEngine: the
vocabulary and chat templates come from a real tiny GGUF loaded vocab-only, and only generation
is faked. `submit()` records the Request and replays a script of events into the request's
sink queue, as `RequestHandle.put` does: `(tag, event)` pairs.

Script: a sequence of events (`TokenEvent`, `ProgressEvent`, then a `FinishEvent` or an
`ErrorEvent`), replayed for every submitted request, or a callable `(request, n) -> events`
(`n`: the 0-based submission number). The `tokens`, `finish`, `completion` and `error`
helpers build them.

Release modes:
    "all": every event is queued during submit() (a slow reader: the server finds them all
        waiting and may write several frames at once).
    "manual": events wait for credits: `release(n)` lets n more events out (given before a
        request arrives, a credit is spent as soon as it is submitted), oldest request first;
        `release_all()` lets everything out.

`cancel(id)` (what `handle.cancel()` calls) is recorded in `cancelled`; like the real engine,
a request that had not ended drops its remaining script and gets `FinishEvent(CANCELLED)`.

`fake_app()` is the only place that knows how ServerState is built; `open_stream()` calls the
WSGI app directly, to read a stream chunk by chunk and close it like a client that goes away.
Imports: falcon, public `pyllama.engine` names, `pyllama.errors`, `pyllama.cli`,
`pyllama.server.app` and `pyllama.server.templates`.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import json
import queue
import threading
from typing import Callable, NamedTuple, Sequence

import falcon.testing

from pyllama.engine import ErrorEvent, EventChannel, FinishEvent, FinishReason, Model, Request, RequestHandle, Timings, TokenEvent
from pyllama.errors import InvalidRequestError, NotSupportedError

FIRST_TOKEN_ID = 260  # scripted token ids start here (inside the synthetic vocabulary)


# --- script helpers ---------------------------------------------------------------------------
def tokens(*pieces: str) -> list[TokenEvent]:
    """One TokenEvent per piece, with token ids FIRST_TOKEN_ID, FIRST_TOKEN_ID + 1, ..."""
    return [TokenEvent(text=p, tokens=[FIRST_TOKEN_ID + i]) for i, p in enumerate(pieces)]


def finish(text: str = "", reason: FinishReason | str = FinishReason.EOS, *, n_tokens: int = 0,
           n_prompt_tokens: int = 5, n_cached: int = 0, stopping_word: str = "",
           truncated: bool = False, id_slot: int = 0) -> FinishEvent:
    """A FinishEvent whose counts and Timings agree (cache_n = n_cached, predicted_n = n_tokens)."""
    return FinishEvent(
        reason=FinishReason(reason), text=text,
        tokens=[FIRST_TOKEN_ID + i for i in range(n_tokens)], stopping_word=stopping_word,
        truncated=truncated, n_prompt_tokens=n_prompt_tokens, tokens_evaluated=n_prompt_tokens,
        tokens_cached=n_prompt_tokens + n_tokens,
        timings=Timings(prompt_n=n_prompt_tokens - n_cached, prompt_ms=1.0, predicted_n=n_tokens,
                        predicted_ms=1.0, cache_n=n_cached),
        id_slot=id_slot)


def completion(*pieces: str, reason: FinishReason | str = FinishReason.EOS, **finish_kwargs) -> list:
    """TokenEvents for `pieces`, then the FinishEvent with their joined text and count."""
    return tokens(*pieces) + [finish("".join(pieces), reason, n_tokens=len(pieces), **finish_kwargs)]


def error(exc: Exception) -> ErrorEvent:
    return ErrorEvent(exc)


# --- the fake ---------------------------------------------------------------------------------
class FakeHandle(RequestHandle):
    """The engine's own RequestHandle, with the script still to replay and what was put."""

    def __init__(self, engine: "FakeEngine", request: Request, sink, tag: int, events: list) -> None:
        super().__init__(engine, request, sink, tag)
        self.remaining = collections.deque(events)
        self.ended = False  # a FinishEvent or ErrorEvent was put
        self.sent: list = []

    def put(self, event) -> None:
        self.sent.append(event)
        if isinstance(event, (FinishEvent, ErrorEvent)):
            self.ended = True
            self.remaining.clear()
        super().put(event)


class _FakeCore:
    """The little of EngineCore that Engine.call functions reach for (/slots)."""

    def __init__(self, engine: "FakeEngine") -> None:
        self._engine = engine

    def slot_info(self) -> list[dict]:
        return [{"id": i, "n_ctx": self._engine.n_ctx_slot, "is_processing": False}
                for i in range(self._engine.n_slots)]


class FakeEngine:
    """The Engine interface the server uses, over scripted events. Thread-safe.

    Args:
        model: a real (e.g. vocab-only) pyllama Model, for tokenize/detokenize and templates.
        script: the events of each request (see the module docstring).
        release: "all" or "manual".
        n_slots, n_ctx_slot: what the server sees as the slot count and per-slot context.
        lora_paths: the adapters the server reports (scales start at 1.0).

    Attributes:
        submitted: every Request, in submission order.
        handles: the FakeHandle of each, in the same order.
        cancelled: request ids, in the order cancel() was called.
        submit_error: when set, submit() raises it (a request refused before queueing).
    """

    embeddings = False
    media = None  # no projector (Engine.media)

    def __init__(self, model, script: Sequence | Callable = (), *, release: str = "all",
                 n_slots: int = 4, n_ctx_slot: int = 4096, lora_paths: Sequence[str] = ()) -> None:
        if release not in ("all", "manual"):
            raise ValueError(f"release must be 'all' or 'manual', not {release!r}")
        self.model = model
        self.script = script
        self.release_mode = release
        self.n_slots = n_slots
        self.n_ctx_slot = n_ctx_slot
        self.lora_paths = list(lora_paths)
        self._lora_scales = tuple(1.0 for _ in self.lora_paths)
        self.submitted: list[Request] = []
        self.handles: list[FakeHandle] = []
        self.cancelled: list[int] = []
        self.submit_error: Exception | None = None
        self.closed = False
        self._credits = 0
        self._lock = threading.Condition()
        self.core = _FakeCore(self)

    # --- Engine interface ------------------------------------------------------------------
    def submit(self, request: Request, sink: EventChannel | None = None, tag: int = 0) -> FakeHandle:
        """Record `request` and start replaying its script into `sink` as (tag, event)."""
        with self._lock:
            if self.submit_error is not None:
                raise self.submit_error
            n = len(self.submitted)
            events = self.script(request, n) if callable(self.script) else self.script
            handle = FakeHandle(self, request, sink, tag, [copy.copy(e) for e in events])
            self.submitted.append(request)
            self.handles.append(handle)
            if self.release_mode == "all":
                while handle.remaining:
                    handle.put(handle.remaining.popleft())
            else:
                self._pump()
            self._lock.notify_all()
        return handle

    def cancel(self, request_id: int) -> None:
        """Record the cancel; an unfinished request ends with FinishEvent(CANCELLED)."""
        with self._lock:
            self.cancelled.append(request_id)
            for handle in self.handles:
                if handle.id == request_id and not handle.ended:
                    handle.put(FinishEvent(reason=FinishReason.CANCELLED, text="", tokens=[],
                                           stopping_word="", truncated=False,
                                           n_prompt_tokens=len(handle.request.prompt),
                                           tokens_evaluated=0, tokens_cached=0, timings=Timings(),
                                           id_slot=-1))
            self._lock.notify_all()

    def call(self, fn, timeout: float | None = None):
        return fn(self.core)

    def slot_info(self) -> list[dict]:
        return self.core.slot_info()

    def embed(self, inputs, normalize: int = 2):
        raise NotSupportedError("This server does not support embeddings. Start it with `--embeddings`")

    def lora_scales(self) -> tuple:
        return self._lora_scales

    def set_lora_scales(self, scales) -> None:
        scales = tuple(float(s) for s in scales)
        if len(scales) != len(self.lora_paths):
            raise InvalidRequestError("one scale per loaded adapter is expected")
        self._lora_scales = scales

    def stats(self) -> dict:
        return {"n_steps": 0, "n_decode_calls": 0, "n_tokens_predicted": 0, "n_prompt_tokens": 0,
                "t_decode": 0.0, "t_step": 0.0, "n_busy": 0, "n_backend_sampled": 0,
                "n_pending": 0, "t_busy": 0.0}

    def close(self, timeout: float | None = None) -> None:
        self.closed = True

    # --- test controls ---------------------------------------------------------------------
    def release(self, n: int = 1) -> None:
        """Let n more events out (manual mode), oldest unfinished request first."""
        with self._lock:
            self._credits += n
            self._pump()

    def release_all(self) -> None:
        """Let every scripted event out, now and for requests submitted later."""
        with self._lock:
            self.release_mode = "all"
            for handle in self.handles:
                while handle.remaining:
                    handle.put(handle.remaining.popleft())

    def wait_submitted(self, count: int = 1, timeout: float = 10.0) -> list[Request]:
        """Block until `count` requests were submitted; return them."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self.submitted) >= count, timeout):
                raise AssertionError(f"{len(self.submitted)} requests submitted, {count} expected")
            return list(self.submitted)

    def _pump(self) -> None:
        while self._credits > 0:
            handle = next((h for h in self.handles if h.remaining), None)
            if handle is None:
                return
            self._credits -= 1
            handle.put(handle.remaining.popleft())


# --- the app over it --------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def vocab_model(path: str) -> Model:
    """The GGUF's vocabulary and metadata (no weights), shared by every test of the session."""
    return Model(path, vocab_only=True)


def fake_app(model_path, script: Sequence | Callable = (), *, release: str = "all",
             args: Sequence[str] = (), **settings) -> tuple[falcon.testing.TestClient, FakeEngine]:
    """The server's Falcon app over a FakeEngine, ready to serve.

    Args:
        model_path: a GGUF whose vocabulary and chat template the server uses.
        script, release: the FakeEngine's (see the module docstring).
        args: extra llama-server flags, parsed as the CLI does (e.g. ["--sse-ping-interval", "1"]).
        **settings: Settings fields to override after parsing (e.g. max_body_mb=1).

    Returns:
        (TestClient over the app, the FakeEngine). `client.app` is the WSGI app, `client.state`
        its ServerState.
    """
    # NOTE: the only code that knows how ServerState is put together (ServerState.load's steps
    # with the engine swapped): when the server's construction changes, change this alone.
    from pyllama.cli import parse_server_args
    from pyllama.server.app import ServerState, create_app

    path = str(model_path)
    s = parse_server_args(["-m", path, *args], environ={})
    if settings:
        s = dataclasses.replace(s, **settings)
    n_slots = s.parallel if s.parallel > 0 else 4
    model = vocab_model(path)
    fake = FakeEngine(model, script, release=release, n_slots=n_slots,
                      n_ctx_slot=s.ctx_size // n_slots if s.ctx_size else 4096)
    state = ServerState(s, path)
    state.engine = fake
    if not s.embedding:
        state.chat = state.make_chat(model)
    state.protocol = state.make_protocol()
    state.ready.set()
    client = falcon.testing.TestClient(create_app(state))
    client.state = state
    return client, fake


# --- reading streams --------------------------------------------------------------------------
class Stream:
    """One WSGI call read chunk by chunk on a helper thread, so a hang fails instead of blocking.

    Use `open_stream()`. On a timeout the fake (if given) releases everything, so the server's
    thread can end, and AssertionError is raised.
    """

    def __init__(self, app, environ: dict, fake: FakeEngine | None, timeout: float) -> None:
        self._fake = fake
        self._timeout = timeout
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self.status = ""
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.ended = False
        self._iterable = None
        threading.Thread(target=self._work, daemon=True, name="fake-stream-reader").start()

        def start():
            def start_response(status, headers, exc_info=None):
                self.status = status
                self.headers = {k.lower(): v for k, v in headers}
            self._iterable = app(environ, start_response)
            self._iter = iter(self._iterable)
        self._do(start, "the response to start")

    @property
    def status_code(self) -> int:
        return int(self.status.split(" ", 1)[0])

    def _work(self) -> None:
        while True:
            fn = self._jobs.get()
            if fn is None:
                return
            try:
                self._results.put((True, fn()))
            except BaseException as exc:  # handed to the test's thread
                self._results.put((False, exc))

    def _do(self, fn, what: str):
        self._jobs.put(fn)
        try:
            ok, value = self._results.get(timeout=self._timeout)
        except queue.Empty:
            if self._fake is not None:
                self._fake.release_all()
            raise AssertionError(f"timed out after {self._timeout}s waiting for {what}") from None
        if not ok:
            raise value
        return value

    def next_chunk(self) -> bytes | None:
        """The next chunk the app writes, or None at the end of the body."""
        if self.ended:
            return None

        def step():
            try:
                return next(self._iter)
            except StopIteration:
                return None
        chunk = self._do(step, "the next chunk")
        if chunk is None:
            self.ended = True
        else:
            self.chunks.append(chunk)
        return chunk

    def rest(self) -> bytes:
        """Every remaining chunk, joined (the whole body when nothing was read yet)."""
        while self.next_chunk() is not None:
            pass
        return b"".join(self.chunks)

    def close(self) -> None:
        """Close the body iterable, as a WSGI server does when the client goes away."""
        if self._iterable is not None and hasattr(self._iterable, "close"):
            self._do(self._iterable.close, "close()")
        self.ended = True
        self._jobs.put(None)


def open_stream(client: falcon.testing.TestClient, path: str, body: dict, *,
                fake: FakeEngine | None = None, method: str = "POST", headers: dict | None = None,
                timeout: float = 10.0) -> Stream:
    """Call the app with a JSON body; the Stream has status and headers, and reads the body lazily."""
    environ = falcon.testing.create_environ(
        path=path, method=method, body=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})})
    return Stream(client.app, environ, fake, timeout)


class Frame(NamedTuple):
    """One SSE frame: `event` is its event: name (None without one, ":" for a comment)."""

    event: str | None
    data: object  # parsed JSON, the string "[DONE]", or None
    raw: bytes


def parse_sse(raw: bytes) -> list[Frame]:
    """Split an SSE body into frames (every frame must end with a blank line)."""
    assert raw == b"" or raw.endswith(b"\n\n"), f"unterminated SSE frame: {raw[-80:]!r}"
    out = []
    for block in raw.split(b"\n\n")[:-1]:
        event, data = None, None
        for line in block.split(b"\n"):
            if line.startswith(b":"):
                event = ":"
            elif line.startswith(b"event: "):
                event = line[7:].decode()
            elif line.startswith(b"data: "):
                payload = line[6:].decode()
                data = payload if payload == "[DONE]" else json.loads(payload)
            else:
                raise AssertionError(f"not an SSE line: {line!r}")
        out.append(Frame(event, data, block + b"\n\n"))
    return out
