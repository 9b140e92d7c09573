"""Model downloads on a real pyllama-server process: -hf, -mu, --offline, -cl, a preset flag.

The hub is tests/hub_standin.py on 127.0.0.1 (HF_ENDPOINT), serving synthetic GGUF models; the
cache is a temporary LLAMA_CACHE per test. A failed download ends the process with a non-zero
status before gunicorn starts, and leaves nothing but a resumable partial file behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import server_process
from hub_standin import HubStandIn

from . import conftest as server_conftest
from .conftest import ServerProcess

SCRIPT = Path(sys.executable).parent / "pyllama-server"
ARGS = ["-np", "1", "-c", "512"]


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    from pyllama.synthetic import SyntheticSpec, write_synthetic_model

    folder = tmp_path_factory.mktemp("ggufs")
    out = {q: write_synthetic_model(folder / f"{q}.gguf", SyntheticSpec(seed=i)).read_bytes()
           for i, q in enumerate(("Q8_0", "Q4_K_M", "F16"))}
    # more than one of huggingface_hub's 10 MiB download chunks, to resume from a partial file
    out["big"] = write_synthetic_model(folder / "big.gguf", SyntheticSpec(n_embd=256, n_layer=4, n_ff=1024)
                                       ).read_bytes()
    return out


@pytest.fixture
def hub(monkeypatch, tmp_path, ggufs):
    for var in ("HF_TOKEN", "MODEL_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    with HubStandIn() as standin:
        # what every process of the test sees (ServerProcess passes os.environ on)
        monkeypatch.setenv("LLAMA_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("HF_ENDPOINT", standin.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # huggingface_hub's own files
        # the stand-in's projector is not a real one: --no-mmproj, but where a test says otherwise
        monkeypatch.setenv("LLAMA_ARG_MMPROJ_AUTO", "0")
        standin.add_repo("user/tiny", {f"tiny-{q}.gguf": ggufs[q] for q in ("Q8_0", "Q4_K_M", "F16")}
                         | {"mmproj-tiny-F16.gguf": b"projector", "README.md": b"# tiny\n"})
        standin.cache = tmp_path / "cache"
        yield standin


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """pyllama-server for a run that ends by itself (an error, -cl)."""
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def serve(args: list[str]) -> tuple[dict, dict, str, str]:
    """Start, complete a prompt, read /props and /v1/models, stop; and the process output."""
    srv = ServerProcess([*args, *ARGS])
    try:
        srv.wait_ready()
        # ignore_eos: a random-weight model may sample its end of generation early
        done = httpx.post(srv.base + "/completion", json={"prompt": "Hello", "n_predict": 4, "ignore_eos": True},
                          timeout=60)
        assert done.status_code == 200 and done.json()["tokens_predicted"] == 4
        props = httpx.get(srv.base + "/props").json()
        models = httpx.get(srv.base + "/v1/models").json()
    finally:
        srv.stop()
    return props, models, done.json()["content"], srv.proc.stdout.read().decode(errors="replace")


def snapshot(hub, repo: str, name: str) -> Path:
    return hub.cache / f"models--{repo.replace('/', '--')}" / "snapshots" / hub.repos[repo].commit / name


def test_hf_downloads_once_then_serves_from_the_cache(hub, ggufs, monkeypatch):
    token = "hf_" + "a" * 34
    monkeypatch.setenv("HF_TOKEN", token)  # -hft's variable, as upstream
    props, models, _, out = serve(["-hf", "user/tiny"])
    path = snapshot(hub, "user/tiny", "tiny-Q4_K_M.gguf")  # Q4_K_M by default
    sha = hashlib.sha256(ggufs["Q4_K_M"]).hexdigest()
    assert os.readlink(path) == f"../../blobs/{sha}" and path.read_bytes() == ggufs["Q4_K_M"]
    # as upstream: the repo is the model's name, the snapshot file its path
    assert (props["model_alias"], props["model_path"]) == ("user/tiny", str(path))
    assert (models["data"][0]["id"], models["data"][0]["aliases"]) == ("user/tiny", ["user/tiny"])
    assert "mmproj-tiny-F16.gguf): not downloaded" in out
    assert all(r.headers.get("authorization") == f"Bearer {token}" for r in hub.requests
               if r.path.startswith("/api/models/"))
    assert [r.method for r in hub.file_requests() if r.path.startswith("/cdn/")] == ["GET"]

    hub.clear()  # a second start finds the file: the listing only, no file request
    props, _, _, _ = serve(["-hf", "user/tiny"])
    assert props["model_path"] == str(path) and not hub.file_requests()
    assert any(r.path == "/api/models/user/tiny/refs" for r in hub.requests)

    hub.clear()  # --offline: the cache only, no request at all
    props, _, _, _ = serve(["-hf", "user/tiny", "--offline"])
    assert props["model_path"] == str(path) and not hub.requests

    listed = run_cli("-cl")
    assert (listed.returncode, listed.stdout) == (0, "number of models in cache: 1\n   1. user/tiny:Q4_K_M\n")


def test_hf_takes_the_repos_projector_with_mmproj_auto(hub, monkeypatch):
    # --mmproj-auto (the default): the projector beside the model is downloaded and loaded;
    # the stand-in's is a few bytes, so loading it fails, naming the downloaded file
    monkeypatch.delenv("LLAMA_ARG_MMPROJ_AUTO")
    done = run_cli("-hf", "user/tiny", "--port", "0")
    projector = snapshot(hub, "user/tiny", "mmproj-tiny-F16.gguf")
    assert projector.read_bytes() == b"projector"
    assert f"failed to load multimodal model, '{projector}'" in done.stdout + done.stderr
    # --no-mmproj, or a projector of one's own: not downloaded
    projector.unlink()
    hub.clear()
    props, _, _, out = serve(["-hf", "user/tiny", "--no-mmproj"])
    assert not projector.exists() and props["modalities"]["vision"] is False
    assert "mmproj-tiny-F16.gguf): not downloaded" in out


def test_mmproj_url_downloads_to_the_llama_cache(hub, ggufs, tmp_path):
    hub.plain["mmproj-tiny-F16.gguf"] = b"projector"
    url = f"{hub.url}/files/mmproj-tiny-F16.gguf"
    model = tmp_path / "m.gguf"
    model.write_bytes(ggufs["Q8_0"])
    done = run_cli("-m", str(model), "-mmu", url, "--port", "0")
    cached = hub.cache / "mmproj-tiny-F16.gguf"
    assert cached.read_bytes() == b"projector"
    assert f"failed to load multimodal model, '{cached}'" in done.stdout + done.stderr


def test_the_quant_tag_picks_the_file(hub, ggufs):
    props, models, _, _ = serve(["-hf", "user/tiny:q8_0"])
    assert props["model_path"] == str(snapshot(hub, "user/tiny", "tiny-Q8_0.gguf"))
    assert models["data"][0]["id"] == "user/tiny:q8_0"
    assert not snapshot(hub, "user/tiny", "tiny-Q4_K_M.gguf").exists()


def test_offline_without_the_model_fails_clearly(hub):
    done = run_cli("-hf", "user/tiny", "--offline")
    assert done.returncode == 1
    assert "pyllama-server: error: user/tiny is not in the cache" in done.stderr
    assert "--offline forbids downloading it" in done.stderr and not hub.requests


def test_unknown_repos_files_and_quants_fail_clearly(hub):
    done = run_cli("-hf", "user/nothing")
    assert done.returncode == 1 and "cannot get user/nothing: repository not found" in done.stderr
    done = run_cli("-hf", "user/tiny", "-hff", "tiny-Q2_K.gguf")
    assert done.returncode == 1
    assert "file 'tiny-Q2_K.gguf' not found in repository user/tiny (available GGUF files: " in done.stderr
    assert "tiny-Q8_0.gguf" in done.stderr
    done = run_cli("-hf", "user/tiny:Q5_K_M")
    assert done.returncode == 1 and "no GGUF file for quant Q5_K_M found in repository user/tiny" in done.stderr
    done = run_cli("-hf", "not-a-repo")
    assert done.returncode == 1 and "expected <user>/<model>[:quant]" in done.stderr
    assert not list(hub.cache.rglob("*.gguf")) and not hub.file_requests()


def test_a_corrupt_download_is_refused_and_removed(hub):
    hub.corrupt.add("tiny-Q4_K_M.gguf")  # one byte flipped: the sha256 no longer matches
    done = run_cli("-hf", "user/tiny")
    assert done.returncode == 1
    assert re.search(r"download of \S+ is corrupt: its sha256 is [0-9a-f]{64}, the hub says [0-9a-f]{64}; "
                     r"the file was deleted", done.stderr), done.stderr
    repo = hub.cache / "models--user--tiny"  # refs/main only: no blob, no snapshot, no partial file
    assert [p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file() or p.is_symlink()] == ["refs/main"]


def test_an_interrupted_download_resumes_on_the_next_start(hub, ggufs):
    big = ggufs["big"]
    hub.add_repo("user/big", {"big-Q4_K_M.gguf": big})
    cut = len(big) * 3 // 4
    hub.cut["big-Q4_K_M.gguf"] = (cut, -1)  # every GET stops there: the retries run out
    done = run_cli("-hf", "user/big")
    assert done.returncode == 1 and "download of " in done.stderr and "run again to resume" in done.stderr
    sha = hashlib.sha256(big).hexdigest()
    blobs = hub.cache / "models--user--big" / "blobs"
    partial = blobs / f"{sha}.downloadInProgress"
    kept = partial.stat().st_size
    assert 0 < kept <= cut and partial.read_bytes() == big[:kept]
    assert not (blobs / sha).exists() and not snapshot(hub, "user/big", "big-Q4_K_M.gguf").exists()

    hub.cut.clear()
    hub.clear()
    props, _, _, _ = serve(["-hf", "user/big"])
    assert props["model_path"] == str(snapshot(hub, "user/big", "big-Q4_K_M.gguf"))
    assert [r.headers.get("range") for r in hub.file_requests() if r.path.startswith("/cdn/")] == [f"bytes={kept}-"]
    assert (blobs / sha).read_bytes() == big and not partial.exists()


def test_a_model_url_downloads_to_the_llama_cache(hub, ggufs):
    hub.plain["plain-Q4_K_M.gguf"] = ggufs["Q4_K_M"]
    url = f"{hub.url}/files/plain-Q4_K_M.gguf"
    props, models, _, _ = serve(["-mu", url])
    path = hub.cache / "plain-Q4_K_M.gguf"  # LLAMA_CACHE/<the URL's file name>, as upstream
    assert path.read_bytes() == ggufs["Q4_K_M"] and (hub.cache / "plain-Q4_K_M.gguf.etag").read_text()
    assert props["model_path"] == str(path) and props["model_alias"] == str(path)
    assert models["data"][0]["id"] == str(path)
    hub.clear()  # the same ETag: a HEAD, no download
    serve(["-mu", url])
    assert [r.method for r in hub.file_requests()] == ["HEAD"]
    hub.clear()
    serve(["-mu", url, "--offline"])
    assert not hub.requests


def test_a_preset_downloads_its_model_and_its_draft(hub, ggufs, monkeypatch):
    hub.add_repo("ggml-org/Qwen2.5-Coder-7B-Q8_0-GGUF", {"qwen2.5-coder-7b-q8_0.gguf": ggufs["Q8_0"]})
    hub.add_repo("ggml-org/Qwen2.5-Coder-0.5B-Q8_0-GGUF", {"qwen2.5-coder-0.5b-q8_0.gguf": ggufs["Q8_0"]})
    port = server_conftest.free_port()
    monkeypatch.setattr(server_process, "free_port", lambda: port)  # ServerProcess's own
    # the preset sets --port 8012 where it stands: a --port after it wins, as upstream
    props, _, _, out = serve(["--fim-qwen-7b-spec", "--port", str(port)])
    assert props["model_alias"] == "ggml-org/Qwen2.5-Coder-7B-Q8_0-GGUF"
    assert props["model_path"].endswith("/qwen2.5-coder-7b-q8_0.gguf")
    assert "not applied" not in out  # the preset's cache_reuse = 256 and its draft apply
    # -hfd with -md as its file, as upstream's preset sets the draft's mparams (no --spec-type:
    # it is not loaded, as upstream frees it when no speculative type asks for it)
    assert any("0.5B" in r.path for r in hub.requests)


def test_gunicorn_directly_downloads_once_in_the_master(hub, tmp_path):
    port = server_conftest.free_port()
    env = {**os.environ, "PYLLAMA_ARGS": f"-hf user/tiny:F16 {' '.join(ARGS)} --port {port}"}
    gunicorn = str(SCRIPT.parent / "gunicorn")
    proc = subprocess.Popen([gunicorn, "-c", "python:pyllama.server.wsgi", "pyllama.server.wsgi:create_app()"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        srv = ServerProcess.__new__(ServerProcess)  # wait_ready on gunicorn's process
        srv.proc, srv.base = proc, f"http://127.0.0.1:{port}"
        srv.wait_ready()
        props = httpx.get(srv.base + "/props").json()
        assert (props["model_alias"], props["model_path"]) == (
            "user/tiny:F16", str(snapshot(hub, "user/tiny", "tiny-F16.gguf")))
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    assert len([r for r in hub.file_requests() if r.path.startswith("/cdn/")]) == 1

    done = subprocess.run([gunicorn, "-c", "python:pyllama.server.wsgi", "pyllama.server.wsgi:create_app()"],
                          env={**env, "PYLLAMA_ARGS": "-hf user/nothing --offline"}, capture_output=True,
                          text=True, cwd=tmp_path, timeout=60)
    assert done.returncode != 0 and "pyllama: error: user/nothing is not in the cache" in done.stderr
