"""The child side of router mode: a pyllama-server the router started (upstream's server_child).

A child knows it is one from LLAMA_SERVER_ROUTER_PORT in its environment. It talks to the
router over its standard streams, as server-models.cpp's children do:

- it writes `cmd_child_to_router:state:{"state": "ready", "payload": <its /v1/models entry>}`
  on a line of its own to stdout once the model is loaded (notify_to_router);
- it reads its stdin: `cmd_router_to_child:exit` asks it to stop (gracefully), and end of
  file means the router is gone, so it stops at once (server_child::setup): a child never
  outlives its router, even one killed with SIGKILL.

`python -m pyllama.server.router.child ARGS` runs `pyllama-server ARGS`, for routers that
have no `pyllama-server` script beside their Python. With LLAMA_SERVER_CHILD_MODE=download
(POST /models) it downloads the model LLAMA_ARG_HF_REPO names into the cache instead, says
`downloading` with `{"result": "download_finished"}` (or `"download_failed"`), and exits on
the router's exit command (server_child::run_download).
Imports: stdlib; `pyllama.cli`, `flags`, `logs`, `downloads` only when run as a program.
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
CHILD_MODE_ENV = "LLAMA_SERVER_CHILD_MODE"
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


def run_download(argv: list) -> int:
    """Download the model the flags name, tell the router, wait for its exit command
    (server_child::run_download). Runs as the download child's main program."""
    from pyllama import logs
    from pyllama.downloads import prepare_model
    from pyllama.flags import parse_server_args

    settings = parse_server_args(argv)
    logs.configure(settings, common_log=False)
    finished = threading.Event()

    def watch():
        for line in sys.stdin:
            if CMD_ROUTER_TO_CHILD_EXIT in line:
                break
        else:  # EOF: the router is gone
            logger.info("EOF on stdin detected, forcing shutdown...")
            os._exit(1)
        if not finished.is_set():
            # NOTE(router): upstream's download checks a cancel flag between chunks; ours has no
            # such hook, so a cancel ends the process (the partial file stays, resumable)
            logger.info("download cancelled")
            notify_to_router("downloading", {"result": "download_failed"})
            os._exit(0)

    thread = threading.Thread(target=watch, name="pyllama-router-stdin", daemon=True)
    thread.start()
    try:
        prepare_model(settings)
        ok = True
    except Exception as exc:  # noqa: BLE001 - any failure is a failed download for the router
        logger.error("download failed for model name=%s: %s", settings.hf_repo, exc)
        ok = False
    finished.set()
    notify_to_router("downloading", {"result": "download_finished" if ok else "download_failed"})
    thread.join()  # the router answers the result with the exit command
    logger.info("download completed %s", "successfully" if ok else "with errors")
    return 0


if __name__ == "__main__":
    if is_child() and os.environ.get(CHILD_MODE_ENV) == "download":
        sys.exit(run_download(sys.argv[1:]))
    from pyllama.cli import server_main

    sys.exit(server_main(sys.argv[1:]))
