"""`pyllama-rpc-server`: llama.cpp's `rpc-server`, serving this machine's devices over ggml RPC.

A llama-server (or pyllama-server) started with `--rpc HOST:PORT,...` offloads layers to the
devices of each such worker. The flags, defaults, messages and device choice are
tools/rpc/rpc-server.cpp's; the serving is ggml's own ggml_backend_rpc_start_server.

SECURITY: the RPC protocol has no authentication and no encryption, and a client may read and
write any memory of the served buffers: bind to loopback or a private network only. The
warning below is printed whenever the host is not a loopback address.
Imports: stdlib, public `engine` names, `downloads` (the cache folder).
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import sys

USAGE = """Usage: {prog} [options]

options:
  -h, --help                       show this help message and exit
  -t, --threads N                  number of threads for the CPU device (default: {threads})
  -d, --device <dev1,dev2,...>     comma-separated list of devices
  -H, --host HOST                  host to bind to (default: {host})
  -p, --port PORT                  port to bind to (default: {port})
  -c, --cache                      enable local file cache
"""

SECURITY_WARNING = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
WARNING: Host ('{host}') is != '127.0.0.1'
         Never expose the RPC server to an open network!
         This is an experimental feature and is not secure!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


class Params:
    """rpc_server_params, with upstream's defaults."""

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = 50052
        self.use_cache = False
        self.n_threads = max(1, (os.cpu_count() or 1) // 2)
        self.devices: list[str] = []


def _err(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def parse_args(argv: list[str], params: Params, prog: str) -> bool | int:
    """rpc_server_params_parse: True when parsed, False on invalid values, an int to exit with."""
    i = 0
    while i < len(argv):
        arg = argv[i]

        def value():
            nonlocal i
            i += 1
            return argv[i] if i < len(argv) else None

        if arg in ("-H", "--host"):
            if (v := value()) is None:
                return False
            params.host = v
        elif arg in ("-t", "--threads"):
            if (v := value()) is None or not re.fullmatch(r"[+-]?\d+", v.strip()):
                return False
            params.n_threads = int(v)
            if params.n_threads <= 0:
                _err(f"error: invalid number of threads: {params.n_threads}\n")
                return False
        elif arg in ("-d", "--device"):
            if (v := value()) is None:
                return False
            params.devices += [d for d in re.split(r"[,/]+", v) if d]
        elif arg in ("-p", "--port"):
            if (v := value()) is None or not re.fullmatch(r"[+-]?\d+", v.strip()):
                return False
            params.port = int(v)
            if not 0 < params.port <= 65535:
                return False
        elif arg in ("-c", "--cache"):
            params.use_cache = True
        elif arg in ("-m", "--mem"):
            # NOTE: rpc-server had -m/--mem (the memory to report) before protocol v3; a v7
            # server reports its devices' own memory, and ggml_backend_rpc_start_server takes none
            _err(f"error: {arg} is not supported: this ggml RPC version (v7) reports each "
                 "device's own memory\n")
            return False
        elif arg in ("-h", "--help"):
            _err(usage(prog, params))
            return 0
        else:  # upstream prints the usage and exits with 0
            _err(f"error: unknown argument: {arg}\n")
            _err(usage(prog, params))
            return 0
        i += 1
    return True


def usage(prog: str, params: Params) -> str:
    return USAGE.format(prog=prog, threads=params.n_threads, host=params.host, port=params.port)


def is_loopback(host: str) -> bool:
    """Say whether `host` is a loopback address (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def choose_devices(params: Params) -> list[str] | None:
    """rpc-server.cpp get_devices: the named ones, else every GPU-like device, else the CPU."""
    from pyllama.engine import list_devices

    devices = list_devices()
    if params.devices:
        names = {d["name"] for d in devices}
        for name in params.devices:
            if name not in names:
                _err(f"error: unknown device: {name}\navailable devices:\n")
                for d in devices:
                    print(f"  {d['name']}: {d['description']} ({d['memory_total'] >> 20} MiB, "
                          f"{d['memory_free'] >> 20} MiB free)")
                return None
        return list(params.devices)
    chosen = [d["name"] for d in devices if d["type"] not in ("cpu", "accel")]
    if not chosen:
        chosen = [d["name"] for d in devices if d["type"] == "cpu"][:1]
    return chosen


def main(argv: list[str] | None = None) -> int:
    """Entry point of `pyllama-rpc-server`."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "pyllama-rpc-server"
    argv = sys.argv[1:] if argv is None else argv
    params = Params()
    parsed = parse_args(argv, params, prog)
    if parsed is False:
        _err("Invalid parameters\n")
        return 1
    if parsed is not True:
        return parsed
    if not is_loopback(params.host):  # upstream: any host but 127.0.0.1
        _err(SECURITY_WARNING.format(host=params.host) + "\n")
    from pyllama.engine import rpc_start_server, supports_rpc

    if not supports_rpc():
        _err("Failed to find RPC backend\n")
        return 1
    devices = choose_devices(params)
    if not devices:
        if devices is not None:
            _err("No devices found\n")
        return 1
    cache_dir = None
    if params.use_cache:
        from pyllama.downloads import llama_cache_dir

        cache_dir = str(llama_cache_dir() / "rpc")
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError:
            _err(f"Failed to create cache directory: {cache_dir}\n")
            return 1
    # The server loop runs in C with the GIL released and never returns: Ctrl-C and SIGTERM
    # end the process as they end upstream's.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.stdout.flush()
    rpc_start_server(f"{params.host}:{params.port}", cache_dir, params.n_threads, devices)
    return 1  # it returns only when it could not start (the reason is on stderr)


if __name__ == "__main__":
    sys.exit(main())
