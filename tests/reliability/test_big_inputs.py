"""Big inputs: a clear 4xx in upstream's error shape or a correct answer, in bounded time and memory.

Against a real server on a synthetic model with a 150,000-token vocabulary (so that 100,000
logit biases and n_probs of 100,000 are real work): 1 MB and 20 MB prompts, 10,000-deep JSON,
a 100,000-entry logit_bias (object and array forms), n_probs of 100,000, 10,000 stop strings,
and json_schemas whose grammar would explode (properties nested deep under long names, an
object with too many optional properties; upstream answers a 280 KB schema of that kind with a
750 MB response and 5.9 GB of RSS), through /completion, a chat's response_format and tools.
Also /infill with a 20 MB prefix, suffix and extra chunk (only their ends are tokenized: the
same FIM prompt as from short ones) and 20 MB embedding and rerank inputs (refused by a count
first). Time is bounded by the client's timeout; memory by the worker's RSS after each request
and its peak during it (VmHWM, reset before the request), each under a generous bound.
"""

from __future__ import annotations

import json

import httpx
import pytest
from server_process import ServerProcess, peak_rss_kib, reset_peak_rss, rss_kib

N_VOCAB_EXTRA = 150_000
TIMEOUT = 120  # seconds for any one request
RSS_GROWTH_MAX_MB = 400  # over the worker's RSS once warmed up, and its peak over its RSS before a request


@pytest.fixture(scope="module")
def big_vocab_model(tmp_path_factory):
    from pyllama.synthetic import SyntheticSpec, write_synthetic_model

    return write_synthetic_model(tmp_path_factory.mktemp("big-vocab") / "big-vocab.gguf",
                                 SyntheticSpec(extra_vocab=N_VOCAB_EXTRA))


@pytest.fixture(scope="module")
def server(big_vocab_model):
    srv = ServerProcess(["-m", str(big_vocab_model), "-np", "2", "-c", "2048", "--jinja"])
    srv.wait_ready()
    r = httpx.post(srv.base + "/completion", json={"prompt": "warm up", "n_predict": 4}, timeout=TIMEOUT)
    assert r.status_code == 200
    srv.baseline_kib = rss_kib(srv.worker_pid())
    yield srv
    srv.stop()


PEAK_GROWTH_MAX_MB = 256  # the worker's peak RSS over its RSS before the request


def peak_growth_mb(server, request) -> tuple:
    """A request's response and how far above the worker's RSS before it its peak RSS went."""
    pid = server.worker_pid()
    reset_peak_rss(pid)
    before = rss_kib(pid)
    response = request()
    return response, (peak_rss_kib(pid) - before) // 1024


def post(server, path: str, body, raw: bytes | None = None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    r, peak = peak_growth_mb(server, lambda: httpx.post(server.base + path, content=content,
                                                        headers={"Content-Type": "application/json"},
                                                        timeout=TIMEOUT))
    grown = (rss_kib(server.worker_pid()) - server.baseline_kib) // 1024
    assert grown < RSS_GROWTH_MAX_MB, f"the worker grew by {grown} MB"
    assert peak < RSS_GROWTH_MAX_MB, f"the worker's peak RSS grew by {peak} MB"
    return r


def assert_error(r: httpx.Response, status: int, kind: str) -> dict:
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert error["code"] == status and error["type"] == kind and error["message"], error
    return error


@pytest.mark.parametrize("mb", [1, 20])
def test_a_prompt_of_megabytes_exceeds_the_context(server, mb):
    prompt = "hello " * (mb * (1 << 20) // 6)
    error = assert_error(post(server, "/completion", {"prompt": prompt, "n_predict": 4}), 400,
                         "exceed_context_size_error")
    assert error["n_ctx"] == 1024 and error["n_prompt_tokens"] > len(prompt) // 6


def test_a_chat_message_of_megabytes_exceeds_the_context(server):
    body = {"messages": [{"role": "user", "content": "hello " * ((4 << 20) // 6)}], "max_tokens": 4}
    assert_error(post(server, "/v1/chat/completions", body), 400, "exceed_context_size_error")


@pytest.mark.parametrize("opener,closer", [(b"[", b"]"), (b'{"a":', b"}")])
def test_json_ten_thousand_deep(server, opener, closer):
    raw = b'{"prompt": ' + opener * 10_000 + b"1" + closer * 10_000 + b', "n_predict": 4}'
    error = assert_error(post(server, "/completion", None, raw), 400, "invalid_request_error")
    assert "depth" in error["message"]


@pytest.mark.parametrize("form", ["object", "array"])
def test_a_logit_bias_of_100000_entries(server, form):
    banned = range(100_000)  # every token below 100,000 banned: only the extra vocabulary is left
    bias = {str(t): False for t in banned} if form == "object" else [[t, False] for t in banned]
    r = post(server, "/completion", {"prompt": "hi", "n_predict": 8, "logit_bias": bias, "return_tokens": True})
    assert r.status_code == 200, r.text[:500]
    tokens = r.json()["tokens"]
    assert len(tokens) == 8 and all(t >= 100_000 for t in tokens), tokens


def test_n_probs_of_100000(server):
    r = post(server, "/completion", {"prompt": "hi", "n_predict": 2, "n_probs": 100_000})
    assert r.status_code == 200, r.text[:500]
    probs = r.json()["completion_probabilities"]
    assert len(probs) == 2 and all(len(p["top_logprobs"]) == 100_000 for p in probs)
    top = [x["logprob"] for x in probs[0]["top_logprobs"]]
    assert top == sorted(top, reverse=True)


def test_ten_thousand_stop_strings(server):
    body = {"prompt": "hi", "n_predict": 16, "temperature": 0}
    free = post(server, "/completion", body).json()["content"]
    word = free.split()[3]  # a piece of what the model says: stop there
    stops = [f"never-said-{i}" for i in range(9_999)] + [word]
    r = post(server, "/completion", {**body, "stop": stops})
    assert r.status_code == 200, r.text[:500]
    out = r.json()
    assert out["stop_type"] == "word" and out["stopping_word"] == word
    assert out["content"] == free[:free.index(word)]


def deep_schema(depth: int, key: str) -> bytes:
    level = b'{"type": "object", "required": ["%s"], "properties": {"%s": ' % (key.encode(), key.encode())
    return level * depth + b'{"type": "string"}' + b"}}" * depth


def wide_schema(n: int) -> bytes:
    return json.dumps({"type": "object", "properties": {f"field_{i:05d}": {"type": "integer"} for i in range(n)}}).encode()


EXPLODING = {  # about 100 KB each
    "deep, long names": deep_schema(400, "k" * 100),  # a 32 MB grammar, upstream's way
    "wide, optional": wide_schema(3000),  # minutes of get_recursive_refs upstream
}


@pytest.mark.parametrize("kind", list(EXPLODING))
def test_an_exploding_json_schema_is_refused(server, kind):
    raw = b'{"prompt": "hi", "n_predict": 4, "json_schema": ' + EXPLODING[kind] + b"}"
    error = assert_error(post(server, "/completion", None, raw), 400, "invalid_request_error")
    assert '"json_schema"' in error["message"]


@pytest.mark.parametrize("kind", list(EXPLODING))
def test_an_exploding_schema_in_a_chat_is_refused(server, kind):
    schema = EXPLODING[kind]
    messages = b'"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4'
    fmt = b'{' + messages + b', "response_format": {"type": "json_schema", "json_schema": {"schema": ' + schema + b"}}}"
    error = assert_error(post(server, "/v1/chat/completions", None, fmt), 400, "invalid_request_error")
    assert "response_format" in error["message"]
    tools = (b'{' + messages + b', "tools": [{"type": "function", "function": {"name": "f", "parameters": '
             + schema + b"}}]}")
    error = assert_error(post(server, "/v1/chat/completions", None, tools), 400, "invalid_request_error")
    assert "tools" in error["message"]


def test_a_deep_schema_within_bounds_is_served(server):
    # 450 levels: deeper than json.dumps and orjson.dumps write, within the parser's 1024
    raw = b'{"prompt": "hi", "n_predict": 6, "json_schema": ' + deep_schema(450, "a") + b"}"
    r = post(server, "/completion", None, raw)
    assert r.status_code == 200, r.text[:500]
    assert r.json()["content"].startswith("{")


# --- /infill and the embedding routes: only what fits is tokenized ------------------------------
@pytest.fixture(scope="module")
def fim_server(fim_model):
    # -n 8: format_infill leaves 2 * n_predict of the context free, so the extra chunks fit
    srv = ServerProcess(["-m", str(fim_model), "-np", "1", "-c", "2048", "-b", "512", "-n", "8"])
    srv.wait_ready()
    yield srv
    srv.stop()


def test_an_infill_prefix_and_suffix_of_megabytes_keep_their_ends(fim_server):
    # only the prefix's last and the suffix's first tokens make the FIM prompt (format_infill):
    # the prompt from 20 MB on each side is the one from a short piece of each
    end = "".join(f"line {i} of the end\n" for i in range(400))
    start = "".join(f"line {i} of the start\n" for i in range(400))
    filler = "hello " * ((20 << 20) // 6)
    base = {"n_predict": 4, "temperature": 0, "cache_prompt": False}
    short = httpx.post(fim_server.base + "/infill", json={**base, "input_prefix": end, "input_suffix": start,
                                                          "input_extra": [{"filename": "a.txt", "text": end}]},
                       timeout=TIMEOUT)
    assert short.status_code == 200, short.text[:300]
    big, grown = peak_growth_mb(fim_server, lambda: httpx.post(
        fim_server.base + "/infill", json={**base, "input_prefix": filler + end, "input_suffix": start + filler,
                                           "input_extra": [{"filename": "a.txt", "text": filler + end}]},
        timeout=TIMEOUT))
    assert big.status_code == 200, big.text[:300]
    assert grown < PEAK_GROWTH_MAX_MB, f"the worker's peak RSS grew by {grown} MB"
    assert big.json()["prompt"] == short.json()["prompt"]
    assert big.json()["content"] == short.json()["content"]
    assert big.json()["tokens_evaluated"] == short.json()["tokens_evaluated"]


@pytest.mark.parametrize("path,field", [("/v1/embeddings", "input"), ("/embedding", "content")])
def test_an_embedding_input_of_megabytes_is_too_large(embed_server, path, field):
    r, grown = peak_growth_mb(embed_server, lambda: httpx.post(
        embed_server.base + path, json={field: "hello " * ((20 << 20) // 6)}, timeout=TIMEOUT))
    error = assert_error(r, 400, "invalid_request_error")
    assert "is too large to process" in error["message"]
    assert grown < PEAK_GROWTH_MAX_MB, f"the worker's peak RSS grew by {grown} MB"


def test_a_rerank_document_of_megabytes_is_too_large(embed_server):
    ok = httpx.post(embed_server.base + "/v1/rerank", json={"query": "q", "documents": ["short", "text"]},
                    timeout=TIMEOUT)
    assert ok.status_code == 200, ok.text[:300]
    r, grown = peak_growth_mb(embed_server, lambda: httpx.post(
        embed_server.base + "/v1/rerank", json={"query": "q", "documents": ["short", "hello " * ((20 << 20) // 6)]},
        timeout=TIMEOUT))
    error = assert_error(r, 400, "invalid_request_error")
    assert "is too large to process" in error["message"]
    assert grown < PEAK_GROWTH_MAX_MB, f"the worker's peak RSS grew by {grown} MB"
