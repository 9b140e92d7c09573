"""SleepGuard: with --sleep-idle-seconds, wake the model before a route that needs it.

The engine unloads its model after the idle period and reloads it on the next use
(`Engine.acquire`). A request routed to a resource takes such a hold before its responder runs
and keeps it until its response, streamed or not, is closed, so no HTTP thread touches the
vocabulary of an unloaded model. Resources that answer while asleep without waking it (GET
/health, /props, /models, /metrics) list their methods in `sleep_bypass`, as upstream's handlers
that start with create_response(true) (server_res_generator's bypass_sleep, which otherwise
calls server_queue::wait_until_no_sleep).
Imports: falcon-free; the engine only through ServerState.
"""

from __future__ import annotations


class _ReleaseOnClose:
    """A response body that ends the request's hold when the server closes it (WSGI close())."""

    def __init__(self, stream, release) -> None:
        self._stream = stream
        self._release = release

    def __iter__(self):
        return iter(self._stream)

    def close(self) -> None:
        try:
            close = getattr(self._stream, "close", None)
            if close is not None:
                close()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


class SleepGuard:
    """Falcon middleware: hold the model awake for each request that needs it."""

    def __init__(self, state) -> None:
        self.state = state

    def process_resource(self, req, resp, resource, params) -> None:
        state = self.state
        if resource is None or state.settings.sleep_idle_seconds < 0 or not state.ready.is_set():
            return  # sleeping off, or still loading: the resource answers 503 "Loading model"
        if req.method == "OPTIONS" or req.method in getattr(resource, "sleep_bypass", ()):
            return
        state.engine.acquire()  # blocks while a sleeping model reloads
        req.context.sleep_hold = True

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        if not getattr(req.context, "sleep_hold", False):
            return
        req.context.sleep_hold = False
        release = self.state.engine.release
        if resp.stream is None:
            release()
        else:
            resp.stream = _ReleaseOnClose(resp.stream, release)
