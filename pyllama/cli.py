"""Command lines: `pyllama-server` (llama-server's flags) and `pyllama generate`.

`pyllama-server` turns llama-server's flags into Settings (pyllama/flags.py), then runs the
server under gunicorn.
Without a model but with --models-dir / --models-preset it runs a router instead (server/router).
Imports: `flags`, `errors`, `downloads`, `server.gunicorn` and `server.router` (lazily), and the
public `engine` names.
"""

from __future__ import annotations

import argparse
import codecs
import logging
import sys

from pyllama import __version__
from pyllama.errors import PyllamaError
from pyllama.flags import FlagError, completion_bash, parse_server_args, server_help

logger = logging.getLogger(__name__)

def version_text() -> str:
    from pyllama.engine import llama_version

    return f"pyllama {__version__}\nllama.cpp {llama_version()} (commit {_pinned_commit()})"


def _pinned_commit() -> str:
    from pyllama.engine import llama_build_commit

    return llama_build_commit()


def _register_rpc(argv: list[str]) -> None:
    """Register the devices of LLAMA_ARG_RPC's and then each --rpc's servers (add_rpc_devices)."""
    import os

    values = [os.environ["LLAMA_ARG_RPC"]] if os.environ.get("LLAMA_ARG_RPC") else []
    values += [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--rpc"]
    if not values:
        return
    from pyllama.engine import parse_servers, register_servers

    for value in values:
        register_servers(parse_servers(value))


def server_main(argv: list[str] | None = None) -> int:
    """Entry point of `pyllama-server`."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv or "--usage" in argv:
        print(server_help())
        return 0
    if "--version" in argv:
        print(version_text())
        return 0
    if "--completion-bash" in argv:  # upstream prints the script and exits while parsing
        print(completion_bash(), end="")
        return 0
    if "--list-devices" in argv:  # upstream prints the list and exits while parsing
        from pyllama.engine import format_device_list

        try:  # with the devices of the --rpc servers given before it (LLAMA_ARG_RPC first)
            _register_rpc(argv[:argv.index("--list-devices")])
        except (ValueError, PyllamaError) as exc:
            print(f"pyllama-server: error: {exc}", file=sys.stderr)
            return 1
        print(format_device_list(), end="")
        return 0
    if "-cl" in argv or "--cache-list" in argv:  # upstream prints the cached models and exits
        from pyllama.downloads import format_cache_list

        print(format_cache_list(), end="")
        return 0
    try:
        settings = parse_server_args(argv)
    except FlagError as exc:
        print(f"pyllama-server: error: {exc}", file=sys.stderr)
        return 1
    from pyllama import logs
    from pyllama.server.router.mode import is_router_mode

    router = is_router_mode(settings)
    try:
        logs.configure(settings, common_log=not router)  # a router never loads libllama
    except OSError as exc:
        print(f"pyllama-server: error: cannot open --log-file: {exc}", file=sys.stderr)
        return 1
    if router:  # no model, and --models-dir / --models-preset: serve many through children
        from pyllama.server.router.app import run as run_router

        return run_router(settings, argv)
    from pyllama.server.router.child import is_child, watch_stdin

    if is_child():  # started by a router: stop with it (server_child::setup)
        watch_stdin()
    from pyllama.downloads import prepare_model

    try:  # -hf/-mu/-dr: download once, here, before gunicorn forks its worker
        settings = prepare_model(settings)
    except PyllamaError as exc:
        print(f"pyllama-server: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pyllama-server: download interrupted (run again to resume it)", file=sys.stderr)
        return 130
    from pyllama.server.gunicorn import run

    return run(settings)


# --- pyllama generate ------------------------------------------------------------------------
def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyllama", description="Run GGUF models with llama.cpp.")
    parser.add_argument("--version", action="version", version=f"pyllama {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="complete a prompt and stream the text")
    gen.add_argument("-p", "--prompt", required=True, help="the text to continue")
    gen.add_argument("-m", "--model", help="GGUF file (default: gemma-3-270m Q4_K_M)")
    gen.add_argument("-n", "--n-predict", type=int, default=128,
                     help="tokens to generate, -1 = until end of text (default: 128)")
    gen.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size (default: 4096)")
    gen.add_argument("-b", "--batch-size", type=int, default=2048, help="logical batch (default: 2048)")
    gen.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all)")
    gen.add_argument("-ngl", "--n-gpu-layers", type=int, default=-1,
                     help="layers to offload to the GPU (default: all; CPU builds ignore it)")
    gen.add_argument("--temp", type=float, default=0.8, help="temperature, <= 0 = greedy (default: 0.8)")
    gen.add_argument("--top-k", type=int, default=40, help="top-k, 0 = off (default: 40)")
    gen.add_argument("--top-p", type=float, default=0.95, help="top-p, 1.0 = off (default: 0.95)")
    gen.add_argument("--min-p", type=float, default=0.05, help="min-p, 0 = off (default: 0.05)")
    gen.add_argument("-s", "--seed", type=int, default=-1, help="RNG seed, -1 = random (default: -1)")
    gen.add_argument("--no-echo", action="store_true", help="do not print the prompt first")
    gen.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    return parser


def _generate(args: argparse.Namespace) -> int:
    from pyllama.engine import Context, Model, SamplerChain, set_log_level
    from pyllama.models import default_model_path

    set_log_level(logging.INFO if args.verbose else logging.ERROR)
    path = args.model or default_model_path()
    model = Model(path, n_gpu_layers=args.n_gpu_layers)
    context = Context(model, n_ctx=args.ctx_size, n_batch=args.batch_size, n_threads=args.threads)
    sampler = SamplerChain(model, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                           min_p=args.min_p, seed=args.seed)
    prompt = model.tokenize(args.prompt, add_special=True, parse_special=False)

    out = sys.stdout
    if not args.no_echo:
        out.write(args.prompt)
        out.flush()
    # Token pieces can split a UTF-8 character; the incremental decoder holds partial bytes.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in context.generate(prompt, sampler, max_tokens=args.n_predict):
        text = decoder.decode(model.token_to_piece(token))
        if text:
            out.write(text)
            out.flush()
    out.write(decoder.decode(b"", final=True) + "\n")
    out.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `pyllama` and return the process exit code."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            return _generate(args)
    except PyllamaError as exc:
        print(f"pyllama: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2
