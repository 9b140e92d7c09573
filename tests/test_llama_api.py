"""pyllama.Llama: the engine in-process, with OpenAI-shaped results, from several threads."""

from __future__ import annotations

import threading

import pytest

import pyllama


@pytest.fixture(scope="module")
def llm(gemma_path):
    with pyllama.Llama(gemma_path, n_ctx=4096) as model:
        yield model


def test_completion_and_stream(llm):
    res = llm.create_completion("The three primary colors are", max_tokens=8, temperature=0)
    assert res["object"] == "text_completion" and "red" in res["choices"][0]["text"]
    assert res["usage"]["completion_tokens"] == 8
    chunks = list(llm.create_completion("The three primary colors are", max_tokens=8, temperature=0,
                                        stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == res["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_and_stream(llm):
    messages = [{"role": "user", "content": "Say a color."}]
    res = llm.create_chat_completion(messages, max_tokens=6, temperature=0)
    assert res["choices"][0]["message"]["role"] == "assistant"
    chunks = list(llm.create_chat_completion(messages, max_tokens=6, temperature=0, stream=True))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == res["choices"][0]["message"]["content"]


def test_concurrent_threads_share_the_engine(llm):
    out = [None] * 6

    def work(i):
        out[i] = llm.create_completion(f"Count: {i}, {i + 1}, {i + 2},", max_tokens=4, temperature=0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, res in enumerate(out):
        assert res["choices"][0]["text"].strip().startswith(str(i + 3))


def test_tokenize_and_embeddings(llm, synthetic_path):
    assert llm.detokenize(llm.tokenize("Hello world", add_special=False)) == "Hello world"
    with pyllama.Llama(synthetic_path, embeddings=True, pooling="mean", n_ctx=512) as emb:
        res = emb.create_embedding(["hello", "world"])
        assert len(res["data"]) == 2 and len(res["data"][0]["embedding"]) == emb.model.n_embd
