"""--embeddings and --reranking servers with a real MiniLM model, over HTTP and the openai client."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import pytest

from embedding_models import minilm_classifier_gguf, minilm_gguf

from .conftest import ServerProcess


@pytest.fixture(scope="module")
def embed_server():
    srv = ServerProcess(["-m", str(minilm_gguf()), "--embeddings", "-np", "2", "-c", "1024",
                         "-b", "512", "-ub", "512", "--metrics"])
    srv.wait_ready()
    yield srv
    srv.stop()


def test_openai_embeddings(embed_server):
    from openai import OpenAI

    client = OpenAI(base_url=embed_server.base + "/v1", api_key="none")
    res = client.embeddings.create(model="minilm", input=["The cat sat.", "A dog ran."])
    assert [d.index for d in res.data] == [0, 1] and len(res.data[0].embedding) == 384
    assert math.isclose(sum(x * x for x in res.data[0].embedding), 1.0, rel_tol=1e-4)
    assert res.usage.prompt_tokens > 4
    b64 = httpx.post(embed_server.base + "/v1/embeddings",
                     json={"input": "The cat sat.", "encoding_format": "base64"}).json()
    vec = struct.unpack("<384f", base64.b64decode(b64["data"][0]["embedding"]))
    assert max(abs(a - b) for a, b in zip(vec, res.data[0].embedding)) < 1e-6


def test_native_embeddings_and_errors(embed_server):
    r = httpx.post(embed_server.base + "/embedding", json={"content": "The cat sat."}).json()
    assert len(r) == 1 and len(r[0]["embedding"]) == 1 and len(r[0]["embedding"][0]) == 384
    raw = httpx.post(embed_server.base + "/embeddings", json={"input": "The cat sat.", "embd_normalize": -1}).json()
    assert not math.isclose(sum(x * x for x in raw[0]["embedding"][0]), 1.0, rel_tol=1e-3)
    # an empty text is its special tokens alone, as upstream ("do not crash on empty input")
    empty = httpx.post(embed_server.base + "/v1/embeddings", json={"input": ""})
    assert empty.status_code == 200 and empty.json()["usage"]["prompt_tokens"] == 2  # [CLS] [SEP]
    assert httpx.post(embed_server.base + "/v1/embeddings", json={"input": []}).status_code == 400
    # OAI content parts: the text parts joined (tokenize_oai_content_array); media is not embedded
    parts = httpx.post(embed_server.base + "/v1/embeddings", json={"input": [
        "The cat sat.", {"content": [{"type": "text", "text": "The cat "}, {"type": "text", "text": "sat."}]}]}).json()
    assert max(abs(a - b) for a, b in zip(parts["data"][0]["embedding"], parts["data"][1]["embedding"])) < 1e-6
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert httpx.post(embed_server.base + "/v1/embeddings",
                      json={"input": {"content": [image]}}).status_code == 501
    assert httpx.post(embed_server.base + "/v1/embeddings", json={}).status_code == 400
    assert httpx.post(embed_server.base + "/completion", json={"prompt": "x"}).status_code == 501
    assert httpx.post(embed_server.base + "/v1/embeddings",
                      json={"input": "x", "encoding_format": "hex"}).status_code == 400


def test_rerank_server():
    srv = ServerProcess(["-m", str(minilm_classifier_gguf()), "--reranking", "-np", "2", "-c", "1024",
                         "-b", "512", "-ub", "512"])
    try:
        srv.wait_ready()
        docs = ["A cat is a small animal.", "Stocks fell on Monday.", "Cats purr."]
        jina = httpx.post(srv.base + "/v1/rerank", json={"query": "what is a cat?", "documents": docs,
                                                         "top_n": 2}).json()
        assert len(jina["results"]) == 2 and jina["object"] == "list"
        scores = [r["relevance_score"] for r in jina["results"]]
        assert scores == sorted(scores, reverse=True)
        tei = httpx.post(srv.base + "/rerank", json={"query": "what is a cat?", "texts": docs,
                                                     "return_text": True}).json()
        assert len(tei) == 3 and {t["text"] for t in tei} == set(docs)
        assert tei[0]["score"] == pytest.approx(scores[0], abs=1e-5)
        assert httpx.post(srv.base + "/rerank", json={"query": 1, "documents": docs}).status_code == 400
        assert httpx.post(srv.base + "/rerank", json={"query": "q", "documents": []}).status_code == 400
    finally:
        srv.stop()


def test_embedding_work_counts_in_the_metrics(embed_server):
    # upstream counts every task's prompt: embedding inputs are prompt tokens and decodes too
    def counters():
        text = httpx.get(embed_server.base + "/metrics").text
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line.startswith("llamacpp:") and not line.startswith("#")}

    before = counters()
    r = httpx.post(embed_server.base + "/v1/embeddings", json={"input": ["hello world", "goodbye world"]}).json()
    after = counters()
    assert after["llamacpp:prompt_tokens_total"] - before["llamacpp:prompt_tokens_total"] == r["usage"]["prompt_tokens"]
    assert after["llamacpp:n_decode_total"] > before["llamacpp:n_decode_total"]
    assert after["llamacpp:prompt_seconds_total"] > before["llamacpp:prompt_seconds_total"]
    assert after["llamacpp:tokens_predicted_total"] == 0
