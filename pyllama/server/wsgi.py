"""The WSGI app factory for running pyllama under gunicorn directly.

    PYLLAMA_ARGS="-m model.gguf -np 4" gunicorn -c python:pyllama.server.wsgi 'pyllama.server.wsgi:create_app()'

`PYLLAMA_ARGS` holds llama-server flags (LLAMA_ARG_* variables work too); this module doubles as
the gunicorn config (bind, one gthread worker, threads, TLS) derived from them. A model named by
-hf/-mu/-dr is downloaded when this module is imported: with `-c python:pyllama.server.wsgi`,
once, in the gunicorn master before it forks.
"""

from __future__ import annotations

import os
import shlex

from pyllama import logs
from pyllama.downloads import prepare_model
from pyllama.errors import PyllamaError
from pyllama.flags import parse_server_args
from pyllama.server.gunicorn import _worker_exit, build_app, gunicorn_options
from pyllama.server.vertex import apply_port

_settings = parse_server_args(shlex.split(os.environ.get("PYLLAMA_ARGS", "")))
logs.configure(_settings)
try:
    _settings = prepare_model(_settings)
except PyllamaError as exc:
    raise SystemExit(f"pyllama: error: {exc}") from None
_settings = apply_port(_settings)  # AIP_MODE=PREDICTION listens on AIP_HTTP_PORT

# gunicorn reads these module globals when used with -c python:pyllama.server.wsgi
globals().update(gunicorn_options(_settings))
worker_exit = _worker_exit


def create_app():
    """Return the WSGI app; the model loads in the background in this (worker) process."""
    return build_app(_settings)
