"""End-to-end serving benchmark: pyllama-server and upstream llama-server side by side over HTTP.

For each concurrency level, each server is started with the same flags, warmed up, and driven by
C concurrent streaming clients (native /completion, or /v1/chat/completions with --chat). Every
request generates exactly --n-predict tokens (ignore_eos), so both servers do the same work.
Per request: time to first token, the gaps between tokens, total time. Aggregated: generated
tokens/s, TTFT and ITL p50/p99, requests/s, errors, and the server's peak RSS (VmHWM summed over
its process tree). Prints a markdown table with the ratios; --png writes a plot.

    python bench/serve_bench.py --upstream ../upstream-build/bin --concurrency 1,2,4,8 --png bench.png

Build the upstream yardstick as bench/engine_bench.py's docstring shows. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompts import WORDS, prompt_text, run_concurrently  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def peak_rss_mb(pid: int) -> float:
    """VmHWM of the process and its children, in MB (Linux)."""
    total = 0
    pids = [pid]
    try:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


class Server:
    def __init__(self, name: str, argv: list[str], port: int) -> None:
        self.name = name
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(argv + ["--port", str(port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception:
                time.sleep(0.2)
        raise RuntimeError(f"{name} did not start")

    def stop(self) -> float:
        rss = peak_rss_mb(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return rss


def one_request(base: str, i: int, args, shared_prefix: str) -> dict:
    body = {"n_predict": args.n_predict, "max_tokens": args.n_predict, "ignore_eos": True, "stream": True,
            "seed": 42 + i, "cache_prompt": True}
    if args.chat:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt_text(i, args.prompt_words, shared_prefix)}]
    else:
        path = "/completion"
        body["prompt"] = prompt_text(i, args.prompt_words, shared_prefix)
    req = urllib.request.Request(base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    stamps, server_timings = [], None
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            for line in resp:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                text = chunk.get("content") if not args.chat else \
                    ((chunk.get("choices") or [{}])[0].get("delta") or {}).get("content")
                if text:
                    stamps.append(time.perf_counter())
                if chunk.get("timings"):
                    server_timings = chunk["timings"]
    except Exception as exc:
        return {"error": str(exc)}
    end = time.perf_counter()
    n = server_timings.get("predicted_n", len(stamps)) if server_timings else len(stamps)
    return {"ttft": stamps[0] - t0 if stamps else float("nan"), "total": end - t0, "tokens": n,
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "server": server_timings}


def run_level(server: Server, concurrency: int, args, shared_prefix: str) -> dict:
    one_request(server.base, 10_000, args, shared_prefix)  # warm-up
    results: list = []
    lock = threading.Lock()

    def client(c: int):
        for r in range(args.requests_per_client):
            res = one_request(server.base, c * 1000 + r, args, shared_prefix)
            with lock:
                results.append(res)

    wall = run_concurrently(concurrency, client)
    ok = [r for r in results if "error" not in r]
    itl = [g for r in ok for g in r["itl"]]
    return {"tps": sum(r["tokens"] for r in ok) / wall, "rps": len(ok) / wall,
            "ttft50": percentile([r["ttft"] for r in ok], 0.5), "ttft99": percentile([r["ttft"] for r in ok], 0.99),
            "itl50": percentile(itl, 0.5), "itl99": percentile(itl, 0.99),
            "errors": len(results) - len(ok)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model")
    parser.add_argument("--upstream", type=Path, help="folder with upstream's llama-server")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--np", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--n-predict", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--shared-prefix", type=int, default=0, help="words of a prefix shared by every prompt")
    parser.add_argument("--chat", action="store_true", help="stream /v1/chat/completions instead of /completion")
    parser.add_argument("--png", help="write a plot of tokens/s and TTFT against concurrency")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pyllama.models import default_model_path

    model = str(args.model or default_model_path())
    flags = ["-m", model, "-np", str(args.np), "-cb", "-c", str(args.ctx), "-t", str(args.threads)]
    ours = [shutil.which("pyllama-server") or str(Path(sys.executable).parent / "pyllama-server")] + flags
    contenders = [("pyllama-server", ours)]
    if args.upstream:
        contenders.append(("llama-server", [str(args.upstream / "llama-server"), *flags, "--no-webui"]))
    shared = " ".join(WORDS[j % len(WORDS)] for j in range(args.shared_prefix)) + " " if args.shared_prefix else ""

    table: dict = {}
    for c in args.concurrency:
        for name, argv in contenders:  # alternately, at each level
            server = Server(name, argv, 8300 + len(table))
            try:
                row = run_level(server, c, args, shared)
            finally:
                row_rss = server.stop()
            row["rss"] = row_rss
            table[(name, c)] = row
            print(f"# {name} c={c}: {row['tps']:.1f} tok/s, TTFT p50 {1e3 * row['ttft50']:.0f} ms, "
                  f"errors {row['errors']}", flush=True)

    print(f"\nmodel {Path(model).name}, -np {args.np} -cb -c {args.ctx} -t {args.threads}, "
          f"{args.n_predict} tokens per request, {args.requests_per_client} requests per client, "
          f"{'chat' if args.chat else 'completion'} streaming, shared prefix {args.shared_prefix} words\n")
    print("| c | server | tok/s | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in args.concurrency:
        for name, _ in contenders:
            r = table[(name, c)]
            print(f"| {c} | {name} | {r['tps']:.1f} | {r['rps']:.2f} | {1e3 * r['ttft50']:.0f} | "
                  f"{1e3 * r['ttft99']:.0f} | {1e3 * r['itl50']:.1f} | {1e3 * r['itl99']:.1f} | "
                  f"{r['errors']} | {r['rss']:.0f} |")
    if args.upstream:
        print("\n| c | tok/s ratio | TTFT p50 ratio | ITL p99 ratio | RSS difference MB |")
        print("|---|---|---|---|---|")
        for c in args.concurrency:
            a, b = table[("pyllama-server", c)], table[("llama-server", c)]
            print(f"| {c} | {a['tps'] / b['tps']:.2f} | {a['ttft50'] / b['ttft50']:.2f} | "
                  f"{a['itl99'] / b['itl99']:.2f} | {a['rss'] - b['rss']:+.0f} |")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for name, _ in contenders:
            ax1.plot(args.concurrency, [table[(name, c)]["tps"] for c in args.concurrency], marker="o", label=name)
            ax2.plot(args.concurrency, [1e3 * table[(name, c)]["ttft50"] for c in args.concurrency], marker="o",
                     label=name)
        ax1.set(xlabel="concurrent clients", ylabel="generated tokens/s", title="Throughput")
        ax2.set(xlabel="concurrent clients", ylabel="TTFT p50 (ms)", title="Time to first token")
        for ax in (ax1, ax2):
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=100)
        print(f"\nplot: {args.png}")


if __name__ == "__main__":
    main()
