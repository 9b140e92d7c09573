"""Router mode: a real router process, real child servers, two tiny synthetic models.

The router is started as llama-server's router is (no -m, with --models-dir / --models-preset),
and every check goes over HTTP; children are found through the OS (/proc) by the port the
router lists for them. The presets' parsing and rendering are checked directly too.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from .conftest import ServerProcess
from .router_client import WAIT, ModelEvents, child_port as _port, models as _models, \
    wait_for_models as _wait_for

pytestmark = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds children in /proc")


# --- helpers ------------------------------------------------------------------------------
def _cmdline(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _pids() -> list:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _child_pids(port: int) -> list:
    """The processes of the child listening on `port`: gunicorn's arbiter first, its worker."""
    found = []
    for pid in _pids():
        cmd = _cmdline(pid)
        if "--port" in cmd and cmd.index("--port") + 1 < len(cmd) and cmd[cmd.index("--port") + 1] == str(port):
            found.append(pid)
    return sorted(found, key=lambda p: _ppid(p) in found)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _status(models: dict, name: str) -> str:
    return models[name]["status"]["value"]


def _chat(srv, model: str, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
            "temperature": 0, **extra}
    return httpx.post(srv.base + "/v1/chat/completions", json=body, timeout=WAIT)


# --- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from pyllama.synthetic import SyntheticSpec, write_synthetic_model

    folder = tmp_path_factory.mktemp("router-models")
    write_synthetic_model(folder / "alpha.gguf", SyntheticSpec(name="alpha", seed=11))
    write_synthetic_model(folder / "beta.gguf", SyntheticSpec(name="beta", seed=22))
    (folder / "broken.gguf").write_bytes(b"GGUF but not really a model")
    (folder / "mmproj-alpha.gguf").write_bytes(b"a companion file, never a model")  # skipped
    (folder / "notes.txt").write_text("not a model")
    return folder


@pytest.fixture(scope="module")
def router_env(tmp_path_factory):
    # an empty model cache: the router lists the cache's models too
    return {"LLAMA_CACHE": str(tmp_path_factory.mktemp("router-cache"))}


@pytest.fixture(scope="module")
def router(models_dir, router_env):
    srv = ServerProcess(["--models-dir", str(models_dir), "-c", "256", "-np", "1", "--no-warmup"], env=router_env)
    srv.wait_ready()
    yield srv
    srv.stop()


# --- one router, autoload on ----------------------------------------------------------------
def test_router_lists_the_models_dir(router, models_dir):
    models = _models(router)
    assert sorted(models) == ["alpha", "beta", "broken"]  # no mmproj, no .txt
    alpha = models["alpha"]
    assert alpha["object"] == "model" and alpha["owned_by"] == "llamacpp" and alpha["source"] == "models_dir"
    assert alpha["can_remove"] is False and alpha["aliases"] == [] and alpha["tags"] == []
    assert alpha["architecture"] == {"input_modalities": ["text"], "output_modalities": ["text"]}
    status = alpha["status"]
    assert status["value"] == "unloaded" and "failed" not in status
    args = status["args"]
    # the router's own flags, then the model's, rendered as upstream's to_args: by first name
    assert args[1:] == ["--host", "127.0.0.1", "--port", "0", "--no-warmup", "--alias", "alpha", "--ctx-size",
                        "256", "--model", str(models_dir / "alpha.gguf"), "--parallel", "1"]
    assert status["preset"] == (f"[alpha]\nwarmup = 0\nctx-size = 256\nmodel = {models_dir / 'alpha.gguf'}\n"
                                "parallel = 1\n\n")
    # the same list on both routes ("created" is the time of the answer: it may cross a second between the two)
    v1, plain = (httpx.get(router.base + path).json()["data"] for path in ("/v1/models", "/models"))
    assert [{k: v for k, v in m.items() if k != "created"} for m in v1] == \
        [{k: v for k, v in m.items() if k != "created"} for m in plain]
    props = httpx.get(router.base + "/props").json()
    assert props["role"] == "router" and props["max_instances"] == 4 and props["models_autoload"] is True
    assert props["model_path"] == "none" and props["default_generation_settings"] == {"params": {}, "n_ctx": 0}
    assert httpx.get(router.base + "/health").json() == {"status": "ok"}


def test_router_process_never_loads_libllama(router):
    worker = [p for p in _pids() if _ppid(p) == router.proc.pid]
    assert worker
    for pid in [router.proc.pid, *worker]:
        with open(f"/proc/{pid}/maps") as fh:
            assert "libllama" not in fh.read()


def test_requests_name_their_model(router):
    r = httpx.post(router.base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400
    assert r.json()["error"] == {"code": 400, "message": "model name is missing from the request",
                                 "type": "invalid_request_error"}
    r = _chat(router, "nope")
    assert r.status_code == 400 and r.json()["error"]["message"] == "model 'nope' not found"
    r = httpx.get(router.base + "/props", params={"model": "nope"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "model 'nope' not found"


def test_two_models_served_at_once(router, models_dir):
    a = _chat(router, "alpha")
    assert a.status_code == 200, a.text
    assert a.json()["model"] == "alpha" and a.json()["object"] == "chat.completion"
    b = httpx.post(router.base + "/completion", json={"model": "beta", "prompt": "Hello", "n_predict": 3, "ignore_eos": True},
                   timeout=WAIT)
    assert b.status_code == 200, b.text
    assert b.json()["model"] == "beta" and b.json()["tokens_predicted"] == 3
    models = _models(router)
    assert _status(models, "alpha") == "loaded" and _status(models, "beta") == "loaded"
    assert _port(models["alpha"]) != _port(models["beta"])
    for name in ("alpha", "beta"):
        # the child's /v1/models entry is merged in, and each child serves its own file
        assert models[name]["meta"]["n_ctx"] == 256
        props = httpx.get(router.base + "/props", params={"model": name}, timeout=WAIT).json()
        assert props["model_path"] == str(models_dir / f"{name}.gguf") and props["model_alias"] == name
        tok = httpx.post(router.base + "/tokenize", json={"model": name, "content": "Hello world"}).json()
        assert tok["tokens"]
        child = httpx.get(f"http://127.0.0.1:{_port(models[name])}/props").json()  # the child itself
        assert child["model_alias"] == name


def test_streamed_chat_passes_through_event_by_event(router):
    body = {"model": "alpha", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "stream": True,
            "temperature": 0, "ignore_eos": True}
    events = []
    with httpx.stream("POST", router.base + "/v1/chat/completions", json=body, timeout=WAIT) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 6 and all(c["object"] == "chat.completion.chunk" and c["model"] == "alpha" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" or chunks[-2]["choices"][0]["finish_reason"]


def test_unload_load_and_their_events(router):
    sse = ModelEvents(router)
    try:
        _chat(router, "beta")  # running
        r = httpx.post(router.base + "/models/unload", json={"model": "beta"})
        assert r.status_code == 200 and r.json() == {"success": True}
        models = _wait_for(router, lambda m: _status(m, "beta") == "unloaded", "beta unloaded")
        assert "failed" not in models["beta"]["status"] and "meta" not in models["beta"]
        sse.wait_for(lambda e: e == {"model": "beta", "event": "status_change",
                                     "data": {"status": "unloaded", "exit_code": 0}}, "beta unloaded")
        r = httpx.post(router.base + "/models/unload", json={"model": "beta"})
        assert r.status_code == 400 and r.json()["error"]["message"] == "model is not running"
        r = httpx.post(router.base + "/models/unload", json={"model": "nope"})
        assert r.status_code == 400 and r.json()["error"]["message"] == "model is not found"
        r = httpx.post(router.base + "/models/load", json={"model": "nope"})
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"

        r = httpx.post(router.base + "/models/load", json={"model": "beta"})
        assert r.status_code == 200 and r.json() == {"success": True}
        _wait_for(router, lambda m: _status(m, "beta") == "loaded", "beta loaded")
        r = httpx.post(router.base + "/models/load", json={"model": "beta"})
        assert r.status_code == 400 and r.json()["error"]["message"] == "model is already running"
        events = sse.wait_for(lambda e: e["model"] == "beta" and e.get("data", {}).get("status") == "loaded",
                              "beta loaded")
        loading = [e for e in events if e == {"model": "beta", "event": "model_status", "data": {"status": "loading"}}]
        assert loading
        loaded = next(e for e in events if e["model"] == "beta" and e["data"]["status"] == "loaded")
        assert loaded["event"] == "status_change" and loaded["data"]["info"]["id"] == "beta"
    finally:
        sse.close()


def test_autoload_query_parameter(router):
    httpx.post(router.base + "/models/unload", json={"model": "beta"})
    _wait_for(router, lambda m: _status(m, "beta") == "unloaded", "beta unloaded")
    r = httpx.get(router.base + "/props", params={"model": "beta", "autoload": "false"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "model is not loaded"
    r = httpx.get(router.base + "/props", params={"model": "beta"}, timeout=WAIT)  # autoload by default
    assert r.status_code == 200 and r.json()["model_alias"] == "beta"


def test_a_model_that_cannot_load_is_reported_failed(router):
    r = _chat(router, "broken")
    assert r.status_code == 500
    assert r.json()["error"] == {"code": 500, "message": "model name=broken failed to load", "type": "server_error"}
    status = _models(router)["broken"]["status"]
    assert status["value"] == "unloaded" and status["failed"] is True and status["exit_code"] != 0
    assert httpx.get(router.base + "/health").status_code == 200


def test_a_killed_child_is_reported_and_restarted(router):
    assert _chat(router, "alpha").status_code == 200
    models = _models(router)
    old_port = _port(models["alpha"])
    pids = _child_pids(old_port)
    assert pids, "the child of alpha is not running"
    os.kill(pids[0], signal.SIGKILL)  # gunicorn's arbiter: the process the router started
    models = _wait_for(router, lambda m: _status(m, "alpha") == "unloaded", "alpha reported down")
    status = models["alpha"]["status"]
    assert status["failed"] is True and status["exit_code"] == 1  # killed by a signal: EXIT_FAILURE
    assert _status(models, "beta") == "loaded"  # the others, and the router, carry on
    assert httpx.get(router.base + "/health").status_code == 200
    r = _chat(router, "alpha")  # the next request starts it again
    assert r.status_code == 200, r.text
    models = _models(router)
    assert _status(models, "alpha") == "loaded" and "failed" not in models["alpha"]["status"]
    assert _port(models["alpha"]) != old_port
    deadline = time.time() + WAIT
    while any(_alive(p) for p in pids) and time.time() < deadline:  # its worker follows its arbiter
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


# --- --no-models-autoload, --models-max 1 -----------------------------------------------------
def test_no_autoload_and_models_max(models_dir, router_env):
    srv = ServerProcess(["--models-dir", str(models_dir), "--no-models-autoload", "--models-max", "1",
                         "-c", "256", "-np", "1", "--no-warmup"], env=router_env)
    child_pids = []
    try:
        srv.wait_ready()
        assert httpx.get(srv.base + "/props").json()["max_instances"] == 1
        r = _chat(srv, "alpha")
        assert r.status_code == 400 and r.json()["error"] == {
            "code": 400, "message": "model is not loaded", "type": "invalid_request_error"}
        assert httpx.post(srv.base + "/models/load", json={"model": "alpha"}).json() == {"success": True}
        models = _wait_for(srv, lambda m: _status(m, "alpha") == "loaded", "alpha loaded")
        child_pids += _child_pids(_port(models["alpha"]))
        assert _chat(srv, "alpha").status_code == 200

        # a second model with one slot: the least recently used one is stopped for it
        assert httpx.post(srv.base + "/models/load", json={"model": "beta"}, timeout=WAIT).json() == {"success": True}
        models = _wait_for(srv, lambda m: _status(m, "beta") == "loaded", "beta loaded")
        assert _status(models, "alpha") == "unloaded" and "failed" not in models["alpha"]["status"]
        child_pids += _child_pids(_port(models["beta"]))

        # ?autoload=true on one request: alpha comes back, beta makes room
        r = httpx.post(srv.base + "/v1/chat/completions?autoload=true", timeout=WAIT,
                       json={"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert r.status_code == 200, r.text
        models = _models(srv)
        assert _status(models, "alpha") == "loaded" and _status(models, "beta") == "unloaded"
        child_pids += _child_pids(_port(models["alpha"]))
    finally:
        srv.stop()
    assert srv.proc.returncode == 0
    deadline = time.time() + WAIT  # no child outlives its router
    while any(_alive(p) for p in child_pids) and time.time() < deadline:
        time.sleep(0.1)
    assert child_pids and not any(_alive(p) for p in child_pids)


# --- a child that sleeps ------------------------------------------------------------------------
def test_a_sleeping_child_is_reported_and_woken(models_dir, router_env):
    srv = ServerProcess(["--models-dir", str(models_dir), "--sleep-idle-seconds", "1", "-c", "256", "-np", "1",
                         "--no-warmup"], env=router_env)
    try:
        srv.wait_ready()
        assert _chat(srv, "alpha").status_code == 200
        models = _wait_for(srv, lambda m: _status(m, "alpha") == "sleeping", "alpha asleep")
        assert "failed" not in models["alpha"]["status"]
        r = _chat(srv, "alpha")  # a sleeping child takes the request and wakes up
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "alpha"
        _wait_for(srv, lambda m: _status(m, "alpha") in ("loaded", "sleeping"), "alpha awake")
    finally:
        srv.stop()


# --- a preset file ----------------------------------------------------------------------------
def test_preset_file(tmp_path, models_dir, router_env):
    ini = tmp_path / "models.ini"
    ini.write_text(f"""version = 1

; every model
[*]
c = 128
n-predict = 3
no-warmup = true

[gamma]
model = {models_dir / 'alpha.gguf'}   ; a comment after a value
np = 1
LLAMA_ARG_N_PREDICT = 2
load-on-startup = true
stop-timeout = 5

# a second model, with aliases and tags
[delta]
model = {models_dir / 'beta.gguf'}
alias = d1,d2
tags = small, test
""")
    srv = ServerProcess(["--models-preset", str(ini), "-c", "512"], env=router_env)
    try:
        srv.wait_ready()
        models = _wait_for(srv, lambda m: _status(m, "gamma") == "loaded", "gamma loaded on startup")
        assert sorted(models) == ["delta", "gamma"] and _status(models, "delta") == "unloaded"
        gamma, delta = models["gamma"], models["delta"]
        assert gamma["source"] == "preset" and delta["aliases"] == ["d1", "d2"] and delta["tags"] == ["small", "test"]
        # precedence: the router's command line > the model's section > [*]
        args = gamma["status"]["args"][1:]
        port = str(_port(gamma))
        assert args == ["--host", "127.0.0.1", "--port", port, "--no-warmup", "--alias", "gamma", "--ctx-size",
                        "512", "--model", str(models_dir / "alpha.gguf"), "--n-predict", "2", "--parallel", "1"]
        assert "load-on-startup = true" in gamma["status"]["preset"]  # kept, never on the command line
        assert delta["status"]["args"][1:] == [
            "--host", "127.0.0.1", "--port", "0", "--tags", "small, test", "--no-warmup", "--alias", "delta",
            "--ctx-size", "512", "--model", str(models_dir / "beta.gguf"), "--n-predict", "3"]
        props = httpx.get(srv.base + "/props", params={"model": "gamma"}).json()
        assert props["default_generation_settings"]["n_ctx"] == 512
        r = httpx.post(srv.base + "/completion", json={"model": "d2", "prompt": "Hello", "ignore_eos": True}, timeout=WAIT)  # an alias
        assert r.status_code == 200 and r.json()["tokens_predicted"] == 3
        models = _models(srv)
        assert _status(models, "delta") == "loaded"
        children = _child_pids(_port(models["gamma"])) + _child_pids(_port(models["delta"]))
        # the router killed outright, before it can stop anyone: its children see their stdin
        # close and stop too (server_child::setup), no orphans
        router_pids = [srv.proc.pid] + [p for p in _pids() if _ppid(p) == srv.proc.pid]
        for pid in router_pids:
            os.kill(pid, signal.SIGKILL)
        srv.proc.wait(30)
        deadline = time.time() + WAIT
        while any(_alive(p) for p in children) and time.time() < deadline:
            time.sleep(0.1)
        assert len(children) == 4 and not any(_alive(p) for p in children)
    finally:
        srv.stop()


def test_bad_preset_file_stops_the_router(tmp_path, router_env):
    ini = tmp_path / "bad.ini"
    ini.write_text("[m]\nno-such-option = 1\n")
    srv = ServerProcess(["--models-preset", str(ini)], env=router_env)
    assert srv.proc.wait(60) == 1
    out = srv.proc.stdout.read().decode()
    assert "option 'no-such-option' not recognized in preset 'm'" in out


# --- presets, without a server ----------------------------------------------------------------
def test_ini_grammar():
    from pyllama.server.router.preset import PresetError, parse_ini

    text = "a = 1\n[s1]\nkey = some value  ; comment\nk2=v#c\nempty =\n\n  ; indented comment\n[s1]\nk3 = x\n"
    assert parse_ini(text) == {"default": {"a": "1"}, "s1": {"k3": "x"}}  # a repeated header restarts
    assert parse_ini("[s]\nkey = some value  ; c\nk2=v#c\nempty =\r\n") == {
        "s": {"key": "some value", "k2": "v", "empty": ""}}
    with pytest.raises(PresetError):
        parse_ini("[s]\n  indented = 1\n")  # upstream's grammar has no leading blanks before a key
    with pytest.raises(PresetError):
        parse_ini("[s]\njust words\n")


def test_preset_keys_and_rendering(tmp_path):
    from pyllama.server.router import preset as p

    ini = tmp_path / "x.ini"
    ini.write_text("[*]\nLLAMA_ARG_CTX_SIZE = 64\n[org/repo:q4_k_m]\nno-mmap = true\njinja = false\n"
                   "ngl = 3\n[other:foo-q8_0]\nmmap = off\n")
    presets, global_preset = p.load_from_ini(str(ini))
    assert sorted(presets) == ["org/repo:Q4_K_M", "other:Q8_0"]  # canonical quant tags
    assert global_preset.to_args() == ["--ctx-size", "64"]
    repo = presets["org/repo:Q4_K_M"]
    assert repo.to_args(["bin"]) == ["bin", "--no-jinja", "--no-mmap", "--n-gpu-layers", "3"]
    assert presets["other:Q8_0"].to_args() == ["--no-mmap"]
    assert repo.to_ini() == "[org/repo:Q4_K_M]\njinja = false\nmmap = false\nn-gpu-layers = 3\n\n"

    base = p.load_from_args(["-c", "512", "--no_mmap", "--temp=0.5", "-m", "x.gguf", "--api-key", "k"])
    p.unset_reserved_args(base, True)
    assert base.to_args() == ["--no-mmap", "--temperature", "0.5", "--ctx-size", "512"]
    merged = p.cascade(global_preset, {"m": repo})["m"]
    merged.merge(base)
    assert merged.to_args() == ["--no-jinja", "--no-mmap", "--temperature", "0.5", "--ctx-size", "512",
                                "--n-gpu-layers", "3"]
    with pytest.raises(p.PresetError, match="does not support yet"):
        ini.write_text("[m]\ntools = all\n")
        p.load_from_ini(str(ini))


def test_router_build_info_matches_the_pin():
    from pyllama.server.router.app import LLAMA_BUILD_COMMIT, LLAMA_BUILD_NUMBER

    pin = Path(__file__).resolve().parents[2] / "vendor" / "pin.toml"
    if not pin.exists():
        pytest.skip("no source tree")
    text = pin.read_text()
    assert f'commit = "{LLAMA_BUILD_COMMIT}"' in text and f"build_number = {LLAMA_BUILD_NUMBER}" in text


def test_a_models_dir_subfolder_passes_its_projector(tmp_path):
    from pyllama.server.router import preset as p

    (tmp_path / "vlm").mkdir()
    (tmp_path / "vlm" / "vlm-Q4_K_M.gguf").write_bytes(b"model")
    (tmp_path / "vlm" / "mmproj-vlm-F16.gguf").write_bytes(b"projector")
    presets = p.load_from_models_dir(str(tmp_path))
    assert presets["vlm"].get_option("LLAMA_ARG_MMPROJ") == str(tmp_path / "vlm" / "mmproj-vlm-F16.gguf")
    assert "--mmproj" in presets["vlm"].to_args()
