"""/embedding(s) (native), /v1/embeddings (OpenAI) and /rerank (Jina and TEI forms)."""

from __future__ import annotations

from pyllama.server.protocol import embeddings
from pyllama.server.streaming import write_json


class _EmbeddingFamily:
    parse = None  # the protocol function: (body, ctx) -> EmbeddingJob

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        job = type(self).parse(req.context.body, self.state.protocol)
        write_json(resp, job.response(self.state.engine.embed(job.inputs, job.normalize)))


class EmbeddingResource(_EmbeddingFamily):
    """POST /embedding, /embeddings: [{index, embedding}] (native format)."""

    parse = embeddings.parse_native


class OAIEmbeddingResource(_EmbeddingFamily):
    """POST /v1/embeddings: the OpenAI list format."""

    parse = embeddings.parse_oai


class RerankResource(_EmbeddingFamily):
    """POST /rerank, /reranking, /v1/rerank, /v1/reranking (needs --reranking)."""

    parse = embeddings.parse_rerank
