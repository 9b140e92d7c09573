"""Fault benchmark: normal requests under slow-client floods, and RSS drift over a short soak.

1. Slow clients. For each hold (--holds, seconds) and flood size (--connections), N connections
   are opened that each send half a request header and then hold it (--kinds half), or send
   nothing at all (--kinds idle). Meanwhile a normal client times GET /health and a short
   POST /completion, each on a fresh connection, one after the other, for the whole hold.
   Printed: the median and worst latency of each, the requests that failed, and how many of the
   flood's connections the server closed before the end of the hold. A server that reads headers
   in its worker threads with no deadline has its normal requests wait as long as the flood holds
   on, once the flood outnumbers its threads.
2. Soak (--soak SECONDS, 0 to skip): C clients (--soak-clients) send a mix of requests for that
   long (completions, streams, streams left after two chunks, chat, tokenize/detokenize,
   bad bodies, /health, /metrics). Printed: requests done, 5xx answers, other failures, and the
   model process's RSS (the gunicorn worker for pyllama) after the warm-up, at the half and at
   the end: the drift.

Servers run one after the other, never at the same time: pyllama-server (this environment's)
and, with --upstream DIR, upstream's llama-server from DIR (bench/build_upstream.sh builds it).

    python bench/fault_bench.py --upstream /work/upstream-build/bin --md bench/results/faults.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HALF_HEADER = (b"POST /completion HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow-client\r\n"
               b"Content-Type: appl")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Server:
    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(f"/tmp/fault_bench-{name.replace(' ', '_')}.log", "wb")
        env = dict(os.environ)
        if argv[0] == "PYLLAMA_ARGS":  # gunicorn run directly: the flags go in the environment
            env["PYLLAMA_ARGS"] = " ".join([*argv[1], "--port", str(self.port)])
            argv = argv[2]
        else:
            argv = [*argv, "--port", str(self.port)]
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception:
                time.sleep(0.2)
        raise RuntimeError(f"{name} did not start")

    def model_pid(self) -> int:
        """The process that holds the model: pyllama's gunicorn worker, or llama-server itself."""
        kids = children(self.proc.pid)
        return kids[0] if kids else self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def request(base: str, path: str, body: dict | None = None, timeout: float = 600) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data, {"Content-Type": "application/json",
                                                     "Connection": "close"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def timed(base: str, path: str, body: dict | None, timeout: float) -> float | None:
    """Seconds for one request on a fresh connection; None if it failed or was not a 200."""
    t0 = time.perf_counter()
    try:
        status, _ = request(base, path, body, timeout)
    except Exception:
        return None
    return time.perf_counter() - t0 if status == 200 else None


def open_flood(port: int, n: int, kind: str) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(10)
        try:
            s.connect(("127.0.0.1", port))
            if kind == "half":
                s.sendall(HALF_HEADER)
        except OSError:
            s.close()
            continue
        s.setblocking(False)
        socks.append(s)
    return socks


def closed_by_server(socks: list[socket.socket]) -> int:
    n = 0
    for s in socks:
        try:
            if s.recv(1 << 16) == b"":
                n += 1
        except BlockingIOError:
            pass
        except OSError:
            n += 1
    return n


def flood(server: Server, n: int, kind: str, hold: float) -> dict:
    """Hold n connections for `hold` seconds while a prober times normal requests; the flood
    lets go at the end of the hold whatever the prober is waiting for."""
    body = {"prompt": "Once upon a time", "n_predict": 4, "cache_prompt": False}
    t0 = time.perf_counter()
    socks = open_flood(server.port, n, kind)
    opened = time.perf_counter() - t0
    end = t0 + hold
    health, completion, failed = [], [], [0]

    def prober() -> None:
        while time.perf_counter() < end:
            for path, b, out in (("/health", None, health), ("/completion", body, completion)):
                dt = timed(server.base, path, b, hold + 60)
                if dt is None:
                    failed[0] += 1
                else:
                    out.append(dt)
            time.sleep(0.5)

    probe = threading.Thread(target=prober)
    probe.start()
    time.sleep(max(0.0, end - time.perf_counter()))
    closed = closed_by_server(socks)
    for s in socks:
        s.close()
    probe.join()
    return {"opened": len(socks), "open_s": opened, "closed": closed, "failed": failed[0],
            "health": health, "completion": completion}


def soak(server: Server, seconds: float, clients: int) -> dict:
    pid = server.model_pid()
    for _ in range(3):  # warm up every kind of request once before the first figure
        request(server.base, "/completion", {"prompt": "warm up", "n_predict": 8})
        request(server.base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 8})
    samples = [(0.0, rss_mb(pid))]
    counts = {"requests": 0, "5xx": 0, "failed": 0}
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def one(rng: random.Random) -> int:
        kind = rng.randrange(8)
        prompt = " ".join(rng.choice(["alpha", "bravo", "charlie", "delta", "echo"]) for _ in range(rng.randint(4, 60)))
        if kind == 0:
            return request(server.base, "/completion", {"prompt": prompt, "n_predict": rng.randint(1, 32)})[0]
        if kind == 1:  # a stream read to its end
            return request(server.base, "/completion", {"prompt": prompt, "n_predict": 24, "stream": True})[0]
        if kind == 2:  # a stream left after two chunks
            req = urllib.request.Request(server.base + "/completion", json.dumps(
                {"prompt": prompt, "n_predict": 200, "stream": True}).encode(), {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                r.readline(), r.readline(), r.readline()
                return r.status
        if kind == 3:
            return request(server.base, "/v1/chat/completions", {
                "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "n_probs": 5})[0]
        if kind == 4:
            status, data = request(server.base, "/tokenize", {"content": prompt})
            if status == 200:
                status = request(server.base, "/detokenize", json.loads(data))[0]
            return status
        if kind == 5:  # bad bodies: 4xx
            return request(server.base, "/completion", rng.choice([{"prompt": 5}, {"n_predict": "x"}, [],
                                                                   {"prompt": "x", "logit_bias": "y"}]))[0]
        if kind == 6:
            return request(server.base, "/health")[0]
        return request(server.base, "/metrics")[0]

    def client(c: int) -> None:
        rng = random.Random(c)
        while time.perf_counter() < stop_at:
            try:
                status = one(rng)
            except Exception:
                status = -1
            with lock:
                counts["requests"] += 1
                if status >= 500:
                    counts["5xx"] += 1
                elif status < 0:
                    counts["failed"] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(5)
        samples.append((time.perf_counter() - t0, rss_mb(pid)))
    for t in threads:
        t.join()
    samples.append((time.perf_counter() - t0, rss_mb(pid)))
    mid = min(samples, key=lambda s: abs(s[0] - seconds / 2))
    return {**counts, "rss_start": samples[0][1], "rss_mid": mid[1], "rss_end": samples[-1][1],
            "rss_max": max(s[1] for s in samples), "seconds": samples[-1][0]}


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.3f} / {max(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", help="GGUF (default: the default model)")
    parser.add_argument("--upstream", type=Path, help="folder with upstream's llama-server")
    parser.add_argument("--np", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--holds", type=lambda s: [float(x) for x in s.split(",") if x], default=[20.0, 120.0],
                        help="seconds each flood holds on (\"\": no flood, the soak only)")
    parser.add_argument("--connections", type=lambda s: [int(x) for x in s.split(",")], default=[300, 2000])
    parser.add_argument("--kinds", type=lambda s: s.split(","), default=["half", "idle"])
    parser.add_argument("--soak", type=float, default=180.0, help="seconds (0: no soak)")
    parser.add_argument("--soak-clients", type=int, default=4)
    parser.add_argument("--stock-gthread", action="store_true",
                        help="also pyllama under gunicorn's own gthread worker (headers read in the "
                             "thread pool), run as `gunicorn -c python:pyllama.server.wsgi -k gthread`")
    parser.add_argument("--no-pyllama", action="store_true", help="leave this environment's pyllama-server out")
    parser.add_argument("--md", help="also write the tables to this file")
    parser.add_argument("--server-args", default="", help="more flags for every server, e.g. '--cache-ram 0'")
    args = parser.parse_args()
    from pyllama.models import default_model_path

    model = str(args.model or default_model_path())
    flags = ["-m", model, "-np", str(args.np), "-c", str(args.ctx), "--metrics", *args.server_args.split()]
    ours = shutil.which("pyllama-server") or str(Path(sys.executable).parent / "pyllama-server")
    contenders = [] if args.no_pyllama else [("pyllama-server", [ours, *flags])]
    if args.stock_gthread:
        gunicorn = str(Path(sys.executable).parent / "gunicorn")
        contenders.append(("pyllama-server, stock gthread", ["PYLLAMA_ARGS", flags, [
            gunicorn, "-c", "python:pyllama.server.wsgi", "-k", "gthread", "pyllama.server.wsgi:create_app()"]]))
    if args.upstream:
        contenders.append(("llama-server", [str(args.upstream / "llama-server"), *flags, "--no-webui"]))

    lines = [f"`{' '.join(['python', *sys.argv])}`", "",
             f"model {Path(model).name}, -np {args.np} -c {args.ctx}, {os.cpu_count()} CPUs", "",
             "Normal requests (each on a fresh connection, one after the other, for the whole hold) "
             "while N connections send half a header (half) or nothing (idle) and hold on. "
             "Latency in seconds, median / worst.", "",
             "| server | kind | N | hold s | /health | /completion (4 tokens) | failed | flood closed by server |",
             "|---|---|---|---|---|---|---|---|"]
    soaks = []
    for name, argv in contenders:
        server = Server(name, argv)
        try:
            base_h = [timed(server.base, "/health", None, 60) for _ in range(5)]
            base_c = [timed(server.base, "/completion", {"prompt": "Once upon a time", "n_predict": 4,
                                                         "cache_prompt": False}, 60) for _ in range(5)]
            row = f"| {name} | none | 0 | - | {fmt([x for x in base_h if x])} | {fmt([x for x in base_c if x])} | - | - |"
            print(row, flush=True)
            lines.append(row)
            for hold in args.holds:
                for n in args.connections:
                    for kind in args.kinds:
                        r = flood(server, n, kind, hold)
                        row = (f"| {name} | {kind} | {r['opened']} | {hold:g} | {fmt(r['health'])} | "
                               f"{fmt(r['completion'])} | {r['failed']} | {r['closed']} |")
                        print(row, flush=True)
                        lines.append(row)
                        time.sleep(2)
            if args.soak > 0:
                s = soak(server, args.soak, args.soak_clients)
                soaks.append((name, s))
                print(name, "soak", s, flush=True)
        finally:
            server.stop()
    if soaks:
        lines += ["", f"Soak: {args.soak_clients} clients, {args.soak:g} s of mixed requests; RSS of the "
                  "process holding the model (MB).", "",
                  "| server | requests | 5xx | failed | RSS start | RSS half-way | RSS end | RSS max | drift (end - start) | drift (end - half) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, s in soaks:
            lines.append(f"| {name} | {s['requests']} | {s['5xx']} | {s['failed']} | {s['rss_start']:.1f} | "
                         f"{s['rss_mid']:.1f} | {s['rss_end']:.1f} | {s['rss_max']:.1f} | "
                         f"{s['rss_end'] - s['rss_start']:+.1f} | {s['rss_end'] - s['rss_mid']:+.1f} |")
    print("\n".join(lines))
    if args.md:
        Path(args.md).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
