"""Engine throughput side by side with upstream llama.cpp, on the same model and settings.

Runs, alternately at each parallel level: pyllama's Engine in-process, upstream's llama-server
(streaming /completion over loopback HTTP) and, once, upstream's llama-batched-bench (raw
decode, no sampling). Prints a markdown table: aggregate generated tokens/s, time to first
token, and the engine's own time per token outside llama_decode.

Build the upstream yardstick first (nothing of it is committed): bash bench/build_upstream.sh
Then:
    python bench/engine_bench.py --upstream ../upstream-build/bin [--parallel 1,4,8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompts import prompt_text, run_concurrently  # noqa: E402


def run_pyllama(model: str, n_par: int, args) -> dict:
    from pyllama.engine import Engine, Request, SamplingParams, TokenEvent

    with Engine(model, n_parallel=max(args.parallel), n_ctx=args.ctx, n_batch=args.batch,
                n_ubatch=args.ubatch, n_threads=args.threads) as eng:
        sampling = SamplingParams(seed=42, ignore_eos=True)
        # warm-up, as llama-server's own warm-up decode
        eng.submit(Request(prompt=eng.model.tokenize("warm up"), sampling=sampling, n_predict=4)).wait()
        before = eng.stats()
        ttft, totals = [0.0] * n_par, [0] * n_par
        t0 = time.perf_counter()

        def one(i):
            h = eng.submit(Request(prompt=eng.model.tokenize(prompt_text(i, args.prompt_words)),
                                   sampling=sampling, n_predict=args.n_predict, cache_prompt=False))
            for ev in h:
                if isinstance(ev, TokenEvent) and not ttft[i]:
                    ttft[i] = time.perf_counter() - t0
            totals[i] = len(h.result.tokens)

        wall = run_concurrently(n_par, one)
        after = eng.stats()
    n_tok = after["n_tokens_predicted"] - before["n_tokens_predicted"]
    outside = (after["t_step"] - after["t_decode"]) - (before["t_step"] - before["t_decode"])
    return dict(tps=sum(totals) / wall, ttft=statistics.median(ttft), tokens=sum(totals),
                overhead_us=1e6 * outside / max(1, n_tok))


def run_server(binary: Path, model: str, n_par: int, args, port: int = 8097) -> dict:
    cmd = [str(binary), "-m", model, "-np", str(max(args.parallel)), "-c", str(args.ctx),
           "-b", str(args.batch), "-ub", str(args.ubatch), "-t", str(args.threads),
           "--port", str(port), "--no-webui"]
    srv = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except Exception:
                time.sleep(0.1)
        ttft, totals = [0.0] * n_par, [0] * n_par

        def one(i, warm=False):
            body = json.dumps({"prompt": "warm up" if warm else prompt_text(i, args.prompt_words),
                               "n_predict": 4 if warm else args.n_predict, "seed": 42,
                               "ignore_eos": True, "cache_prompt": False, "stream": True}).encode()
            req = urllib.request.Request(base + "/completion", body, {"Content-Type": "application/json"})
            n = 0
            with urllib.request.urlopen(req) as resp:
                for line in resp:
                    if line.startswith(b"data: "):
                        chunk = json.loads(line[6:])
                        if chunk.get("content") and not ttft[i] and not warm:
                            ttft[i] = time.perf_counter() - t0
                        if chunk.get("stop"):
                            n = chunk.get("tokens_predicted", 0)
            if not warm:
                totals[i] = n

        t0 = time.perf_counter()
        one(0, warm=True)
        t0 = time.perf_counter()
        wall = run_concurrently(n_par, one)
    finally:
        srv.terminate()
        srv.wait()
    return dict(tps=sum(totals) / wall, ttft=statistics.median(ttft), tokens=sum(totals))


def run_batched_bench(binary: Path, model: str, args) -> str:
    n_prompt = 0
    from pyllama.engine import Model

    n_prompt = len(Model(model, vocab_only=True).tokenize(prompt_text(0, args.prompt_words)))
    cmd = [str(binary), "-m", model, "-c", str(args.ctx), "-b", str(args.batch), "-ub", str(args.ubatch),
           "-t", str(args.threads), "-npp", str(n_prompt), "-ntg", str(args.n_predict),
           "-npl", ",".join(map(str, args.parallel))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    return "\n".join(l for l in out.stdout.splitlines() if l.startswith("|"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", help="GGUF (default: the default model)")
    parser.add_argument("--upstream", type=Path, help="folder with upstream llama-server / llama-batched-bench")
    parser.add_argument("--parallel", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    parser.add_argument("--n-predict", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--ubatch", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    from pyllama.models import default_model_path

    model = str(args.model or default_model_path())
    rows = []
    for n_par in args.parallel:
        ours = run_pyllama(model, n_par, args)
        theirs = run_server(args.upstream / "llama-server", model, n_par, args) if args.upstream else None
        rows.append((n_par, ours, theirs))
        print(f"# {n_par} parallel: pyllama {ours['tps']:.1f} tok/s"
              + (f", llama-server {theirs['tps']:.1f} tok/s" if theirs else ""), flush=True)
    print(f"\nmodel {Path(model).name}, n_ctx {args.ctx}, n_batch {args.batch}, n_ubatch {args.ubatch}, "
          f"threads {args.threads}, {args.n_predict} generated tokens per request, seeded default sampling\n")
    print("| parallel | pyllama tok/s | llama-server tok/s | ratio | pyllama TTFT p50 ms | "
          "llama-server TTFT p50 ms | pyllama engine µs/token outside decode |")
    print("|---|---|---|---|---|---|---|")
    for n_par, ours, theirs in rows:
        t = theirs or dict(tps=float("nan"), ttft=float("nan"))
        print(f"| {n_par} | {ours['tps']:.1f} | {t['tps']:.1f} | {ours['tps'] / t['tps']:.2f} | "
              f"{1e3 * ours['ttft']:.0f} | {1e3 * t['ttft']:.0f} | {ours['overhead_us']:.0f} |")
    if len(rows) > 1 and rows[0][2]:
        print(f"\nscaling {rows[0][0]}→{rows[-1][0]}: pyllama {rows[-1][1]['tps'] / rows[0][1]['tps']:.2f}×, "
              f"llama-server {rows[-1][2]['tps'] / rows[0][2]['tps']:.2f}×")
    if args.upstream and (args.upstream / "llama-batched-bench").exists():
        print("\nupstream llama-batched-bench (decode only, no sampling, no server):\n")
        print(run_batched_bench(args.upstream / "llama-batched-bench", model, args))


if __name__ == "__main__":
    main()
