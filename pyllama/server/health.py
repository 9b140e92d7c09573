"""Liveness: whether this worker's engine can serve, for /health, and the watchdog acting on it.

llama-server's /health answers 503 only while the model loads. Ours also answers 503 (the same
`unavailable_error` shape) when the engine thread has died, or is wedged: a step (one
llama_decode batch) or a queued request waiting longer than PYLLAMA_LIVENESS_TIMEOUT seconds
(default 300; 0 turns the stall check off). The watchdog thread of a gunicorn worker
(`start_watchdog`, from server/gunicorn.py) checks the same every second and, when the engine
is in trouble, stops the worker so that gunicorn starts a fresh one (PYLLAMA_LIVENESS_RESTART=0
leaves that to whoever reads /health). Under systemd (NOTIFY_SOCKET and WATCHDOG_USEC in the
environment) it also sends WATCHDOG=1 while the engine is fine, and stops once it is not.
Imports: `errors`; the engine only through Engine.liveness() (no libllama call, no lock).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

from pyllama.errors import UnavailableError

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "PYLLAMA_LIVENESS_TIMEOUT"
RESTART_ENV = "PYLLAMA_LIVENESS_RESTART"
# One step is one llama_decode of up to n_batch (2048) tokens, plus the admissions and slot
# calls before it. The default model (270M) takes 3.5 s for one on 2 shared CPU cores (2251
# prompt tokens in 3.8-4.1 s); a 7B model there about 26 times that, 90 s; a 70B model on a
# 16-core CPU, at 20-40 prompt tokens/s, 50-100 s. A healthy server must never be restarted,
# so the default leaves room for the slowest of these.
DEFAULT_TIMEOUT_S = 300.0
RESTART_GRACE_S = 5.0  # a stopping worker's in-flight answers get this long, then it exits
EXIT_UNHEALTHY = 1  # any code but gunicorn's 3 and 4 (boot / app load errors) is respawned


def liveness_timeout(environ=os.environ) -> float:
    """PYLLAMA_LIVENESS_TIMEOUT in seconds (0: no stall check); the default when unset or bad."""
    value = environ.get(TIMEOUT_ENV, "")
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        timeout = float(value)
    except ValueError:
        timeout = -1.0
    if not timeout >= 0:  # also NaN
        logger.warning("%s=%r is not a number of seconds >= 0: using %g", TIMEOUT_ENV, value, DEFAULT_TIMEOUT_S)
        return DEFAULT_TIMEOUT_S
    return timeout


def trouble(engine, timeout: float) -> str | None:
    """Why `engine` cannot serve (a dead or wedged engine thread), or None. Thread-safe."""
    liveness = getattr(engine, "liveness", None)
    if liveness is None:  # an engine stand-in without the check (tests' FakeEngine)
        return None
    alive, stalled = liveness()
    if not alive:
        failure = getattr(engine, "failure", None)
        return f"engine thread failed: {failure}" if failure is not None else "engine thread stopped"
    if timeout > 0 and stalled > timeout:
        return f"engine stalled: no progress for {stalled:.0f} s with work pending"
    return None


def check(state) -> None:
    """GET /health: raise UnavailableError (503) while loading or when the engine is in trouble."""
    engine = state.require_ready()
    problem = trouble(engine, state.liveness_timeout)
    if problem is not None:
        raise UnavailableError(problem)


class SystemdNotifier:
    """sd_notify(3) over NOTIFY_SOCKET, with the stdlib only. Thread-safe (one datagram a call)."""

    def __init__(self, address: str, watchdog_s: float) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address  # abstract socket
        self.watchdog_s = watchdog_s

    @classmethod
    def from_env(cls, environ=os.environ) -> "SystemdNotifier | None":
        """The notifier systemd asks for, or None. WATCHDOG_PID is not checked: the pings come
        from the worker, a child of the unit's main process (NotifyAccess=all)."""
        address = environ.get("NOTIFY_SOCKET", "")
        if not address:
            return None
        try:
            watchdog_s = int(environ.get("WATCHDOG_USEC", "0")) / 1e6
        except ValueError:
            watchdog_s = 0.0
        return cls(address, watchdog_s)

    def send(self, message: str) -> None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError as exc:
            logger.debug("sd_notify(%r) failed: %s", message, exc)


def restart_on_trouble(environ=os.environ) -> bool:
    return environ.get(RESTART_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def start_watchdog(state, environ=os.environ) -> threading.Thread:
    """Watch this worker's engine (gunicorn worker process, after the fork)."""
    thread = threading.Thread(target=_watch, args=(state, SystemdNotifier.from_env(environ),
                                                   restart_on_trouble(environ)),
                              name="pyllama-watchdog", daemon=True)
    thread.start()
    return thread


def _watch(state, notifier: SystemdNotifier | None, restart: bool) -> None:
    # Watchdog thread. Pings go out at half of systemd's WatchdogSec, checks once a second;
    # loading counts as healthy (a load that never ends is the startup probe's to catch).
    period = 1.0
    if notifier is not None and notifier.watchdog_s > 0:
        period = min(period, notifier.watchdog_s / 2)
    said_ready = False
    while True:
        problem = trouble(state.engine, state.liveness_timeout) if state.ready.is_set() else None
        if problem is not None:
            break
        if notifier is not None:
            if state.ready.is_set() and not said_ready:
                notifier.send("STATUS=model loaded")
                said_ready = True
            if notifier.watchdog_s > 0:
                notifier.send("WATCHDOG=1")
        time.sleep(period)
    if notifier is not None:  # and no WATCHDOG=1 from here on
        notifier.send(f"STATUS=unhealthy: {problem}")
    if not restart:
        logger.critical("%s: /health answers 503 (%s=0: the worker is not restarted)", problem, RESTART_ENV)
        return
    logger.critical("%s: restarting the worker", problem)
    # gunicorn's graceful worker exit (server/worker.py closes the listeners at once); the
    # master starts a new worker. Requests still waiting on a wedged engine never end, so the
    # process ends itself after a short grace.
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(RESTART_GRACE_S)
    logger.critical("the worker did not stop within %g s: exiting", RESTART_GRACE_S)
    os._exit(EXIT_UNHEALTHY)
