"""The router's registry of models and their child processes (upstream's server_models).

One entry per model the router can serve, from the cache, `--models-dir` and `--models-preset`
(router/preset.py), each with upstream's state machine (server-models.h):

    DOWNLOADING --> DOWNLOADED --> (replaced at the next load_models)

    UNLOADED --> LOADING --> LOADED <--> SLEEPING
       ^            |           |
       +---failed---+           |
       +-------unloaded---------+

`load` spawns the child (a pyllama-server on a free loopback port with the model's command
line), whose "ready" line on stdout makes it LOADED; a child that exits, for any reason, makes
the model UNLOADED with its exit code, and a non-zero code is what GET /models reports as
`"failed": true` (server_model_meta::is_failed). `--models-max` bounds the running children:
a request for a model that is not running waits in a queue (server_lru_sched) while the least
recently used idle model is stopped for it. Every state change is broadcast to /models/sse.
A POST /models download runs in a child of its own (DOWNLOADING, outside --models-max) whose
result makes the entry DOWNLOADED; the next listing re-scans the sources (load_models), which
replaces it with the cache's model. `remove` stops a cache model and deletes its files.

Each child has a reader thread (upstream's server_monitor watches them all from one): it
forwards the child's log lines, prefixed with its port, handles its state lines, and reaps
it. A stop writes the exit command to the child's stdin and force-kills it (its whole process
group: gunicorn's arbiter and worker) after the model's `stop-timeout` (default 10 s).
Thread-safe: one lock (and its condition) guards the mapping, as server_models::mutex.
Imports: `errors`, `settings`, router/preset.py, router/sched.py, router/conversations.py,
router/child.py (the line protocol), stdlib.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from pyllama.errors import EngineError, InvalidRequestError
from pyllama.server.router import preset as presets
from pyllama.server.router.child import (CHILD_MODE_ENV, CMD_CHILD_TO_ROUTER_STATE, CMD_ROUTER_TO_CHILD_EXIT,
                                         ROUTER_PORT_ENV)
from pyllama.server.router.conversations import ConvModelTracker
from pyllama.server.router.sched import LruScheduler
from pyllama.settings import Settings

logger = logging.getLogger(__name__)
child_logger = logging.getLogger("pyllama.server.router.instance")

UNLOADED, LOADING, LOADED, SLEEPING = "unloaded", "loading", "loaded", "sleeping"
DOWNLOADING, DOWNLOADED = "downloading", "downloaded"  # a POST /models download child
MODE_NORMAL, MODE_DOWNLOAD = "normal", "download"  # server_child_mode
SOURCE_PRESET, SOURCE_MODELS_DIR, SOURCE_CACHE = "preset", "models_dir", "cache"
DEFAULT_STOP_TIMEOUT = 10  # seconds
CHILD_ADDR = "127.0.0.1"  # the router may listen on 0.0.0.0; children only on loopback


class RouterError(EngineError):
    """A failure of the router itself (upstream's std::runtime_error): 500 server_error."""


def now_ms() -> int:
    return time.monotonic_ns() // 1_000_000  # ggml_time_ms: a monotonic clock


def free_port() -> int:
    """common_http_get_free_port: a port the system has free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def server_bin_args() -> list:
    """How to start a pyllama-server: the `pyllama-server` script beside this Python (what
    upstream's get_server_exec_path finds for llama-server), else this Python running it."""
    script = Path(sys.executable).parent / "pyllama-server"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "pyllama.server.router.child"]


def download_bin_args() -> list:
    """How to start a download child: this Python running router/child.py, which downloads
    when LLAMA_SERVER_CHILD_MODE=download (upstream starts llama-server itself in that mode)."""
    return [sys.executable, "-m", "pyllama.server.router.child"]


def _split_names(value: str | None) -> set:
    return {part.strip() for part in (value or "").split(",") if part.strip()}


@dataclass
class ModelMeta:
    """server_model_meta: what the router knows of one model."""

    name: str
    preset: presets.Preset
    source: str = SOURCE_PRESET
    aliases: set = field(default_factory=set)
    tags: set = field(default_factory=set)
    port: int = 0
    status: str = UNLOADED
    last_used: int = 0  # for LRU unloading
    args: list = field(default_factory=list)  # the child's command line (update_args)
    loaded_info: dict = field(default_factory=dict)  # the child's /v1/models entry
    progress: object = None
    exit_code: int = 0  # of the last child, valid when UNLOADED
    stop_timeout: int = DEFAULT_STOP_TIMEOUT
    hidden: bool = False

    def is_ready(self) -> bool:
        return self.status == LOADED

    def is_running(self) -> bool:
        return self.status in (LOADED, LOADING, SLEEPING)

    def is_ready_or_sleep(self) -> bool:
        return self.status in (LOADED, SLEEPING)

    def is_failed(self) -> bool:
        return self.status == UNLOADED and self.exit_code != 0

    def update_args(self, bin_args: list) -> None:
        """Render the child's command line (server_model_meta::update_args)."""
        presets.unset_reserved_args(self.preset, False)
        self.preset.set_option("LLAMA_ARG_HOST", CHILD_ADDR)
        self.preset.set_option("LLAMA_ARG_PORT", str(self.port))
        self.preset.set_option("LLAMA_ARG_ALIAS", self.name)
        self.args = self.preset.to_args(bin_args)


@dataclass
class Instance:
    """instance_t: a model's metadata, its child process (if any) and its running requests."""

    meta: ModelMeta
    proc: subprocess.Popen | None = None
    req_count: int = 0  # proxied requests in flight
    mode: str = MODE_NORMAL

    def request_exit(self) -> None:
        """Ask the child to exit (it reads the command on its stdin, server_child::setup)."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.write((CMD_ROUTER_TO_CHILD_EXIT + "\n").encode())
            self.proc.stdin.flush()
        except (OSError, ValueError):
            pass


class Broadcaster:
    """The /models/sse event fan-out (server_response with one waiting id per client).
    Thread-safe: each client reads its own queue."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: list = []

    def subscribe(self) -> queue.Queue:
        q: queue.Queue = queue.Queue()
        with self._lock:
            self._clients.append(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            if q in self._clients:
                self._clients.remove(q)

    def broadcast(self, data: dict) -> None:
        with self._lock:
            for q in self._clients:
                q.put(data)


class ServerModels:
    """server_models: the model list, the children, the load/unload/LRU logic. Thread-safe."""

    def __init__(self, settings: Settings, argv: list, bin_args: list | None = None) -> None:
        self.settings = settings
        self.models_max = settings.models_max
        self.bin_args = bin_args or server_bin_args()
        self.base_env = dict(os.environ)
        self.base_preset = presets.load_from_args(argv)
        # propagate the router's own flags to the children, but not what the router owns
        presets.unset_reserved_args(self.base_preset, True)
        self.base_preset.unset_option("LLAMA_ARG_LOG_FILE")  # a preset may still set one
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)
        self.mapping: dict = {}
        self.stopping: set = set()  # asked to stop, running until their exit is seen
        self.startup_models: list | None = []
        self.sched = LruScheduler(self)
        self.sse = Broadcaster()
        self.closing = False
        self.is_reloading = False  # load() waits while a reload runs
        self.need_reload = False  # a download finished: the next get_meta() re-scans first
        self.conv_models = ConvModelTracker()
        self.load_models()

    # --- the model list ---------------------------------------------------------------------
    def _scan(self) -> tuple:
        """Read the model sources: (presets by name, source by name, hidden cache models).
        Pure I/O, no lock (load_models' phase 1)."""
        s = self.settings
        cached = presets.load_from_cache()
        local = presets.load_from_models_dir(s.models_dir) if s.models_dir else {}
        custom, global_preset = presets.load_from_ini(s.models_preset) if s.models_preset else ({}, presets.Preset())
        cached = presets.cascade(global_preset, cached)
        local = presets.cascade(global_preset, local)
        custom = presets.cascade(global_preset, custom)
        # a model in the cache and the folder is the folder's; a preset section merges over both
        final, source = {}, {}
        for name, p in cached.items():
            final[name], source[name] = p, SOURCE_CACHE
        for name, p in local.items():
            final[name], source[name] = p, SOURCE_MODELS_DIR
        for name, p in custom.items():
            if name in final:
                final[name].merge(p)
            else:
                final[name] = p
            source[name] = SOURCE_PRESET
        # the router's own command line over every model ("llama-server --temp 0" for all)
        for p in final.values():
            p.merge(self.base_preset)
        return final, source, self._dedup_hidden(custom, cached, source)

    def _apply_stop_timeout_and_hidden(self, hidden: set) -> None:
        """Lock held."""
        for name, inst in self.mapping.items():
            value = inst.meta.preset.get_option(presets.PRESET_STOP_TIMEOUT)
            if value is not None:
                try:
                    inst.meta.stop_timeout = int(value)
                except ValueError:
                    logger.warning("invalid stop-timeout value '%s' for model '%s', using default %d seconds",
                                   value, name, DEFAULT_STOP_TIMEOUT)
                    inst.meta.stop_timeout = DEFAULT_STOP_TIMEOUT
            inst.meta.hidden = name in hidden

    def load_models(self) -> None:
        """(Re-)build the model list from its sources (server_models::load_models).

        The first time, every model is added. Later (GET /models?reload=1, or after a POST
        /models download), the new list is reconciled with the running one: a running model
        whose source is gone or whose preset changed is stopped, a model no longer listed is
        dropped, the others take their new preset, new ones are added, and /models/sse hears
        "models_reload". A reload never starts a model.

        Raises:
            PresetError: a source that cannot be read; RouterError: conflicting names.
        """
        final, source, hidden = self._scan()
        with self.cv:
            self.need_reload = False
            if not self.mapping:
                for name in sorted(final):
                    self._add_model(ModelMeta(name=name, preset=final[name], source=source.get(name, SOURCE_PRESET)))
                self._apply_stop_timeout_and_hidden(hidden)
                self._log_available_models()
                if self.startup_models is not None:  # skipped once the startup phase is over
                    to_load = [name for name, inst in self.mapping.items() if presets.is_truthy(
                        inst.meta.preset.get_option(presets.PRESET_LOAD_ON_STARTUP) or "")]
                    if len(to_load) > self.models_max:  # as upstream: even with --models-max 0
                        raise RouterError(f"number of models to load on startup ({len(to_load)}) exceeds "
                                          f"models_max ({self.models_max})")
                    self.startup_models = to_load
                return
            self.is_reloading = True
            try:
                self._reload(final, source, hidden)
            finally:
                self.is_reloading = False  # releases the load() calls waiting for the reload
                self.cv.notify_all()
            self._log_available_models()
        self.notify_sse("models_reload", "*")

    def _reload(self, final: dict, source: dict, hidden: set) -> None:
        """load_models' reconciliation. Lock held (released while waiting for stops)."""
        def comparable(preset):  # update_args sets these, the sources do not
            p = preset.copy()
            for env in ("LLAMA_ARG_HOST", "LLAMA_ARG_PORT", "LLAMA_ARG_ALIAS"):
                p.unset_option(env)
            return p.options

        to_unload = [name for name, inst in self.mapping.items() if inst.meta.is_running() and (
            name not in final or comparable(inst.meta.preset) != comparable(final[name]))]
        for name in to_unload:
            logger.info("(reload) unloading model name=%s (source updated or removed)", name)
            inst = self.mapping[name]
            if inst.meta.is_running():
                self._stop_instance(name, inst)
        self.cv.wait_for(lambda: not any(n in self.mapping and self.mapping[n].meta.is_running()
                                         for n in to_unload))
        for name in list(self.mapping):
            status = self.mapping[name].meta.status
            if status == DOWNLOADING:
                continue  # its child is still busy
            if status == DOWNLOADED:
                del self.mapping[name]  # the download is done: the cache lists the model now
            elif name not in final:
                logger.info("(reload) removing model name=%s (no longer in source)", name)
                del self.mapping[name]
        for name, inst in self.mapping.items():
            if inst.meta.is_running() or name not in final:
                continue
            meta = inst.meta
            meta.preset = final[name]
            meta.aliases = set()
            for alias in _split_names(meta.preset.get_option("LLAMA_ARG_ALIAS")):
                other = next((k for k, i in self.mapping.items()
                              if k != name and (k == alias or alias in i.meta.aliases)), None)
                if other is not None:
                    logger.warning("(reload) alias '%s' for model '%s' conflicts with model '%s', skipping",
                                   alias, name, other)
                    continue
                meta.aliases.add(alias)
            meta.tags = _split_names(meta.preset.get_option("LLAMA_ARG_TAGS"))
            meta.exit_code = 0  # no longer failed: it may be loaded again
            meta.update_args(self.bin_args)
        for name in sorted(final):  # new models; load-on-startup does not apply to them
            if name not in self.mapping:
                self._add_model(ModelMeta(name=name, preset=final[name], source=source.get(name, SOURCE_PRESET)))
        self._apply_stop_timeout_and_hidden(hidden)

    def _dedup_hidden(self, custom: dict, cached: dict, source: dict) -> set:
        """Cache models a `dedup-cache-models` preset already serves (hidden from GET /models)."""
        repos = set()
        for p in custom.values():
            if presets.is_truthy(p.get_option(presets.PRESET_DEDUP_CACHE_MODELS) or ""):
                repo = p.get_option("LLAMA_ARG_HF_REPO")
                if repo:
                    repo, _, tag = repo.partition(":")
                    repos.add((repo, (tag or "Q4_K_M").upper()))
        # NOTE(router): upstream compares the resolved cache file paths; repo and tag name that
        # file the same way for the cache's own presets
        out = set()
        for name in cached:
            if source.get(name) == SOURCE_CACHE:
                repo, _, tag = name.partition(":")
                if (repo, tag.upper()) in repos:
                    logger.info("hiding cache model name=%s (deduplicated by a preset)", name)
                    out.add(name)
        return out

    def _add_model(self, meta: ModelMeta) -> None:
        """server_models::add_model: check names and aliases, render the command line.
        Lock held."""
        if meta.name in self.mapping:
            raise RouterError(f"model '{meta.name}' appears multiple times")
        for key, inst in self.mapping.items():
            if meta.name in inst.meta.aliases:
                raise RouterError(f"model name '{meta.name}' conflicts with alias of model '{key}'")
        meta.aliases = _split_names(meta.preset.get_option("LLAMA_ARG_ALIAS"))
        meta.tags = _split_names(meta.preset.get_option("LLAMA_ARG_TAGS"))
        for alias in meta.aliases:
            if alias in self.mapping:
                raise RouterError(f"alias '{alias}' for model '{meta.name}' conflicts with existing model name")
            for key, inst in self.mapping.items():
                if alias in inst.meta.aliases:
                    raise RouterError(f"alias '{alias}' for model '{meta.name}' conflicts with alias of "
                                      f"model '{key}'")
        meta.update_args(self.bin_args)
        self.mapping[meta.name] = Instance(meta)

    def _log_available_models(self) -> None:
        logger.info("Available models (%d):", len(self.mapping))
        if not self.mapping:
            logger.info("  no models found on the system (visit https://llama.app/models for suggestions)")
        for name, inst in self.mapping.items():
            info = ""
            if inst.meta.aliases:
                info += " (aliases: " + ", ".join(sorted(inst.meta.aliases)) + ")"
            if inst.meta.tags:
                info += " [tags: " + ", ".join(sorted(inst.meta.tags)) + "]"
            logger.info("  [%10s] %s%s", inst.meta.source, name, info)

    def load_startup_models(self) -> None:
        """Load the `load-on-startup` models, once (server_models::load_startup_models)."""
        with self.lock:
            to_load, self.startup_models = self.startup_models or [], None
        for name in to_load:
            logger.info("(startup) loading model %s", name)
            self.load(name)

    def _resolve(self, name: str):
        """The instance named `name` or having it as an alias. Lock held."""
        if name in self.mapping:
            return self.mapping[name]
        return next((inst for inst in self.mapping.values() if name in inst.meta.aliases), None)

    def has_model(self, name: str) -> bool:
        with self.lock:
            return self._resolve(name) is not None

    def _reload_if_needed(self) -> None:
        with self.lock:
            needed = self.need_reload
        if needed:
            self.load_models()

    def get_meta(self, name: str) -> ModelMeta | None:
        """A copy of a model's metadata, by name or alias (re-scanning the sources first
        after a download, as server_models::get_meta)."""
        self._reload_if_needed()
        with self.lock:
            inst = self._resolve(name)
            return None if inst is None else replace(inst.meta)

    def max_stop_timeout(self) -> int:
        """The longest stop-timeout of any model (no re-scan: for the shutdown)."""
        with self.lock:
            return max((inst.meta.stop_timeout for inst in self.mapping.values()), default=0)

    def get_all_meta(self) -> list:
        self._reload_if_needed()
        with self.lock:
            return [replace(inst.meta) for inst in self.mapping.values()]

    # --- events -----------------------------------------------------------------------------
    def notify_sse(self, event: str, model_id: str, data=None) -> None:
        out = {"model": model_id, "event": event}
        if data is not None:
            out["data"] = data
        self.sse.broadcast(out)

    def update_status(self, name: str, status: str, exit_code: int = 0, loaded_info=None, progress=None) -> None:
        """Set a model's state and tell /models/sse (server_models::update_status)."""
        with self.cv:
            inst = self.mapping.get(name)
            if inst is not None:
                inst.meta.status = status
                inst.meta.exit_code = exit_code
                if status == UNLOADED:
                    self.stopping.discard(name)
                if loaded_info is not None:
                    inst.meta.loaded_info = loaded_info
                if progress is not None:
                    inst.meta.progress = progress
                # a model that comes up idle or goes down changes the slots of queued requests
                self.sched.tick()
            data = {"status": status}
            if status == UNLOADED:
                data["exit_code"] = exit_code
            if loaded_info is not None:
                data["info"] = loaded_info
            if progress is not None:
                data["progress"] = progress
            self.notify_sse("status_change", name, data)
            self.cv.notify_all()

    def update_download_progress(self, name: str, progress: dict | None, done: bool, ok: bool = True) -> None:
        """A download child's progress (`progress`: url, downloaded, total) or its end
        (server_models::update_download_progress). An ended download leaves a DOWNLOADED
        entry that the next load_models() replaces with what the cache now holds."""
        curr = None
        with self.cv:
            inst = self.mapping.get(name)
            if inst is not None:
                if done:
                    inst.meta.status = DOWNLOADED
                    self.need_reload = True
                else:
                    info = inst.meta.loaded_info
                    info.setdefault("progress", {})[progress["url"]] = {"done": progress["downloaded"],
                                                                        "total": progress["total"]}
                    curr = json.loads(json.dumps(info))  # a copy
            if done:
                self.cv.notify_all()  # an unload() may wait for the cancelled download
        if done:
            self.notify_sse("download_finished" if ok else "download_failed", name, {})
        else:
            self.notify_sse("download_progress", name, curr)

    def remove(self, name: str) -> None:
        """Stop a cache model and delete its files from the cache (server_models::remove).

        Raises:
            RouterError: an unknown model, or one that does not come from the cache.
        """
        from pyllama.server.router.cache import remove_cached

        with self.cv:
            inst = self.mapping.get(name)
            if inst is None:
                raise RouterError(f"model name={name} is not found")
            if inst.meta.source != SOURCE_CACHE:
                raise RouterError(f"model name={name} is not removable (not from cache)")
            if inst.meta.status == DOWNLOADING:
                logger.info("cancelling download for model name=%s", name)
                inst.request_exit()
            elif inst.meta.is_running():
                self._stop_instance(name, inst)
            self._wait(name, lambda m: m.status in (UNLOADED, DOWNLOADED))
            # best effort: a cancelled download may have no files yet
            ok = remove_cached(name)
            self.mapping.pop(name, None)
        if not ok:
            logger.warning("removing model name=%s from disk returned false (no cached files?)", name)
        logger.info("removing model name=%s from cache (%s)", name, "succeeded" if ok else "partial")
        self.notify_sse("model_remove", name, {})

    def _wait(self, name: str, predicate) -> None:
        """Wait until `predicate(meta)` holds, or the entry is gone (server_models::wait).
        Lock held."""
        self.cv.wait_for(lambda: name not in self.mapping or predicate(self.mapping[name].meta))

    def handle_child_state(self, name: str, line: str) -> None:
        """A `cmd_child_to_router:state:` line (server_models::handle_child_state)."""
        try:
            data = json.loads(line[len(CMD_CHILD_TO_ROUTER_STATE):])
            state, payload = data.get("state", ""), data.get("payload") or {}
        except (ValueError, AttributeError) as exc:
            logger.error("failed to parse child state update for name=%s: %s", name, exc)
            return
        if state == "downloading":  # a download child: progress, then its result
            result, url = payload.get("result", ""), payload.get("url", "")
            if result in ("download_finished", "download_failed"):
                self.update_download_progress(name, None, done=True, ok=result == "download_finished")
                with self.lock:
                    inst = self.mapping.get(name)
                    if inst is not None:
                        inst.request_exit()
            elif url:
                self.update_download_progress(name, {"url": url, "downloaded": payload.get("downloaded", 0),
                                                     "total": payload.get("total", 0)}, done=False)
        elif state == "loading":
            self.update_status(name, LOADING, progress=payload)
        elif state == "ready":  # an empty payload: woken from sleep
            self.update_status(name, LOADED, loaded_info=payload or None)
        elif state == "sleeping":
            self.update_status(name, SLEEPING)
        else:
            logger.error("unexpected state %r from child name=%s", state, name)

    # --- children ---------------------------------------------------------------------------
    def _watch(self, name: str, proc: subprocess.Popen, port: int, mode: str = MODE_NORMAL) -> None:
        """Reader thread of one child: forward its log, handle its state lines, reap it."""
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith(CMD_CHILD_TO_ROUTER_STATE):
                logger.debug("[%5d] %s", port, line)
                self.handle_child_state(name, line)
            elif line:
                child_logger.info("[%5d] %s", port, line)  # forward the child's log
        code = proc.wait()
        code = code if code >= 0 else 1  # killed by a signal: EXIT_FAILURE, as subprocess_join
        self.on_child_exit(name, proc, code, mode)
        logger.info("instance name=%s exited with status %d", name, code)

    def on_child_exit(self, name: str, proc: subprocess.Popen, exit_code: int, mode: str = MODE_NORMAL) -> None:
        with self.cv:
            inst = self.mapping.get(name)
            if inst is None or inst.proc is not proc:
                self.stopping.discard(name)  # entry dropped, or a newer instance took the name
                return
            if mode == MODE_DOWNLOAD:
                if inst.meta.status == DOWNLOADING:  # died without a result: a failed download
                    inst.meta.status = DOWNLOADED
                    self.need_reload = True
                    self.notify_sse("download_failed", name, {})
                # the entry goes at the next load_models()
                self.stopping.discard(name)
                self.cv.notify_all()
                return
        self.update_status(name, UNLOADED, exit_code)

    def _spawn(self, meta: ModelMeta, mode: str = MODE_NORMAL) -> subprocess.Popen:
        env = {**self.base_env, ROUTER_PORT_ENV: str(self.settings.port)}
        if mode == MODE_DOWNLOAD:
            env[CHILD_MODE_ENV] = MODE_DOWNLOAD
            env["LLAMA_ARG_HF_REPO"] = meta.name
        # its own session: a force-kill reaches gunicorn's worker too, and a Ctrl-C on the
        # router's terminal stops the children through the router, in order
        return subprocess.Popen(meta.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        """Force-kill a child and what it started (server_subproc::terminate: SIGKILL)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                proc.kill()
            except ProcessLookupError:
                pass

    def request_stop(self, name: str, send_exit: bool = True) -> None:
        """Ask a running child to stop, force-killing it after its stop-timeout. Lock held."""
        inst = self.mapping.get(name)
        if inst is None or name in self.stopping or inst.proc is None:
            return
        self.stopping.add(name)
        proc = inst.proc
        if send_exit:
            try:
                proc.stdin.write((CMD_ROUTER_TO_CHILD_EXIT + "\n").encode())
                proc.stdin.flush()
            except (OSError, ValueError):
                pass

        def force_kill():
            if proc.poll() is None:
                logger.warning("force-killing model instance name=%s after timeout", name)
                self._kill(proc)

        timer = threading.Timer(inst.meta.stop_timeout, force_kill)
        timer.daemon = True
        timer.start()

    def load(self, name: str, mode: str = MODE_NORMAL, custom_meta: ModelMeta | None = None) -> None:
        """Start a model's child (server_models::load); returns once it is spawned.

        `mode=MODE_DOWNLOAD` with a `custom_meta` starts a download child instead (POST /models):
        an entry of its own in DOWNLOADING state, outside --models-max.

        Raises:
            RouterError: an unknown model, no free slot, a failed spawn.
        """
        if custom_meta is None:
            if not self.has_model(name):
                raise RouterError(f"model name={name} is not found")
            self.unload_lru()
        with self.cv:
            # a reload in progress: load against the fresh list
            self.cv.wait_for(lambda: not self.is_reloading)
            if self.closing:
                raise RouterError("the router is shutting down")
            if custom_meta is None and name not in self.mapping:
                raise RouterError(f"model name={name} is not found")  # dropped by a reload
            old = self.mapping.get(name)
            base = custom_meta if custom_meta is not None else old.meta
            if base.status != UNLOADED:
                logger.info("model %s is not ready", name)
                return
            # re-check the capacity under the lock, against concurrent loads; downloads take no slot
            if mode == MODE_NORMAL and self.models_max > 0 and \
                    sum(1 for i in self.mapping.values() if i.meta.is_running()) >= self.models_max:
                raise RouterError("model limit reached, try again later")
            meta = replace(base, preset=base.preset.copy(), port=free_port(), status=LOADING,
                           loaded_info={}, last_used=now_ms())
            logger.info("spawning server instance with name=%s on port %d", name, meta.port)
            meta.update_args(self.bin_args if mode == MODE_NORMAL else download_bin_args())
            if mode == MODE_DOWNLOAD:
                meta.status = DOWNLOADING
            logger.info("spawning server instance with args:")
            for arg in meta.args:
                logger.info("  %s", arg)
            try:
                proc = self._spawn(meta, mode)
            except OSError as exc:
                raise RouterError(f"failed to spawn server instance: {exc}") from None
            if old is not None and old.proc is not None and old.proc.poll() is None:
                logger.warning("old process for model name=%s is still alive, this is unexpected", name)
                self._kill(old.proc)
            self.notify_sse("model_status", name, {"status": meta.status})
            self.mapping[name] = Instance(meta, proc, mode=mode)
            threading.Thread(target=self._watch, args=(name, proc, meta.port, mode),
                             name=f"pyllama-router-{meta.port}", daemon=True).start()
            self.cv.notify_all()

    def unload_lru(self) -> None:
        """Stop the least recently used idle model when --models-max is reached, and wait."""
        if self.models_max <= 0:
            return
        with self.cv:
            if self.sched.has_capacity():
                return
            victim = self.sched.pick_victim()
        if victim:
            logger.info("models_max limit reached, removing LRU name=%s", victim)
            self.unload(victim)
            with self.cv:
                self.cv.wait_for(lambda: self.mapping[victim].meta.status == UNLOADED)

    def _stop_instance(self, name: str, inst: Instance) -> None:
        """Lock held."""
        logger.info("stopping model instance name=%s", name)
        loading = inst.meta.status == LOADING
        if loading:  # a model still loading is killed at once
            logger.warning("model name=%s is still loading, force-killing", name)
            self._kill(inst.proc)
        self.request_stop(name, not loading)

    def unload(self, name: str) -> None:
        """Stop a model's child; its exit is reported by its reader thread. A download is
        cancelled, and waited for."""
        with self.cv:
            inst = self.mapping.get(name)
            if inst is None:
                return
            if inst.meta.status == DOWNLOADING:
                logger.info("cancelling download for model name=%s", name)
                inst.request_exit()
                self._wait(name, lambda m: m.status != DOWNLOADING)
            elif inst.meta.is_running():
                self._stop_instance(name, inst)
            else:
                logger.warning("model instance name=%s is not running", name)

    def unload_all(self, timeout: float | None = None) -> None:
        """Stop every child and wait for them all (the router's clean_up)."""
        with self.cv:
            self.closing = True
            for name, inst in self.mapping.items():
                if inst.meta.status == DOWNLOADING:
                    logger.info("cancelling download for model name=%s", name)
                    inst.request_exit()
                elif inst.meta.is_running():
                    self._stop_instance(name, inst)
            self.cv.wait_for(lambda: not any(i.meta.is_running() or i.meta.status == DOWNLOADING
                                             for i in self.mapping.values()), timeout)

    def ensure_model_ready(self, name: str, should_stop=None) -> bool:
        """Make sure a model is running, loading it (through the --models-max queue) if not,
        and wait until it is ready (server_models::ensure_model_ready).

        Returns:
            False if it was ready already, True after a wait.
        Raises:
            RouterError: an unknown model, a load that failed, a cancelled wait.
        """
        meta = self.get_meta(name)
        if meta is None:
            raise RouterError(f"model name={name} is not found")
        with self.cv:
            stopping = name in self.stopping
        if not stopping and meta.status in (LOADED, SLEEPING):
            return False  # a sleeping child wakes up on the request
        queued = did_load = False
        with self.cv:
            inst = self.mapping.get(name)
            if inst is not None and inst.meta.status == UNLOADED:
                self.sched.join(name)  # the queue entry protects the model from eviction
                self.sched.tick()
                queued = True
        logger.info("waiting until model name=%s is fully loaded...", name)
        with self.cv:
            try:
                saw_loading = False
                while True:
                    inst = self.mapping.get(name)
                    if inst is None:
                        break
                    if name in self.stopping:  # a stopping instance takes no new request
                        if not queued:
                            self.sched.join(name)
                            self.sched.tick()
                            queued = True
                        if should_stop and should_stop():
                            raise RouterError(f"request cancelled while waiting for model name={name}")
                        self.cv.wait(0.2)
                        continue
                    status = inst.meta.status
                    if status in (LOADED, SLEEPING):
                        break
                    if status in (DOWNLOADING, DOWNLOADED):
                        break  # never wait on a download child
                    if status == LOADING:
                        saw_loading = True
                    elif status == UNLOADED:
                        if did_load or saw_loading:  # a spawn happened and it came back down
                            if inst.meta.is_failed():
                                raise RouterError(f"model name={name} failed to load")
                            break  # unloaded by another path: the caller reports "not running"
                        if not queued:
                            break
                    if should_stop and should_stop():
                        raise RouterError(f"request cancelled while waiting for model name={name}")
                    if status == UNLOADED and self.sched.try_claim(name):  # our turn, a free slot
                        self.cv.release()
                        ok = True
                        try:
                            logger.info("slot available, loading queued model name=%s", name)
                            self.load(name)
                            did_load = True
                        except RouterError as exc:  # lost a race for the slot: stay in line
                            logger.warning("queued load of name=%s did not go through: %s", name, exc)
                            ok = False
                        finally:
                            self.cv.acquire()
                        self.sched.claim_done(name, ok)
                        self.sched.tick()
                        if not ok and self.closing:
                            raise RouterError("the router is shutting down")
                        continue
                    self.cv.wait(0.2)
            finally:
                if queued:
                    self.sched.leave(name)
                self.sched.tick()  # a slot freed for this waiter goes to the next one
        return True

    # --- proxied requests -------------------------------------------------------------------
    def begin_request(self, name: str, update_last_used: bool) -> ModelMeta:
        """Count a request to a running model (proxy_request's bookkeeping).

        Raises:
            RouterError: unknown model; InvalidRequestError: the model is not running.
        """
        meta = self.get_meta(name)
        if meta is None:
            raise RouterError(f"model name={name} is not found")
        if not meta.is_running():
            raise InvalidRequestError(f"model name={name} is not running")
        with self.cv:
            inst = self.mapping[meta.name]
            if update_last_used:
                inst.meta.last_used = now_ms()
            inst.req_count += 1
        return meta

    def end_request(self, name: str) -> None:
        with self.cv:
            inst = self.mapping.get(name)
            if inst is not None and inst.req_count > 0:
                inst.req_count -= 1
                if inst.req_count == 0:
                    self.sched.tick()
            self.cv.notify_all()
