"""Response headers as llama-server writes them: upstream's names and spelling, on every route.

Falcon keeps header names lowercased (`Response.set_header` folds them) and gunicorn writes
the names the WSGI app hands to `start_response`, so without this every header but gunicorn's
own (Server, Date, Connection, Transfer-Encoding) went out as `content-type`, ... . Clients
that read headers into a plain dict compare names case-sensitively. `UpstreamHeaders` wraps
the WSGI app, once, and renames each header: the names upstream sets
(tools/server/server-http.cpp, server-context.cpp, cpp-httplib's Server::write_response_core)
in their exact spelling, any other name in the usual Title-Case.

It also closes the connection after a 4xx/5xx answer, as cpp-httplib does ("Don't leave
connections open after errors": `Connection: close`), through gunicorn's Response.force_close.

What gunicorn writes itself and cannot be changed from the app (hop-by-hop headers are
dropped from the app's list): a `Date` header (cpp-httplib sends none), and `Connection:
keep-alive` where cpp-httplib sends `Keep-Alive: timeout=5, max=100`.
Imports: stdlib only.
"""

from __future__ import annotations

# Every header name llama-server (and cpp-httplib under it) sets, spelled as upstream spells it.
UPSTREAM_NAMES = (
    "Access-Control-Allow-Origin", "Access-Control-Allow-Credentials",
    "Access-Control-Allow-Methods", "Access-Control-Allow-Headers",
    "Content-Type", "Content-Length", "Content-Encoding", "Content-Range", "Accept-Ranges",
    "Vary", "ETag", "Cache-Control", "Cross-Origin-Embedder-Policy", "Cross-Origin-Opener-Policy",
    "X-Accel-Buffering", "Process-Start-Time-Unix", "Location", "WWW-Authenticate",
)
_CANONICAL = {name.lower(): name for name in UPSTREAM_NAMES}


def canonical(name: str) -> str:
    """A header name in upstream's spelling, else in Title-Case (`x-foo-bar` -> `X-Foo-Bar`)."""
    lower = name.lower()
    known = _CANONICAL.get(lower)
    return known if known is not None else "-".join(p.capitalize() for p in lower.split("-"))


class UpstreamHeaders:
    """WSGI middleware: header names in upstream's case; errors close the connection."""

    def __init__(self, app) -> None:
        self.app = app

    def __call__(self, environ, start_response):
        def start(status: str, headers: list, exc_info=None):
            if status[:1] in ("4", "5"):
                # cpp-httplib: `Connection: close` after every error status; gunicorn's
                # start_response is a method of its Response, which can be told to close
                force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
                if force_close is not None:
                    force_close()
            return start_response(status, [(canonical(n), v) for n, v in headers], exc_info)

        return self.app(environ, start)
