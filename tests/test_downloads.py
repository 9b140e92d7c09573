"""pyllama/downloads.py in-process: upstream's cache layout, names and file choice, presets.

The hub is tests/hub_standin.py on 127.0.0.1; the cache a temporary LLAMA_CACHE. The same
paths are checked against huggingface_hub's own client, so a model either one downloads is
found by the other (llama-server shares the layout: common/hf-cache.cpp).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hub_standin import HubStandIn

from pyllama import downloads
from pyllama.downloads import HubFile, find_best_model, gguf_name, split_files, split_repo_tag, url_parts
from pyllama.errors import ModelDownloadError
from pyllama.flags import parse_server_args
from pyllama.presets import PRESETS

ARG_CPP = Path(__file__).resolve().parents[1] / "vendor" / "llama.cpp" / "common" / "arg.cpp"
ENV = ("LLAMA_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "MODEL_ENDPOINT",
       "HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE")


@pytest.fixture
def env(monkeypatch, tmp_path):
    from huggingface_hub import constants

    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)  # read once, at its import
    return monkeypatch


@pytest.fixture
def cache(env, tmp_path):
    env.setenv("LLAMA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    from pyllama.synthetic import SyntheticSpec, write_synthetic_model

    folder = tmp_path_factory.mktemp("ggufs")
    return {q: write_synthetic_model(folder / f"{q}.gguf", SyntheticSpec(seed=i)).read_bytes()
            for i, q in enumerate(("Q8_0", "Q4_K_M", "F16"))}


@pytest.fixture(scope="module")
def big_gguf(tmp_path_factory):
    """A 16 MB model: more than one of huggingface_hub's 10 MiB download chunks."""
    from pyllama.synthetic import SyntheticSpec, write_synthetic_model

    spec = SyntheticSpec(n_embd=256, n_layer=4, n_ff=1024)
    return write_synthetic_model(tmp_path_factory.mktemp("big") / "big.gguf", spec).read_bytes()


@pytest.fixture
def hub(cache, env, ggufs):
    with HubStandIn() as standin:
        env.setenv("HF_ENDPOINT", standin.url)
        standin.add_repo("user/tiny", {f"tiny-{q}.gguf": data for q, data in ggufs.items()}
                         | {"mmproj-tiny-F16.gguf": b"projector", "README.md": b"# tiny\n"})
        yield standin


# --- where ---------------------------------------------------------------------------------
def _hub_client_cache(environ: dict) -> str:
    code = "from huggingface_hub import constants; print(constants.HF_HUB_CACHE)"
    return subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_hub_cache_is_found_in_upstreams_order(env, tmp_path):
    home = tmp_path / "home"
    steps = [(None, None, home / ".cache/huggingface/hub"),
             ("XDG_CACHE_HOME", tmp_path / "xdg", tmp_path / "xdg/huggingface/hub"),
             ("HF_HOME", tmp_path / "hfhome", tmp_path / "hfhome/hub"),
             ("HUGGINGFACE_HUB_CACHE", tmp_path / "old", tmp_path / "old"),
             ("HF_HUB_CACHE", tmp_path / "hub", tmp_path / "hub")]
    for var, value, expected in steps:  # each variable beats the ones set before it
        if var:
            env.setenv(var, str(value))
        assert downloads.hf_cache_dir() == expected
        # ... and it is where huggingface_hub itself looks, so their caches are one
        assert Path(_hub_client_cache(dict(os.environ))) == expected
    env.setenv("LLAMA_CACHE", str(tmp_path / "llama"))
    assert downloads.hf_cache_dir() == tmp_path / "llama"


@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="the XDG layout")
def test_the_llama_cache_is_upstreams(env, tmp_path):
    assert downloads.llama_cache_dir() == tmp_path / "home/.cache/llama.cpp"
    env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert downloads.llama_cache_dir() == tmp_path / "xdg/llama.cpp"
    env.setenv("LLAMA_CACHE", str(tmp_path / "llama"))
    assert downloads.llama_cache_dir() == tmp_path / "llama"


def test_model_endpoint_beats_hf_endpoint(env):
    assert downloads.model_endpoint() == "https://huggingface.co"
    env.setenv("HF_ENDPOINT", "http://mirror.example/")
    assert downloads.model_endpoint() == "http://mirror.example"
    env.setenv("MODEL_ENDPOINT", "http://models.example")
    assert downloads.model_endpoint() == "http://models.example"


# --- names ---------------------------------------------------------------------------------
def test_repo_and_quant_names():
    assert split_repo_tag("ggml-org/GLM-4.7-Flash-GGUF:Q4_K_M") == ("ggml-org/GLM-4.7-Flash-GGUF", "Q4_K_M")
    assert split_repo_tag("user/model") == ("user/model", "")
    assert split_repo_tag("user/model:a:q8_0") == ("user/model", "q8_0")  # the last part, as upstream
    for bad in ("model", "a/b/c", "user/", "user/-model", "us er/model"):
        with pytest.raises(ModelDownloadError, match="expected <user>/<model>"):
            split_repo_tag(bad)
    assert gguf_name("dir/Model-7B-Q4_K_M-00001-of-00003.gguf") == downloads.GgufName(
        "dir/Model-7B-Q4_K_M", "Q4_K_M", 1, 3)
    assert gguf_name("qwen2.5-coder-7b-q8_0.gguf").tag == "Q8_0"
    assert gguf_name("README.md").index == 0
    assert url_parts("http://x/m-00001-of-00002.gguf") == ["http://x/m-00001-of-00002.gguf",
                                                           "http://x/m-00002-of-00002.gguf"]
    assert url_parts("http://x/m.gguf?download=1") == ["http://x/m.gguf?download=1"]
    assert downloads.default_local_path("http://x/a/m.gguf?download=1#top").name == "m.gguf"


def _files(*paths):
    return [HubFile("u/m", p) for p in paths]


def test_the_quant_tag_picks_the_file_as_upstream():
    files = _files("README.md", "m-Q8_0.gguf", "mmproj-m-F16.gguf", "m-Q4_K_M.gguf", "m-F16.gguf")
    assert find_best_model(files, "").path == "m-Q4_K_M.gguf"  # Q4_K_M by default
    assert find_best_model(files, "q8_0").path == "m-Q8_0.gguf"  # case-insensitive
    assert find_best_model(files, "F16").path == "m-F16.gguf"  # never the projector
    assert find_best_model(files, "Q5_K_M") is None
    assert find_best_model(_files("m-F16.gguf", "m-Q8_0.gguf"), "").path == "m-Q8_0.gguf"  # then Q8_0
    assert find_best_model(_files("m-BF16.gguf", "m-F16.gguf"), "").path == "m-BF16.gguf"  # then the first
    split = _files("Q4_K_M/m-Q4_K_M-00002-of-00002.gguf", "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf", "m-Q8_0.gguf")
    primary = find_best_model(split, "")
    assert primary.path == "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf"
    assert [f.path for f in split_files(split, primary)] == [split[0].path, split[1].path]


# --- the hub cache -------------------------------------------------------------------------
def test_a_download_lands_in_the_hub_layout(hub, cache, ggufs):
    path = Path(downloads.resolve_hf("user/tiny"))
    repo = cache / "models--user--tiny"
    commit = hub.repos["user/tiny"].commit
    sha = hashlib.sha256(ggufs["Q4_K_M"]).hexdigest()
    assert path == repo / "snapshots" / commit / "tiny-Q4_K_M.gguf"
    assert os.readlink(path) == f"../../blobs/{sha}"  # a relative link, as hf_cache::finalize_file
    assert (repo / "blobs" / sha).read_bytes() == ggufs["Q4_K_M"]
    assert (repo / "refs" / "main").read_text() == commit
    assert not list(repo.rglob("*.downloadInProgress"))
    assert not (repo / "snapshots" / commit / "mmproj-tiny-F16.gguf").exists()  # no multimodal input
    # the hub API first (refs, then the tree at that commit), then the file at the commit
    paths = [r.path for r in hub.requests if not r.path.startswith("/api/agent")]
    assert paths[:2] == ["/api/models/user/tiny/refs", f"/api/models/user/tiny/tree/{commit}?recursive=true"
                         "&expand=false"]
    assert [r.path.split("/")[1] for r in hub.file_requests()] == ["user", "cdn"]
    hub.clear()
    assert Path(downloads.resolve_hf("user/tiny")) == path
    assert not hub.file_requests()  # cached: the listing only
    hub.clear()
    assert Path(downloads.resolve_hf("user/tiny", offline=True)) == path
    assert not hub.requests  # offline: nothing at all


def test_the_cache_is_shared_with_huggingface_hub(hub, cache):
    from huggingface_hub import hf_hub_download

    theirs = hf_hub_download("user/tiny", "tiny-Q8_0.gguf", cache_dir=cache, endpoint=hub.url, token=False)
    hub.clear()
    assert downloads.resolve_hf("user/tiny:Q8_0", offline=True) == theirs
    ours = downloads.resolve_hf("user/tiny:F16")
    assert hf_hub_download("user/tiny", "tiny-F16.gguf", cache_dir=cache, local_files_only=True) == ours
    assert sorted(downloads.cached_models()) == [("user/tiny", "F16"), ("user/tiny", "Q8_0")]


def test_the_cache_list_is_upstreams(cache):
    snap = cache / "models--org--Big-GGUF" / "snapshots" / ("a" * 40)
    (snap / "Q4_K_M").mkdir(parents=True)
    for name in ("Q4_K_M/big-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/big-Q4_K_M-00002-of-00002.gguf",
                 "mmproj-big-f16.gguf", "big-q8_0.gguf", "README.md"):
        (snap / name).write_bytes(b"x")
    (cache / "models--org--Big-GGUF" / "refs").mkdir()
    (cache / "models--org--Big-GGUF" / "refs" / "main").write_text("a" * 40)
    (cache / "models--org--nosnapshot" / "blobs").mkdir(parents=True)
    assert sorted(downloads.cached_models()) == [("org/Big-GGUF", "Q4_K_M"), ("org/Big-GGUF", "Q8_0")]
    text = downloads.format_cache_list()
    assert text.splitlines()[0] == "number of models in cache: 2"
    assert re.fullmatch(r"   1\. org/Big-GGUF:(Q4_K_M|Q8_0)", text.splitlines()[1])


def test_a_dropped_connection_resumes_within_the_run(hub, cache, big_gguf):
    hub.add_repo("user/big", {"big-Q4_K_M.gguf": big_gguf})
    cut = len(big_gguf) * 3 // 4
    hub.cut["big-Q4_K_M.gguf"] = (cut, 1)  # the first GET stops three quarters in
    path = Path(downloads.resolve_hf("user/big"))
    assert path.read_bytes() == big_gguf
    ranges = [r.headers.get("range") for r in hub.file_requests() if r.path.startswith("/cdn/")]
    # huggingface_hub's http_get writes 10 MiB chunks: the retry asks for what reached the disk
    assert ranges[0] is None and len(ranges) == 2, ranges
    assert 0 < int(re.fullmatch(r"bytes=(\d+)-", ranges[1]).group(1)) <= cut


def test_a_changed_url_is_downloaded_again(hub, cache, ggufs):
    hub.plain["m.gguf"] = ggufs["Q8_0"]
    hub.etags["m.gguf"] = '"v1"'
    url = f"{hub.url}/files/m.gguf"
    path = Path(downloads.resolve_url(url))
    assert path == cache / "m.gguf" and path.read_bytes() == ggufs["Q8_0"]
    assert (cache / "m.gguf.etag").read_text() == '"v1"'  # upstream's etag file, the header as sent
    hub.clear()
    downloads.resolve_url(url)
    assert [r.method for r in hub.file_requests()] == ["HEAD"]
    hub.plain["m.gguf"], hub.etags["m.gguf"] = ggufs["F16"], '"v2"'
    downloads.resolve_url(url)
    assert path.read_bytes() == ggufs["F16"] and (cache / "m.gguf.etag").read_text() == '"v2"'
    with pytest.raises(ModelDownloadError, match="not available in cache"):
        downloads.resolve_url(f"{hub.url}/files/other.gguf", offline=True)


def test_docker_models_come_from_the_registry(hub, cache, ggufs, monkeypatch):
    monkeypatch.setattr(downloads, "DOCKER_AUTH_URL", hub.url + "/token")
    monkeypatch.setattr(downloads, "DOCKER_REGISTRY_URL", hub.url)
    hub.docker[("ai/tiny", "latest")] = ggufs["Q4_K_M"]
    hub.docker[("me/tiny", "Q8_0")] = ggufs["Q8_0"]
    hub.token = "registry-token"
    path = Path(downloads.resolve_docker("tiny"))  # ai/ and :latest by default
    assert path == cache / "ai_tiny_latest.gguf" and path.read_bytes() == ggufs["Q4_K_M"]
    assert any("scope=repository:ai/tiny:pull" in r.path for r in hub.requests)
    assert Path(downloads.resolve_docker("me/tiny:Q8_0")) == cache / "me_tiny_Q8_0.gguf"
    hub.clear()
    assert Path(downloads.resolve_docker("tiny", offline=True)) == path and not hub.requests
    with pytest.raises(ModelDownloadError, match="manifest"):
        downloads.resolve_docker("nothing")


# --- start-up: presets, names --------------------------------------------------------------
def _upstream_presets() -> dict:
    text = ARG_CPP.read_text()
    out = {}
    for m in re.finditer(r'\{"(--[\w.-]+-(?:default|spec))"\}(.*?)\.set_examples', text, re.S):
        body = m.group(2)
        out[m.group(1)] = {k: v for k, v in (
            ("hf_repo", re.search(r'params\.model\.hf_repo = "([^"]+)"', body)),
            ("hf_file", re.search(r'params\.model\.hf_file = "([^"]+)"', body)),
            ("port", re.search(r"params\.port = (\d+)", body))) if v}
    return out


def test_presets_are_upstreams():
    upstream = _upstream_presets()
    assert sorted(upstream) == sorted(PRESETS)
    for flag, found in upstream.items():
        values = PRESETS[flag].values
        assert values.get("hf_repo") == (found["hf_repo"].group(1) if "hf_repo" in found else None), flag
        assert values.get("hf_file") == (found["hf_file"].group(1) if "hf_file" in found else None), flag
        assert values.get("port") == (int(found["port"].group(1)) if "port" in found else None), flag


def test_a_preset_applies_where_it_stands():
    s = parse_server_args(["--fim-qwen-7b-default"], environ={"LLAMA_ARG_PORT": "9001"})
    assert (s.hf_repo, s.hf_file, s.port, s.batch_size, s.ubatch_size, s.ctx_size, s.cache_reuse) == (
        "ggml-org/Qwen2.5-Coder-7B-Q8_0-GGUF", "qwen2.5-coder-7b-q8_0.gguf", 8012, 1024, 1024, 0, 256)
    assert parse_server_args(["--port", "9000", "--fim-qwen-7b-default"], environ={}).port == 8012
    assert parse_server_args(["--fim-qwen-7b-default", "--port", "9000"], environ={}).port == 9000
    s = parse_server_args(["--gpt-oss-20b-default"], environ={})
    assert (s.temp, s.top_p, s.top_k, s.min_p, s.jinja, s.parallel, s.ctx_size, s.batch_size) == (
        1.0, 1.0, 0, 0.01, True, 2, 262144, 32768)
    s = parse_server_args(["--embd-gemma-default"], environ={})
    assert (s.embedding, s.parallel, s.ctx_size, s.port) == (True, 32, 65536, 8011)
    s = parse_server_args(["--spec-default"], environ={})
    assert s.spec_default is True and s.spec_type == ("ngram-mod",)
    assert (s.spec_ngram_mod_n_match, s.spec_ngram_mod_n_min, s.spec_ngram_mod_n_max) == (24, 48, 64)


def test_start_up_names_the_model_as_upstream_and_fetches_a_presets_draft(hub, caplog):
    hub.add_repo("ggml-org/Qwen2.5-Coder-7B-Q8_0-GGUF", {"qwen2.5-coder-7b-q8_0.gguf": b"GGUF-ish",
                                                          "README.md": b"x"})
    hub.repos["ggml-org/Qwen2.5-Coder-7B-Q8_0-GGUF"].lfs.clear()  # a small non-LFS file: the git oid
    hub.add_repo("ggml-org/Qwen2.5-Coder-0.5B-Q8_0-GGUF", {"qwen2.5-coder-0.5b-q8_0.gguf": b"GGUF-draft"})
    hub.repos["ggml-org/Qwen2.5-Coder-0.5B-Q8_0-GGUF"].lfs.clear()
    caplog.set_level(logging.INFO, "pyllama.downloads")
    s = downloads.prepare_model(parse_server_args(["--fim-qwen-7b-spec"], environ={}))
    assert s.model.endswith("/qwen2.5-coder-7b-q8_0.gguf") and Path(s.model).read_bytes() == b"GGUF-ish"
    assert (s.alias, s.hf_repo) == ("ggml-org/Qwen2.5-Coder-7B-Q8_0-GGUF", "")  # /props model_alias
    # -hfd with -md as its file, as the preset sets draft.mparams upstream
    assert s.spec_draft_model.endswith("/qwen2.5-coder-0.5b-q8_0.gguf") and s.spec_draft_hf == ""
    assert Path(s.spec_draft_model).read_bytes() == b"GGUF-draft"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert not any("not applied" in w for w in warned), warned
    assert downloads.prepare_model(s) == s  # once resolved, nothing more to do
    s = downloads.prepare_model(parse_server_args(["-hf", "user/tiny:Q8_0", "-a", "mine"], environ={}))
    assert s.alias == "mine" and s.model.endswith("tiny-Q8_0.gguf")
    caplog.clear()
    s = downloads.prepare_model(parse_server_args(["--spec-default", "-m", "x.gguf"], environ={}))
    assert s.model == "x.gguf" and s.spec_type == ("ngram-mod",) and "not applied" not in caplog.text
