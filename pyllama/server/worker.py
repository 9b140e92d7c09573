"""The gunicorn worker: gthread, except that a stop signal frees the listening port at once.

llama-server's SIGTERM/SIGINT handler (tools/server/server.cpp `shutdown_handler`, then
`clean_up` -> server_http_context::stop -> httplib::Server::stop) closes its listening socket
right away, so a successor can bind the port while the old process winds down. gunicorn's
arbiter closes its own copy of the listener on SIGTERM, but the gthread worker only stops
accepting and keeps its inherited copy open until it exits, which is after the in-flight
requests finish (up to graceful_timeout): meanwhile the port stays in LISTEN and the next
server fails with "Address already in use". This worker closes its listeners as soon as it
is told to stop; requests already accepted still run to their end.
Imports: gunicorn only. Runs on the worker's main thread (signal handlers, poller callbacks).
"""

from __future__ import annotations

from gunicorn.workers.gthread import ThreadWorker


class PyllamaWorker(ThreadWorker):
    """gthread whose listening sockets close on SIGTERM (graceful) and SIGINT/SIGQUIT."""

    def handle_exit(self, sig, frame):
        """SIGTERM: stop accepting and close the listeners, then drain (gthread's shutdown)."""
        stopping = self.alive
        super().handle_exit(sig, frame)
        if stopping:
            # on the main loop, where the poller is used: not inside the signal handler
            self.method_queue.defer(self._close_listeners)

    def handle_quit(self, sig, frame):
        """SIGINT/SIGQUIT: the listeners close before the immediate exit."""
        self._close_listeners()
        super().handle_quit(sig, frame)

    def _close_listeners(self) -> None:
        try:
            self.set_accept_enabled(False)
        except (OSError, KeyError, ValueError):
            pass
        for listener in self.sockets:
            try:
                listener.close()
            except OSError:
                pass
