"""Running the server under gunicorn: one worker process owns the model, gthread threads serve.

`run(settings)` starts gunicorn programmatically (BaseApplication). The model is loaded in the
worker, after the fork, by a background thread, so /health answers 503 while it loads.
`gunicorn_options(settings)` is also what wsgi.py's config uses for direct gunicorn deployments.
Each worker runs server/health.py's watchdog: a dead or wedged engine stops the worker, and
gunicorn's master starts a new one; under systemd it also sends the WatchdogSec pings.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

import gunicorn.http.wsgi
from gunicorn.app.base import BaseApplication

from pyllama.settings import Settings

logger = logging.getLogger(__name__)

# llama-server answers with "Server: llama.cpp"; gunicorn writes its own Server header itself.
gunicorn.http.wsgi.SERVER = "llama.cpp"


def http_threads(settings: Settings) -> int:
    """Upstream's pool: --threads-http fixed threads (default max(slots + 4, CPUs - 1)) plus up to
    1024 more made on demand; gthread's executor also starts its threads only when needed."""
    fixed = settings.threads_http if settings.threads_http > 0 else \
        max(settings.parallel + 4, (os.cpu_count() or 1) - 1)
    return fixed + 1024


def hosts(settings: Settings) -> list[str]:
    """--host's comma-separated addresses (UNIX socket paths end in .sock)."""
    return [h.strip() for h in settings.host.split(",") if h.strip()]


def bind_addresses(settings: Settings) -> list[str]:
    out = []
    for host in hosts(settings):
        if host.endswith(".sock"):
            out.append(f"unix:{host}")
        else:
            out.append(f"[{host}]:{settings.port}" if ":" in host else f"{host}:{settings.port}")
    return out


def listen_url(sock, ssl: bool = False) -> str:
    """A bound socket's address as server_http_context::start lists it (http://host:port,
    IPv6 in brackets, unix://path): the URL to open the web UI at."""
    addr = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix://{addr}"
    host, port = addr[0], addr[1]
    scheme = "https" if ssl else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _announce_when_ready(worker) -> None:
    """Worker process, post_worker_init: once the model is loaded, log upstream's
    "listening on URL" line per address (server.cpp logs it after "model loaded")."""
    state = _worker_state
    if state is None:
        return
    ssl = bool(state.settings.ssl_key_file and state.settings.ssl_cert_file)
    urls = [listen_url(s, ssl) for s in worker.sockets]

    def announce():
        state.ready.wait()
        for url in urls:
            logger.info("listening on %s", url)

    threading.Thread(target=announce, name="pyllama-announce", daemon=True).start()


def gunicorn_options(settings: Settings) -> dict:
    options = {
        "bind": bind_addresses(settings),
        "workers": 1,  # one model load per process: scale with threads
        # gthread that frees the port as soon as it is told to stop (server.worker)
        "worker_class": "pyllama.server.worker.PyllamaWorker",
        "threads": http_threads(settings),
        # gthread keeps (worker_connections - threads) idle keep-alive connections
        "worker_connections": http_threads(settings) + 1000,
        "timeout": max(30, settings.timeout),
        "graceful_timeout": 30,
        "keepalive": 5,
        "accesslog": "-" if settings.verbose else None,
        "errorlog": "-",
        "loglevel": "debug" if settings.verbose else ("critical" if settings.log_disable else "info"),
        "logger_class": "pyllama.logs.GunicornLogger",
        "worker_tmp_dir": "/dev/shm" if os.path.isdir("/dev/shm") else None,
        "reuse_port": settings.reuse_port,
        # gunicorn >= 25's control socket sits at one path per user ($HOME/.gunicorn/gunicorn.ctl):
        # every pyllama-server (and each router child) would take it over from the last, and
        # llama-server has nothing like it
        "control_socket_disable": True,
    }
    if settings.ssl_key_file and settings.ssl_cert_file:
        options["keyfile"] = settings.ssl_key_file
        options["certfile"] = settings.ssl_cert_file
    return {k: v for k, v in options.items() if v is not None}


def build_app(settings: Settings):
    """Create the state and the app, and start loading the model (call in the worker)."""
    from pyllama.downloads import needs_download, prepare_model
    from pyllama.models import default_model_path
    from pyllama.server.app import ServerState, create_app, start_loading
    from pyllama.server.headers import UpstreamHeaders

    if needs_download(settings):  # a caller of run(); pyllama-server and wsgi.py download before the fork
        settings = prepare_model(settings)
    model_path = settings.model or str(default_model_path())
    state = ServerState(settings, model_path)

    def fail(exc):
        logger.critical("cannot serve: %s", exc)
        os._exit(3)  # gunicorn's WORKER_BOOT_ERROR: the arbiter stops instead of respawning

    start_loading(state, on_failure=fail)
    from pyllama.server.health import start_watchdog

    start_watchdog(state)  # in the worker, as build_app runs here for both deployments
    from pyllama.server.router.child import is_child, notify_when_ready

    if is_child():  # started by a router: tell it when the model is ready
        notify_when_ready(state)
    global _worker_state
    _worker_state = state
    return UpstreamHeaders(create_app(state))  # header names as upstream spells them


class PyllamaApplication(BaseApplication):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__()

    def load_config(self):
        for key, value in gunicorn_options(self.settings).items():
            if key == "control_socket_disable" and key not in self.cfg.settings:
                continue  # gunicorn < 25.1 has no control socket
            self.cfg.set(key, value)
        self.cfg.set("worker_exit", _worker_exit)
        self.cfg.set("post_worker_init", _announce_when_ready)

    def load(self):
        return build_app(self.settings)


_worker_state = None  # the ServerState of this worker process


def _worker_exit(server, worker):
    state = _worker_state
    if state is None:
        return
    if state.ready.is_set():
        from pyllama.server.health import EXIT_UNHEALTHY, trouble

        problem = trouble(state.engine, state.liveness_timeout)
        if problem is not None:  # nothing to drain: a wedged engine would hold the exit for good
            logger.critical("%s: the worker exits without closing the engine", problem)
            os._exit(EXIT_UNHEALTHY)
    state.close()


def run(settings: Settings) -> int:
    from pyllama.server.vertex import apply_port

    try:
        settings = apply_port(settings)  # AIP_MODE=PREDICTION listens on AIP_HTTP_PORT
    except ValueError as exc:
        logger.error("%s", exc)
        return 1
    logger.info("pyllama-server listening on %s", ", ".join(bind_addresses(settings)))
    PyllamaApplication(settings).run()
    return 0
