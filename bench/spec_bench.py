"""Speculative decoding, single stream: pyllama-server and llama-server side by side.

A repetitive task (a quoted source file, then the start of it again, so the model copies it
back): greedy /completion with a fixed reply length (ignore_eos), one request at a time, with
the same flags for both servers in each configuration: no speculation, n-gram drafting
(--spec-type ngram-simple / ngram-mod) and a draft model (-md, by default the model itself,
--spec-type draft-simple). Reports the servers' own generation tokens/s (timings
predicted_per_second, median over the repetitions), the drafted / accepted tokens, and each
configuration's speed-up over no speculation.

    python bench/spec_bench.py --upstream /work/upstream-build/bin --reps 3 --n-predict 192

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from serve_bench import Contender, Server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def repetitive_prompt(n_lines: int) -> str:
    code = "\n".join((ROOT / "pyllama" / "engine" / "config.py").read_text().splitlines()[40:40 + n_lines])
    head = "\n".join(code.splitlines()[:3])
    return f"Here is a Python file:\n\n```python\n{code}\n```\n\nThe same file, copied exactly:\n\n```python\n{head}\n"


def complete(base: str, prompt: str, n_predict: int) -> dict:
    body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "ignore_eos": True, "cache_prompt": False,
            "seed": 1}
    req = urllib.request.Request(base + "/completion", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=1800) as resp:
        return json.loads(resp.read())


CONFIGS = {
    "none": [],
    "ngram-simple": ["--spec-type", "ngram-simple"],
    "ngram-mod": ["--spec-type", "ngram-mod", "--spec-ngram-mod-n-match", "12", "--spec-ngram-mod-n-min", "4",
                  "--spec-ngram-mod-n-max", "32"],
    "draft-model": None,  # -md DRAFT --spec-type draft-simple (set in main)
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", help="GGUF (default: the default model)")
    parser.add_argument("-md", "--model-draft", help="draft GGUF (default: the model itself)")
    parser.add_argument("--upstream", type=Path, help="folder with upstream's llama-server")
    parser.add_argument("--pyllama", default=str(Path(sys.executable).parent / "pyllama-server"))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--n-predict", type=int, default=192)
    parser.add_argument("--lines", type=int, default=60, help="lines of the quoted file")
    parser.add_argument("--draft-n-max", type=int, default=8)
    parser.add_argument("-c", "--ctx-size", type=int, default=4096)
    parser.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    parser.add_argument("--extra", default="", help="more flags for both servers")
    args = parser.parse_args()
    if args.model is None:
        from pyllama.models import default_model_path

        args.model = str(default_model_path())
    draft = args.model_draft or args.model
    CONFIGS["draft-model"] = ["-md", draft, "--spec-type", "draft-simple", "--spec-draft-n-max", str(args.draft_n_max)]
    prompt = repetitive_prompt(args.lines)
    results: dict = {}
    for cfg in args.configs.split(","):
        flags = ["-m", args.model, "-np", "1", "-c", str(args.ctx_size), "-t", str(args.threads),
                 "--no-cache-prompt", *CONFIGS[cfg], *args.extra.split()]
        contenders = [Contender("pyllama", [args.pyllama, *flags])]
        if args.upstream:
            contenders.append(Contender("llama-server", [str(args.upstream / "llama-server"), *flags, "--no-webui"]))
        for i, contender in enumerate(contenders):
            server = Server(contender, 18700 + i)
            try:
                complete(server.base, prompt, 8)  # warm-up
                runs = [complete(server.base, prompt, args.n_predict) for _ in range(args.reps)]
            finally:
                server.stop()
            t = [r["timings"] for r in runs]
            results[(cfg, contender.name)] = {
                "tps": statistics.median(x["predicted_per_second"] for x in t),
                "draft_n": statistics.median(x.get("draft_n", 0) for x in t),
                "accepted": statistics.median(x.get("draft_n_accepted", 0) for x in t),
                "prompt_n": t[0]["prompt_n"], "text": runs[0]["content"],
            }
            print(f"{cfg} {contender.name}: {results[(cfg, contender.name)]['tps']:.1f} tok/s", file=sys.stderr)
    print(f"\nsingle stream, greedy, {args.n_predict} tokens per reply (ignore_eos), prompt "
          f"{results[next(iter(results))]['prompt_n']} tokens, median of {args.reps}; -t {args.threads}, "
          f"draft model: {os.path.basename(draft)} (--spec-draft-n-max {args.draft_n_max})\n")
    print("| config | server | tokens/s | speed-up vs none | drafted | accepted | pyllama / llama-server |")
    print("|---|---|---|---|---|---|---|")
    for (cfg, name), r in results.items():
        base = results.get(("none", name))
        speed = f"{r['tps'] / base['tps']:.2f}x" if base else ""
        other = results.get((cfg, "llama-server"))
        ratio = f"{r['tps'] / other['tps']:.2f}" if name == "pyllama" and other else ""
        print(f"| {cfg} | {name} | {r['tps']:.1f} | {speed} | {r['draft_n']:.0f} | {r['accepted']:.0f} | {ratio} |")
    same = [cfg for cfg in args.configs.split(",") if (cfg, "llama-server") in results
            and results[(cfg, "pyllama")]["text"] == results[(cfg, "llama-server")]["text"]]
    print(f"\nsame text from both servers: {', '.join(same) or 'none'}")


if __name__ == "__main__":
    main()
