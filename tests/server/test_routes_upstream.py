"""The rest of llama-server's routes and fields, checked against its code at the pin.

- unknown routes, methods a route does not take, methods cpp-httplib does not route, HEAD
  (server-http.cpp's error handler; cpp-httplib's Server::routing / parse_request_line);
- /cors-proxy and /tools with their features off, /v1/audio/transcriptions without audio;
- /props' model_ftype, media_marker and build_info, system_fingerprint;
- stream chunk fields: id_slot, timings with timings_per_token, prompt_progress on /v1/completions,
  `logprobs` standing for n_probs;
- /v1/messages: metadata.user_id, and Claude Code's billing stamp normalised for the cache;
- --log-prompts-dir; Vertex AI (AIP_MODE=PREDICTION).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest

from pyllama.engine import ProgressEvent, Timings, TokenEvent
from pyllama.server.protocol import info, vertex

from .conftest import ServerProcess, free_port
from .fake_engine import completion, fake_app, finish, parse_sse

NOT_FOUND = {"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}
DISABLED = {"error": {"message": "this feature is disabled", "type": "feature_disabled"}}
PIN = Path(__file__).resolve().parents[2] / "vendor" / "pin.toml"


@pytest.fixture
def make(synthetic_path):
    def build(script=(), **kwargs):
        return fake_app(synthetic_path, script, **kwargs)
    return build


# --- routing --------------------------------------------------------------------------------
def test_unknown_routes_and_methods_are_404_file_not_found(http):
    for method, path in (("GET", "/nope"), ("GET", "/completion"), ("PUT", "/completion"),
                         ("DELETE", "/props"), ("PATCH", "/health"), ("POST", "/health"),
                         ("GET", "/v1/streams/lookup")):
        r = http.request(method, path)
        assert r.status_code == 404, (method, path)
        assert r.json() == NOT_FOUND and "allow" not in r.headers
        assert r.headers["content-type"] == "application/json; charset=utf-8"


def test_methods_cpp_httplib_does_not_route_are_a_bare_400(http):
    for method in ("FOO", "TRACE", "CONNECT"):
        r = http.request(method, "/health")
        assert r.status_code == 400 and r.content == b"", method


def test_head_is_answered_as_get_without_the_body(http):
    r = http.head("/health")
    assert r.status_code == 200 and r.content == b""
    assert r.headers["content-length"] == str(len(http.get("/health").content))
    assert r.headers["accept-ranges"] == "bytes"


def test_disabled_features(http):
    for method in ("GET", "POST"):
        for path in ("/cors-proxy", "/tools"):
            r = http.request(method, path, content=b"not json")
            assert r.status_code == 403 and r.json() == DISABLED, (method, path)
    assert http.put("/tools").status_code == 404
    for path in ("/v1/audio/transcriptions", "/audio/transcriptions"):
        r = http.post(path, files={"file": ("a.wav", b"RIFF")})
        assert r.status_code == 501 and r.json() == {"error": {
            "code": 501, "message": "The current model does not support audio input.", "type": "not_supported_error"}}


# --- /props and build info --------------------------------------------------------------------
def test_props_fields(http):
    props = http.get("/props").json()
    meta = http.get("/v1/models").json()["data"][0]["meta"]
    assert props["model_ftype"] == meta["ftype"] == "Q4_K - Medium"  # the default model is Q4_K_M
    assert re.fullmatch(r"<__media_[A-Za-z0-9]{32}__>", props["media_marker"])
    assert http.get("/props").json()["media_marker"] == props["media_marker"]  # one per process
    pin = tomllib.loads(PIN.read_text())["llama_cpp"]
    assert props["build_info"] == f"b{pin['build_number']}-{pin['commit']}"
    assert pin["build_number"] == info.LLAMA_BUILD_NUMBER
    chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                   "max_tokens": 1}).json()
    assert chat["system_fingerprint"] == props["build_info"]


def test_model_ftype_is_the_end_of_the_description():
    class M:
        description = "llama4 17Bx16E (Scout) Q4_K - Medium"
    assert info.model_ftype(M()) == "Q4_K - Medium"
    M.description = "gemma3 270M (guessed) IQ3_S mix - 3.66 bpw"
    assert info.model_ftype(M()) == "(guessed) IQ3_S mix - 3.66 bpw"


# --- stream chunk fields ----------------------------------------------------------------------
def _frames(http, path, body):
    r = http.post(path, json={**body, "stream": True})
    assert r.status_code == 200
    return [f.data for f in parse_sse(r.content) if isinstance(f.data, dict)]


def test_native_chunks_carry_id_slot_as_upstream(http):
    frames = _frames(http, "/completion", {"prompt": "Hello", "n_predict": 3, "id_slot": 1})
    assert [f["id_slot"] for f in frames[:-1]] == [-1] * (len(frames) - 1)  # partials: -1 upstream
    assert frames[-1]["stop"] is True and frames[-1]["id_slot"] == 1


def test_timings_per_token_on_openai_stream_deltas(http):
    body = {"prompt": "Hello", "max_tokens": 3, "timings_per_token": True}
    frames = _frames(http, "/v1/completions", body)
    assert all("timings" in f for f in frames)
    assert not any("timings" in f for f in _frames(http, "/v1/completions", {**body, "timings_per_token": False})[:-1])
    chat = _frames(http, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                  "max_tokens": 3, "timings_per_token": True})
    token_chunks = [f for f in chat if f["choices"] and f["choices"][0]["finish_reason"] is None]
    assert token_chunks and all("timings" in f for f in token_chunks[1:])
    assert chat[-1]["timings"]["predicted_n"] == 3


def test_prompt_progress_on_the_v1_completions_stream(http):
    frames = _frames(http, "/v1/completions", {"prompt": "Hello there", "max_tokens": 2, "return_progress": True})
    progress = [f for f in frames if "prompt_progress" in f]
    assert progress and set(progress[-1]["prompt_progress"]) == {"total", "cache", "processed", "time_ms"}
    assert all(p["choices"] == [{"text": "", "index": 0, "logprobs": None, "finish_reason": None}]
               for p in progress)
    assert frames.index(progress[-1]) < len(frames) - 1


def test_logprobs_stands_for_n_probs_on_native_routes(make, fim_path):
    client, fake = make(completion("a", "b"))
    for value, expected in ((3, 3), (True, 1), (False, 0)):
        client.simulate_post("/completion", json={"prompt": "x", "n_predict": 2, "logprobs": value})
        assert fake.submitted[-1].sampling.n_probs == expected
    client.simulate_post("/completion", json={"prompt": "x", "logprobs": 3, "n_probs": 5})
    assert fake.submitted[-1].sampling.n_probs == 5  # n_probs first
    client, fake = fake_app(fim_path, completion("a"))
    client.simulate_post("/infill", json={"input_prefix": "def f(", "input_suffix": ")", "logprobs": 2})
    assert fake.submitted[-1].sampling.n_probs == 2


@pytest.fixture(scope="module")
def fim_path(tmp_path_factory):
    from pyllama.synthetic import SyntheticSpec, write_synthetic_model

    return write_synthetic_model(tmp_path_factory.mktemp("fim") / "fim.gguf", SyntheticSpec(fim=True))


def test_timings_and_progress_with_a_scripted_engine(make):
    t = Timings(prompt_n=5, prompt_ms=1.0, predicted_n=1, predicted_ms=1.0)
    script = [ProgressEvent(5, 0, 5, 1.0), TokenEvent(text="Hi", tokens=[260], timings=t),
              finish("Hi", n_tokens=1)]
    client, _ = make(script)
    r = client.simulate_post("/v1/completions", json={"prompt": "x", "stream": True, "timings_per_token": True,
                                                     "return_progress": True})
    frames = [f.data for f in parse_sse(r.content) if isinstance(f.data, dict)]
    assert "prompt_progress" in frames[0] and frames[0]["choices"][0]["text"] == ""
    assert frames[1]["choices"][0]["text"] == "Hi" and frames[1]["timings"]["prompt_n"] == 5


# --- /v1/messages -----------------------------------------------------------------------------
STAMPED = ("x-anthropic-billing-header: cc_version=2.1.101.e51; cc_entrypoint=cli; cch={};"
           "You are Claude Code, Anthropic's official CLI for Claude.")


def test_claude_code_billing_stamp_does_not_break_the_prompt_cache(make):
    client, fake = make(completion("ok"))
    for stamp in ("a5145", "0b9e2"):
        for system in (STAMPED.format(stamp), [{"type": "text", "text": STAMPED.format(stamp)},
                                               {"type": "text", "text": " more"}]):
            r = client.simulate_post("/v1/messages", json={
                "model": "x", "max_tokens": 4, "system": system, "metadata": {"user_id": "user_123"},
                "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 200
    prompts = [tuple(r.prompt) for r in fake.submitted]
    assert prompts[0] == prompts[2] and prompts[1] == prompts[3] and prompts[0] != prompts[1]
    text = fake.model.detokenize(list(prompts[0]), unparse_special=True)
    assert "cch=fffff;You are Claude Code" in text
    # anything else is left alone, and metadata of any shape is accepted
    from pyllama.server.protocol.anthropic import normalize_billing_header

    assert normalize_billing_header("cch=a5145; not a header") == "cch=a5145; not a header"
    assert normalize_billing_header("x-anthropic-billing-header: cch=abc;") == "x-anthropic-billing-header: cch=abc;"
    for metadata in (None, "x", {"user_id": 5}, {}):
        r = client.simulate_post("/v1/messages", json={"model": "x", "max_tokens": 2, "metadata": metadata,
                                                       "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200


# --- --log-prompts-dir ------------------------------------------------------------------------
def test_prompts_are_logged_as_upstream_writes_them(make, tmp_path):
    folder = tmp_path / "prompts" / "deeper"
    client, _ = make(completion("ok"), args=["--log-prompts-dir", str(folder)])
    assert folder.is_dir()  # the flag creates it
    def logged(path, body):
        before = set(folder.iterdir())
        assert client.simulate_post(path, json=body).status_code == 200
        [new] = set(folder.iterdir()) - before
        assert re.fullmatch(r"\d{12}\.txt", new.name)
        time.sleep(0.002)  # one file per millisecond
        return new.read_text()
    assert logged("/completion", {"prompt": "Hello"}) == "Hello"
    assert logged("/completion", {"prompt": [1, 2, "ab"]}) == '[\n  1,\n  2,\n  "ab"\n]'
    rendered = client.simulate_post("/apply-template", json={"messages": [{"role": "user", "content": "Hi"}]}).json
    assert logged("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}) == rendered["prompt"]
    assert not [p for p in folder.iterdir() if p.stat().st_size == 0]


# --- Vertex AI --------------------------------------------------------------------------------
def test_vertex_aliases_as_upstream():
    assert vertex.path_to_format("/v1/chat/completions") == "chatCompletions"
    assert vertex.path_to_format("/apply-template") == "applyTemplate"
    assert vertex.path_to_format("/slots/:id_slot") == "slots"
    assert vertex.path_to_format("/v1/messages/count_tokens") == "messagesCountTokens"
    aliases = vertex.aliases(["/completion", "/completions", "/v1/completions", "/embeddings", "/v1/embeddings",
                              "/slots", "/slots/:id_slot", "/health", "/v1/health"])
    assert aliases["completions"] == "/v1/completions" and aliases["embeddings"] == "/v1/embeddings"
    assert aliases["slots"] == "/slots" and aliases["health"] == "/health" and aliases["completion"] == "/completion"


def test_vertex_predict_over_the_app(make, monkeypatch):
    monkeypatch.setenv("AIP_MODE", "PREDICTION")
    monkeypatch.setenv("AIP_HEALTH_ROUTE", "ping")
    monkeypatch.setenv("AIP_PREDICT_ROUTE", "v1/models/m:predict")
    client, fake = make(completion("Hello", " there"))
    assert client.simulate_get("/ping").json == {"status": "ok"}
    assert client.simulate_post("/ping").status_code == 404
    r = client.simulate_post("/v1/models/m:predict", json={"instances": [
        {"@requestFormat": "chatCompletions", "messages": [{"role": "user", "content": "Hi"}], "stream": True},
        {"@requestFormat": "/completion", "prompt": "x"},
        {"@requestFormat": "tokenize", "content": "hello"},
        {"@requestFormat": "props"},
        {"@requestFormat": "completion", "prompt": "x", "n_predict": "many"},
        {"@requestFormat": "stream", "conv_id": "x"},
        {"@requestFormat": "nope"},
        {"prompt": "x"},
        5,
    ]})
    assert r.status_code == 200
    p = r.json["predictions"]
    assert p[0]["object"] == "chat.completion" and p[0]["choices"][0]["message"]["content"] == "Hello there"
    assert p[1]["content"] == "Hello there" and p[1]["stop"] is True
    assert "tokens" in p[2] and "model_ftype" in p[3]
    assert p[4]["error"]["code"] == 400 and "n_predict" in p[4]["error"]["message"]
    assert p[5]["error"]["message"] == "Missing conversation id in path"  # the query is the predict request's
    assert p[6] == {"error": {"code": 400, "message": "no handler registered for @requestFormat: nope",
                              "type": "invalid_request_error"}}
    assert p[7]["error"]["message"] == "each instance must include a string @requestFormat"
    assert p[8]["error"]["message"] == "each instance must be a JSON object"
    for body, message in ((b"nope", None), (b"[]", "request body must be a JSON object"),
                          (b"{}", "request body must include an array field named instances"),
                          (b'{"instances": ' + b"[{}," * 128 + b"{}" + b"]" * 129 + b"}", None)):
        r = client.simulate_post("/v1/models/m:predict", body=body)
        assert r.status_code == 400 and r.json["error"]["type"] == "invalid_request_error"
        if message:
            assert r.json["error"]["message"] == message
    many = {"instances": [{}] * 129}
    assert client.simulate_post("/v1/models/m:predict", json=many).json["error"]["message"] == \
        "instances array exceeds maximum size of 128"
    assert client.simulate_post("/v1/models/m:predict", json={"instances": []}).json == {"predictions": []}
    assert client.simulate_get("/cors-proxy").status_code == 403  # still there, not reachable from predict


def test_vertex_predict_route_may_not_shadow_a_route(make, monkeypatch):
    monkeypatch.setenv("AIP_MODE", "PREDICTION")
    monkeypatch.setenv("AIP_PREDICT_ROUTE", "/completion")
    with pytest.raises(SystemExit):
        make()


def test_vertex_real_server_listens_on_aip_http_port(gemma_path):
    port = free_port()
    srv = ServerProcess(["-m", str(gemma_path), "-np", "2", "-c", "2048"],
                        env={"AIP_MODE": "PREDICTION", "AIP_HTTP_PORT": str(port), "LLAMA_MEDIA_MARKER": "<m>"})
    asked = srv.port
    srv.port, srv.base = port, f"http://127.0.0.1:{port}"
    try:
        srv.wait_ready()
        with httpx.Client(base_url=srv.base, timeout=120) as http:
            r = http.post("/predict", json={"instances": [
                {"@requestFormat": "chatCompletions", "max_tokens": 4,
                 "messages": [{"role": "user", "content": "What is the meaning of life?"}]}] * 2})
            assert r.status_code == 200
            assert [p["choices"][0]["message"]["role"] for p in r.json()["predictions"]] == ["assistant"] * 2
            assert http.get("/props").json()["media_marker"] == "<m>"
    finally:
        srv.stop()
    log = srv.proc.stdout.read().decode(errors="replace")
    assert f"Google Cloud Platform compat: overriding server port {asked} with AIP_HTTP_PORT {port}" in log


def test_vertex_bad_port_is_refused():
    out = subprocess.run([sys.executable, "-c", "from pyllama.server.vertex import GcpParams as G;"
                          "G.from_env({'AIP_MODE': 'PREDICTION', 'AIP_HTTP_PORT': 'x'})"], capture_output=True)
    assert out.returncode != 0 and b"AIP_HTTP_PORT" in out.stderr
    from pyllama.server.vertex import GcpParams

    assert GcpParams.from_env({"AIP_MODE": "PREDICTION", "AIP_HTTP_PORT": " 9000abc"}).port == 9000
    assert GcpParams.from_env({}).enabled is False
    g = GcpParams.from_env({"AIP_MODE": "PREDICTION", "AIP_HEALTH_ROUTE": "h", "AIP_PREDICT_ROUTE": ""})
    assert (g.path_health, g.path_predict, g.port) == ("/h", "/predict", 8080)

