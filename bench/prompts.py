"""Helpers shared by the benchmarks: distinct same-length prompts, and running concurrent clients."""

import threading
import time

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
         "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def prompt_text(i: int, n_words: int, shared_prefix: str = "") -> str:
    return shared_prefix + f"Story {i}: " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(n_words))


def run_concurrently(n: int, fn) -> float:
    """Run fn(0) .. fn(n-1) on n threads at once; return the wall time in seconds."""
    t0 = time.perf_counter()
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0
