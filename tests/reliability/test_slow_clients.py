"""Slow and idle clients: held connections never keep a normal request waiting.

A flood of connections that send half a request header and hold it, or send nothing, is
opened against a real server, more of them than it has HTTP threads (--threads-http 2: 2 + 1024,
upstream's pool); meanwhile normal requests, each with a client timeout far below the hold,
must be answered. Then what a slow client is owed: an idle connection is closed after the
keep-alive timeout, a half-sent header is kept and answered once the rest arrives, a header sent
a byte at a time is answered, and keep-alive and pipelined requests still work through the
header reader (pyllama/server/worker.py). Last, a flood larger than the server's connection
limit (an open-file limit of 640): the oldest half-read connections make room, normal requests
still get in.
"""

from __future__ import annotations

import resource
import socket
import time

import httpx
import pytest
from server_process import ServerProcess

HOLD = 15.0  # seconds the flood holds on at least (until every normal request is answered)
CLIENT_TIMEOUT = 10.0
THREADS = 2 + 1024  # --threads-http 2 plus upstream's 1024 on-demand threads
HALF = b"POST /completion HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: applic"
BODY = b'{"prompt": "Hello", "n_predict": 4, "ignore_eos": true}'


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.fail(f"this test needs {need} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def connect(port: int, data: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if data:
        s.sendall(data)
    return s


def closed_by_server(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        s.setblocking(True)


_left: dict[int, bytes] = {}  # bytes read past a response, per socket (pipelined responses)


def read_response(s: socket.socket, timeout: float = CLIENT_TIMEOUT) -> bytes:
    """One HTTP response with a Content-Length body, read off a raw socket."""
    s.settimeout(timeout)
    data = _left.pop(s.fileno(), b"")
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "connection closed in the body"
        body += chunk
    if body[length:]:
        _left[s.fileno()] = body[length:]
    return head + b"\r\n\r\n" + body[:length]


def normal_requests(base: str) -> None:
    """A round of ordinary requests, each on a fresh connection, none allowed to wait long."""
    with httpx.Client(base_url=base, timeout=CLIENT_TIMEOUT) as client:
        assert client.get("/health").status_code == 200
        done = client.post("/completion", json={"prompt": "Hello", "n_predict": 4, "ignore_eos": True})
        assert done.status_code == 200, done.text
        assert done.headers.get("content-type", "").startswith("application/json"), (done.headers, done.content[:300])
        assert done.content.startswith(b"{"), (done.headers, done.content[:300])
        assert done.json()["tokens_predicted"] == 4
        with client.stream("POST", "/completion", json={"prompt": "Hi", "n_predict": 4, "stream": True, "ignore_eos": True}) as r:
            assert r.status_code == 200
            assert any('"stop":true' in line for line in r.iter_lines())
        oai = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
        assert oai.status_code == 200 and oai.json()["usage"]["completion_tokens"] == 3


@pytest.fixture(scope="module")
def server(synthetic_path):
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "2", "-c", "1024", "--threads-http", "2"])
    srv.wait_ready()
    yield srv
    srv.stop()


def test_a_flood_of_half_headers_and_idle_connections_delays_no_normal_request(server):
    n_half, n_idle = THREADS + 300, 300
    raise_fd_limit(n_half + n_idle + 256)
    half = [connect(server.port, HALF) for _ in range(n_half)]
    idle = [connect(server.port) for _ in range(n_idle)]
    try:
        start = time.monotonic()
        normal_requests(server.base)  # at once
        time.sleep(7)  # past the 5 s keep-alive timeout: the idle connections are closed
        normal_requests(server.base)
        assert all(closed_by_server(s) for s in idle), "idle connections left open past the keep-alive timeout"
        assert not any(closed_by_server(s) for s in half[:50])  # a header in progress is kept
        time.sleep(max(0.0, start + HOLD - 4 - time.monotonic()))
        normal_requests(server.base)
        # a held half header is answered once the rest of it comes
        s = half[0]
        s.sendall(b"ation/json\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)
        response = read_response(s)
        assert response.startswith(b"HTTP/1.1 200") and b'"tokens_predicted":4' in response
    finally:
        for s in half + idle:
            s.close()
    normal_requests(server.base)


def test_a_header_sent_a_byte_at_a_time_is_answered(server):
    request = (b"POST /completion HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(BODY)) + BODY
    with connect(server.port) as s:
        for i in range(len(request)):
            s.sendall(request[i:i + 1])
            time.sleep(0.01)
        response = read_response(s)
    assert response.startswith(b"HTTP/1.1 200") and b'"tokens_predicted":4' in response


def test_keep_alive_and_pipelined_requests_through_the_header_reader(server):
    get = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with connect(server.port) as s:
        for _ in range(3):  # one connection, three requests, the header of each sent in two parts
            s.sendall(get[:20])
            time.sleep(0.3)
            s.sendall(get[20:])
            assert read_response(s).startswith(b"HTTP/1.1 200")
        s.sendall(get * 3)  # pipelined: the second and third are read ahead with the first
        for _ in range(3):
            assert read_response(s).startswith(b"HTTP/1.1 200")
        s.sendall(get + get[:25])  # read ahead: half of the next header
        assert read_response(s).startswith(b"HTTP/1.1 200")
        time.sleep(0.3)
        s.sendall(get[25:])
        assert read_response(s).startswith(b"HTTP/1.1 200")


def test_a_flood_beyond_the_connection_limit_makes_room_for_normal_requests(synthetic_path):
    limit = 640  # open files: the worker keeps 256 for itself, so about 384 connections

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    srv = ServerProcess(["-m", str(synthetic_path), "-np", "1", "-c", "512"], popen={"preexec_fn": low_limit})
    try:
        srv.wait_ready()
        n = 1000
        raise_fd_limit(n + 256)
        flood = [connect(srv.port, HALF) for _ in range(n)]
        try:
            normal_requests(srv.base)
            time.sleep(1)
            normal_requests(srv.base)
            shed = sum(closed_by_server(s) for s in flood)
            assert shed >= n - limit, shed  # the oldest half headers were closed to make room
        finally:
            for s in flood:
                s.close()
        normal_requests(srv.base)
    finally:
        srv.stop()


def test_a_body_that_stops_arriving_gives_its_thread_back_after_the_timeout(synthetic_path):
    # --timeout is the read/write timeout of a connection being served (cpp-httplib's), so a
    # body that stalls ends in a 408 and a closed connection instead of holding a thread forever.
    # The clients keep their sockets open after the answer: closing them must not stall the
    # worker's main loop (gthread's util.close_graceful waits 2 s for each client's FIN there,
    # 16 s for these eight, and normal requests timed out meanwhile).
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "1", "-c", "512", "--timeout", "3"])
    try:
        srv.wait_ready()
        head = (b"POST /completion HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(BODY))
        stalled = [connect(srv.port, head + BODY[:10]) for _ in range(8)]
        try:
            for s in stalled:
                response = read_response(s, timeout=CLIENT_TIMEOUT + 5)
                assert response.startswith(b"HTTP/1.1 408"), response[:200]
                assert b"Connection: close" in response
                assert b'"code":408' in response and b"timed out waiting for the request body" in response
            normal_requests(srv.base)
            for s in stalled:
                s.settimeout(CLIENT_TIMEOUT)
                assert s.recv(1) == b"", "the connection was left open after its 408"
        finally:
            for s in stalled:
                s.close()
    finally:
        srv.stop()
