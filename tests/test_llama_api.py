"""pyllama.Llama: the engine in-process, with OpenAI-shaped results, from several threads."""

from __future__ import annotations

import threading

import pytest

import pyllama


# The default model's greedy text depends on the CPU's kernels: tests compare runs of the same
# computation (cache_prompt=False: the whole prompt evaluated each time), never the text.
FIXED = dict(temperature=0, cache_prompt=False)


@pytest.fixture(scope="module")
def llm(gemma_path):
    with pyllama.Llama(gemma_path, n_ctx=4096) as model:
        yield model


def test_completion_and_stream(llm):
    res = llm.create_completion("The three primary colors are", max_tokens=8, ignore_eos=True, **FIXED)
    assert res["object"] == "text_completion" and res["choices"][0]["text"]
    assert res["usage"]["completion_tokens"] == 8 and res["choices"][0]["finish_reason"] == "length"
    chunks = list(llm.create_completion("The three primary colors are", max_tokens=8, ignore_eos=True,
                                        stream=True, **FIXED))
    assert "".join(c["choices"][0]["text"] for c in chunks) == res["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 8


def test_chat_and_stream(llm):
    messages = [{"role": "user", "content": "Say a color."}]
    res = llm.create_chat_completion(messages, max_tokens=6, **FIXED)
    assert res["choices"][0]["message"]["role"] == "assistant"
    chunks = list(llm.create_chat_completion(messages, max_tokens=6, stream=True, **FIXED))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == res["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == res["choices"][0]["finish_reason"]


def test_concurrent_threads_share_the_engine(synthetic_path):
    # F32 synthetic model: batch composition changes no number, so each thread's answer,
    # decoded side by side with the others, equals its answer alone.
    with pyllama.Llama(synthetic_path, n_ctx=2048) as synth:
        def run(i):
            return synth.create_completion(f"the {i} of and {i + 1}", max_tokens=12, ignore_eos=True, **FIXED)

        alone = [run(i)["choices"][0]["text"] for i in range(6)]
        assert len(set(alone)) > 1
        out = [None] * 6

        def work(i):
            out[i] = run(i)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, res in enumerate(out):
            assert res["choices"][0]["text"] == alone[i] and res["usage"]["completion_tokens"] == 12


def test_tokenize_and_embeddings(llm, synthetic_path):
    assert llm.detokenize(llm.tokenize("Hello world", add_special=False)) == "Hello world"
    with pyllama.Llama(synthetic_path, embeddings=True, pooling="mean", n_ctx=512) as emb:
        res = emb.create_embedding(["hello", "world"])
        assert len(res["data"]) == 2 and len(res["data"][0]["embedding"]) == emb.model.n_embd
