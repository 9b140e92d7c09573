"""Engine and RequestHandle: the thread-safe face of the engine.

`Engine` owns one model, one context and the engine thread that runs the continuous-batching
loop (`EngineCore.step`). Any thread may `submit()` a Request and iterate the returned handle
for its events; `cancel()` stops a request within one step.
Imports: engine internals, `engine.types`, `errors`; never falcon or the server.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import queue
import sys
import threading
import time
from typing import Iterator

from pyllama.engine._context import Context
from pyllama.engine._core import EngineCore
from pyllama.engine._embed import EmbeddingCore
from pyllama.engine._model import Model
from pyllama.engine._sampling import SamplerChain, json_schema_to_grammar
from pyllama.engine.types import (
    EmbeddingResult,
    ErrorEvent,
    FinishEvent,
    FinishReason,
    Request,
    Timings,
    TokenEvent,
)
from pyllama.errors import EngineError, InvalidRequestError, NotSupportedError, PyllamaError, UnavailableError

logger = logging.getLogger(__name__)


def _name_os_thread(name: str) -> None:
    # Linux: `top -H` and /proc/<pid>/task/*/comm show it, and threads started from this one
    # (ggml's compute threads) inherit it; elsewhere a no-op.
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
        except (OSError, AttributeError):
            pass


class Retry(Exception):
    """Raised by an Engine.call function to run again after the next step."""


class RequestHandle:
    """The caller's side of one request: iterate it for TokenEvents, then a Finish/ErrorEvent.

    Thread-safe: one consumer thread iterates, any thread may cancel.
    """

    def __init__(self, engine: "Engine", request: Request, sink: queue.SimpleQueue | None = None,
                 tag: int = 0) -> None:
        self._engine = engine
        self.request = request
        self.id = request.id
        self.tag = tag
        self._sink = sink
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self.result: FinishEvent | None = None
        self.sampler: SamplerChain | None = None  # built by submit(), owned by the engine once admitted

    def put(self, event) -> None:  # engine thread
        if self._sink is not None:
            # several requests of one HTTP call share one queue: events come tagged
            self._sink.put((self.tag, event))
        else:
            self._events.put(event)

    def get(self, timeout: float | None = None):
        """Return the next event, or None when `timeout` seconds pass without one."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def __iter__(self) -> Iterator[TokenEvent | FinishEvent]:
        """Yield TokenEvents and then the FinishEvent; an ErrorEvent raises its error."""
        while True:
            event = self._events.get()
            if isinstance(event, ErrorEvent):
                raise event.error
            yield event
            if isinstance(event, FinishEvent):
                self.result = event
                return

    def cancel(self) -> None:
        """Stop the request; its slot is freed within one engine step."""
        self._engine.cancel(self.id)

    def wait(self) -> FinishEvent:
        """Consume the events and return the FinishEvent."""
        for _ in self:
            pass
        return self.result


class _EmbeddingJob:
    """One embed() call waiting for the engine thread."""

    def __init__(self, inputs: list[list[int]], normalize: int) -> None:
        self.inputs = inputs
        self.normalize = normalize
        self.done: queue.SimpleQueue = queue.SimpleQueue()


class Engine:
    """One model, one context, n_parallel slots and the engine thread that serves them.

    Args:
        model_path: the GGUF file.
        n_parallel: slots (sequences) served at once.
        n_ctx: total context; 0 = the model's training context. Each slot gets n_ctx /
            n_parallel, or the whole n_ctx with kv_unified.
        n_batch, n_ubatch, n_threads, n_threads_batch, flash_attn, type_k, type_v,
        kv_unified, swa_full, n_gpu_layers, use_mmap: as for Model and Context.
        n_predict: default cap for requests that set none (-1 = unlimited).
        ctx_shift: shift the context instead of stopping when a slot fills.
        slot_prompt_similarity: prefix share needed to pick a slot by its cache.
        n_threads_sampling: threads sampling slots in parallel (None = n_threads).
        embeddings: an embedding engine (`embed()`), not a generation one (`submit()`).
        pooling: with embeddings: None (the model's), "none", "mean", "cls", "last", "rank".
        model_options, context_options: more Model / Context keyword arguments (kv_overrides,
            rope_scaling, rope_freq_base, yarn_*, ...).
        lora: [(path, scale)] LoRA adapters to load; their ids are their positions.
        lora_init_without_apply: start every adapter at scale 0 (until set_lora_scales).
        n_ctx_slot_max: cap each slot's context (llama-server's --kv-unified-per-slot); 0 = none.
    """

    def __init__(self, model_path, *, n_parallel: int = 1, n_ctx: int = 4096, n_batch: int = 2048,
                 n_ubatch: int = 512, n_threads: int | None = None, n_threads_batch: int | None = None,
                 flash_attn="auto", type_k: str = "f16", type_v: str = "f16",
                 kv_unified: bool = False, swa_full: bool = False, n_gpu_layers: int = -1,
                 use_mmap: bool = True, repack: bool = True, n_predict: int = -1, ctx_shift: bool = False,
                 slot_prompt_similarity: float = 0.1, n_threads_sampling: int | None = None,
                 embeddings: bool = False, pooling: str | None = None,
                 model_options: dict | None = None, context_options: dict | None = None,
                 lora: list | None = None, lora_init_without_apply: bool = False,
                 n_ctx_slot_max: int = 0) -> None:
        self._lock = threading.Condition()
        self._pending: collections.deque = collections.deque()
        self._cancels: list[int] = []
        self._calls: list = []
        self._running = True
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._params = dict(
            model_path=model_path, n_parallel=n_parallel, n_ctx=n_ctx, n_batch=n_batch,
            n_ubatch=n_ubatch, n_threads=n_threads, n_threads_batch=n_threads_batch,
            flash_attn=flash_attn, type_k=type_k, type_v=type_v, kv_unified=kv_unified,
            swa_full=swa_full, n_gpu_layers=n_gpu_layers, use_mmap=use_mmap, repack=repack, n_predict=n_predict,
            ctx_shift=ctx_shift, slot_prompt_similarity=slot_prompt_similarity,
            n_threads_sampling=n_threads_sampling, embeddings=embeddings, pooling=pooling,
            model_options=model_options or {}, context_options=context_options or {},
            lora=list(lora or []), lora_init_without_apply=lora_init_without_apply,
            n_ctx_slot_max=n_ctx_slot_max)
        self.embeddings = embeddings
        self.lora_paths: list[str] = []
        self.model: Model | None = None
        self.core: EngineCore | None = None
        self.embedder: EmbeddingCore | None = None
        self.t_busy = 0.0  # engine-thread seconds not spent waiting for work
        self._thread = threading.Thread(target=self._run, name="pyllama-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    # --- any thread --------------------------------------------------------------------------
    def submit(self, request: Request, sink: queue.SimpleQueue | None = None, tag: int = 0) -> RequestHandle:
        """Queue a request; it starts when a slot is free (FIFO). Thread-safe.

        With `sink`, events go to that queue as (tag, event) pairs instead of the handle.

        Raises:
            UnavailableError: the engine is shut down.
            InvalidRequestError: a sampling parameter is out of range, or the grammar or
                json_schema does not parse.
        """
        if self.embeddings:
            raise NotSupportedError("This server does not support completions. Start it without `--embeddings`")
        sampling = request.sampling
        if sampling.json_schema is not None and not sampling.grammar:
            request.sampling = dataclasses.replace(
                sampling, grammar=json_schema_to_grammar(sampling.json_schema), json_schema=None)
        handle = RequestHandle(self, request, sink, tag)
        # Built here, on the caller's thread: grammar parsing and bias tables never stall the
        # engine's steps, and a bad grammar fails before queueing.
        handle.sampler = SamplerChain(self.model, request.sampling)
        with self._lock:
            if not self._running:
                raise UnavailableError("the engine is shutting down")
            self._pending.append(handle)
            self._lock.notify()
        return handle

    def embed(self, inputs: list[list[int]], normalize: int = 2) -> EmbeddingResult:
        """Embed token inputs, batched with other callers' inputs. Thread-safe; blocks.

        Args:
            inputs: token lists, one vector (or score, with pooling "rank") each.
            normalize: -1 none, 0 max-abs (int16 range), 1 taxicab, 2 euclidean, >2 p-norm.

        Raises:
            NotSupportedError: the engine was not started with embeddings=True.
            InvalidRequestError, ContextLengthExceededError: an input cannot be embedded.
        """
        if not self.embeddings:
            raise NotSupportedError("This server does not support embeddings. Start it with `--embeddings`")
        job = _EmbeddingJob([list(t) for t in inputs], normalize)
        with self._lock:
            if not self._running:
                raise UnavailableError("the engine is shutting down")
            self._pending.append(job)
            self._lock.notify()
        event = job.done.get()
        if isinstance(event, ErrorEvent):
            raise event.error
        return event

    def call(self, fn, timeout: float | None = None):
        """Run `fn(core)` on the engine thread between two steps and return its result.

        Thread-safe; blocks. The way to read or change slot state from another thread.
        `fn` may raise Retry to be run again after the next step (e.g. its slot is busy).
        """
        done: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            if not self._running:
                raise UnavailableError("the engine is shutting down")
            self._calls.append((fn, done))
            self._lock.notify()
        try:
            ok, value = done.get(timeout=timeout)
        except queue.Empty:
            raise UnavailableError("the engine did not answer in time") from None
        if not ok:
            raise value
        return value

    def lora_scales(self) -> tuple:
        """The server-wide LoRA scales, one per adapter. Thread-safe."""
        return self.call(lambda core: core.lora_scales)

    def set_lora_scales(self, scales) -> None:
        """Set the server-wide LoRA scales (one per adapter). Thread-safe."""
        scales = tuple(float(s) for s in scales)

        def apply(core):
            if len(scales) != len(core.lora_adapters):
                raise InvalidRequestError("one scale per loaded adapter is expected")
            core.lora_scales = scales
        self.call(apply)

    def cancel(self, request_id: int) -> None:
        """Stop a queued or running request. Thread-safe."""
        with self._lock:
            self._cancels.append(request_id)
            self._lock.notify()

    def close(self, timeout: float | None = None) -> None:
        """Cancel everything, stop the engine thread and free the model."""
        with self._lock:
            self._running = False
            self._lock.notify()
        self._thread.join(timeout)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def n_slots(self) -> int:
        return self.core.n_slots if self.core else self.embedder.n_seq

    @property
    def n_ctx_slot(self) -> int:
        return self.core.n_ctx_slot if self.core else self.embedder.n_ctx_seq

    def stats(self) -> dict:
        """Engine counters (read without locking; approximate while running)."""
        stats = self.core.stats() if self.core else {}
        stats["n_pending"] = len(self._pending)
        stats["t_busy"] = self.t_busy
        return stats

    # --- engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        _name_os_thread("pyllama-engine")  # before the context: its compute threads inherit it
        p = self._params
        try:
            self.model = Model(p["model_path"], n_gpu_layers=p["n_gpu_layers"], use_mmap=p["use_mmap"],
                               repack=p["repack"], **p["model_options"])
            context = Context(self.model, n_ctx=p["n_ctx"], n_batch=p["n_batch"], n_ubatch=p["n_ubatch"],
                              n_seq_max=p["n_parallel"], n_threads=p["n_threads"],
                              n_threads_batch=p["n_threads_batch"], flash_attn=p["flash_attn"],
                              type_k=p["type_k"], type_v=p["type_v"], kv_unified=p["kv_unified"],
                              swa_full=p["swa_full"], embeddings=p["embeddings"], pooling=p["pooling"],
                              **p["context_options"])
            if p["embeddings"]:
                self.embedder = EmbeddingCore(context)
                self._ready.set()
                self._run_embeddings()
                return
            self.core = EngineCore(context, n_predict=p["n_predict"], ctx_shift=p["ctx_shift"],
                                   slot_prompt_similarity=p["slot_prompt_similarity"],
                                   n_threads_sampling=p["n_threads_sampling"] or context.n_threads)
            if p["n_ctx_slot_max"] > 0:
                self.core.n_ctx_slot = min(self.core.n_ctx_slot, p["n_ctx_slot_max"])
            self.core.lora_adapters = [self.model.load_lora(path) for path, _ in p["lora"]]
            self.core.lora_scales = tuple(0.0 if p["lora_init_without_apply"] else float(scale)
                                          for _, scale in p["lora"])
            self.lora_paths = [path for path, _ in p["lora"]]
        except BaseException as exc:  # reported to the constructor's thread
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        deferred: collections.deque = collections.deque()
        clock = time.perf_counter
        try:
            while True:
                with self._lock:
                    while self._running and not self._pending and not self._cancels \
                            and not self._calls and not deferred and self.core.n_busy == 0:
                        self._lock.wait()
                    if not self._running:
                        break
                    t0 = clock()
                    deferred.extend(self._pending)
                    self._pending.clear()
                    cancels, self._cancels = self._cancels, []
                    calls, self._calls = self._calls, []
                for request_id in cancels:
                    self._cancel_now(request_id, deferred)
                self._run_calls(calls)
                self._admit(deferred)
                self.core.step()
                self.t_busy += clock() - t0
        except BaseException as exc:  # never leave callers waiting
            logger.exception("engine thread failed")
            self._fail_all(EngineError(f"engine thread failed: {exc}"), deferred)
            return
        self._fail_all(UnavailableError("the engine is shutting down"), deferred)

    def _run_embeddings(self) -> None:
        # Every waiting job's inputs go into the same decodes.
        while True:
            with self._lock:
                while self._running and not self._pending:
                    self._lock.wait()
                if not self._running:
                    break
                jobs = list(self._pending)
                self._pending.clear()
            valid = []
            for job in jobs:
                try:
                    for tokens in job.inputs:
                        self.embedder.check_input(tokens)
                    valid.append(job)
                except PyllamaError as exc:
                    job.done.put(ErrorEvent(exc))
            for normalize in sorted({job.normalize for job in valid}):
                group = [job for job in valid if job.normalize == normalize]
                try:
                    vectors = self.embedder.embed([t for job in group for t in job.inputs], normalize)
                except Exception as exc:
                    error = exc if isinstance(exc, PyllamaError) else EngineError(str(exc))
                    for job in group:
                        job.done.put(ErrorEvent(error))
                    continue
                i = 0
                for job in group:
                    n = len(job.inputs)
                    job.done.put(EmbeddingResult(vectors[i:i + n], [len(t) for t in job.inputs],
                                                 self.embedder.pooling_name))
                    i += n
        with self._lock:
            jobs = list(self._pending)
            self._pending.clear()
        for job in jobs:
            job.done.put(ErrorEvent(UnavailableError("the engine is shutting down")))

    def _run_calls(self, calls: list) -> None:
        retry = []
        for fn, done in calls:
            try:
                done.put((True, fn(self.core)))
            except Retry:
                retry.append((fn, done))
            except BaseException as exc:
                done.put((False, exc))
        if retry:
            with self._lock:
                self._calls[:0] = retry

    def _cancel_now(self, request_id: int, deferred: collections.deque) -> None:
        if self.core.cancel(request_id):
            return
        for handle in deferred:
            if handle.id == request_id:
                deferred.remove(handle)
                handle.put(FinishEvent(reason=FinishReason.CANCELLED, text="", tokens=[],
                                       stopping_word="", truncated=False,
                                       n_prompt_tokens=len(handle.request.prompt),
                                       tokens_evaluated=0, tokens_cached=0,
                                       timings=Timings(),
                                       id_slot=-1))
                return

    def _admit(self, deferred: collections.deque) -> None:
        # FIFO, except that a request pinned to a busy slot does not block the others.
        for handle in list(deferred):
            slot = self.core.free_slot_for(handle.request)
            if slot is None:
                continue
            deferred.remove(handle)
            try:
                self.core.admit(slot, handle.request, handle.sampler, handle)
            except PyllamaError as exc:
                handle.put(ErrorEvent(exc))

    def _fail_all(self, error: Exception, deferred: collections.deque) -> None:
        with self._lock:
            self._running = False
            deferred.extend(self._pending)
            self._pending.clear()
        for handle in deferred:
            handle.put(ErrorEvent(error))
        if self.core is not None:
            for slot in self.core.slots:
                if slot.busy:
                    self.core.cancel(slot.request.id)
