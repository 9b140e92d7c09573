"""Anthropic Messages (with the anthropic client), token counters, LoRA listing, UNIX socket."""

from __future__ import annotations

import httpx
import pytest

from .conftest import ServerProcess


def test_anthropic_messages(server):
    import anthropic

    client = anthropic.Anthropic(base_url=server.base, api_key="none")
    # cache_prompt false: both runs evaluate the whole prompt, the same computation
    extra = {"temperature": 0, "cache_prompt": False}
    msg = client.messages.create(model="x", max_tokens=8, system="Be brief.", extra_body=extra,
                                 messages=[{"role": "user", "content": "Name a color."}])
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.stop_reason in ("max_tokens", "end_turn") and msg.usage.output_tokens <= 8
    text = "".join(b.text for b in msg.content if b.type == "text")
    with client.messages.stream(model="x", max_tokens=8, system="Be brief.", extra_body=extra,
                                messages=[{"role": "user", "content": "Name a color."}]) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.stop_reason == msg.stop_reason and final.usage.output_tokens == msg.usage.output_tokens
    assert streamed == text  # greedy: the stream spells out the same answer


def test_anthropic_raw_events_and_errors(http):
    with http.stream("POST", "/v1/messages", json={"model": "x", "max_tokens": 4, "stream": True,
                                                    "messages": [{"role": "user", "content": "Hi"}]}) as r:
        names = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert "[DONE]" not in names
    r = http.post("/v1/messages", json={"model": "x", "max_tokens": 4})
    # upstream answers 500 (a runtime error); a client's mistake is a 4xx that names the field
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "messages" in r.json()["error"]["message"]


def test_token_counters(http):
    body = {"messages": [{"role": "user", "content": "Hello there"}]}
    chat = http.post("/v1/chat/completions/input_tokens", json=body).json()
    assert chat["object"] == "response.input_tokens" and chat["input_tokens"] > 3
    anthropic_count = http.post("/v1/messages/count_tokens", json={"model": "x", **body}).json()
    assert anthropic_count == {"input_tokens": chat["input_tokens"]}
    prompt = http.post("/apply-template", json=body).json()["prompt"]
    tokens = http.post("/tokenize", json={"content": prompt, "add_special": True}).json()["tokens"]
    assert len(tokens) == chat["input_tokens"]


def test_lora_adapters_without_adapters(http):
    assert http.get("/lora-adapters").json() == []
    assert http.post("/lora-adapters", json=[]).json() == {"success": True}
    assert http.post("/lora-adapters", json={"id": 0}).status_code == 400
    assert http.post("/lora-adapters", json=[{"id": 0, "scale": 1.0}]).status_code == 400


def test_lora_adapters(tmp_path):
    from pyllama.synthetic import write_synthetic_lora, write_synthetic_model

    model = write_synthetic_model(tmp_path / "base.gguf")
    lora = write_synthetic_lora(tmp_path / "lora.gguf")
    srv = ServerProcess(["-m", str(model), "-np", "2", "-c", "512", "--lora-scaled", f"{lora}:0.5"])
    try:
        srv.wait_ready()
        assert httpx.get(srv.base + "/lora-adapters").json() == [
            {"id": 0, "path": str(lora), "scale": 0.5, "task_name": "", "prompt_prefix": ""}]

        def tokens(**extra):
            body = {"prompt": "Hello world", "n_predict": 8, "temperature": 0, "ignore_eos": True,
                    "return_tokens": True, **extra}
            return httpx.post(srv.base + "/completion", json=body).json()["tokens"]

        with_lora = tokens()
        without = tokens(lora=[{"id": 0, "scale": 0.0}])
        assert with_lora != without
        assert tokens(lora=[]) == without  # unlisted adapters get scale 0
        assert httpx.post(srv.base + "/lora-adapters", json=[{"id": 0, "scale": 0.0}]).json() == {"success": True}
        assert httpx.get(srv.base + "/lora-adapters").json()[0]["scale"] == 0.0
        assert tokens() == without
        assert tokens(lora=[{"id": 0, "scale": 0.5}]) == with_lora
        assert httpx.post(srv.base + "/lora-adapters", json=[{"id": 3, "scale": 1}]).status_code == 400
        assert httpx.post(srv.base + "/completion", json={"prompt": "x", "lora": [{"id": 5, "scale": 1}]}).status_code == 400
    finally:
        srv.stop()


def test_unix_socket(synthetic_path, tmp_path):
    sock = tmp_path / "pyllama.sock"
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "1", "-c", "256", "--host", str(sock)])
    try:
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, base_url="http://pyllama") as client:
            import time

            for _ in range(300):
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            r = client.post("/completion", json={"prompt": "Hello", "n_predict": 2, "ignore_eos": True})
            assert r.status_code == 200 and r.json()["tokens_predicted"] == 2
    finally:
        srv.stop()


def test_infill(http, tmp_path):
    r = http.post("/infill", json={"input_prefix": "def f(", "input_suffix": "):"})
    assert r.status_code == 501 and r.json()["error"]["type"] == "not_supported_error"  # gemma: no FIM
    from pyllama.synthetic import SyntheticSpec, write_synthetic_model

    path = write_synthetic_model(tmp_path / "fim.gguf", SyntheticSpec(fim=True))
    srv = ServerProcess(["-m", str(path), "-np", "1", "-c", "4096", "-b", "512"])
    try:
        srv.wait_ready()
        body = {"input_prefix": "the ", "input_suffix": " end", "prompt": "a",
                "input_extra": [{"filename": "x.txt", "text": "hello"}], "n_predict": 4,
                "return_tokens": True, "ignore_eos": True}
        res = httpx.post(srv.base + "/infill", json=body).json()
        assert res["tokens_predicted"] == 4
        toks = httpx.post(srv.base + "/tokenize", json={"content": res["prompt"], "parse_special": True}).json()
        assert "<fim_prefix>" in res["prompt"] and res["prompt"].endswith("<fim_middle>")
        assert res["prompt"].index("hello") < res["prompt"].index("<fim_prefix>") < res["prompt"].index("<fim_suffix>")
        assert toks["tokens"]
        bad = httpx.post(srv.base + "/infill", json={"input_prefix": "x", "input_suffix": "y",
                                                     "input_extra": [{"text": 3}]})
        assert bad.status_code == 400
    finally:
        srv.stop()


def test_tool_results_follow_their_message_and_keep_images(synthetic_server):
    # convert_anthropic_to_oai: a user message's text comes before the tool results it carries,
    # and a tool_result with an image becomes OAI content parts (here, with no projector, the
    # image is refused in upstream's words instead of being dropped)
    from pyllama.server.protocol.anthropic import to_chat

    pixel = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    body = {"model": "m", "max_tokens": 4, "messages": [
        {"role": "user", "content": "look"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "read", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "File: a.png"}, pixel]},
            {"type": "text", "text": "and now?"}]}]}
    messages = to_chat(body)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "tool"]
    assert messages[2]["content"] == "and now?"
    assert messages[3]["content"] == [{"type": "text", "text": "File: a.png"},
                                      {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    text_only = to_chat({**body, "messages": body["messages"][:2] + [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "File: a.png"}]}]}]})
    assert text_only["messages"][-1]["content"] == "File: a.png"
    r = httpx.post(synthetic_server.base + "/v1/messages", json=body, timeout=60)
    assert r.status_code == 400 and "image input is not supported" in r.json()["error"]["message"]
