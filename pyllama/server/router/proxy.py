"""Forwarding one request to a child server and relaying its answer (upstream's server_http_proxy).

The request goes out as it came (method, path and query, body, headers but the hop-by-hop
ones and Accept-Encoding, so the answer is never compressed; Host names the child). The
answer's status and headers come back first; its body is then relayed chunk by chunk as the
child writes it (`HTTPResponse.read1`), so SSE tokens reach the client when the child sends
them, never buffered. A child that cannot be reached is a 500 "proxy error: ..." as upstream.
Headers the router sets itself (Server, CORS) or that belong to one hop (Transfer-Encoding,
Content-Length, Keep-Alive) are dropped from the child's answer (should_strip_proxy_header).
Imports: stdlib only.
"""

from __future__ import annotations

import http.client
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

CHUNK = 64 * 1024
_SKIP_REQUEST = {"accept-encoding", "transfer-encoding", "content-length", "connection", "keep-alive",
                 "host"}


def _strip_response_header(name: str) -> bool:
    """should_strip_proxy_header, plus Connection (hop-by-hop under WSGI)."""
    return name in ("server", "transfer-encoding", "content-length", "keep-alive", "connection") or \
        name.startswith("access-control-")


@dataclass
class ProxiedResponse:
    """A child's answer: status, headers and content type now, the body as an iterator."""

    status: int
    headers: list = field(default_factory=list)
    content_type: str = ""
    body: Iterator[bytes] | None = None
    data: bytes | None = None  # a body read whole (the child sent its length)


def forward(method: str, host: str, port: int, path: str, headers: dict, body: bytes, timeout: float,
            on_close: Callable[[], None] | None = None) -> ProxiedResponse:
    """Send a request to a child and return once its status and headers have come.

    `on_close` runs once the answer has been relayed (or failed). Thread-safe: one
    connection per call.
    """
    conn = http.client.HTTPConnection(host, port, timeout=timeout if timeout > 0 else None)
    closed = False

    def close():
        nonlocal closed
        if closed:
            return
        closed = True
        conn.close()
        if on_close is not None:
            on_close()

    try:
        out_headers = {k: v for k, v in headers.items() if k.lower() not in _SKIP_REQUEST}
        out_headers["Host"] = f"{host}:{port}"
        conn.request(method, path, body=body if method != "GET" or body else None, headers=out_headers)
        res = conn.getresponse()
    except (OSError, http.client.HTTPException) as exc:
        logger.error("http client error: %s", exc)
        close()
        return ProxiedResponse(500, [], "text/plain", data=f"proxy error: {exc}".encode())
    kept, content_type = [], ""
    for name, value in res.getheaders():
        low = name.lower()
        if _strip_response_header(low):
            continue
        if low == "content-type":
            content_type = value
            continue
        kept.append((name, value))
    out = ProxiedResponse(res.status, kept, content_type)
    if res.getheader("Content-Length") is not None and not res.chunked:  # a whole body: read it now
        try:
            out.data = res.read()
        except (OSError, http.client.HTTPException) as exc:
            logger.error("http client error: %s", exc)
            out.data = b""
        finally:
            close()
        return out

    out.body = _Relay(res, close)
    return out


class _Relay:
    """The body of a streamed answer, chunk by chunk. The WSGI server calls close() when it is
    done or the client went away, which ends the child connection (the child then sees its
    client gone) and runs `on_close`, even if no chunk was ever asked for."""

    def __init__(self, res: http.client.HTTPResponse, close: Callable[[], None]) -> None:
        self.res = res
        self._close = close

    def __iter__(self) -> "_Relay":
        return self

    def __next__(self) -> bytes:
        try:
            chunk = self.res.read1(CHUNK)
        except (OSError, http.client.HTTPException) as exc:
            logger.error("http client error: %s", exc)
            chunk = b""
        if not chunk:
            self.close()
            raise StopIteration
        return chunk

    def close(self) -> None:
        self._close()
