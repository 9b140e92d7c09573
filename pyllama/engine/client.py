"""Engine and RequestHandle: the thread-safe face of the engine.

`Engine` owns one model, one context and the engine thread that runs the continuous-batching
loop (`EngineCore.step`). Any thread may `submit()` a Request and iterate the returned handle
for its events; `cancel()` stops a request within one step.
Imports: engine internals, `engine.types`, `errors`; never falcon or the server.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import gc
import logging
import os
import queue
import sys
import threading
import time
from typing import Iterator

from pyllama.engine._channel import EventChannel
from pyllama.engine._context import Context, ContextParams, fit_params
from pyllama.engine._core import EngineCore
from pyllama.engine._embed import EmbeddingCore
from pyllama.engine._media import MediaContext
from pyllama.engine._model import Model, ModelParams, set_abort_hook
from pyllama.engine import rpc
from pyllama.engine._sampling import SamplerChain, json_schema_to_grammar
from pyllama.engine.config import EngineConfig
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


def _test_fault():
    # Tests only (tests/server/test_liveness.py): PYLLAMA_TEST_FAULT=hang makes the engine
    # thread block for good inside its first step, =die makes that step raise. Read once per
    # engine start; unset, the loop pays one `is not None` test per step.
    fault = os.environ.get("PYLLAMA_TEST_FAULT", "")
    if not fault:
        return None
    logger.warning("PYLLAMA_TEST_FAULT=%s: the engine thread will fail on its first step (tests only)", fault)
    if fault == "hang":
        return threading.Event().wait
    if fault == "die":
        def die():
            raise RuntimeError("PYLLAMA_TEST_FAULT=die")
        return die
    raise ValueError(f"PYLLAMA_TEST_FAULT: expected hang or die, not {fault!r}")


class Retry(Exception):
    """Raised by an Engine.call function to run again after the next step."""


class RequestHandle:
    """The caller's side of one request: iterate it for TokenEvents, then a Finish/ErrorEvent.

    Thread-safe: one consumer thread iterates, any thread may cancel.
    """

    def __init__(self, engine: "Engine", request: Request, sink: EventChannel | None = None,
                 tag: int = 0) -> None:
        self._engine = engine
        self.request = request
        self.id = request.id
        self.tag = tag
        # where the engine puts this request's events: with a sink (several requests of one
        # HTTP call share it) as (tag, event) pairs, else bare in the handle's own channel
        self.tagged = sink is not None
        self.queue: EventChannel = sink if sink is not None else EventChannel()
        self.result: FinishEvent | None = None
        self.sampler: SamplerChain | None = None  # built by submit(), owned by the engine once admitted
        # time.monotonic() when the engine queued it and when a slot took it (0.0 until then):
        # the server's queue-time histogram, and the oldest queued request for liveness()
        self.t_queued = 0.0
        self.t_admitted = 0.0

    def put(self, event) -> None:  # engine thread (EngineCore.step defers the wake-up instead)
        self.queue.put((self.tag, event) if self.tagged else event)

    def get(self, timeout: float | None = None):
        """Return the next event, or None when `timeout` seconds pass without one."""
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def __iter__(self) -> Iterator[TokenEvent | FinishEvent]:
        """Yield TokenEvents and then the FinishEvent; an ErrorEvent raises its error."""
        while True:
            event = self.queue.get()
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
        self.t_queued = 0.0  # time.monotonic() when queued (liveness())


class Engine:
    """One model, one context, n_parallel slots and the engine thread that serves them.

    Args:
        model_path: the GGUF file.
        config: every option (see EngineConfig); None takes the defaults.
        **options: EngineConfig fields that override `config`'s. `model_options=` and
            `context_options=` (dicts of the same fields) are still accepted and merged.

    Raises:
        TypeError: an option that is not an EngineConfig field.
        ModelLoadError, ContextCreationError, InvalidRequestError: the model or context
            could not be created (raised on the constructor's thread).
    """

    def __init__(self, model_path, config: EngineConfig | None = None, **options) -> None:
        # NOTE: model_options / context_options predate EngineConfig; tests and the
        # server still pass them. Their keys are plain EngineConfig fields now.
        for legacy in ("model_options", "context_options"):
            extra = options.pop(legacy, None) or {}
            clash = sorted(set(extra) & set(options))
            if clash:
                raise TypeError(f"{legacy} repeats option(s): {', '.join(clash)}")
            options.update(extra)
        self.config = (config or EngineConfig()).replace(**options)
        self.model_path = model_path
        self._lock = threading.Condition()
        self._pending: collections.deque = collections.deque()
        self._cancels: list[int] = []
        self._calls: list = []
        self._running = True
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.failure: BaseException | None = None  # what stopped the engine thread, if anything did
        self.embeddings = self.config.embeddings
        self.lora_paths: list[str] = []
        self.model: Model | None = None
        self.core: EngineCore | None = None
        self.media: MediaContext | None = None  # --mmproj: libmtmd; tokenize() is thread-safe
        self.embedder: EmbeddingCore | None = None
        self.t_busy = 0.0  # engine-thread seconds not spent waiting for work
        self._busy_since = 0.0  # perf_counter() when the running step began; 0 between steps
        # --sleep-idle-seconds (server_queue::start_loop's sleeping state): the model is unloaded
        # after that long without work and reloaded on the next use; see acquire()
        self._awake = threading.Condition(self._lock)  # notified when a reload is done
        self._sleeping = False
        self._wake_requested = False
        self._holds = 0  # acquire() calls not yet released: the model stays loaded meanwhile
        self._t_last_task = time.monotonic()
        self._sleeping_callbacks: list = []
        self._asleep: dict = {}  # what stats(), n_slots and n_ctx_slot report while asleep
        self._context: Context | None = None
        self._draft_model: Model | None = None  # -md: the draft model and its context
        self._draft_context: Context | None = None
        self._thread = threading.Thread(target=self._run, name="pyllama-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    # --- any thread --------------------------------------------------------------------------
    def submit(self, request: Request, sink: EventChannel | None = None, tag: int = 0) -> RequestHandle:
        """Queue a request; it starts when a slot is free (FIFO). Thread-safe.

        With `sink`, events go to that channel as (tag, event) pairs instead of the handle.

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
        with self.using():  # a sleeping engine reloads its model first
            # Built here, on the caller's thread: grammar parsing and bias tables never stall the
            # engine's steps, and a bad grammar fails before queueing.
            handle.sampler = SamplerChain(self.model, request.sampling)
            with self._lock:
                if not self._running:
                    raise UnavailableError("the engine is shutting down")
                handle.t_queued = time.monotonic()
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
        with self.using(), self._lock:  # a sleeping engine reloads its model first
            if not self._running:
                raise UnavailableError("the engine is shutting down")
            job.t_queued = time.monotonic()
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

        Raises:
            NotSupportedError: an embedding engine (its thread runs no calls).
            UnavailableError: the engine is shut down, or `timeout` passed.
        """
        if self.embeddings:
            raise NotSupportedError("an embedding engine runs no engine calls")
        done: queue.SimpleQueue = queue.SimpleQueue()
        with self.using(), self._lock:  # a sleeping engine reloads its model first
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

    # --- slots (GET /slots, POST /slots/{id}) ---------------------------------------------------
    def slot_info(self, timeout: float | None = None) -> list[dict]:
        """Describe every slot: id, n_ctx, is_processing, n_tokens, and the request it serves.

        Thread-safe; blocks for at most one step (or `timeout` seconds). An embedding engine
        reports its sequences, all idle.

        Raises:
            UnavailableError: the engine is shut down or did not answer in time.
        """
        if self.embeddings:
            return [dict(id=i, n_ctx=self.n_ctx_slot, is_processing=False, n_tokens=0)
                    for i in range(self.n_slots)]
        return self.call(lambda core: core.slot_info(), timeout=timeout)

    def save_slot(self, slot_id: int, path: str) -> tuple[int, int]:
        """Write a slot's tokens and KV cache to `path`, once the slot is idle.

        Thread-safe; blocks while the slot serves a request (server_context's
        SERVER_TASK_TYPE_SLOT_SAVE defers the task the same way). The engine thread writes
        the file with the GIL released.

        Returns:
            (tokens saved, bytes written).

        Raises:
            InvalidRequestError: slot_id is not in [0, n_slots).
            EngineError: libllama could not write the file.
        """
        return self._when_idle(slot_id, lambda core: core.save_slot(slot_id, os.fspath(path)))

    def restore_slot(self, slot_id: int, path: str) -> tuple[int, int]:
        """Load a slot's tokens and KV cache from `path`, once the slot is idle.

        Thread-safe; blocks while the slot serves a request (SERVER_TASK_TYPE_SLOT_RESTORE).
        A failed restore leaves the slot empty.

        Returns:
            (tokens restored, bytes read).

        Raises:
            InvalidRequestError: slot_id is out of range, `path` does not exist, or it holds
                no valid state for this context.
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise InvalidRequestError(f"Unable to restore slot: {os.path.basename(path)} does not exist")
        return self._when_idle(slot_id, lambda core: core.restore_slot(slot_id, path))

    def erase_slot(self, slot_id: int) -> int:
        """Drop a slot's cached tokens and KV cache once it is idle; return how many.

        Thread-safe; blocks while the slot serves a request (SERVER_TASK_TYPE_SLOT_ERASE).

        Raises:
            InvalidRequestError: slot_id is not in [0, n_slots).
        """
        return self._when_idle(slot_id, lambda core: core.erase_slot(slot_id))

    def _when_idle(self, slot_id, fn):
        # Any thread: runs fn(core) on the engine thread between two steps, once the slot is
        # idle. Calls run before queued requests are admitted, so a slot that just finished
        # serves the waiting call before any new request.
        if self.embeddings:
            raise NotSupportedError("an embedding engine has no slots to save, restore or erase")
        if isinstance(slot_id, bool) or not isinstance(slot_id, int) or not 0 <= slot_id < self.n_slots:
            raise InvalidRequestError("Invalid slot ID")

        def run(core):
            if core.slots[slot_id].busy:
                raise Retry()
            return fn(core)
        return self.call(run)

    def end_reasoning(self, request_id: int) -> str:
        """Force the end of a running request's thinking block (its reasoning budget sampler).
        Returns "ok", "not_running" or "not_enabled" (the request did not ask for
        reasoning_control). Thread-safe; runs between two steps."""
        return self.call(lambda core: core.end_reasoning(request_id))

    def cancel(self, request_id: int) -> None:
        """Stop a queued or running request. Thread-safe."""
        with self._lock:
            self._cancels.append(request_id)
            self._lock.notify()

    # --- sleeping when idle (--sleep-idle-seconds) ------------------------------------------------
    @property
    def sleeping(self) -> bool:
        """True while the model is unloaded after the idle period (server_queue::is_sleeping)."""
        return self._sleeping

    def on_sleeping_state(self, callback) -> None:
        """Register callback(sleeping: bool), run on the engine thread: with True while the model is
        still loaded, just before it is unloaded; with False once it is loaded again (in reverse
        registration order), before any waiting caller goes on. server_queue::on_sleeping_state."""
        self._sleeping_callbacks.append(callback)

    def acquire(self, wake: bool = True) -> bool:
        """Keep the model loaded until release(); reload it first if the engine sleeps.

        Thread-safe; blocks while the model reloads (server_queue::wait_until_no_sleep). The
        way for another thread to use the model (its vocabulary) safely when sleeping is on.

        Args:
            wake: False to leave a sleeping engine asleep: then nothing is held and False is
                returned; the hold does not count as activity either (as /props, /health).

        Raises:
            UnavailableError: the engine is shut down.
        """
        with self._lock:
            if self._sleeping:
                if not wake:
                    return False
                if not self._wake_requested:
                    logger.debug("requesting to stop sleeping")
                    self._wake_requested = True
                    self._lock.notify_all()
                while self._sleeping and self._running:
                    self._awake.wait(1.0)
            if not self._running:
                raise UnavailableError("the engine is shutting down")
            self._holds += 1
            if wake:
                self._t_last_task = time.monotonic()
            return True

    def release(self, activity: bool = True) -> None:
        """End one acquire(); with `activity`, the idle period starts again now. Thread-safe."""
        with self._lock:
            self._holds -= 1
            if activity:
                self._t_last_task = time.monotonic()
            if self._holds == 0:
                self._lock.notify_all()

    @contextlib.contextmanager
    def using(self, wake: bool = True):
        """acquire() ... release() around a block; yields whether the model is held."""
        held = self.acquire(wake)
        try:
            yield held
        finally:
            if held:
                self.release(activity=wake)

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
        core, embedder = self.core, self.embedder
        return core.n_slots if core else embedder.n_seq if embedder else self._asleep["n_slots"]

    @property
    def n_ctx_slot(self) -> int:
        core, embedder = self.core, self.embedder
        return core.n_ctx_slot if core else embedder.n_ctx_seq if embedder else self._asleep["n_ctx_slot"]

    def stats(self) -> dict:
        """Engine counters (approximate while running; while asleep, those of the moment the
        model was unloaded, as upstream's cached metrics)."""
        with self._lock:  # the model is not unloaded meanwhile
            if self._sleeping:
                stats = dict(self._asleep["stats"])
            else:
                stats = self.core.stats() if self.core else self.embedder.stats() if self.embedder else {}
        stats["n_pending"] = len(self._pending)
        # a step still running counts too, so busy time never lags the decode time inside it
        since = self._busy_since
        stats["t_busy"] = self.t_busy + (time.perf_counter() - since if since else 0.0)
        return stats

    def liveness(self) -> tuple[bool, float]:
        """Whether the engine thread runs, and how long it has made no progress with work waiting.

        Thread-safe, and safe while the engine is wedged: it reads a few attributes the engine
        thread sets, takes no lock and calls nothing in libllama (the server's /health).

        Returns:
            (alive, stalled_s): `alive` is False once the engine thread has ended (closed, or
            failed: see `failure`). `stalled_s` is the age of the running step (one
            llama_decode batch, with the admissions and calls before it) or of the oldest
            request the engine thread has not picked up yet, whichever is older; 0.0 while idle,
            between steps and while asleep.
        """
        alive = self._thread.is_alive()
        since = self._busy_since
        stalled = time.perf_counter() - since if since else 0.0
        try:
            t_queued = self._pending[0].t_queued if self._pending else 0.0
        except IndexError:  # the engine thread took it meanwhile
            t_queued = 0.0
        if t_queued:
            stalled = max(stalled, time.monotonic() - t_queued)
        return alive, stalled

    # --- engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        _name_os_thread("pyllama-engine")  # before the context: its compute threads inherit it
        try:
            self._load()
        except BaseException as exc:  # reported to the constructor's thread
            self._startup_error = exc
            self._ready.set()
            return
        self._t_last_task = time.monotonic()
        self._ready.set()
        if self.embeddings:
            self._run_embeddings()
            return
        deferred: collections.deque = collections.deque()
        self._deferred = deferred  # for _on_backend_abort only
        clock = time.perf_counter
        fault = _test_fault()  # None unless PYLLAMA_TEST_FAULT is set (tests only)
        try:
            while True:
                with self._lock:
                    while self._running and not self._pending and not self._cancels \
                            and not self._calls and not deferred and self.core.n_busy == 0:
                        self._wait_for_work()
                    if not self._running:
                        break
                    t0 = self._busy_since = clock()
                    deferred.extend(self._pending)
                    self._pending.clear()
                    cancels, self._cancels = self._cancels, []
                    calls, self._calls = self._calls, []
                for request_id in cancels:
                    self._cancel_now(request_id, deferred)
                self._run_calls(calls)
                self._admit(deferred)
                if fault is not None:
                    fault()
                self.core.step()
                if self.core.n_busy == 0:
                    self.core.flush_wakes()  # no decode comes to wake the last events' readers
                self.t_busy += clock() - t0
                self._busy_since = 0.0
                self._t_last_task = time.monotonic()  # a step is work: the idle period starts after it
        except BaseException as exc:  # never leave callers waiting
            logger.exception("engine thread failed")
            self.failure = exc
            if self.core is not None:
                self.core.flush_wakes()
            self._fail_all(EngineError(f"engine thread failed: {exc}"), deferred)
            return
        self._fail_all(UnavailableError("the engine is shutting down"), deferred)

    def _load(self) -> None:
        # Engine thread: the model, its context and the engine core (or embedder) from the
        # config; at start-up and when waking from sleep (load_model, also "to resume from
        # sleeping state"). Raises what Model/Context raise.
        cfg = self.config
        if cfg.rpc_servers:  # remote devices first, as --rpc registers them while parsing
            rpc.register_servers(cfg.rpc_servers)
            set_abort_hook(self._on_backend_abort)
        # the one place where a config becomes libllama objects
        model_params = ModelParams(**cfg.model_options())
        context_params = ContextParams(**cfg.context_options())
        if cfg.fit:  # before the load, as common_init_from_params
            fit_params(self.model_path, model_params, context_params, cfg.fit_target_mib, cfg.fit_ctx_min)
        self.model = Model(self.model_path, params=model_params)
        context = self._context = Context(self.model, params=context_params)
        if cfg.warmup:
            logger.debug("warming up the model with an empty run - please wait ... (--no-warmup to disable)")
            context.warmup()
        if cfg.embeddings:
            self.embedder = EmbeddingCore(context)
            return
        spec = cfg.speculative if cfg.speculative is not None and cfg.speculative.enabled else None
        if spec is not None and spec.needs_draft_model and spec.draft_model:
            self._load_draft(spec, context)
        self.core = EngineCore(context, n_predict=cfg.n_predict, ctx_shift=cfg.ctx_shift,
                               slot_prompt_similarity=cfg.slot_prompt_similarity,
                               n_threads_sampling=cfg.n_threads_sampling or context.n_threads,
                               cache_ram_mib=cfg.cache_ram_mib, cache_idle_slots=cfg.cache_idle_slots,
                               n_cache_reuse=cfg.n_cache_reuse, n_ctx_checkpoints=cfg.n_ctx_checkpoints,
                               checkpoint_min_step=cfg.checkpoint_min_step,
                               speculative=spec.bridge_params() if spec is not None else None,
                               draft_context=self._draft_context)
        if self._draft_context is not None and not self.core.speculative:
            self._close_draft()  # common_speculative_init refused it (server_context::init)
        if cfg.n_ctx_slot_max > 0:
            self.core.n_ctx_slot = min(self.core.n_ctx_slot, cfg.n_ctx_slot_max)
        if cfg.mmproj:
            self._load_media(context)
        self.core.lora_adapters = [self.model.load_lora(path) for path, _ in cfg.lora]
        self.core.lora_scales = tuple(0.0 if cfg.lora_init_without_apply else scale
                                      for _, scale in cfg.lora)
        self.lora_paths = [path for path, _ in cfg.lora]

    def _load_draft(self, spec, context: Context) -> None:
        # Engine thread: the draft model and a context with as many tokens and sequences as the
        # target's (common_speculative_init_result: n_ctx = llama_n_ctx(ctx_tgt), the target's
        # batch sizes, the draft's KV types and threads). Raises what Model/Context raise.
        cfg = self.config
        logger.info("loading draft model '%s'", spec.draft_model)
        opts = dict(cfg.model_options(), n_gpu_layers=spec.draft_n_gpu_layers,
                    tensor_overrides=spec.draft_tensor_overrides)
        if spec.draft_devices is not None:
            opts["devices"] = spec.draft_devices
        self._draft_model = Model(spec.draft_model, params=ModelParams(**opts))
        copts = dict(cfg.context_options(), n_ctx=context.n_ctx, type_k=spec.draft_type_k,
                     type_v=spec.draft_type_v, control_vectors=(), embeddings=False, pooling=None)
        if spec.draft_n_threads is not None:
            copts["n_threads"] = spec.draft_n_threads
            copts["n_threads_batch"] = spec.draft_n_threads_batch or spec.draft_n_threads
            copts["cpu"], copts["cpu_batch"] = spec.draft_cpu, spec.draft_cpu_batch
        elif spec.draft_n_threads_batch is not None:
            copts["n_threads_batch"] = spec.draft_n_threads_batch
        self._draft_context = Context(self._draft_model, params=ContextParams(**copts))

    def _close_draft(self) -> None:
        if self._draft_context is not None:
            self._draft_context.close()
            self._draft_context = None
        if self._draft_model is not None:
            self._draft_model.close()
            self._draft_model = None

    def _load_media(self, context: Context) -> None:
        # Engine thread: libmtmd over the loaded model (server_context::load_model). Context
        # shift and cache reuse are off with it, as upstream turns them off.
        cfg = self.config
        device = cfg.mmproj_device
        if cfg.mmproj_use_gpu and device is None and cfg.devices and cfg.devices[0] != "none":
            device = cfg.devices[0]  # -mmdev defaults to the first --device (common_params_parse_ex)
        self.media = MediaContext(
            cfg.mmproj, self.model, use_gpu=cfg.mmproj_use_gpu and device != "none",
            device=device if device not in (None, "none") else None, n_threads=context.n_threads,
            flash_attn=cfg.flash_attn, warmup=cfg.warmup, image_min_tokens=cfg.image_min_tokens,
            image_max_tokens=cfg.image_max_tokens, batch_max_tokens=cfg.mtmd_batch_max_tokens,
            media_marker=cfg.media_marker or None, video_fps=cfg.video_fps,
            video_timestamp_interval_ms=cfg.video_timestamp_interval_ms,
            video_ffmpeg_dir=cfg.video_ffmpeg_dir or None)
        self.core.media = self.media
        if self.media.use_mrope and self.core.do_checkpoints:
            # NOTE(pyllama): checkpoints are matched by token counts here, which M-RoPE media
            # (fewer positions than tokens) set apart from positions; without them a recurrent
            # or SWA memory re-evaluates the prompt instead of restoring part of it
            self.core.do_checkpoints = False
            logger.warning("context checkpoints are not supported with an M-RoPE projector yet, "
                           "they will be disabled")
        if self.core.ctx_shift:
            self.core.ctx_shift = False
            logger.warning("ctx_shift is not supported by multimodal, it will be disabled")
        if self.core.n_cache_reuse:
            self.core.n_cache_reuse = 0
            logger.warning("cache_reuse is not supported by multimodal, it will be disabled")

    def _on_backend_abort(self, message: str) -> None:
        # The ggml-abort thread (_model.set_abort_hook), the process about to abort: an RPC
        # server died or answered garbage mid-computation (ggml-rpc's RPC_STATUS_ASSERT). The
        # engine thread is blocked inside the backend for good, so its requests are failed from
        # here, and their HTTP threads get a moment to send the error before the process ends.
        where, _, what = message.partition(": ")
        error = EngineError(f"the model's backend failed: {what or message} "
                            f"({os.path.basename(where)}); the server restarts its worker")
        logger.critical("ggml aborted: %s", message)
        if self.config.rpc_servers:
            rpc.note_lost_peer()
        handles = [slot.channel for slot in self.core.slots if slot.channel is not None] \
            if self.core is not None else []
        handles += list(getattr(self, "_deferred", ())) + list(self._pending)
        for handle in handles:
            handle.put(ErrorEvent(error))
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not all(
                h.queue.empty() for h in handles):
            time.sleep(0.02)
        time.sleep(1.0 if handles else 0)  # the last error frames on their way out (a loaded machine)

    def _unload(self) -> None:
        # Engine thread: free the core (slots, samplers, prompt cache), the context (KV cache),
        # the LoRA adapters and the model, as server_context_impl::destroy. Their Python objects
        # may outlive this (a caller's handle); their libllama memory does not.
        core, self.core = self.core, None
        self.embedder = None
        if core is not None:
            core.media = None
        if self.media is not None:  # before the model it was made from
            self.media.close()
            self.media = None
        if core is not None:
            self._asleep["lora_scales"] = core.lora_scales
            core.lora_adapters = []
        del core
        self._close_draft()
        if self._context is not None:
            self._context.close()
            self._context = None
        if self.model is not None:
            self.model.close()
        gc.collect()
        if sys.platform.startswith("linux"):  # hand the freed heap back to the OS
            try:
                ctypes.CDLL(None).malloc_trim(0)
            except (OSError, AttributeError):
                pass

    def _wait_for_work(self) -> None:
        # Engine thread, self._lock held, nothing to do: wait for work, or sleep once the idle
        # period has passed with nothing held (server_queue::start_loop's should_sleep).
        idle_s = self.config.sleep_idle_seconds
        if idle_s < 0:
            self._lock.wait()
            return
        if self._holds:
            self._lock.wait()  # release() notifies when the last hold ends
            return
        left = self._t_last_task + idle_s - time.monotonic()
        if left > 0:
            self._lock.wait(min(left, 1.0))
            return
        self._sleep()

    def _sleep(self) -> None:
        # Engine thread, self._lock held: unload the model, wait until a caller asks for it
        # (acquire), load it again. server_queue::start_loop's sleeping state around
        # server_context_impl::handle_sleeping_state(true / false).
        logger.info("entering sleeping state")
        self._asleep = {"stats": self.core.stats() if self.core else {},
                        "n_slots": self.n_slots, "n_ctx_slot": self.n_ctx_slot}
        self._sleeping = True
        self._wake_requested = False
        self._lock.release()
        try:
            for callback in self._sleeping_callbacks:  # cb0 -> cbN, the model still loaded
                callback(True)
            logger.info("server is entering sleeping state")
            self._unload()
        finally:
            self._lock.acquire()
        while self._running and not self._wake_requested:
            self._lock.wait()
        if not self._running:  # closed while asleep
            self._awake.notify_all()
            return
        logger.info("exiting sleeping state")
        self._lock.release()
        try:
            logger.info("server is exiting sleeping state")
            self._load()
            if self.core is not None:  # the scales set through set_lora_scales() stay
                self.core.lora_scales = self._asleep.get("lora_scales", self.core.lora_scales)
            for callback in reversed(self._sleeping_callbacks):  # cbN -> cb0
                callback(False)
        except BaseException:  # upstream aborts; here the engine stops and callers get errors
            logger.error("failed to reload model after sleeping")
            with self._lock:
                self._running = False
                self._awake.notify_all()
            raise
        finally:
            self._lock.acquire()
        self._sleeping = False
        self._wake_requested = False
        self._t_last_task = time.monotonic()
        self._awake.notify_all()

    def _run_embeddings(self) -> None:
        # Every waiting job's inputs go into the same decodes.
        while True:
            with self._lock:
                while self._running and not self._pending:
                    self._wait_for_work()
                if not self._running:
                    break
                jobs = list(self._pending)
                self._pending.clear()
                t0 = self._busy_since = time.perf_counter()
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
            self.t_busy += time.perf_counter() - t0
            self._busy_since = 0.0
            self._t_last_task = time.monotonic()
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
            handle.t_admitted = time.monotonic()
            try:
                self.core.admit(slot, handle.request, handle.sampler, handle)
            except PyllamaError as exc:
                handle.put(ErrorEvent(exc))

    def _fail_all(self, error: Exception, deferred: collections.deque) -> None:
        if self.core is not None:
            self.core.flush_wakes()  # a direct put() does not wake a reader owed a wake-up
        with self._lock:
            self._running = False
            deferred.extend(self._pending)
            self._pending.clear()
            calls, self._calls = self._calls, []
        for handle in deferred:
            handle.put(ErrorEvent(error))
        for _, done in calls:  # e.g. a save_slot still waiting for its slot
            done.put((False, error))
        if self.core is not None:
            for slot in self.core.slots:
                if slot.busy:
                    # the error first: the cancel's FinishEvent would read as a normal end
                    if slot.channel is not None:
                        slot.channel.put(ErrorEvent(error))
                    self.core.cancel(slot.request.id)
