"""Whether the client of a request is still connected, while its HTTP thread waits for the engine.

llama-server hands each handler `req.should_stop`, cpp-httplib's `is_connection_closed`
(detail::is_socket_alive: the socket is not readable, or a one-byte MSG_PEEK still finds
data), and its response readers check it every HTTP_POLLING_SECONDS while they wait
(server_response_reader::next / wait_for_all): a client that went away cancels its tasks
and frees the slot. A non-streaming request has nothing to write until it is done, so
without this check it generated on to its limit after the client left.

Under gunicorn the client socket is `environ["gunicorn.socket"]` (HTTP/1.x; an HTTP/2
connection is shared by many streams and is not watched). `ConnectionWatch` puts the check
on `resp.context.client_gone` for server/streaming.py.
Imports: stdlib only.
"""

from __future__ import annotations

import select
import socket
from typing import Callable

POLL_SECONDS = 1.0  # upstream's HTTP_POLLING_SECONDS


def client_gone_check(environ: dict) -> Callable[[], bool] | None:
    """A function telling whether the request's client has closed or reset its connection.

    None when the server gives no socket to watch. The check never blocks and reads nothing
    off the socket. Thread-safe (a request is served by one thread at a time).
    """
    sock = environ.get("gunicorn.socket")
    if sock is None or not str(environ.get("SERVER_PROTOCOL", "")).startswith("HTTP/1"):
        return None
    try:
        fd = sock.fileno()
    except (OSError, ValueError):
        return None
    if fd < 0:
        return None

    def gone() -> bool:
        # cpp-httplib's !is_socket_alive(sock), with poll() as it (select() refuses a descriptor
        # past 1023: with a thousand connections open, every request looked abandoned)
        poller = select.poll()
        try:
            poller.register(fd, select.POLLIN)
            events = poller.poll(0)
        except (OSError, ValueError):
            return True
        if not events:
            return False
        try:
            # the plain socket's recv, also under TLS: peek at the TCP stream as upstream does
            return not socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:  # ECONNRESET and friends
            return True

    return gone


class ConnectionWatch:
    """Falcon middleware: `resp.context.client_gone` for the request (or None)."""

    def process_request(self, req, resp) -> None:
        resp.context.client_gone = client_gone_check(req.env)
