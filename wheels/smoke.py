#!/usr/bin/env python3
"""Smoke-test an installed pyllama-serve wheel the way a new user meets it.

    python wheels/smoke.py --wheel WHEEL [--ngl N]   make a fresh venv, install WHEEL (and the
                                                     test's model writer), then run the checks
                                                     there with no compiler or cmake on PATH, no
                                                     environment variables and, where the kernel
                                                     lets us (unshare -n), no network
    python wheels/smoke.py [--ngl N]                 run the checks in this interpreter, where
                                                     the wheel is installed (cibuildwheel's
                                                     test-command)

Checks: import; `pyllama-server --list-devices` and `llama-server --version`; a tiny synthetic
model written with gguf, loaded and generating; `pyllama-server` started on 127.0.0.1 with it,
/health, one chat request, then the web UI as a browser loads it (no node on PATH): `/` gzipped,
the bundle it names, /props' ui, and the "listening on http://..." line. --ngl 99 offloads to a GPU (on a machine with one and a GPU
backend package installed). Standard library only, apart from what the checks install.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

# What writing the tiny model needs; installed into the fresh venv next to the wheel.
MODEL_WRITER = ["gguf>=0.17", "numpy"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: dict | None = None, timeout: float = 60.0):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _get_gzip(url: str) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.status, dict(resp.headers), resp.read()


def _check_ui(base: str) -> None:
    """The page at / and the hashed bundle it loads, gzipped as llama-server sends them."""
    import gzip
    import re

    status, headers, body = _get_gzip(base + "/")
    assert status == 200 and headers.get("Content-Encoding") == "gzip", (status, headers)
    page = gzip.decompress(body).decode()
    assert "<html" in page, page[:200]
    scripts = re.findall(r'(_app/immutable/bundle\.[A-Za-z0-9_-]+\.js)', page)
    assert scripts, "index.html names no _app/immutable/bundle.*.js"
    status, headers, body = _get_gzip(f"{base}/{scripts[0]}")
    assert status == 200 and "immutable" in headers.get("Cache-Control", ""), (status, headers)
    size = len(gzip.decompress(body))
    status, props = _http("GET", f"{base}/props")
    assert status == 200 and props["ui"] is True, props
    print(f"smoke: web UI / and {scripts[0]} ({size / 1e6:.1f} MB) served gzipped")


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise SystemExit(f"smoke: FAIL console script {name} is not installed next to {sys.executable}")
    return str(path)


def run_checks(ngl: int) -> None:
    """The checks, in the interpreter that has the wheel installed."""
    work = Path(tempfile.mkdtemp(prefix="pyllama-smoke-"))
    try:
        import pyllama
        from pyllama import engine
        from pyllama.synthetic import write_synthetic_model

        print(f"smoke: pyllama {pyllama.__version__} from {Path(pyllama.__file__).parent}")
        print(f"smoke: backends {engine.list_backends()}")
        print(f"smoke: system_info {engine.system_info().strip()}")
        out = subprocess.run([_bin("pyllama-server"), "--list-devices"], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.startswith("Available devices:\n"), out
        print("smoke: --list-devices\n" + out.stdout.rstrip())
        out = subprocess.run([_bin("llama-server"), "--version"], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and "pyllama" in (out.stdout + out.stderr), out

        model_path = write_synthetic_model(work / "tiny.gguf")
        model = engine.Model(model_path, n_gpu_layers=ngl)
        ctx = engine.Context(model, n_ctx=128)
        tokens = list(ctx.generate(model.tokenize("Hello"), engine.SamplerChain.greedy(model),
                                   max_tokens=8, stop_at_eog=False))
        assert len(tokens) == 8, tokens
        ctx.close()
        model.close()
        print(f"smoke: generated {len(tokens)} tokens in-process")

        port = _free_port()
        log = open(work / "server.log", "w+")
        server = subprocess.Popen(
            [_bin("pyllama-server"), "-m", str(model_path), "--host", "127.0.0.1", "--port",
             str(port), "-c", "512", "-np", "1", "-ngl", str(ngl)],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    status, _ = _http("GET", f"{base}/health", timeout=5)
                    if status == 200:
                        break
                except (OSError, ValueError):
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise SystemExit(f"smoke: FAIL server did not become healthy:\n{log.read()[-3000:]}")
                time.sleep(0.3)
            status, reply = _http("POST", f"{base}/v1/chat/completions", {
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})
            assert status == 200, (status, reply)
            choice = reply["choices"][0]
            assert choice["message"]["role"] == "assistant" and reply["usage"]["completion_tokens"] > 0
            print(f"smoke: chat reply finish_reason={choice['finish_reason']} "
                  f"usage={reply['usage']}")
            _check_ui(base)
            log.seek(0)
            assert f"listening on {base}" in log.read(), "no 'listening on URL' line in the log"
        finally:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
        print("smoke: ok")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _no_network_prefix() -> list[str]:
    """A command prefix that runs without network (loopback only), if this kernel allows it."""
    unshare = shutil.which("unshare")
    ip = shutil.which("ip") or "/sbin/ip"
    if not unshare or not os.path.exists(ip):
        return []
    probe = subprocess.run([unshare, "-n", ip, "link", "set", "lo", "up"], capture_output=True)
    if probe.returncode != 0:
        return []
    return [unshare, "-n", "sh", "-c", f'{ip} link set lo up && exec "$0" "$@"']


def run_in_fresh_venv(wheel: str, ngl: int) -> int:
    with tempfile.TemporaryDirectory(prefix="pyllama-smoke-venv-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        py = venv / "bin" / "python"
        subprocess.run([py, "-m", "pip", "install", "-q", wheel, *MODEL_WRITER], check=True)
        # No compiler, no cmake: PATH holds the venv's scripts and a folder with only `sh`.
        tools = Path(tmp) / "tools"
        tools.mkdir()
        os.symlink(shutil.which("sh") or "/bin/sh", tools / "sh")
        env = {"PATH": f"{venv / 'bin'}:{tools}", "HOME": tmp, "LANG": "C.UTF-8"}
        for tool in ("cc", "gcc", "c++", "cmake", "nvcc"):
            assert shutil.which(tool, path=env["PATH"]) is None, tool
        prefix = _no_network_prefix()
        print(f"smoke: fresh venv {venv}; network: {'none (unshare -n)' if prefix else 'not isolated'}")
        cmd = prefix + [str(py), "-P", str(Path(__file__).resolve()), "--ngl", str(ngl)]
        return subprocess.run(cmd, env=env, cwd=tmp).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", help="install this wheel into a fresh venv and test it there")
    parser.add_argument("--ngl", type=int, default=0, help="layers to offload (99: all, on a GPU)")
    args = parser.parse_args()
    if args.wheel:
        return run_in_fresh_venv(args.wheel, args.ngl)
    run_checks(args.ngl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
