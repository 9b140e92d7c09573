"""ggml RPC: one process against the model split over two local RPC workers, pyllama and upstream.

For each project: its server alone, then its server with `--rpc A,B -ts 1,1` over two of its own
RPC workers on 127.0.0.1 (pyllama-server + pyllama-rpc-server; llama-server + ggml-rpc-server,
the `rpc-server` tool of the same pin, built by bench/build_upstream.sh). Single stream: a
prompt of about --prompt-words words, then --n-predict greedy tokens (ignore_eos), --requests
times after one warm-up; prompt and generation tokens/s are the server's own `timings`
(median over the requests), plus the wall time per request.

    python bench/rpc_bench.py --upstream /work/upstream-build/bin

A layer split runs the workers one after the other, so each worker gets all the cores
(--worker-threads, default: every CPU) and the single process the same (-t). On one machine
this measures what the RPC hop costs, not what more machines add. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from serve_bench import Contender, Server  # noqa: E402

WORDS = "the quick brown fox jumps over the lazy dog while seven wise owls count the stars".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    def __init__(self, argv: list[str], log_name: str) -> None:
        self.port = free_port()
        self.log = open(f"/tmp/rpc_bench-{log_name}-{self.port}.log", "wb")
        self.proc = subprocess.Popen([*argv, "-p", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited; see {self.log.name}")
            try:
                # ggml's server takes a bare connect as a client that left
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{argv[0]} did not listen")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.log.close()


def completion(base: str, prompt: str, n_predict: int) -> dict:
    body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "ignore_eos": True,
            "cache_prompt": False}
    req = urllib.request.Request(base + "/completion", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=1800) as resp:
        out = json.loads(resp.read())
    out["wall"] = time.perf_counter() - t0
    return out


def measure(contender: Contender, args, port: int) -> dict:
    server = Server(contender, port)
    try:
        prompt = " ".join(WORDS[i % len(WORDS)] for i in range(args.prompt_words))
        completion(server.base, prompt, 8)  # warm-up
        runs = [completion(server.base, prompt, args.n_predict) for _ in range(args.requests)]
    finally:
        server.stop()
    timings = [r["timings"] for r in runs]
    return {
        "prompt_n": timings[0]["prompt_n"],
        "pp": statistics.median(t["prompt_per_second"] for t in timings),
        "tg": statistics.median(t["predicted_per_second"] for t in timings),
        "wall": statistics.median(r["wall"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", help="GGUF (default: the default model)")
    parser.add_argument("--upstream", type=Path, help="folder with upstream's llama-server and ggml-rpc-server")
    parser.add_argument("--pyllama", default=str(Path(sys.executable).parent / "pyllama-server"))
    parser.add_argument("--pyllama-rpc", default=str(Path(sys.executable).parent / "pyllama-rpc-server"))
    parser.add_argument("--prompt-words", type=int, default=400)
    parser.add_argument("--n-predict", type=int, default=128)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    parser.add_argument("--worker-threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if args.model is None:
        from pyllama.models import default_model_path

        args.model = str(default_model_path())
    flags = ["-m", args.model, "-np", "1", "-c", "4096", "-t", str(args.threads), "--no-warmup"]
    projects = [("pyllama", [args.pyllama, *flags], [args.pyllama_rpc])]
    if args.upstream:
        projects.append(("llama-server", [str(args.upstream / "llama-server"), *flags, "--no-webui"],
                         [str(args.upstream / "ggml-rpc-server")]))
    rows = []
    port = 18700
    for name, server_argv, worker_argv in projects:
        rows.append((name, "one process", measure(Contender(f"{name}-single", server_argv), args, port)))
        port += 1
        workers = [Worker([*worker_argv, "-t", str(args.worker_threads)], name) for _ in range(2)]
        try:
            rpc = ",".join(f"127.0.0.1:{w.port}" for w in workers)
            argv = [*server_argv, "--rpc", rpc, "-ts", "1,1"]
            rows.append((name, "2 RPC workers (-ts 1,1)", measure(Contender(f"{name}-rpc", argv), args, port)))
            port += 1
        finally:
            for w in workers:
                w.stop()
    print(f"\n{Path(args.model).name}, single stream, {rows[0][2]['prompt_n']}-token prompt, "
          f"{args.n_predict} generated tokens, median of {args.requests}; server -t {args.threads}, "
          f"workers -t {args.worker_threads}\n")
    print("| server | layout | prompt tok/s | generation tok/s | wall s/request |")
    print("|---|---|---|---|---|")
    for name, layout, r in rows:
        print(f"| {name} | {layout} | {r['pp']:.1f} | {r['tg']:.1f} | {r['wall']:.2f} |")


if __name__ == "__main__":
    main()
