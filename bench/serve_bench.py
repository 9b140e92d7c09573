"""End-to-end serving benchmark: pyllama-server and upstream llama-server side by side over HTTP.

For each concurrency level, each server is started with the same flags, warmed up, and driven by
C concurrent streaming clients, once per mode: streaming /completion and streaming
/v1/chat/completions. Every request generates exactly --n-predict tokens (ignore_eos), so every
server does the same work. Per request: time to first token, the gaps between tokens, total time
and the server's own timings. Aggregated: generated tokens/s, TTFT and ITL p50/p99, requests/s,
errors (a stream cut before its last chunk counts as one) and the server's peak RSS (VmHWM summed
over its process tree). Servers run alternately at each level, never at the same time.

Then a prompt-cache probe: two requests sharing a --cache-probe-tokens long prefix; the second
one's TTFT and `timings.cache_n` show the cache hit. Prints markdown tables with the ratios
(also written with --md), and --png plots tokens/s and TTFT against concurrency.

    python bench/serve_bench.py --upstream ../upstream-build/bin --concurrency 1,2,4,8 --png serve.png

Contenders: pyllama-server (this environment's), other pyllama-server builds (--pyllama
NAME=PATH: e.g. the portable wheel against a native build), upstream llama-server (--upstream: built from the
same vendored sources by bench/build_upstream.sh), optionally upstream with --backend-sampling
(--upstream-backend-sampling) and llama-cpp-python's server (--llama-cpp-python PYTHON: an
interpreter with `llama-cpp-python[server]` installed; it has no native /completion, so its
completion mode uses /v1/completions, and no ignore_eos, so its token counts are what it sent).
--limit runs upstream's llama-batched-bench at the same shapes (no HTTP, no sampling) and reports
each server as a fraction of it; --raw adds llama-bench's single-stream decode figure.
Loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompts import WORDS, prompt_text, run_concurrently  # noqa: E402

OURS = "pyllama-server"
UPSTREAM = "llama-server"


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


def process_tree(pid: int) -> list[int]:
    try:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    except OSError:
        return [pid]
    return [pid] + [int(p) for p in out.split()]


def engine_and_other_cpu(pid: int) -> tuple[float, float, int]:
    """CPU seconds of pyllama's engine threads (the engine thread and the compute threads it
    started, which inherit its name) and of every other thread (HTTP, gunicorn), over the tree,
    and the other threads' voluntary context switches (each a sleep and a wake-up)."""
    tick = os.sysconf("SC_CLK_TCK")
    engine = other = 0.0
    other_switches = 0
    for p in process_tree(pid):
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                name = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            try:  # nanoseconds on the CPU; stat's utime + stime only count 10 ms ticks
                cpu = int((task / "schedstat").read_text().split()[0]) * 1e-9
            except (OSError, ValueError, IndexError):
                cpu = (int(fields[11]) + int(fields[12])) / tick
            if name == "pyllama-engine":
                engine += cpu
                continue
            other += cpu
            try:
                status = (task / "status").read_text()
                other_switches += int(status.split("voluntary_ctxt_switches:", 1)[1].split()[0])
            except (OSError, IndexError, ValueError):
                pass
    return engine, other, other_switches


def engine_counters(base: str) -> dict:
    """pyllama's own /metrics counters (pyllama:engine_*)."""
    out = {}
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("pyllama:engine_"):
                name, value = line.split()
                out[name.split(":", 1)[1]] = float(value)
    return out


@dataclass
class Contender:
    name: str
    argv: list[str]
    llama_cpp_python: bool = False  # OpenAI routes only, no /health, no ignore_eos
    body_extra: dict | None = None  # more request fields for this server

    def path(self, mode: str) -> str:
        if mode == "chat":
            return "/v1/chat/completions"
        return "/v1/completions" if self.llama_cpp_python else "/completion"


class Server:
    def __init__(self, contender: Contender, port: int) -> None:
        self.contender = contender
        self.base = f"http://127.0.0.1:{port}"
        self.log = open(f"/tmp/serve_bench-{contender.name.replace(' ', '_')}.log", "wb")
        self.proc = subprocess.Popen(contender.argv + ["--port", str(port)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        ready = "/v1/models" if contender.llama_cpp_python else "/health"
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{contender.name} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.base + ready, timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception:
                time.sleep(0.2)
        raise RuntimeError(f"{contender.name} did not start")

    def stop(self) -> float:
        rss = peak_rss_mb(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        return rss


def one_request(server: Server, mode: str, prompt: str, n_predict: int, seed: int) -> dict:
    body = {"n_predict": n_predict, "max_tokens": n_predict, "ignore_eos": True, "stream": True,
            "seed": seed, "cache_prompt": True}
    body.update(server.contender.body_extra or {})
    if mode == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    path = server.contender.path(mode)
    openai = path.startswith("/v1/")
    req = urllib.request.Request(server.base + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    stamps, server_timings, finished = [], None, False
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            for line in resp:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                if openai:
                    choice = (chunk.get("choices") or [{}])[0]
                    text = choice.get("text") if mode == "completion" else (choice.get("delta") or {}).get("content")
                    finished = finished or choice.get("finish_reason") is not None
                else:
                    text = chunk.get("content")
                    finished = finished or bool(chunk.get("stop"))
                if text:
                    stamps.append(time.perf_counter())
                if chunk.get("timings"):
                    server_timings = chunk["timings"]
    except Exception as exc:
        return {"error": str(exc)}
    if not finished:
        return {"error": f"stream cut after {len(stamps)} chunks"}
    end = time.perf_counter()
    n = server_timings.get("predicted_n", len(stamps)) if server_timings else len(stamps)
    return {"ttft": stamps[0] - t0 if stamps else float("nan"), "total": end - t0, "tokens": n,
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "server": server_timings}


def run_level(server: Server, mode: str, concurrency: int, args) -> dict:
    one_request(server, mode, "warm up " + prompt_text(99_999, args.prompt_words), 8, 1)
    ours = server.contender.name.startswith(OURS)
    if ours:
        counters0, cpu0 = engine_counters(server.base), engine_and_other_cpu(server.proc.pid)
    results: list = []
    lock = threading.Lock()

    def client(c: int):
        for r in range(args.requests_per_client):
            i = c * 1000 + r
            res = one_request(server, mode, prompt_text(i, args.prompt_words, args.shared_prefix_text),
                              args.n_predict, 42 + i)
            with lock:
                results.append(res)

    wall = run_concurrently(concurrency, client)
    overhead = {}
    if ours:  # per generated token: engine thread outside llama_decode, and the HTTP side's CPU
        counters1, cpu1 = engine_counters(server.base), engine_and_other_cpu(server.proc.pid)
        n = max(1.0, counters1["engine_tokens_predicted_total"] - counters0["engine_tokens_predicted_total"])
        busy = counters1["engine_busy_seconds_total"] - counters0["engine_busy_seconds_total"]
        decode = counters1["engine_decode_seconds_total"] - counters0["engine_decode_seconds_total"]
        overhead = {"engine_us": 1e6 * (busy - decode) / n, "http_cpu_us": 1e6 * (cpu1[1] - cpu0[1]) / n,
                    "http_switches": (cpu1[2] - cpu0[2]) / n}
    ok = [r for r in results if "error" not in r]
    itl = [g for r in ok for g in r["itl"]]
    timed = [r["server"] for r in ok if r["server"]]
    return {**overhead, "tps": sum(r["tokens"] for r in ok) / wall, "rps": len(ok) / wall,
            "ttft50": percentile([r["ttft"] for r in ok], 0.5), "ttft99": percentile([r["ttft"] for r in ok], 0.99),
            "itl50": percentile(itl, 0.5), "itl99": percentile(itl, 0.99),
            "total50": percentile([r["total"] for r in ok], 0.5),
            "server_prompt_ms": percentile([t.get("prompt_ms", float("nan")) for t in timed], 0.5),
            "server_tps": percentile([t.get("predicted_per_second", float("nan")) for t in timed], 0.5),
            "errors": len(results) - len(ok),
            "first_error": next((r["error"] for r in results if "error" in r), "")}


def cache_probe(server: Server, n_tokens: int) -> dict:
    """Two requests sharing a prefix of about n_tokens: cold, then a cache hit."""
    words = max(1, n_tokens // 2)
    for _ in range(4):  # size the prefix with the server's own tokenizer
        text = " ".join(WORDS[j % len(WORDS)] for j in range(words)) + " "
        req = urllib.request.Request(server.base + "/tokenize", json.dumps({"content": text}).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                got = len(json.load(r)["tokens"])
        except Exception:
            break  # no /tokenize (llama-cpp-python): keep the estimate
        if abs(got - n_tokens) < 16:
            break
        words = max(1, round(words * n_tokens / max(1, got)))
    out = {}
    for key, i in (("cold", 1), ("warm", 2)):
        res = one_request(server, "completion", prompt_text(i, 8, text), 8, 7)
        out[key] = res
    return out


def batched_bench(upstream: Path, model: str, args, n_prompt: int) -> dict:
    """llama-batched-bench at the benchmark's shapes: {npl: completion tokens/s, prefill included}."""
    binary = upstream / "llama-batched-bench"
    npl = args.concurrency
    ctx = max(npl) * (n_prompt + args.n_predict) + 256
    cmd = [str(binary), "-m", model, "-c", str(ctx), "-t", str(args.threads), "-npp", str(n_prompt),
           "-ntg", str(args.n_predict), "-npl", ",".join(map(str, npl)), "--output-format", "jsonl",
           *shlex.split(args.server_args)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    limit = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            limit[row["pl"]] = row["pl"] * row["tg"] / row["t"]
    if not limit:
        print(f"# llama-batched-bench failed: {out.stderr[-500:]}", file=sys.stderr)
    return limit


def llama_bench_raw(upstream: Path, model: str, args) -> float:
    """llama-bench's single-stream decode tokens/s."""
    cmd = [str(upstream / "llama-bench"), "-m", model, "-p", "0", "-n", str(args.n_predict), "-t",
           str(args.threads), "-o", "json", *shlex.split(args.server_args)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return float(json.loads(out.stdout)[0]["avg_ts"])
    except (ValueError, IndexError, KeyError):
        print(f"# llama-bench failed: {out.stderr[-500:]}", file=sys.stderr)
        return float("nan")


def eog_tokens(model: str) -> list[int]:
    from pyllama.engine import Model

    return Model(model, vocab_only=True).eog_tokens


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def prompt_tokens(model: str, n_words: int) -> int:
    from pyllama.engine import Model

    return len(Model(model, vocab_only=True).tokenize(prompt_text(0, n_words)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", help="GGUF (default: the default model)")
    parser.add_argument("--upstream", type=Path, help="folder with upstream's llama-server (and -bench tools)")
    parser.add_argument("--upstream-backend-sampling", action="store_true",
                        help="also run upstream with --backend-sampling")
    parser.add_argument("--pyllama", action="append", default=[], metavar="NAME=PATH",
                        help="another pyllama-server build to compare with this environment's, e.g. "
                             "portable=/venv/bin/pyllama-server (repeatable)")
    parser.add_argument("--llama-cpp-python", metavar="PYTHON", help="interpreter with llama-cpp-python[server]")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["completion", "chat"],
                        help="completion, chat or both (default)")
    parser.add_argument("--np", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--server-args", default="", help="more flags for every server, e.g. \"-ngl 99\"")
    parser.add_argument("--n-predict", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--shared-prefix", type=int, default=0, metavar="WORDS",
                        help="a prefix of this many words shared by every prompt of the load (prompt cache)")
    parser.add_argument("--cache-probe-tokens", type=int, default=2000, help="shared prefix length; 0 = no probe")
    parser.add_argument("--limit", action="store_true", help="llama-batched-bench at the same shapes")
    parser.add_argument("--raw", action="store_true", help="llama-bench single-stream decode")
    parser.add_argument("--md", help="also write the tables to this file")
    parser.add_argument("--png", help="plot tokens/s and TTFT against concurrency")
    args = parser.parse_args()
    args.shared_prefix_text = " ".join(WORDS[j % len(WORDS)] for j in range(args.shared_prefix)) + " " \
        if args.shared_prefix else ""
    from pyllama.models import default_model_path

    model = str(args.model or default_model_path())
    extra = shlex.split(args.server_args)
    flags = ["-m", model, "-np", str(args.np), "-cb", "-c", str(args.ctx), "-t", str(args.threads), "--metrics",
             *extra]
    ours = shutil.which("pyllama-server") or str(Path(sys.executable).parent / "pyllama-server")
    contenders = [Contender(OURS, [ours, *flags])]
    for spec in args.pyllama:
        name, _, path = spec.partition("=")
        contenders.append(Contender(f"{OURS} {name}", [path, *flags]))
    if args.upstream:
        contenders.append(Contender(UPSTREAM, [str(args.upstream / "llama-server"), *flags, "--no-webui"]))
        if args.upstream_backend_sampling:
            contenders.append(Contender(UPSTREAM + " --backend-sampling",
                                        [str(args.upstream / "llama-server"), *flags, "--no-webui",
                                         "--backend-sampling"]))
    if args.llama_cpp_python:
        # one sequence with the same per-slot context; no batching of requests
        contenders.append(Contender("llama-cpp-python", [
            args.llama_cpp_python, "-m", "llama_cpp.server", "--model", model,
            "--n_ctx", str(args.ctx // args.np), "--n_threads", str(args.threads),
            "--n_threads_batch", str(args.threads), "--host", "127.0.0.1", *extra], llama_cpp_python=True,
            # no ignore_eos there: the same effect through OpenAI's logit_bias
            body_extra={"logit_bias": {str(t): -100 for t in eog_tokens(model)}}))

    table: dict = {}
    port = 8300
    for c in args.concurrency:
        for contender in contenders:  # alternately, at each level
            server = Server(contender, port)
            port += 1
            rows = {}
            try:
                for mode in args.modes:
                    rows[mode] = run_level(server, mode, c, args)
            finally:
                rss = server.stop()
            for mode, row in rows.items():
                row["rss"] = rss
                table[(contender.name, mode, c)] = row
                print(f"# {contender.name} {mode} c={c}: {row['tps']:.1f} tok/s, TTFT p50 "
                      f"{1e3 * row['ttft50']:.0f} ms, ITL p99 {1e3 * row['itl99']:.1f} ms, errors {row['errors']} "
                      f"{row['first_error']}", flush=True)

    probes = {}
    if args.cache_probe_tokens:
        probe_ctx = max(args.ctx, args.np * (args.cache_probe_tokens + 512))
        for contender in contenders:
            argv = list(contender.argv)
            if contender.llama_cpp_python:
                argv[argv.index("--n_ctx") + 1] = str(args.cache_probe_tokens + 512)
            else:
                argv[argv.index("-c") + 1] = str(probe_ctx)
            server = Server(Contender(contender.name, argv, contender.llama_cpp_python), port)
            port += 1
            try:
                probes[contender.name] = cache_probe(server, args.cache_probe_tokens)
            finally:
                server.stop()

    limit, raw = {}, float("nan")
    if args.limit and args.upstream:
        limit = batched_bench(args.upstream, model, args, prompt_tokens(model, args.prompt_words))
    if args.raw and args.upstream:
        raw = llama_bench_raw(args.upstream, model, args)

    lines = [f"model {Path(model).name}; flags: -np {args.np} -cb -c {args.ctx} -t {args.threads} "
             f"{args.server_args}".rstrip() + f"; {args.n_predict} generated tokens per request (ignore_eos), "
             f"prompts of {args.prompt_words} words" + (f" after a shared {args.shared_prefix}-word prefix"
                                                         if args.shared_prefix else "")
             + f", {args.requests_per_client} requests per client", ""]
    for mode in args.modes:
        lines += [f"### streaming {'/v1/chat/completions' if mode == 'chat' else '/completion'}", "",
                  "| c | server | tok/s | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
                  "errors | peak RSS MB | server prompt ms p50 | server tok/s per stream p50 |"
                  + (" of limit |" if limit else ""),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if limit else "")]
        for c in args.concurrency:
            for ct in contenders:
                r = table[(ct.name, mode, c)]
                frac = f" {r['tps'] / limit[c]:.0%} |" if c in limit else (" |" if limit else "")
                lines.append(f"| {c} | {ct.name} | {r['tps']:.1f} | {r['rps']:.2f} | {1e3 * r['ttft50']:.0f} | "
                             f"{1e3 * r['ttft99']:.0f} | {1e3 * r['itl50']:.1f} | {1e3 * r['itl99']:.1f} | "
                             f"{r['errors']} | {r['rss']:.0f} | {r['server_prompt_ms']:.0f} | {r['server_tps']:.1f} |"
                             + frac)
        for other in contenders[1:]:
            lines += ["", f"{OURS} / {other.name}:", "",
                      "| c | tok/s ratio | TTFT p50 ratio | ITL p99 ratio | RSS difference MB |", "|---|---|---|---|---|"]
            for c in args.concurrency:
                a, b = table[(OURS, mode, c)], table[(other.name, mode, c)]
                lines.append(f"| {c} | {ratio(a['tps'], b['tps'])} | {ratio(a['ttft50'], b['ttft50'])} | "
                             f"{ratio(a['itl99'], b['itl99'])} | {a['rss'] - b['rss']:+.0f} |")
        for ct in contenders:
            if not ct.name.startswith(OURS):
                continue
            lines += ["", f"{ct.name} per generated token: engine thread time outside llama_decode "
                      "(admission, batch building, sampling, publishing) and CPU of every other thread "
                      "(HTTP, JSON, SSE):", "",
                      "| c | engine µs/token outside decode | HTTP-side CPU µs/token | HTTP-side sleeps/token |",
                      "|---|---|---|---|"]
            for c in args.concurrency:
                r = table[(ct.name, mode, c)]
                lines.append(f"| {c} | {r['engine_us']:.0f} | {r['http_cpu_us']:.0f} | {r['http_switches']:.2f} |")
        lines.append("")
    if limit or raw == raw:
        lines += ["### the same build without a server (upstream tools)", ""]
        if limit:
            lines += ["| c | llama-batched-bench tok/s (prefill included) |", "|---|---|"]
            lines += [f"| {c} | {v:.1f} |" for c, v in sorted(limit.items())]
        if raw == raw:
            lines += ["", f"llama-bench single-stream decode: {raw:.1f} tok/s; 1-stream serving as a fraction of it: "
                      + ", ".join(f"{ct.name} {table[(ct.name, args.modes[0], 1)]['tps'] / raw:.0%}"
                                  for ct in contenders if (ct.name, args.modes[0], 1) in table)]
        lines.append("")
    if probes:
        lines += [f"### prompt cache: two requests sharing a {args.cache_probe_tokens}-token prefix", "",
                  "| server | 1st TTFT ms | 1st prompt tokens evaluated | 2nd TTFT ms | 2nd cache_n | "
                  "2nd prompt tokens evaluated |", "|---|---|---|---|---|---|"]
        for name, p in probes.items():
            cold, warm = p["cold"], p["warm"]
            if "error" in cold or "error" in warm:
                lines.append(f"| {name} | error: {cold.get('error') or warm.get('error')} |||||")
                continue
            cs, ws = cold["server"] or {}, warm["server"] or {}
            lines.append(f"| {name} | {1e3 * cold['ttft']:.0f} | {cs.get('prompt_n', '?')} | {1e3 * warm['ttft']:.0f} | "
                         f"{ws.get('cache_n', '?')} | {ws.get('prompt_n', '?')} |")
        lines.append("")
    text = "\n".join(lines)
    print("\n" + text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    if args.png:
        plot(args, contenders, table, args.png)
        print(f"plot: {args.png}")


def plot(args, contenders: list[Contender], table: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(args.modes), 2, figsize=(10, 4 * len(args.modes)), squeeze=False)
    for (ax1, ax2), mode in zip(axes, args.modes):
        for ct in contenders:
            rows = [table[(ct.name, mode, c)] for c in args.concurrency]
            ax1.plot(args.concurrency, [r["tps"] for r in rows], marker="o", label=ct.name)
            ax2.plot(args.concurrency, [1e3 * r["ttft50"] for r in rows], marker="o", label=ct.name)
        ax1.set(xlabel="concurrent clients", ylabel="generated tokens/s", title=f"Throughput ({mode})")
        ax2.set(xlabel="concurrent clients", ylabel="TTFT p50 (ms)", title=f"Time to first token ({mode})")
        for ax in (ax1, ax2):
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
