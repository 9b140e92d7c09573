"""One logging setup for the server: pyllama's own logs, libllama's, and gunicorn's.

libllama's log reaches the `pyllama.llama_cpp` logger (engine/_model.pyx), gunicorn's error and
access logs propagate to the root logger (GunicornLogger), so the llama-server logging flags
shape all of them: -lv/--verbosity, -v, --log-disable, --log-file, --log-colors,
--log-prefix, --log-timestamps and --log-jsonl, with upstream's line format (common/log.cpp:
`M.SS.mmm.uuu I message`, time since start, a level letter).
Imports: stdlib, `settings`, and `_chat` for common's own log.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from gunicorn import glogging

from pyllama.settings import Settings

_START = time.monotonic()
# upstream's verbosity thresholds (common/log.h) -> Python levels
# (4 is upstream's trace, shown as D; 5, its debug, is the level below DEBUG: libllama's
# debug lines, engine/_model.pyx)
DEBUG_VERBOSE = 5
_VERBOSITY = {0: logging.CRITICAL, 1: logging.ERROR, 2: logging.WARNING, 3: logging.INFO, 4: logging.DEBUG}
_LETTERS = {DEBUG_VERBOSE: ("D", "\033[33m"), logging.DEBUG: ("D", "\033[33m"), logging.INFO: ("I", "\033[32m"),
            logging.WARNING: ("W", "\033[35m"), logging.ERROR: ("E", "\033[31m"),
            logging.CRITICAL: ("E", "\033[31m")}
_BLUE, _RESET = "\033[34m", "\033[0m"
_JSONL_LEVELS = {DEBUG_VERBOSE: "debug", logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn",
                 logging.ERROR: "error", logging.CRITICAL: "error"}


def level_for(settings: Settings) -> int:
    """The lowest Python level the flags let through."""
    if settings.log_disable:
        return logging.CRITICAL + 1
    if settings.verbose:
        return DEBUG_VERBOSE
    return _VERBOSITY.get(settings.verbosity, DEBUG_VERBOSE if settings.verbosity > 4 else logging.CRITICAL)


class UpstreamFormatter(logging.Formatter):
    """common_log's line: [time since start] [level letter] message, colours optional."""

    def __init__(self, prefix: bool = True, timestamps: bool = True, colors: bool = False) -> None:
        super().__init__()
        self.prefix, self.timestamps, self.colors = prefix, timestamps, colors

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if not self.prefix:
            return msg
        head = ""
        if self.timestamps:
            us = int((record.created - (time.time() - (time.monotonic() - _START))) * 1e6)
            us = max(us, 0)
            stamp = f"{us // 60_000_000}.{us // 1_000_000 % 60:02d}.{us // 1000 % 1000:03d}.{us % 1000:03d}"
            head = f"{_BLUE}{stamp}{_RESET} " if self.colors else stamp + " "
        letter, color = _LETTERS.get(record.levelno, ("I", ""))
        if self.colors:
            tail = _RESET if record.levelno != logging.INFO else ""
            return f"{head}{color}{letter} {_RESET if record.levelno == logging.INFO else ''}{msg}{tail}"
        return f"{head}{letter} {msg}"


class JsonlFormatter(logging.Formatter):
    """--log-jsonl: {"type": "log", "time": us since start, "level", "msg"} per line."""

    def format(self, record: logging.LogRecord) -> str:
        us = int((time.monotonic() - _START) * 1e6)
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return json.dumps({"type": "log", "time": us, "level": _JSONL_LEVELS.get(record.levelno, "info"),
                           "msg": msg}, ensure_ascii=False)


def configure(settings: Settings, common_log: bool = True) -> None:
    """Install the handlers the flags ask for on the root logger (replacing earlier ones);
    `common_log=False` leaves llama.cpp's common log alone (a router never loads libllama)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level_for(settings))
    if common_log:
        _configure_common_log(settings)
    if settings.log_disable:
        root.addHandler(logging.NullHandler())
        return
    if settings.log_jsonl:
        stream = logging.StreamHandler(sys.stdout)  # upstream: JSONL goes to stdout, no colours
        stream.setFormatter(JsonlFormatter())
    else:
        colors = settings.log_colors == "on" or (settings.log_colors == "auto" and sys.stderr.isatty())
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(UpstreamFormatter(settings.log_prefix, settings.log_timestamps, colors))
    root.addHandler(stream)
    if settings.log_file:
        # common_log_set_file: every line also goes to the file, never coloured
        file = logging.FileHandler(settings.log_file, encoding="utf-8")
        file.setFormatter(JsonlFormatter() if settings.log_jsonl else
                          UpstreamFormatter(settings.log_prefix, settings.log_timestamps, False))
        root.addHandler(file)


def _configure_common_log(settings: Settings) -> None:
    # common's own lines (threadpools, --fit, chat templates) are written by common_log, which
    # has no hook to reach Python: give it the same format (to stderr; not to --log-file)
    try:
        from pyllama._chat import configure_common_log
    except ImportError:  # a source tree without the compiled modules
        return
    colors = {"auto": -1, "off": 0, "on": 1}.get(settings.log_colors, -1)
    verbosity = 1 << 30 if settings.verbose else settings.verbosity
    configure_common_log(settings.log_prefix, settings.log_timestamps, colors, settings.log_jsonl, verbosity,
                         settings.log_disable)


class GunicornLogger(glogging.Logger):
    """gunicorn's error and access logs through the root logger's handlers and format."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in list(log.handlers):
                log.removeHandler(handler)
            log.propagate = True
        self.error_log.setLevel(logging.NOTSET)
        self.access_log.setLevel(logging.INFO if cfg.accesslog else logging.CRITICAL + 1)
