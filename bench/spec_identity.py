"""Greedy text with and without speculation (the model as its own draft), per server.

On the quantised default model the CPU kernels give slightly different logits for different batch
shapes (a verification batch holds several tokens of one sequence), so greedy text with
speculation may part from greedy text without it at a near-tie. This runs the same prompts
through each server twice, plain and with `-md MODEL --spec-type draft-simple`, and prints where
they part, for pyllama-server and, with --upstream DIR, llama-server.

    python bench/spec_identity.py --upstream /work/upstream-build/bin
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PROMPTS = [
    "Copy this code exactly:\n\ndef add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n\nCopy:\n\n",
    "The capital of France is", "Once upon a time, in a small village,", "List the planets of the solar system:",
    "Write a haiku about the sea.", "def fibonacci(n):", "The quick brown fox", "Explain photosynthesis in simple terms.",
    "1, 2, 3, 4,", "Translate to French: Good morning, how are you?", "Q: What is 17 times 23?\nA:",
    "My favourite recipe is",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([*argv, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            with urllib.request.urlopen(base + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, base
        except Exception:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{argv[0]} did not start")


def generate(base: str, prompt: str, n_predict: int) -> dict:
    body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
    req = urllib.request.Request(base + "/completion", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def run(argv: list[str], n_predict: int) -> list[dict]:
    proc, base = start(argv)
    try:
        return [generate(base, p, n_predict) for p in PROMPTS]
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", help="GGUF (default: the default model)")
    parser.add_argument("--upstream", type=Path, help="folder with upstream's llama-server")
    parser.add_argument("--pyllama", default=str(Path(sys.executable).parent / "pyllama-server"))
    parser.add_argument("--n-predict", type=int, default=64)
    args = parser.parse_args()
    from pyllama.models import default_model_path

    model = str(args.model or default_model_path())
    flags = ["-m", model, "-np", "1", "-c", "2048", "-b", "256"]
    spec = ["-md", model, "--spec-type", "draft-simple", "--spec-draft-n-max", "4"]
    servers = [("pyllama-server", [args.pyllama, *flags])]
    if args.upstream:
        servers.append(("llama-server", [str(args.upstream / "llama-server"), *flags, "--no-webui"]))
    for name, argv in servers:
        plain = run(argv, args.n_predict)
        drafted = run([*argv, *spec], args.n_predict)
        same = 0
        for prompt, a, b in zip(PROMPTS, plain, drafted):
            x, y = a["content"], b["content"]
            if x == y:
                same += 1
                continue
            i = next((k for k in range(min(len(x), len(y))) if x[k] != y[k]), min(len(x), len(y)))
            print(f"{name}: {prompt[:30]!r} parts at character {i}: {x[max(0, i - 20):i + 20]!r} / "
                  f"{y[max(0, i - 20):i + 20]!r}")
        print(f"{name}: {same} of {len(PROMPTS)} prompts give the same greedy text with speculation "
              f"({args.n_predict} tokens each)", flush=True)


if __name__ == "__main__":
    main()
