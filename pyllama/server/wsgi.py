"""The WSGI app factory for running pyllama under gunicorn directly.

    PYLLAMA_ARGS="-m model.gguf -np 4" gunicorn -c python:pyllama.server.wsgi 'pyllama.server.wsgi:create_app()'

`PYLLAMA_ARGS` holds llama-server flags (LLAMA_ARG_* variables work too); this module doubles as
the gunicorn config (bind, one gthread worker, threads, TLS) derived from them. A model named by
-hf/-mu/-dr is downloaded when this module is imported: with `-c python:pyllama.server.wsgi`,
once, in the gunicorn master before it forks.

Flags that start a router (no model, and --models-dir or --models-preset, as pyllama-server
decides: server/router/mode.py) serve router mode instead: the model list is read on import
(a bad preset stops gunicorn before it forks), the app routes to child servers it starts from
the worker, and the worker_exit hook (with `-c python:pyllama.server.wsgi`) stops them when the
worker stops; without the hook they still stop with it, on the end of their stdin.
"""

from __future__ import annotations

import os
import shlex

from pyllama import logs
from pyllama.downloads import prepare_model
from pyllama.errors import PyllamaError
from pyllama.flags import parse_server_args
from pyllama.server.gunicorn import _worker_exit, build_app, gunicorn_options
from pyllama.server.router.mode import is_router_mode
from pyllama.server.vertex import apply_port

_argv = shlex.split(os.environ.get("PYLLAMA_ARGS", ""))
_settings = parse_server_args(_argv)
_router_state = None
if is_router_mode(_settings):
    from pyllama.server.router import app as _router

    logs.configure(_settings, common_log=False)  # a router never loads libllama
    try:
        _router_state = _router.RouterState(_settings, _router.ServerModels(_settings, _argv))
    except Exception as exc:  # noqa: BLE001 - as pyllama-server: a bad preset, folder or name
        raise SystemExit(f"pyllama: error: failed to initialize router models: {exc}") from None
    _router.announce(_settings)
    worker_exit = _router.worker_exit_hook(_router_state)
else:
    logs.configure(_settings)
    try:
        _settings = prepare_model(_settings)
    except PyllamaError as exc:
        raise SystemExit(f"pyllama: error: {exc}") from None
    _settings = apply_port(_settings)  # AIP_MODE=PREDICTION listens on AIP_HTTP_PORT
    worker_exit = _worker_exit

# gunicorn reads these module globals when used with -c python:pyllama.server.wsgi
globals().update(gunicorn_options(_settings))


def create_app():
    """Return the WSGI app: the router's, or the model's, which loads in the background in
    this (worker) process."""
    if _router_state is not None:
        return _router.build_router_app(_router_state)
    return build_app(_settings)
