"""Embeddings and rerank scores through EmbeddingCore, on real and synthetic models."""

from __future__ import annotations

import math
import threading

import pytest

from pyllama.engine import Engine
from pyllama.errors import ContextLengthExceededError, InvalidRequestError, NotSupportedError

from embedding_models import classifier_head, minilm_classifier_gguf, minilm_dir, minilm_gguf

TEXTS = ["The cat sat on the mat.", "A dog played in the park today, happily.",
         "Quantum chromodynamics describes the strong interaction.", "The cat sat on the mat."]
# Batched and single decodes may differ by float rounding (the pooling matmul sums over the
# whole batch); upstream batches the same way. Identical up to this.
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def minilm():
    with Engine(minilm_gguf(), embeddings=True, n_parallel=4, n_ctx=2048, n_batch=512,
                n_ubatch=512) as eng:
        yield eng


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    result = minilm.embed([minilm.model.tokenize(t) for t in TEXTS])
    assert result.pooling == "mean" and result.n_tokens[0] == len(minilm.model.tokenize(TEXTS[0]))
    reference = SentenceTransformer(str(minilm_dir()), device="cpu").encode(
        TEXTS, normalize_embeddings=True)
    for ours, theirs in zip(result.embeddings, reference):
        assert len(ours) == 384
        assert _cos(ours, theirs) > 0.9999
        assert math.isclose(math.sqrt(sum(x * x for x in ours)), 1.0, rel_tol=1e-5)


def test_same_text_alone_and_in_a_batch(minilm):
    batch = minilm.embed([minilm.model.tokenize(t) for t in TEXTS]).embeddings
    alone = minilm.embed([minilm.model.tokenize(TEXTS[0])]).embeddings[0]
    for vec in (batch[0], batch[3]):
        assert max(abs(x - y) for x, y in zip(vec, alone)) < TOLERANCE
    # concurrent callers share decodes and still get their own vectors
    results = [None] * 8

    def work(i):
        results[i] = minilm.embed([minilm.model.tokenize(TEXTS[i % 3])]).embeddings[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, vec in enumerate(results):
        assert max(abs(x - y) for x, y in zip(vec, batch[i % 3])) < TOLERANCE


def test_normalisation_modes(minilm):
    tokens = [minilm.model.tokenize(TEXTS[1])]
    raw = minilm.embed(tokens, normalize=-1).embeddings[0]
    l2 = minilm.embed(tokens, normalize=2).embeddings[0]
    taxicab = minilm.embed(tokens, normalize=1).embeddings[0]
    maxabs = minilm.embed(tokens, normalize=0).embeddings[0]
    norm = math.sqrt(sum(x * x for x in raw))
    assert norm > 0 and not math.isclose(norm, 1.0, rel_tol=1e-3)
    assert all(math.isclose(a / norm, b, abs_tol=1e-6) for a, b in zip(raw, l2))
    assert math.isclose(sum(abs(x) for x in taxicab), 1.0, rel_tol=1e-5)
    assert math.isclose(max(abs(x) for x in maxabs), 32760.0, rel_tol=1e-5)


def test_pooling_none_gives_a_vector_per_token():
    with Engine(minilm_gguf(), embeddings=True, pooling="none", n_ctx=512, n_batch=512,
                n_ubatch=512) as eng:
        tokens = eng.model.tokenize(TEXTS[0])
        result = eng.embed([tokens])
        assert result.pooling == "none" and len(result.embeddings[0]) == len(tokens)
        assert all(len(v) == 384 for v in result.embeddings[0])


def test_rerank_scores_match_the_classifier_head():
    from sentence_transformers import SentenceTransformer

    query_docs = ["what is a cat?", "A cat is a small animal.", "Stocks fell on Monday."]
    with Engine(minilm_classifier_gguf(), embeddings=True, pooling="rank", n_parallel=4,
                n_ctx=1024, n_batch=512, n_ubatch=512) as eng:
        result = eng.embed([eng.model.tokenize(t) for t in query_docs])
    assert result.pooling == "rank" and all(len(s) == 1 for s in result.embeddings)
    # reference: the same head on the CLS hidden state computed by sentence-transformers
    weight, bias = classifier_head()
    hidden = SentenceTransformer(str(minilm_dir()), device="cpu").encode(
        query_docs, output_value="token_embeddings")
    expected = [float(h[0] @ weight[0] + bias[0]) for h in hidden]
    for (score,), ref in zip(result.embeddings, expected):
        assert abs(score - ref) < 2e-3
    assert len({round(s[0], 4) for s in result.embeddings}) == 3


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_causal_model_embeddings_are_batch_independent(synthetic_path, pooling):
    with Engine(synthetic_path, embeddings=True, pooling=pooling, n_parallel=4, n_ctx=512) as eng:
        tokens = [eng.model.tokenize(t) for t in TEXTS]
        batch = eng.embed(tokens).embeddings
        alone = eng.embed([tokens[0]]).embeddings[0]
        assert len(alone) == eng.model.n_embd
        assert max(abs(x - y) for x, y in zip(batch[0], alone)) < TOLERANCE
        assert max(abs(x - y) for x, y in zip(batch[3], alone)) < TOLERANCE
        assert _cos(batch[0], batch[1]) < 0.9999


def test_embedding_errors(minilm, synthetic_path):
    with pytest.raises(InvalidRequestError, match="empty"):
        minilm.embed([[]])
    with pytest.raises(ContextLengthExceededError):
        minilm.embed([[101] + [1037] * 600 + [102]])
    with Engine(minilm_gguf(), embeddings=True, n_ctx=512, n_batch=512, n_ubatch=128) as small:
        with pytest.raises(InvalidRequestError, match="too large to process"):
            small.embed([[101] + [1037] * 300 + [102]])
    with Engine(synthetic_path, embeddings=True, pooling="mean", n_ctx=256, n_ubatch=512,
                n_batch=512) as eng:
        with pytest.raises(ContextLengthExceededError):
            eng.embed([[1] * 300])
        from pyllama.engine import Request

        with pytest.raises(NotSupportedError):
            eng.submit(Request(prompt=[1, 2]))
    assert minilm.embed([minilm.model.tokenize("still serving")]).embeddings
