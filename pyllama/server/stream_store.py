"""Resumable streams: a buffer per conversation that outlives the HTTP connection (upstream's
server-stream.cpp).

A streamed completion whose request carries `X-Conversation-Id` is teed into a StreamSession:
every byte the client is sent (first chunk, frames, pings, `[DONE]`) also goes into the
session's buffer. When the client goes away the generation is not cancelled: the stream keeps
being read into the buffer until it ends, and `GET /v1/stream?conv_id=..&from=N` replays it
from any offset and then follows it live. One conversation has at most one live session: a new
request on the same id cancels the previous one (its stream ends), and `DELETE /v1/stream`
cancels and evicts it. A request that fails before streaming (or a non-streamed one) leaves
nothing behind.

Limits as upstream's: 4 MiB per session (the oldest bytes are dropped: a reader behind them
gets "offset lost"), finished sessions expire 300 s after they end, swept every 60 s.
Thread-safe throughout: producers run on the HTTP thread of their request, readers on theirs.
Imports: stdlib only.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterator

SESSION_TTL_SECONDS = 300  # STREAM_SESSION_TTL_SECONDS
SESSION_MAX_BYTES = 4 * 1024 * 1024  # STREAM_SESSION_MAX_BYTES
GC_INTERVAL_SECONDS = 60  # STREAM_SESSION_GC_INTERVAL_SECONDS
READ_WAKE_SECONDS = 0.2  # STREAM_READ_WAKE_INTERVAL_MS

logger = logging.getLogger(__name__)


class OffsetLost(Exception):
    """The requested offset is below the bytes the session still holds."""


class StreamSession:
    """One generation's SSE bytes: a capped buffer, readable from any offset (stream_session).

    Offsets count every byte that ever entered the session; `dropped` of them fell off the front.
    """

    def __init__(self, conversation_id: str, max_bytes: int = SESSION_MAX_BYTES,
                 clock: Callable[[], float] = time.time) -> None:
        self.conversation_id = conversation_id
        self.started_at = int(clock())
        self._clock = clock
        self._cond = threading.Condition()
        self._buffer = bytearray()
        self._dropped = 0
        self._cap = max_bytes
        self._done = False
        self._cancelled = False
        self._completed_at = 0

    def append(self, data: bytes) -> bool:
        """Add bytes at the end (dropping the oldest beyond the cap); False once finalized."""
        if not data:
            return True
        with self._cond:
            if self._done:
                return False
            if len(data) >= self._cap:  # one chunk over the cap: only its tail fits
                self._dropped += len(self._buffer) + len(data) - self._cap
                self._buffer = bytearray(data[len(data) - self._cap:])
            else:
                over = len(self._buffer) + len(data) - self._cap
                if over > 0:
                    del self._buffer[:over]
                    self._dropped += over
                self._buffer += data
            self._cond.notify_all()
        return True

    def finalize(self) -> None:
        """No more bytes: wake the readers, start the expiry clock. Idempotent."""
        with self._cond:
            if self._done:
                return
            self._done = True
            self._completed_at = int(self._clock())
            self._cond.notify_all()

    def cancel(self) -> None:
        """Ask the producer to stop (DELETE /v1/stream, or a newer request on the conversation)."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def done(self) -> bool:
        with self._cond:
            return self._done

    @property
    def total_bytes(self) -> int:
        """Bytes that ever entered the session."""
        with self._cond:
            return self._dropped + len(self._buffer)

    @property
    def dropped(self) -> int:
        """Bytes evicted from the front because of the cap."""
        with self._cond:
            return self._dropped

    @property
    def completed_at(self) -> int:
        """0 while live, the unix time of finalize() after."""
        with self._cond:
            return self._completed_at

    def read(self, offset: int, wait: float = READ_WAKE_SECONDS) -> bytes | None:
        """The bytes from `offset` on, waiting up to `wait` seconds for some (read_from).

        Returns b"" when none came in time, None once the session is finalized and everything
        from `offset` was read. Raises OffsetLost when `offset` fell below the dropped prefix.
        """
        with self._cond:
            while True:
                if offset < self._dropped:
                    raise OffsetLost
                end = self._dropped + len(self._buffer)
                if offset < end:
                    return bytes(self._buffer[offset - self._dropped:])
                if self._done:
                    return None
                if not self._cond.wait(wait):
                    return b""

    def replay(self, offset: int) -> Iterator[bytes]:
        """The bytes from `offset` on, then live ones until the session ends (GET /v1/stream).

        Ends quietly when the reader falls behind the dropped prefix, as upstream's reader does.
        """
        while True:
            try:
                chunk = self.read(offset)
            except OffsetLost:
                return
            if chunk is None:
                return
            if chunk:
                offset += len(chunk)
                yield chunk


class StreamStore:
    """Every live session of this worker process, by conversation id (stream_session_manager).

    A sweeper thread (start(); stop() ends it and finalizes every session) drops sessions that
    ended more than `ttl` seconds ago.
    """

    def __init__(self, ttl: float = SESSION_TTL_SECONDS, gc_interval: float = GC_INTERVAL_SECONDS,
                 max_bytes: int = SESSION_MAX_BYTES, clock: Callable[[], float] = time.time) -> None:
        self.ttl = ttl
        self.gc_interval = gc_interval
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, StreamSession] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- sessions -------------------------------------------------------------------------
    def create_or_replace(self, conversation_id: str) -> StreamSession:
        """A fresh session for the id; a previous one is cancelled and finalized."""
        fresh = StreamSession(conversation_id, self.max_bytes, self._clock)
        with self._lock:
            previous = self._sessions.get(conversation_id)
            self._sessions[conversation_id] = fresh
        if previous is not None:
            previous.cancel()
            previous.finalize()
        return fresh

    def get(self, conversation_id: str) -> StreamSession | None:
        with self._lock:
            return self._sessions.get(conversation_id)

    def sessions(self) -> list[StreamSession]:
        with self._lock:
            return list(self._sessions.values())

    def lookup(self, ids: list[str]) -> list[StreamSession]:
        """For each id, the sessions keyed by it or by "<id>::<model>" (streams_lookup)."""
        every = self.sessions()
        out = []
        for rid in ids:
            prefix = rid + "::"
            out += [s for s in every if s.conversation_id == rid or s.conversation_id.startswith(prefix)]
        return out

    def evict(self, session: StreamSession) -> None:
        """Forget this session (if it is still the conversation's) and wake its readers."""
        with self._lock:
            if self._sessions.get(session.conversation_id) is session:
                del self._sessions[session.conversation_id]
        session.finalize()

    def evict_and_cancel(self, conversation_id: str) -> bool:
        """The explicit stop: cancel the producer, evict the buffer. False when there was none."""
        with self._lock:
            session = self._sessions.pop(conversation_id, None)
            live = list(self._sessions)
        if session is None:
            logger.warning("stop on unknown stream session, conv_id=%s matched nothing, %d live: [%s]",
                           conversation_id, len(live), ", ".join(live))
            return False
        session.cancel()
        session.finalize()
        return True

    def sweep(self) -> None:
        """Drop the sessions that ended `ttl` seconds ago or more (one gc_loop pass)."""
        cutoff = self._clock() - self.ttl
        with self._lock:
            expired = [s for s in self._sessions.values() if s.completed_at and s.completed_at <= cutoff]
            for s in expired:
                del self._sessions[s.conversation_id]
        for s in expired:
            s.finalize()

    # --- the sweeper ----------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._gc_loop, name="pyllama-stream-gc", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the sweeper and finalize every session, so no reader waits forever."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            every, self._sessions = list(self._sessions.values()), {}
        for s in every:
            s.finalize()

    def _gc_loop(self) -> None:
        while not self._stop.wait(self.gc_interval):
            self.sweep()

    # --- producing ------------------------------------------------------------------------
    def producer(self, conversation_id: str) -> "Producer | None":
        """The tee for a request's X-Conversation-Id value; None when it is absent or empty."""
        if not conversation_id:
            return None
        self.start()  # the sweeper runs from the first session on
        return Producer(self, self.create_or_replace(conversation_id))


class Producer:
    """The writing end of one request's session (server_res_spipe / stream_pipe_producer)."""

    def __init__(self, store: StreamStore, session: StreamSession) -> None:
        self.store = store
        self.session = session

    def abandon(self) -> None:
        """The request failed before streaming, or did not stream: leave nothing behind."""
        self.store.evict(self.session)

    def tee(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """Yield `chunks` to the client and write each into the session.

        The stream stops when the session is cancelled. If the client goes away (the generator
        is closed), `chunks` is read on into the session until it ends or is cancelled; this
        runs on the closing (HTTP) thread, as upstream's on_complete() drain does.
        """
        session = self.session
        gone = False
        try:
            for chunk in chunks:
                if session.cancelled:
                    return
                session.append(chunk)
                yield chunk
        except GeneratorExit:
            gone = True
        finally:
            try:
                if gone:
                    for chunk in chunks:
                        if session.cancelled:
                            break
                        session.append(chunk)
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()  # cancels whatever the engine still runs for this stream
                session.finalize()
