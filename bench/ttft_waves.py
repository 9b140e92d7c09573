"""Where TTFT goes under a closed-loop load: when each request of each round starts, and its TTFT.

C clients each send R requests back to back (as serve_bench does) against a running server.
Requests of the same length finish together, so the clients' next requests arrive in "waves";
how a server splits a wave across decodes decides most of the time to first token. Prints one
line per round: the spread of the start times and each request's TTFT, in start order.

    python bench/ttft_waves.py --url http://127.0.0.1:8080 --clients 8 --rounds 6
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompts import prompt_text, run_concurrently  # noqa: E402
from serve_bench import Contender, one_request  # noqa: E402


class _Target:
    def __init__(self, url: str) -> None:
        self.base = url.rstrip("/")
        self.contender = Contender("server", [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--mode", choices=["completion", "chat"], default="completion")
    parser.add_argument("--n-predict", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=24)
    args = parser.parse_args()
    target = _Target(args.url)
    one_request(target, args.mode, "warm up", 4, 1)
    records, lock, t0 = [], threading.Lock(), time.perf_counter()

    def client(c: int) -> None:
        for r in range(args.rounds):
            start = time.perf_counter() - t0
            res = one_request(target, args.mode, prompt_text(c * 1000 + r, args.prompt_words), args.n_predict, 42)
            with lock:
                records.append((r, start, res.get("ttft", float("nan"))))

    run_concurrently(args.clients, client)
    for r in range(args.rounds):
        wave = sorted(x for x in records if x[0] == r)
        print(f"round {r}: start spread {1e3 * (wave[-1][1] - wave[0][1]):4.0f} ms, TTFT ms in start order",
              [round(1e3 * x[2]) for x in wave])


if __name__ == "__main__":
    main()
