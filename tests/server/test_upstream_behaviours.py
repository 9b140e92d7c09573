"""Behaviours held against upstream llama-server's code at the vendored pin (issue 12, part 6).

Each test talks to real server processes: headers are read off the raw socket (a
case-insensitive client would hide their spelling), disconnects and signals are real.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import struct
import time

import httpx
import pytest

from .conftest import ServerProcess

TOKEN_NAME = re.compile(r"^[A-Za-z0-9-]+$")


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def raw_exchange(port: int, request: bytes, until: bytes | None = None, timeout: float = 120) -> bytes:
    """Send raw bytes, read until EOF (or until `until` shows up)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while until is None or until not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def raw_request(port: int, method: str, path: str, body: dict | None = None,
                headers: dict | None = None, keep_alive: bool = False) -> tuple[str, list, bytes]:
    """(status line, [(name, value)] as written on the wire, body bytes)."""
    payload = json.dumps(body).encode() if body is not None else b""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if not keep_alive:
        lines.append("Connection: close")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    data = raw_exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + payload,
                        until=b"\r\n\r\n" if keep_alive else None)
    head, _, rest = data.partition(b"\r\n\r\n")
    status, *header_lines = head.decode("latin-1").split("\r\n")
    return status, [tuple(line.split(": ", 1)) if ": " in line else (line.rstrip(":"), "")
                    for line in header_lines], rest


def names(headers: list) -> list:
    return [n for n, _ in headers]


def value(headers: list, name: str):
    """The value of the header spelled exactly `name` (None when absent)."""
    return next((v for n, v in headers if n == name), None)


def assert_canonical(headers: list) -> None:
    for name in names(headers):
        assert TOKEN_NAME.match(name), name
        assert name[0].isupper() and name != name.lower(), f"header name not in upstream's case: {name}"


# --- 1. header names in upstream's spelling, on every route ---------------------------------
def test_header_names_are_spelled_as_upstreams_on_every_route(synthetic_server):
    port = synthetic_server.port
    status, headers, body = raw_request(port, "GET", "/health")
    assert status == "HTTP/1.1 200 OK" and body == b'{"status":"ok"}'
    assert_canonical(headers)
    assert value(headers, "Content-Type") == "application/json; charset=utf-8"
    assert value(headers, "Content-Length") == "15"
    assert value(headers, "Server") == "llama.cpp"
    # --cors-origins * with credentials (the defaults): the Origin echoed, empty without one
    assert value(headers, "Access-Control-Allow-Origin") == ""

    status, headers, _ = raw_request(port, "GET", "/health", headers={"Origin": "http://a.example"})
    assert value(headers, "Access-Control-Allow-Origin") == "http://a.example"

    status, headers, _ = raw_request(port, "OPTIONS", "/completion", headers={"Origin": "http://a.example"})
    assert status == "HTTP/1.1 200 OK"
    assert_canonical(headers)
    for name in ("Access-Control-Allow-Origin", "Access-Control-Allow-Credentials",
                 "Access-Control-Allow-Methods", "Access-Control-Allow-Headers"):
        assert value(headers, name) is not None, name
    assert value(headers, "Content-Type") == "text/html"

    # SSE: upstream adds only X-Accel-Buffering to a stream (no Cache-Control)
    status, headers, body = raw_request(port, "POST", "/completion",
                                        {"prompt": "hi", "n_predict": 2, "stream": True})
    assert status == "HTTP/1.1 200 OK"
    assert_canonical(headers)
    assert value(headers, "Content-Type") == "text/event-stream"
    assert value(headers, "X-Accel-Buffering") == "no"
    assert value(headers, "Transfer-Encoding") == "chunked"
    assert "Cache-Control" not in names(headers)
    assert b"data: " in body

    # errors: falcon's 404 and a 400 from an unparseable body (upstream: a 500)
    status, headers, body = raw_request(port, "GET", "/no-such-route")
    assert status.startswith("HTTP/1.1 404")
    assert_canonical(headers)
    assert value(headers, "Content-Type") == "application/json; charset=utf-8"
    assert json.loads(body)["error"]["type"] == "not_found_error"
    status, headers, _ = raw_exchange_bad_json(port)
    assert status.startswith("HTTP/1.1 400")
    assert_canonical(headers)
    assert value(headers, "Content-Type") == "application/json; charset=utf-8"


def raw_exchange_bad_json(port: int):
    data = raw_exchange(port, b"POST /completion HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                              b"Content-Type: application/json\r\nContent-Length: 4\r\n\r\n{bad")
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    return head[0], [tuple(line.split(": ", 1)) for line in head[1:]], None


def test_an_error_closes_a_kept_alive_connection_as_cpp_httplib(synthetic_server):
    # Server::write_response_core: "Don't leave connections open after errors"
    status, headers, _ = raw_request(synthetic_server.port, "GET", "/health", keep_alive=True)
    assert status == "HTTP/1.1 200 OK" and value(headers, "Connection") != "close"
    status, headers, _ = raw_request(synthetic_server.port, "GET", "/no-such-route", keep_alive=True)
    assert status.startswith("HTTP/1.1 404") and value(headers, "Connection") == "close"


# --- 3. /metrics' Process-Start-Time-Unix ---------------------------------------------------
def test_metrics_sends_process_start_time_unix_as_upstream(synthetic_path):
    before = time.monotonic_ns() // 1000  # ggml_time_us(): CLOCK_MONOTONIC, shared by processes
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "1", "-c", "256", "--metrics"])
    try:
        srv.wait_ready()
        after = time.monotonic_ns() // 1000
        status, headers, body = raw_request(srv.port, "GET", "/metrics")
        assert status == "HTTP/1.1 200 OK"
        assert_canonical(headers)
        assert value(headers, "Content-Type") == "text/plain; version=0.0.4"
        start = value(headers, "Process-Start-Time-Unix")
        assert start is not None and start.isdigit()
        assert before <= int(start) <= after  # when the model was loaded (metrics.init())
        assert b"llamacpp:prompt_tokens_total" in body
    finally:
        srv.stop()


# --- 2. verbose: upstream's __verbose blocks -------------------------------------------------
def sse_events(client: httpx.Client, path: str, body: dict) -> list:
    out = []
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


NATIVE_FINAL_KEYS = {"index", "content", "tokens", "id_slot", "stop", "model", "tokens_predicted",
                     "tokens_evaluated", "generation_settings", "prompt", "has_new_line", "truncated",
                     "stop_type", "stopping_word", "tokens_cached", "timings"}


def test_verbose_adds_upstreams_verbose_block(synthetic_server):
    with httpx.Client(base_url=synthetic_server.base, timeout=120) as client:
        body = {"prompt": "hello", "max_tokens": 4, "seed": 1, "verbose": True}
        out = client.post("/v1/completions", json=body).json()
        verbose = out["__verbose"]
        assert set(verbose) == NATIVE_FINAL_KEYS
        assert verbose["content"] == out["choices"][0]["text"] and verbose["stop"] is True
        assert verbose["generation_settings"]["n_predict"] == 4
        assert verbose["tokens"] == []  # no return_tokens
        assert "__verbose" not in client.post("/v1/completions", json={**body, "verbose": False}).json()

        # every /v1/completions chunk carries its native partial; the last its native final
        chunks = sse_events(client, "/v1/completions", body)
        assert chunks and all("__verbose" in c for c in chunks)
        assert all(c["__verbose"]["stop"] is False for c in chunks[:-1])
        last = chunks[-1]["__verbose"]
        assert set(last) == NATIVE_FINAL_KEYS and last["stop"] is True and last["content"] == ""
        text = "".join(c["__verbose"]["content"] for c in chunks[:-1])
        assert text == "".join(c["choices"][0]["text"] for c in chunks)

        # /completion is the native format itself: no __verbose there
        assert "__verbose" not in client.post("/completion", json={**body, "n_predict": 2}).json()

        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 1, "verbose": True}
        out = client.post("/v1/chat/completions", json=chat).json()
        assert set(out["__verbose"]) == NATIVE_FINAL_KEYS
        assert out["__verbose"]["tokens_predicted"] == out["usage"]["completion_tokens"]
        # a chat stream: the final result's first chunk only (deltas.front())
        chunks = sse_events(client, "/v1/chat/completions", chat)
        marked = [i for i, c in enumerate(chunks) if "__verbose" in c]
        assert len(marked) == 1 and chunks[marked[0]]["__verbose"]["stop"] is True
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:marked[0]] if c["choices"])


# --- 4. prompt-progress events carry timings ------------------------------------------------
@pytest.mark.parametrize("path", ["/completion", "/v1/chat/completions", "/v1/responses"])
def test_prompt_progress_events_carry_timings(synthetic_server, path):
    # upstream's tests/unit/test_metrics.py::test_metrics_timings_on_prompt_progress
    prompt = "the quick brown fox jumps over the lazy dog " * 8 + path
    body = {"/completion": {"prompt": prompt, "n_predict": 4},
            "/v1/chat/completions": {"messages": [{"role": "user", "content": prompt}], "max_tokens": 4},
            "/v1/responses": {"input": prompt, "max_output_tokens": 4}}[path]
    body.update({"timings_per_token": True, "return_progress": True, "cache_prompt": False})
    with httpx.Client(base_url=synthetic_server.base, timeout=120) as client:
        chunks = sse_events(client, path, body)
        progress = [c for c in chunks if "prompt_progress" in c]
        assert len(progress) > 1
        first = progress[0]["timings"]  # sent before any prompt token is decoded
        assert (first["prompt_n"], first["prompt_ms"], first["predicted_n"], first["predicted_ms"]) == (0, 0.0, 0, 0.0)
        prompt_ms = 0.0
        for chunk in progress:
            timings = chunk["timings"]
            assert all(v is not None and v >= 0 for v in timings.values()), timings
            assert timings["prompt_ms"] >= prompt_ms
            assert timings["prompt_n"] == chunk["prompt_progress"]["processed"] - chunk["prompt_progress"]["cache"]
            prompt_ms = timings["prompt_ms"]
        assert prompt_ms > 0
        # without timings_per_token a progress event has none
        chunks = sse_events(client, path, {**body, "timings_per_token": False})
        assert all("timings" not in c for c in chunks if "prompt_progress" in c)


# --- 5. generation_settings: the effective sampling state -----------------------------------
def test_generation_settings_report_the_effective_sampling_state(synthetic_server, synthetic):
    with httpx.Client(base_url=synthetic_server.base, timeout=120) as client:
        out = client.post("/completion", json={
            "prompt": "hello", "n_predict": 2, "ignore_eos": True, "temperature": 0.7, "top_p": 0.9,
            "logit_bias": [[5, 1.3]], "logprobs": 2, "grammar": "root ::= [a-z]+", "grammar_lazy": True,
            "grammar_triggers": [{"type": 1, "value": "abc def"}]}).json()
        gs = out["generation_settings"]
        # ignore_eos adds every EOG token's -inf bias (params_from_json's ignore_eos handler)
        assert gs["logit_bias"] == [{"bias": f32(1.3), "token": 5}] + \
            [{"bias": None, "token": t} for t in synthetic.eog_tokens]
        assert synthetic.eog_tokens
        # floats as the sampler holds them (float32)
        assert (gs["temperature"], gs["top_p"], gs["min_p"]) == (f32(0.7), f32(0.9), f32(0.05))
        assert gs["speculative.types"] == "none"
        # logprobs stands for n_probs (server-schema.cpp's alias)
        assert gs["n_probs"] == 2 and len(out["completion_probabilities"]) == 2
        assert gs["grammar_lazy"] is True
        assert gs["grammar_triggers"] == [{"type": 1, "value": "abc def"}]
        assert gs["samplers"] == ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p",
                                  "xtc", "temperature"]
        without = client.post("/completion", json={"prompt": "hello", "n_predict": 1}).json()
        assert without["generation_settings"]["logit_bias"] == []

        params = client.get("/props").json()["default_generation_settings"]["params"]
        assert (params["temperature"], params["top_p"], params["xtc_threshold"]) == (f32(0.8), f32(0.95), f32(0.1))
        assert params["speculative.types"] == "none"
        assert "logit_bias" not in params  # to_json(only_metrics)


def test_props_report_a_default_task_whatever_n_predict_and_keep_say(synthetic_path):
    # get_res_props: a default task_params with only the flags' sampling
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "1", "-c", "256", "-n", "7", "--keep", "3",
                         "--temp", "0.5"])
    try:
        srv.wait_ready()
        params = httpx.get(srv.base + "/props").json()["default_generation_settings"]["params"]
        assert (params["n_predict"], params["max_tokens"], params["n_keep"]) == (-1, -1, 0)
        assert params["temperature"] == 0.5 and params["stream"] is False
        gs = httpx.post(srv.base + "/completion", json={"prompt": "hi"}).json()["generation_settings"]
        assert (gs["n_predict"], gs["n_keep"], gs["temperature"]) == (7, 3, 0.5)  # what a request gets
    finally:
        srv.stop()


# --- 6. same seed, same text, streamed or not -----------------------------------------------
def streamed_text(client: httpx.Client, path: str, body: dict) -> str:
    parts = []
    for chunk in sse_events(client, path, body):
        if path == "/completion":
            parts.append(chunk["content"])
        elif chunk.get("choices"):
            choice = chunk["choices"][0]
            parts.append(choice.get("text") if "text" in choice else choice["delta"].get("content") or "")
    return "".join(p or "" for p in parts)


def full_text(path: str, out: dict) -> str:
    if path == "/completion":
        return out["content"]
    choice = out["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


@pytest.mark.parametrize("path", ["/completion", "/v1/completions", "/v1/chat/completions"])
def test_same_seed_gives_the_same_text_streamed_or_not(server, path):
    # Sampled (not greedy) text, compared within the test. Both runs must start from the same
    # KV-cache state: a prompt partly served from the cache is decoded in a different batch
    # shape, and the quantised kernels' logits (so the sampled tokens) differ with it, in
    # upstream as here. cache_prompt=false processes the whole prompt each time; a warm
    # cache reuses all of it but the last token each time.
    prompt = f"Write a short story about a {path.strip('/').replace('/', ' ')} robot."
    body = {"max_tokens": 48, "seed": 1234, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    body.update({"prompt": prompt} if path != "/v1/chat/completions" else
                {"messages": [{"role": "user", "content": prompt}]})
    with httpx.Client(base_url=server.base, timeout=300) as client:
        for cache in (False, True):
            b = {**body, "cache_prompt": cache}
            if cache:
                client.post(path, json=b).raise_for_status()  # warm the cache
            plain = full_text(path, client.post(path, json=b).json())
            streamed = streamed_text(client, path, b)
            assert plain and streamed == plain, (cache, plain, streamed)


# --- 7. a non-streaming request whose client leaves is cancelled ----------------------------
def metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"llamacpp:{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def busy_slots(client: httpx.Client) -> list:
    return [s for s in client.get("/slots").json() if s["is_processing"]]


def test_a_non_streaming_request_whose_client_leaves_frees_its_slot(server):
    # upstream: rd.wait_for_all(req.should_stop) sees is_connection_closed and cancels the tasks
    with httpx.Client(base_url=server.base, timeout=60) as client:
        assert not busy_slots(client)
        n_ctx = client.get("/props").json()["default_generation_settings"]["n_ctx"]
        decodes_before = metric(client, "n_decode_total")
        body = json.dumps({"prompt": "Count from one to ten thousand:", "n_predict": -1,
                           "ignore_eos": True}).encode()
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.time() + 120
        while time.time() < deadline:  # generating
            slots = busy_slots(client)
            if slots and slots[0]["next_token"][0]["n_decoded"] > 0:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the request never started generating")
        sock.close()  # the client goes away before any byte of the answer
        while time.time() < deadline and busy_slots(client):
            time.sleep(0.1)
        assert not busy_slots(client)
        decoded = metric(client, "n_decode_total") - decodes_before
        # one decode per step with one busy slot: far from the n_ctx the request could reach
        assert decoded < n_ctx // 2, (decoded, n_ctx)


# --- 8. after SIGTERM the port is free for a successor at once -------------------------------
def test_a_successor_binds_the_port_right_after_sigterm(synthetic_path):
    # upstream's shutdown_handler stops the HTTP listener at once (server_http_context::stop)
    args = ["-m", str(synthetic_path), "-np", "1", "-c", "65536"]
    old = ServerProcess(args)
    new = None
    try:
        old.wait_ready()
        # a long stream the old server is still sending when it is told to stop: the client
        # reads nothing yet, so the request stays in flight (~8 MB of events to come)
        body = json.dumps({"prompt": "hi", "n_predict": -1, "ignore_eos": True, "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", old.port), timeout=60)
        sock.sendall(b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        head = b""
        while len(head) < 12:
            head += sock.recv(12 - len(head))
        assert head == b"HTTP/1.1 200"
        old.proc.send_signal(signal.SIGTERM)
        new = ServerProcess(args, port=old.port)
        new.wait_ready()
        assert old.proc.poll() is None  # still finishing its request...
        data = b""
        while data.count(b"data: ") < 10:  # ...which goes on streaming
            data += sock.recv(65536)
        sock.close()
        new.proc.stdout.seek(0)
        assert b"Connection in use" not in new.proc.stdout.read()  # bound at the first try
        assert httpx.get(new.base + "/health").status_code == 200
        old.proc.wait(60)
    finally:
        old.stop()
        if new is not None:
            new.stop()


# --- a generation that stops inside a UTF-8 character ------------------------------------------
C3 = 3 + 0xC3  # the synthetic vocabulary's byte token <0xC3>: the first byte of "é" (C3 A9)
E = 72  # a token whose text is "E"


def _text(r: httpx.Response, stream: bool) -> str:
    assert r.status_code == 200, r.text
    if not stream:
        body = r.json()
        return body["content"] if "content" in body else body["choices"][0]["message"]["content"]
    out = ""
    for line in r.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            out += event.get("content") or ((event.get("choices") or [{}])[0].get("delta") or {}).get("content") or ""
    return out


@pytest.mark.parametrize("stream", [False, True])
def test_a_partial_character_at_the_end_as_upstream(synthetic_server, stream):
    # upstream never streams an incomplete UTF-8 character (process_token sends complete text
    # only); a whole /completion response writes it as U+FFFD (JSON with replace); a chat
    # message leaves it out (common's PEG parser stops before it), unless nothing else is there,
    # when the message is the raw content (to_json_oaicompat_chat)
    with httpx.Client(base_url=synthetic_server.base, timeout=60) as c:
        got = []
        for n, bias in ((1, [[C3, 100]]), (2, [[E, 50], [C3, 49]])):
            got.append(_text(c.post("/completion", json={"prompt": "Hello", "n_predict": n, "logit_bias": bias,
                                                         "temperature": 0, "stream": stream}), stream))
            got.append(_text(c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": n, "temperature": 0,
                "logit_bias": {str(t): b for t, b in bias}, "stream": stream}), stream))
    assert got == (["\ufffd", "\ufffd", "E\ufffd", "E"] if not stream else ["", "", "E", "E"])
