"""ggml RPC on the client side: check RPC servers, then register their devices (--rpc).

llama-server's `--rpc host:port,...` (common/arg.cpp add_rpc_devices) registers each server's
devices with ggml before the model loads; they are then listed by --list-devices and picked by
-dev / -ts / -sm like local GPUs. ggml-rpc itself aborts the process when a server refuses the
connection or fails the handshake (rpc_dispatcher::start), so each server is first checked here
with the protocol's own HELLO, and a refusing, garbage or version-mismatched peer becomes a
ModelLoadError instead.

A server that dies later, mid-computation, still aborts the process (ggml-rpc's
RPC_STATUS_ASSERT); `Engine` hooks that abort to fail the requests in flight with a clear error
first, and leaves a note (`note_lost_peer`) so that the process started in its place (gunicorn's
respawned worker) waits for the servers to come back rather than refusing to start.
Imports: stdlib, `errors` and `engine._model`. Call before loading a model; not thread-safe.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import tempfile
import time

from pyllama.engine._model import RPC_PROTO_VERSION, add_rpc_server, supports_rpc
from pyllama.errors import ModelLoadError

logger = logging.getLogger(__name__)

# ggml-rpc.cpp's wire format: | cmd (1 byte) | size (8 bytes, LE) | payload |, replies
# | size (8 bytes) | payload |. HELLO (command 14, fixed across versions) carries 24 bytes of
# transport capabilities (zeros: plain TCP) and is answered with major, minor, patch, padding
# and the server's 24 bytes.
_RPC_CMD_HELLO = 14
_CONN_CAPS_SIZE = 24
_HELLO_REPLY_SIZE = 4 + _CONN_CAPS_SIZE
CONNECT_TIMEOUT_S = 5.0
# rpc-server serves one client at a time: a busy one answers HELLO once its client leaves
HELLO_TIMEOUT_S = 30.0


class RpcPeerError(ModelLoadError):
    """An RPC server that cannot be used: unreachable, not ggml RPC, or another version."""


def parse_servers(value: str) -> tuple[str, ...]:
    """Split --rpc's comma-separated host:port list, as upstream's string_split.

    Raises:
        ValueError: no servers, or an endpoint without a port.
    """
    servers = tuple(s for s in value.split(",") if s) if value else ()
    if not servers:
        raise ValueError("no RPC servers specified")
    for server in servers:  # what ggml-rpc's parse_endpoint would abort on
        host, sep, port = server.partition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"invalid RPC server {server!r}: expected HOST:PORT")
    return servers


def _endpoint(server: str) -> tuple[str, int]:
    host, _, port = server.partition(":")  # parse_endpoint: at the first ':' (no IPv6)
    return host, int(port)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def probe(server: str, *, connect_timeout: float = CONNECT_TIMEOUT_S,
          hello_timeout: float = HELLO_TIMEOUT_S) -> tuple[int, int, int]:
    """Check that `server` speaks ggml RPC this build understands; return its version.

    The HELLO exchange of ggml-rpc.cpp's negotiate_hello, on a connection of its own that is
    closed afterwards (the server then takes its next client).

    Raises:
        RpcPeerError: the connection is refused or times out, the reply is not a HELLO reply,
            or the protocol version differs (another major, or a newer minor, as upstream).
    """
    host, port = _endpoint(server)
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise RpcPeerError(f"failed to connect to RPC server {server}: {reason}") from None
    with sock:
        try:
            sock.settimeout(hello_timeout)
            sock.sendall(struct.pack("<BQ", _RPC_CMD_HELLO, _CONN_CAPS_SIZE) + bytes(_CONN_CAPS_SIZE))
            head = _recv_exact(sock, 8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            reply = _recv_exact(sock, _HELLO_REPLY_SIZE) if size == _HELLO_REPLY_SIZE else b""
        except socket.timeout:
            raise RpcPeerError(
                f"RPC server {server} did not answer the handshake within {hello_timeout:g} s "
                "(not a ggml RPC server, or one busy with another client: rpc-server serves "
                "one at a time)") from None
        except OSError as exc:
            raise RpcPeerError(f"RPC server {server}: handshake failed: "
                               f"{exc.strerror or exc}") from None
    if len(reply) != _HELLO_REPLY_SIZE:
        raise RpcPeerError(f"RPC server {server} did not answer the ggml RPC handshake "
                           "(not an RPC server, or an incompatible one)")
    version = (reply[0], reply[1], reply[2])
    major, minor, _ = RPC_PROTO_VERSION
    if version[0] != major or version[1] > minor:
        raise RpcPeerError(
            f"RPC server {server} speaks protocol v{'.'.join(map(str, version))}, this build "
            f"v{'.'.join(map(str, RPC_PROTO_VERSION))}: run an rpc-server of the same llama.cpp "
            "version")
    return version


def _lost_peer_note() -> str:
    # one note per parent: gunicorn's arbiter, whose next worker reads it
    return os.path.join(tempfile.gettempdir(), f"pyllama-rpc-lost-{os.getuid()}-{os.getppid()}")


def note_lost_peer() -> None:
    """Leave word that this process dies of a lost RPC server (see register_servers)."""
    try:
        with open(_lost_peer_note(), "w") as f:
            f.write(str(os.getpid()))
    except OSError:
        pass


def register_servers(servers, *, retry_interval: float = 1.0) -> list[str]:
    """Check each RPC server, then register its devices; return the device names, in order.

    Upstream's add_rpc_devices, with each peer checked first. In a process that replaces one
    killed by a lost RPC server (a respawned gunicorn worker: see note_lost_peer), an
    unreachable server is waited for, every `retry_interval` seconds, instead of refused.

    Raises:
        RpcPeerError: a server is unreachable or incompatible (see probe).
        ModelLoadError: this build has no RPC backend.
    """
    if not supports_rpc():
        raise ModelLoadError("RPC not supported in this build")
    note = _lost_peer_note()
    wait = os.path.exists(note)
    names = []
    for server in servers:
        t_warned = None
        while True:
            try:
                probe(server)
                break
            except RpcPeerError as exc:
                if not wait:
                    raise
                if t_warned is None or time.monotonic() - t_warned > 30:
                    logger.warning("%s; waiting for it to come back (the last worker lost it)", exc)
                    t_warned = time.monotonic()
                time.sleep(retry_interval)
        names += add_rpc_server(server)
    if wait:
        try:
            os.unlink(note)
        except OSError:
            pass
    return names
