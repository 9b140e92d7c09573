"""Multi-turn chat with more conversations than slots: pyllama-server and llama-server side by side.

Each conversation is a growing chat history (a long opening document, then turns); every turn
sends the whole history so far plus a new user message to /v1/chat/completions and appends the
reply. Conversations run `--clients` at a time, round-robin, so a returning conversation usually
finds its slot taken by another one: what its prompt costs then depends on the prompt cache
beyond the slots (upstream's --cache-ram, on by default). Per turn it reports TTFT p50/p99, the
prompt tokens evaluated and served from cache (the server's own `timings`), and tokens/s.

    python bench/multiturn_bench.py --upstream /path/to/llama-server-folder \
        --conversations 16 --turns 4 --clients 4 -np 4

Both servers get the same flags and the same conversation trace (greedy, fixed seed, a fixed
reply length with ignore_eos), one after the other. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from serve_bench import Contender, Server, percentile  # noqa: E402

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def document(i: int, n_words: int) -> str:
    # a different long text per conversation, so no two share more than the template's prefix
    return " ".join(WORDS[(i * 7 + k * (i % 5 + 1)) % len(WORDS)] for k in range(n_words))


def chat_turn(base: str, messages: list, n_predict: int, seed: int) -> dict:
    body = {"messages": messages, "max_tokens": n_predict, "temperature": 0, "seed": seed, "stream": True,
            "ignore_eos": True, "cache_prompt": True, "timings_per_token": False}
    req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft, text, timings = None, [], None
    with urllib.request.urlopen(req, timeout=1800) as resp:
        for line in resp:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or [{}]
            piece = (choices[0].get("delta") or {}).get("content")
            if piece:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text.append(piece)
            if chunk.get("timings"):
                timings = chunk["timings"]
    return {"ttft": ttft if ttft is not None else time.perf_counter() - t0, "total": time.perf_counter() - t0,
            "text": "".join(text), "timings": timings or {}}


def run(server: Server, args) -> dict:
    conversations = [[{"role": "user", "content": f"Read this and answer questions about it.\n\n"
                                                  f"{document(i, args.doc_words)}"}]
                     for i in range(args.conversations)]
    per_turn: dict[int, list] = {t: [] for t in range(args.turns)}
    lock = threading.Lock()
    order = list(range(args.conversations))

    def worker(slot: int) -> None:
        for turn in range(args.turns):
            for c in order[slot::args.clients]:
                history = conversations[c]
                if turn:
                    history.append({"role": "user", "content": f"Question {turn}: what comes after "
                                                               f"{WORDS[(c + turn) % len(WORDS)]}?"})
                res = chat_turn(server.base, history, args.n_predict, 1000 + c)
                history.append({"role": "assistant", "content": res["text"]})
                with lock:
                    per_turn[turn].append(res)
            barrier.wait()  # every conversation finishes turn t before turn t + 1 starts

    barrier = threading.Barrier(args.clients)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    rows = {}
    for turn, results in per_turn.items():
        timed = [r["timings"] for r in results]
        rows[turn] = {
            "ttft50": percentile([r["ttft"] for r in results], 0.5),
            "ttft99": percentile([r["ttft"] for r in results], 0.99),
            "evaluated": sum(t.get("prompt_n", 0) for t in timed),
            "cached": sum(t.get("cache_n", 0) for t in timed),
            "generated": sum(t.get("predicted_n", 0) for t in timed),
            "wall": sum(r["total"] for r in results),
        }
    total_gen = sum(r["generated"] for r in rows.values())
    return {"turns": rows, "tps": total_gen / wall, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", help="GGUF (default: the default model)")
    parser.add_argument("--upstream", type=Path, help="folder with upstream's llama-server")
    parser.add_argument("--pyllama", default=str(Path(sys.executable).parent / "pyllama-server"))
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("-np", "--parallel", type=int, default=4)
    parser.add_argument("-c", "--ctx-size", type=int, default=32768)
    parser.add_argument("--doc-words", type=int, default=600, help="words of each opening document")
    parser.add_argument("--n-predict", type=int, default=32)
    parser.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    parser.add_argument("--extra", default="", help="more flags for both servers")
    args = parser.parse_args()
    if args.model is None:
        from pyllama.models import default_model_path

        args.model = str(default_model_path())
    flags = ["-m", args.model, "-np", str(args.parallel), "-c", str(args.ctx_size), "-t", str(args.threads),
             "--jinja", *args.extra.split()]
    contenders = [Contender("pyllama", [args.pyllama, *flags])]
    if args.upstream:
        contenders.append(Contender("llama-server", [str(args.upstream / "llama-server"), *flags, "--no-webui"]))
    results = {}
    for i, contender in enumerate(contenders):
        server = Server(contender, 18600 + i)
        try:
            results[contender.name] = run(server, args)
        finally:
            server.stop()
    print(f"\n{args.conversations} conversations, {args.turns} turns, {args.clients} clients, -np {args.parallel}, "
          f"-c {args.ctx_size}, {args.doc_words}-word documents, {args.n_predict} tokens per reply\n")
    print("| server | turn | TTFT p50 s | TTFT p99 s | prompt tokens evaluated | from cache | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for name, res in results.items():
        for turn, row in res["turns"].items():
            print(f"| {name} | {turn + 1} | {row['ttft50']:.2f} | {row['ttft99']:.2f} | {row['evaluated']} | "
                  f"{row['cached']} | {res['tps']:.1f} |")
    if len(results) == 2:
        a, b = results["pyllama"]["turns"], results["llama-server"]["turns"]
        evaluated = sum(r["evaluated"] for r in a.values()), sum(r["evaluated"] for r in b.values())
        ttft = statistics.median(a[t]["ttft50"] / b[t]["ttft50"] for t in a if b[t]["ttft50"])
        print(f"\nprompt tokens evaluated: pyllama {evaluated[0]}, llama-server {evaluated[1]}; "
              f"TTFT p50 pyllama / llama-server, median over turns: {ttft:.2f}")


if __name__ == "__main__":
    main()
