"""Every generation and info endpoint of a real server, streaming and not."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

PROMPT = "The three primary colors are"
# The default model's greedy text depends on the CPU's kernels: no test asserts it. Tests
# compare two runs of one computation on this machine (cache_prompt false: a cached prompt
# re-evaluates only its last token, which is another computation) or force the text.
# ignore_eos: counts that must not depend on when the model would stop.
FIXED = {"temperature": 0, "cache_prompt": False}


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[6:]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_health_models_props(http, server):
    r = http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert r.headers["server"] == "llama.cpp"
    assert http.get("/v1/health").json() == {"status": "ok"}
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["owned_by"] == "llamacpp"
    assert models["data"][0]["meta"]["n_ctx_train"] == 32768
    assert http.get("/models").json()["models"][0]["details"]["format"] == "gguf"
    props = http.get("/props").json()
    assert props["total_slots"] == 4
    assert props["default_generation_settings"]["n_ctx"] == 2048
    assert props["default_generation_settings"]["params"]["top_k"] == 40
    assert props["bos_token"] == "<bos>" and props["endpoint_metrics"] is True
    assert http.post("/props", json={}).status_code == 501


def test_native_completion(http):
    request = {"prompt": PROMPT, "n_predict": 12, "temperature": 0, "ignore_eos": True}
    r = http.post("/completion", json={**request, "return_tokens": True, "cache_prompt": False})
    assert r.status_code == 200
    body = r.json()
    assert body["content"] and body["stop"] is True and body["stop_type"] == "limit"
    assert http.post("/detokenize", json={"tokens": body["tokens"]}).json()["content"] == body["content"]
    assert body["tokens_predicted"] == 12 and len(body["tokens"]) == 12
    assert body["tokens_evaluated"] == 6 and body["timings"]["predicted_n"] == 12
    assert body["generation_settings"]["n_predict"] == 12
    assert body["prompt"] == "<bos>" + PROMPT
    again = http.post("/completions", json={**request, "cache_prompt": False}).json()
    assert again["content"] == body["content"] and again["timings"]["cache_n"] == 0
    cached = http.post("/completions", json=request).json()
    assert cached["timings"]["cache_n"] == 5 and cached["tokens_predicted"] == 12


def test_native_completion_stream(http):
    with http.stream("POST", "/completion", json={"prompt": PROMPT, "n_predict": 10, **FIXED,
                                                   "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert "[DONE]" not in events
    assert all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True
    assert events[-1]["content"] == "" and events[-1]["tokens"] == []
    text = "".join(e["content"] for e in events[:-1])
    full = http.post("/completion", json={"prompt": PROMPT, "n_predict": 10, **FIXED}).json()
    assert text == full["content"] and events[-1]["tokens_predicted"] == full["tokens_predicted"]


def test_prompt_batch_and_token_prompts(http):
    r = http.post("/completion", json={"prompt": [PROMPT, "Once upon a time"], "n_predict": 4,
                                       "temperature": 0, "ignore_eos": True}).json()
    assert isinstance(r, list) and [x["index"] for x in r] == [0, 1]
    assert [x["prompt"] for x in r] == ["<bos>" + PROMPT, "<bos>Once upon a time"]
    assert [x["tokens_predicted"] for x in r] == [4, 4]
    tokens = http.post("/tokenize", json={"content": PROMPT, "add_special": True}).json()["tokens"]
    by_ids = http.post("/completion", json={"prompt": tokens, "n_predict": 4, **FIXED}).json()
    by_text = http.post("/completion", json={"prompt": PROMPT, "n_predict": 4, **FIXED}).json()
    assert by_ids["tokens_evaluated"] == len(tokens) == r[0]["tokens_evaluated"]
    assert by_ids["content"] == by_text["content"]


def test_stop_words_and_probs(http):
    # the stop word is one this machine's greedy text contains
    free = http.post("/completion", json={"prompt": PROMPT, "n_predict": 30, **FIXED}).json()["content"]
    words = [w for w in free.split() if len(w) >= 3 and free.find(w) > 0]
    assert words, free
    stop = words[len(words) // 2]
    body = http.post("/completion", json={"prompt": PROMPT, "n_predict": 30, **FIXED,
                                          "stop": [stop], "n_probs": 3}).json()
    assert body["stop_type"] == "word" and body["stopping_word"] == stop
    assert body["content"] == free[:free.find(stop)]
    probs = body["completion_probabilities"]
    assert probs and len(probs[0]["top_logprobs"]) == 3 and probs[0]["logprob"] <= 0


def test_oai_completions(http):
    from openai import OpenAI

    client = OpenAI(base_url=str(http.base_url) + "/v1", api_key="none")
    extra = {"ignore_eos": True, "cache_prompt": False}
    res = client.completions.create(model="x", prompt=PROMPT, max_tokens=8, temperature=0, extra_body=extra)
    assert res.choices[0].finish_reason == "length" and res.choices[0].text
    assert res.usage.completion_tokens == 8
    chunks = list(client.completions.create(model="x", prompt=PROMPT, max_tokens=8, temperature=0,
                                            stream=True, extra_body=extra))
    assert "".join(c.choices[0].text for c in chunks) == res.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_chat(http):
    from openai import OpenAI

    client = OpenAI(base_url=str(http.base_url) + "/v1", api_key="none")
    messages = [{"role": "user", "content": "Name a color."}]
    extra = {"cache_prompt": False}
    res = client.chat.completions.create(model="x", messages=messages, max_tokens=8, temperature=0,
                                         extra_body=extra)
    assert res.object == "chat.completion" and res.choices[0].message.role == "assistant"
    assert res.choices[0].finish_reason in ("length", "stop") and res.usage.prompt_tokens > 5
    assert 1 <= res.usage.completion_tokens <= 8
    stream = client.chat.completions.create(model="x", messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body=extra)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == res.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [res.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == res.usage.completion_tokens


def test_chat_json_schema_response_format(http):
    schema = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "blue"]}},
              "required": ["color"], "additionalProperties": False}  # bounded: it ends within max_tokens
    r = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Pick a color as JSON."}], "max_tokens": 120,
        "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}})
    assert r.status_code == 200
    assert json.loads(r.json()["choices"][0]["message"]["content"])["color"] in ("red", "blue")
    bad = http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nope"}}}})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_tokenize_detokenize_apply_template(http):
    r = http.post("/tokenize", json={"content": "Hello 😀", "with_pieces": True}).json()
    pieces = r["tokens"]
    assert all("id" in p and "piece" in p for p in pieces)
    ids = [p["id"] for p in pieces]
    assert http.post("/detokenize", json={"tokens": ids}).json()["content"] == "Hello 😀"
    assert http.post("/tokenize", json={}).json() == {"tokens": []}
    prompt = http.post("/apply-template", json={"messages": [{"role": "user", "content": "Hi"}]}).json()["prompt"]
    assert "Hi" in prompt and prompt.endswith("assistant\n")


def test_errors(http):
    # an unparseable body is the client's mistake: a 400 (upstream's parser throws, a 500)
    r = http.post("/completion", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = http.get("/nope")
    assert r.status_code == 404 and r.json() == {"error": {"code": 404, "message": "File Not Found",
                                                           "type": "not_found_error"}}
    r = http.post("/completion", json={"n_predict": 3})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = http.post("/completion", json={"prompt": "x", "n_predict": "many"})
    assert r.status_code == 400 and "n_predict" in r.json()["error"]["message"]
    r = http.post("/completion", json={"prompt": "word " * 3000})
    err = r.json()["error"]
    assert r.status_code == 400 and err["type"] == "exceed_context_size_error" and err["n_ctx"] == 2048
    r = http.post("/completion", json={"prompt": "x", "grammar": "root ::= ("})
    assert r.status_code == 400 and "grammar" in r.json()["error"]["message"]
    r = http.post("/completion", json={"prompt": [1, 999999999]})
    assert r.status_code == 400
    r = http.post("/completion", json={"prompt": "word " * 3000, "stream": True})
    assert r.status_code == 400  # streams commit late: an early error is a plain JSON error
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                "chat_template_kwargs": 5})
    assert r.status_code == 400
    assert http.post("/v1/messages", json={"messages": 5}).status_code == 400
    assert http.post("/embeddings", json={"input": "x"}).status_code == 501
    assert http.post("/rerank", json={"query": "x", "documents": ["y"]}).status_code == 501
    assert http.get("/health").status_code == 200  # still serving


def _count_prompt(i: int) -> str:
    return "Count: " + ", ".join(str(10 * i + k) for k in range(10, 13)) + ","


def test_eight_streams_on_four_slots(synthetic_server):
    # F32 synthetic model: each stream, side by side with the others, must equal its run alone;
    # no stream received another's tokens or attended to another's cache.
    def body(i):
        return {"prompt": _count_prompt(i), "n_predict": 16, "temperature": 0, "ignore_eos": True,
                "cache_prompt": False}

    def streamed_alone(i):
        # streamed, as the runs side by side: a stream leaves out a partial last character that a
        # whole response writes as U+FFFD (as upstream)
        with httpx.Client(base_url=synthetic_server.base, timeout=120) as c:
            with c.stream("POST", "/completion", json={**body(i), "stream": True}) as r:
                return "".join(e["content"] for e in sse_events(r)[:-1])

    alone = [streamed_alone(i) for i in range(8)]
    assert len(set(alone)) > 1
    results = [None] * 8

    def run(i):
        with httpx.Client(base_url=synthetic_server.base, timeout=120) as c:
            with c.stream("POST", "/completion", json={**body(i), "stream": True}) as r:
                results[i] = sse_events(r)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, events in enumerate(results):
        assert events[-1]["stop"] is True and events[-1]["tokens_predicted"] == 16
        streamed = "".join(e["content"] for e in events[:-1])
        assert streamed == alone[i], i


def test_disconnect_frees_the_slot(http, server):
    with httpx.Client(base_url=server.base, timeout=60) as c:
        with c.stream("POST", "/completion", json={"prompt": PROMPT, "n_predict": 100000,
                                                    "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break
    import time

    deadline = time.time() + 10
    while time.time() < deadline:
        if not any(s["is_processing"] for s in http.get("/slots").json()):
            break
        time.sleep(0.1)
    assert not any(s["is_processing"] for s in http.get("/slots").json())


def test_metrics_move(http):
    def value(name, prefix="llamacpp"):
        for line in http.get("/metrics").text.splitlines():
            if line.startswith(f"{prefix}:{name} "):
                return float(line.split()[1])

    before = value("tokens_predicted_total")
    busy, decode = value("engine_busy_seconds_total", "pyllama"), value("engine_decode_seconds_total", "pyllama")
    http.post("/completion", json={"prompt": "Hello", "n_predict": 5, "temperature": 0, "ignore_eos": True})
    r = http.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain") and "Process-Start-Time-Unix" in r.headers
    assert "# TYPE llamacpp:prompt_tokens_total counter" in r.text
    assert value("tokens_predicted_total") == before + 5
    assert value("n_decode_total") > 0
    # our engine counters: decode time is part of the engine thread's busy time
    busy_after = value("engine_busy_seconds_total", "pyllama")
    decode_after = value("engine_decode_seconds_total", "pyllama")
    assert decode_after > decode and busy_after - busy >= decode_after - decode
    assert value("engine_tokens_predicted_total", "pyllama") >= 5


def test_slots_save_restore_erase(http, slot_dir):
    http.post("/completion", json={"prompt": "Remember this sentence about llamas.", "n_predict": 2,
                                   "temperature": 0, "id_slot": 1})
    slots = http.get("/slots").json()
    assert len(slots) == 4 and slots[1]["id"] == 1
    saved = http.post("/slots/1?action=save", json={"filename": "s1.bin"}).json()
    assert saved["n_saved"] > 5 and (slot_dir / "s1.bin").exists()
    erased = http.post("/slots/1?action=erase").json()
    assert erased == {"id_slot": 1, "n_erased": saved["n_saved"]}
    restored = http.post("/slots/1?action=restore", json={"filename": "s1.bin"}).json()
    assert restored["n_restored"] == saved["n_saved"]
    r = http.post("/completion", json={"prompt": "Remember this sentence about llamas. Yes", "n_predict": 1,
                                       "id_slot": 1}).json()
    assert r["timings"]["cache_n"] >= saved["n_saved"] - 2
    assert http.post("/slots/1?action=save", json={"filename": "../evil.bin"}).status_code == 400
    assert http.post("/slots/1?action=explode").status_code == 400
    assert http.post("/slots/abc?action=erase").status_code == 400


def test_langchain_chat_openai(http):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=str(http.base_url) + "/v1", api_key="sk-no-key-required", model="any",
                     max_tokens=8, temperature=0, extra_body={"cache_prompt": False})
    reply = llm.invoke("Name a color.")
    assert isinstance(reply.content, str) and reply.response_metadata["finish_reason"] in ("length", "stop")
    streamed = "".join(part.content for part in llm.stream("Name a color."))
    assert streamed == reply.content


def test_response_fields_and_timings_per_token(http):
    r = http.post("/completion", json={"prompt": PROMPT, "n_predict": 3, "temperature": 0, "ignore_eos": True,
                                       "response_fields": ["content", "timings/predicted_n", "nope/x"]}).json()
    assert set(r) == {"content", "timings/predicted_n"} and r["timings/predicted_n"] == 3
    with http.stream("POST", "/completion", json={"prompt": PROMPT, "n_predict": 4, "stream": True,
                                                   "timings_per_token": True}) as resp:
        events = sse_events(resp)
    partial = [e for e in events if not e["stop"]]
    assert partial and all("timings" in e for e in partial)
    assert [e["timings"]["predicted_n"] for e in partial] == list(range(1, len(partial) + 1))


def test_return_progress(http):
    prompt = "Progress test: " + "one two three four five " * 60
    with http.stream("POST", "/completion", json={"prompt": prompt, "n_predict": 2, "stream": True,
                                                   "return_progress": True, "cache_prompt": False}) as r:
        events = sse_events(r)
    progress = [e["prompt_progress"] for e in events if "prompt_progress" in e]
    assert progress[0]["processed"] == progress[0]["cache"] == 0
    assert progress[-1]["processed"] == progress[-1]["total"] > 300
    assert events[-1]["stop"] is True
    with http.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True,
            "return_progress": True}) as r:
        chunks = [e for e in sse_events(r) if e != "[DONE]"]
    with_progress = [c for c in chunks if "prompt_progress" in c]
    assert with_progress and with_progress[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}


def _as_llama_server_slot_file(data: bytes, media_keys: int = 0) -> bytes:
    # llama_state_seq_save_file: magic, version, token count, tokens, state. llama-server (this pin)
    # writes server_tokens::serialize() as the "tokens": LLAMA_TOKEN_NULL, state version 1, the
    # token count and tokens, the media start indices (and their chunks), padded to 4 bytes
    import struct

    magic, version, n = struct.unpack_from("<III", data)
    tokens = data[12:12 + 4 * n]
    packed = struct.pack("<iII", -1, 1, n) + tokens + struct.pack("<I", media_keys)
    if media_keys:
        packed += struct.pack("<I", 0) + struct.pack("<I", 0)  # one start index, an empty chunk
    return struct.pack("<III", magic, version, len(packed) // 4) + packed + data[12 + 4 * n:]


def test_a_slot_file_saved_by_llama_server_restores(http, slot_dir):
    http.post("/completion", json={"prompt": "A slot written in llama-server's format.", "n_predict": 2,
                                   "temperature": 0, "id_slot": 2})
    saved = http.post("/slots/2?action=save", json={"filename": "ours.bin"}).json()
    (slot_dir / "theirs.bin").write_bytes(_as_llama_server_slot_file((slot_dir / "ours.bin").read_bytes()))
    restored = http.post("/slots/2?action=restore", json={"filename": "theirs.bin"}).json()
    assert restored["n_restored"] == saved["n_saved"]
    r = http.post("/completion", json={"prompt": "A slot written in llama-server's format. Yes", "n_predict": 1,
                                       "id_slot": 2}).json()
    assert r["timings"]["cache_n"] >= saved["n_saved"] - 2
    # with media in it, on a server without a projector: upstream's words, and the slot stays usable
    (slot_dir / "media.bin").write_bytes(_as_llama_server_slot_file((slot_dir / "ours.bin").read_bytes(), 1))
    refused = http.post("/slots/2?action=restore", json={"filename": "media.bin"})
    assert refused.status_code == 400
    assert "Cannot restore media tokens without an mmproj" in refused.json()["error"]["message"]
    assert http.post("/completion", json={"prompt": "still here", "n_predict": 1, "id_slot": 2}).status_code == 200
