"""The gunicorn worker: gthread that reads request headers off its threads and frees the port.

Request headers are read on the worker's main loop, not in the thread pool. gunicorn's gthread
hands every accepted connection to a thread, which then blocks reading the header with no
deadline: 300 clients that each send half a header and hold on take 300 threads, and once a
flood outnumbers the threads (--threads-http + 1024, upstream's pool) every normal request
waits for as long as the flood holds on. Here the main loop (one epoll selector, non-blocking
reads) gathers each connection's header and submits the connection to the pool only once the
header is whole, so a thread is taken only by a request that can be answered. A connection
that sends nothing is closed after the keep-alive timeout (5 s, cpp-httplib's
keep_alive_timeout, as llama-server); one that has begun a header has gunicorn's timeout
(max(30, --timeout) s; upstream's read timeout is --timeout) to finish it. Once a thread has the
connection, every read and write on it has --timeout as its deadline (SO_RCVTIMEO/SO_SNDTIMEO,
as cpp-httplib's read and write timeouts): a body that stops arriving, or a client that stops
reading its stream, gives the thread back instead of holding it forever. A connection closed after
its response lingers (FIN sent, what the client still sends drained for up to 2 s) on the poller,
not in a blocking wait on the main loop as gthread's util.close_graceful does. The half-read headers
of all connections together hold at most HEAD_BUDGET bytes, and when the connections reach the
worker's limit (also kept below the open-file limit, which the worker raises to its hard limit)
the oldest connection that has sent no complete header yet is closed to make room, so a flood
of any size cannot lock a normal client out. TLS connections keep gunicorn's path (the
handshake runs in a thread).

llama-server's SIGTERM/SIGINT handler (tools/server/server.cpp `shutdown_handler`, then
`clean_up` -> server_http_context::stop -> httplib::Server::stop) closes its listening socket
right away, so a successor can bind the port while the old process winds down. gunicorn's
arbiter closes its own copy of the listener on SIGTERM, but the gthread worker only stops
accepting and keeps its inherited copy open until it exits, which is after the in-flight
requests finish (up to graceful_timeout): meanwhile the port stays in LISTEN and the next
server fails with "Address already in use". This worker closes its listeners as soon as it
is told to stop; requests already accepted still run to their end, and connections still
sending their header are closed.

Written against gthread as gunicorn 24-27 have it (TConn.initialized, method_queue,
keepalived_conns, murder_keepalived; tested on 27).
Imports: gunicorn only. Runs on the worker's main thread (signal handlers, poller callbacks).
"""

from __future__ import annotations

import errno
import logging
import resource
import selectors
import socket
import struct
import time
from functools import partial

from gunicorn import http, util
from gunicorn.workers.gthread import TConn, ThreadWorker

logger = logging.getLogger(__name__)

HEAD_END = b"\r\n\r\n"
READ_CHUNK = 64 * 1024
HEAD_BUDGET = 64 * 1024 * 1024  # the half-read headers of all connections together
FD_RESERVE = 256  # open files kept for the model, logs, pipes and the engine
OUT_OF_FILES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# util.close_graceful's linger after a response that closes the connection: read (and drop) what
# the client still sends for up to 2 s or 64 KiB, so the kernel does not answer it with a reset
LINGER_SECONDS = 2.0
LINGER_BYTES = 64 * 1024
LINGER_MAX = 1024  # connections lingering at once; past it the oldest is closed at once


def raise_open_file_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit (at most 2**20); return the soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft


class LingeringConn(TConn):
    """A plain-HTTP connection whose graceful close lingers on the worker's main loop instead
    of blocking it: gthread's finish_request closes with util.close_graceful, which waits up
    to 2 s for the client's FIN on the main loop, so eight clients that kept their sockets
    open after a "Connection: close" answer stalled every other connection for 16 s."""

    def __init__(self, worker, *args):
        super().__init__(*args)
        self.worker = worker
        self.drained = 0

    def close(self, graceful=False):
        if graceful:
            self.worker._linger(self)
        else:
            util.close(self.sock)


class PyllamaWorker(ThreadWorker):
    """gthread that reads headers on its main loop and closes its listeners on SIGTERM."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # connections waiting for their first byte, and those with part of a header: each
        # dict maps a TConn to its deadline, oldest first (every entry of one dict gets the
        # same timeout, so insertion order is deadline order)
        self.silent_conns: dict[TConn, float] = {}
        self.head_conns: dict[TConn, float] = {}
        self.head_bytes = 0
        self.lingering: dict[TConn, float] = {}  # closed for writing, draining until the deadline
        # the most a whole header can be under gunicorn's limits (request line, fields, a PROXY
        # line): a longer one is handed to gunicorn's parser, which answers it with its error
        fields = self.cfg.limit_request_fields or 32768
        self.head_limit = (self.cfg.limit_request_line or 8190) + 2 + \
            fields * ((self.cfg.limit_request_field_size or 8190) + 2) + 4 + 256

    def init_process(self):
        limit = raise_open_file_limit()
        if limit != resource.RLIM_INFINITY and self.worker_connections > limit - FD_RESERVE:
            self.worker_connections = max(self.cfg.threads, limit - FD_RESERVE)
        super().init_process()

    # -- accepting --------------------------------------------------------------------------

    def accept(self, listener):
        """Main loop: accept a connection and wait for its header without taking a thread."""
        if self.cfg.is_ssl:
            return super().accept(listener)  # the TLS handshake runs in a thread
        if self.nr_conns >= self.worker_connections - 1:
            self._shed_one()
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return None
            if e.errno in OUT_OF_FILES:
                # no descriptor left for it: make room, or stop accepting until one closes
                if not self._shed_one():
                    logger.warning("out of file descriptors with %d connections open", self.nr_conns)
                    self.worker_connections = max(1, self.nr_conns)
                return None
            raise
        self.nr_conns += 1
        conn = LingeringConn(self, self.cfg, client_sock, client_addr, listener.getsockname())  # non-blocking
        self._wait_for_head(conn, time.monotonic() + self._silent_timeout())
        return None

    def on_client_socket_readable(self, conn, client):
        """Main loop: a kept-alive connection has sent something (its next header, or EOF)."""
        if self.cfg.is_ssl:
            return super().on_client_socket_readable(conn, client)
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._wait_for_head(conn, time.monotonic() + self._silent_timeout())
        self._read_head(conn)
        return None

    def finish_request(self, conn, fs):
        """Main loop: a request is done; part of the next header read ahead waits here too."""
        if self.alive and not self.cfg.is_ssl and not fs.cancelled() and fs.exception() is None and fs.result() is True \
                and not conn.is_http2 and conn.parser is not None:
            held = conn.parser.unreader.buf.getvalue()
            if held and not self._head_complete(held):
                conn.parser.unreader.take_buffered()
                conn.sock.setblocking(False)
                self._wait_for_head(conn, time.monotonic() + self._silent_timeout())
                self._add_head(conn, held)
                return
        super().finish_request(conn, fs)

    # -- reading headers on the main loop -----------------------------------------------------

    def _wait_for_head(self, conn, deadline: float) -> None:
        conn.head = bytearray()
        self.silent_conns[conn] = deadline
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head_readable, conn))

    def _on_head_readable(self, conn, _sock) -> None:
        self._read_head(conn)

    @staticmethod
    def _recv(conn) -> bytes | None:
        """Main loop: what a readable connection has (b"": closed or failed; None: nothing yet)."""
        try:
            return conn.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b""

    def _read_head(self, conn) -> None:
        data = self._recv(conn)
        if data is None:
            return
        if not data:  # the client went away
            self._drop(conn)
            return
        self._add_head(conn, data)

    def _add_head(self, conn, data: bytes) -> None:
        if conn in self.silent_conns:
            del self.silent_conns[conn]
            self.head_conns[conn] = time.monotonic() + self._head_timeout()
        conn.head += data
        self.head_bytes += len(data)
        if self._head_complete(conn.head):
            self._hand_off(conn)
            return
        while self.head_bytes > HEAD_BUDGET and self.head_conns:
            self._drop(next(iter(self.head_conns)))

    def _head_complete(self, data) -> bool:
        """Whether gunicorn's parser can take it from here without waiting on the client: the
        header is whole, or it is already wrong (a bare LF, longer than gunicorn allows)."""
        return HEAD_END in data or len(data) > self.head_limit or \
            (b"\n" in data and data.count(b"\n") != data.count(b"\r\n"))

    def _silent_timeout(self) -> float:
        """How long a connection may stay silent before its first byte (the keep-alive timeout)."""
        return float(self.cfg.keepalive if self.cfg.keepalive > 0 else 5)

    def _head_timeout(self) -> float:
        return float(self.cfg.timeout or 600)

    def _io_timeout(self) -> float:
        """The read/write deadline of a served connection: --timeout, as cpp-httplib's
        set_read_timeout / set_write_timeout (server_http_context::init). gunicorn's own
        timeout (the worker heartbeat) is at least 30 s, so it is read from the settings."""
        settings = getattr(self.app, "settings", None)
        timeout = getattr(settings, "timeout", None)
        return float(timeout) if timeout and timeout > 0 else self._head_timeout()

    def _hand_off(self, conn) -> None:
        """Main loop: the header is here; a pool thread parses it and serves the request."""
        self._forget(conn)
        data = bytes(conn.head)
        conn.head = None
        if conn.parser is None:  # TConn.init's plain-HTTP/1 branch, done here with the bytes
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
            conn.initialized = True
        conn.parser.unreader.unread(data)
        conn.data_ready = True
        self._set_io_deadline(conn)
        self.enqueue_req(conn)

    def _set_io_deadline(self, conn) -> None:
        """Bound each blocking read and write the thread makes on this connection. Python's
        blocking sockets (timeout None) call recv/send directly, so the kernel's timeouts apply
        and a stall raises BlockingIOError in the thread."""
        deadline = struct.pack("ll", max(1, int(self._io_timeout())), 0)
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, deadline)
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, deadline)
        except OSError:
            pass

    def _forget(self, conn) -> None:
        try:
            self.poller.unregister(conn.sock)
        except (OSError, KeyError, ValueError):
            pass
        self.silent_conns.pop(conn, None)
        self.head_conns.pop(conn, None)
        if conn.head is not None:
            self.head_bytes -= len(conn.head)

    def _drop(self, conn) -> None:
        self._forget(conn)
        conn.head = None
        self.nr_conns -= 1
        conn.close()

    def _shed_one(self) -> bool:
        """Close the connection least likely to be missed, to make room for a new one: the
        oldest that has sent nothing, then the oldest half header, then the oldest kept alive."""
        for conns in (self.silent_conns, self.head_conns):
            if conns:
                self._drop(next(iter(conns)))
                return True
        if self.keepalived_conns:
            conn = self.keepalived_conns.popleft()
            try:
                self.poller.unregister(conn.sock)
            except (OSError, KeyError, ValueError):
                pass
            self.nr_conns -= 1
            conn.close()
            return True
        return False

    # -- closing ---------------------------------------------------------------------------------

    def _linger(self, conn) -> None:
        """Main loop: util.close_graceful without the wait: FIN now, then the poller drains what
        the client still sends until it closes, LINGER_BYTES or LINGER_SECONDS."""
        if len(self.lingering) >= LINGER_MAX:
            self._end_linger(next(iter(self.lingering)))
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.setblocking(False)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_linger_readable, conn))
        except (OSError, KeyError, ValueError):
            util.close(conn.sock)
            return
        self.lingering[conn] = time.monotonic() + LINGER_SECONDS

    def _on_linger_readable(self, conn, _sock) -> None:
        data = self._recv(conn)
        if data is None:
            return
        conn.drained += len(data)
        if not data or conn.drained >= LINGER_BYTES:
            self._end_linger(conn)

    def _end_linger(self, conn) -> None:
        self.lingering.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (OSError, KeyError, ValueError):
            pass
        util.close(conn.sock)

    def murder_keepalived(self, *args, **kwargs):
        """Main loop, once a second (and at the end): close the kept-alive connections past
        their timeout, as gthread does, and those past their header deadline (all of them once
        the worker is stopping)."""
        super().murder_keepalived(*args, **kwargs)
        now = time.monotonic()
        while self.lingering:
            conn, deadline = next(iter(self.lingering.items()))
            if deadline > now and self.alive:
                break
            self._end_linger(conn)
        for conns in (self.silent_conns, self.head_conns):
            while conns:
                conn, deadline = next(iter(conns.items()))
                if deadline > now and self.alive:
                    break
                self._drop(conn)

    # -- stopping -------------------------------------------------------------------------------

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
