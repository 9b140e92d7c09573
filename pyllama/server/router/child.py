"""The child side of router mode: a pyllama-server the router started (upstream's server_child).

A child knows it is one from LLAMA_SERVER_ROUTER_PORT in its environment. It talks to the
router over its standard streams, as server-models.cpp's children do:

- it writes `cmd_child_to_router:state:{"state": "ready", "payload": <its /v1/models entry>}`
  on a line of its own to stdout once the model is loaded (notify_to_router);
- it reads its stdin: `cmd_router_to_child:exit` asks it to stop (gracefully), and end of
  file means the router is gone, so it stops at once (server_child::setup): a child never
  outlives its router, even one killed with SIGKILL.

`python -m pyllama.server.router.child ARGS` runs `pyllama-server ARGS`, for routers that
have no `pyllama-server` script beside their Python.
Imports: stdlib; `pyllama.cli` only when run as a program.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading

logger = logging.getLogger(__name__)

CMD_ROUTER_TO_CHILD_EXIT = "cmd_router_to_child:exit"
CMD_CHILD_TO_ROUTER_STATE = "cmd_child_to_router:state:"
ROUTER_PORT_ENV = "LLAMA_SERVER_ROUTER_PORT"

_stdout_lock = threading.Lock()


def is_child() -> bool:
    """Whether this process is a model instance started by a router (server_child::is_child)."""
    return ROUTER_PORT_ENV in os.environ


def notify_to_router(state: str, payload) -> None:
    """Tell the router about a state change (server_child::notify_to_router). Thread-safe.

    The line goes straight to file descriptor 1, after a newline that ends whatever a logger
    left unfinished on the shared pipe, so the router sees it at the start of a line.
    """
    data = json.dumps({"state": state, "payload": payload}, separators=(",", ":"))
    line = "\n" + CMD_CHILD_TO_ROUTER_STATE + data + "\n"
    with _stdout_lock:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        os.write(1, line.encode())


def notify_when_ready(state) -> None:
    """Once `state` (a ServerState) has its model, send the "ready" state with the model's
    /v1/models entry (server.cpp: notify_to_router(READY, routes.get_model_info())); then,
    with --sleep-idle-seconds, "sleeping" when the model is unloaded and "ready" with an empty
    payload when it is back (server_context's state callback). Runs a daemon thread of the
    worker; the sleep states are sent from the engine thread."""
    def on_sleeping_state(sleeping: bool) -> None:
        notify_to_router("sleeping" if sleeping else "ready", {})

    def run():
        state.ready.wait()
        try:
            info = state.models()["data"][0]
        except Exception:  # noqa: BLE001 - the router still needs the ready state
            logger.exception("cannot describe the model for the router")
            info = {}
        notify_to_router("ready", info)
        if state.settings.sleep_idle_seconds > 0:
            state.engine.on_sleeping_state(on_sleeping_state)

    threading.Thread(target=run, name="pyllama-router-notify", daemon=True).start()


def watch_stdin() -> threading.Thread:
    """Stop this process on the router's exit command (SIGTERM: a graceful stop) or at the end
    of stdin (SIGINT: an immediate one), as server_child::setup. Call in the process the router
    started (gunicorn's arbiter); runs a daemon thread."""
    def run():
        logger.info("child server monitoring thread started, waiting for EOF on stdin...")
        for line in sys.stdin:
            if CMD_ROUTER_TO_CHILD_EXIT in line:
                logger.info("exit command received, exiting...")
                os.kill(os.getpid(), signal.SIGTERM)
                return
        logger.info("EOF on stdin detected, forcing shutdown...")
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=run, name="pyllama-router-stdin", daemon=True)
    thread.start()
    return thread


if __name__ == "__main__":
    from pyllama.cli import server_main

    sys.exit(server_main(sys.argv[1:]))
