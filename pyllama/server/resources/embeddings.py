"""/embedding(s) (native), /v1/embeddings (OpenAI) and /rerank (Jina and TEI forms), §4.6-4.7."""

from __future__ import annotations

import base64
import struct

from pyllama.errors import InvalidRequestError, NotSupportedError
from pyllama.server.protocol.params import get_int, tokenize_prompt
from pyllama.server.resources.body import read_json, write_json


def _inputs(model, value) -> list[list[int]]:
    if isinstance(value, list) and value and all(isinstance(v, (str, list, dict)) for v in value) \
            and not all(isinstance(v, int) for v in value):
        items = value
    else:
        items = [value]
    if not items or value == []:
        raise InvalidRequestError("Input content cannot be empty")
    out = []
    for item in items:
        if isinstance(item, dict) and "content" in item:
            item = item["content"]
        if item == "" or item == []:
            raise InvalidRequestError("Input content cannot be empty")
        tokens = tokenize_prompt(model, item)
        if not tokens:
            raise InvalidRequestError("Input content cannot be empty")
        out.append(tokens)
    return out


def _require_embeddings(state):
    engine = state.require_ready()
    if not engine.embeddings:
        raise NotSupportedError("This server does not support embeddings. Start it with `--embeddings`")
    return engine


class EmbeddingResource:
    """POST /embedding, /embeddings: [{index, embedding}] (native format)."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        body = read_json(req, self.state.settings.max_body_mb << 20)
        engine = _require_embeddings(self.state)
        value = body.get("input", body.get("content"))
        if value is None:
            raise InvalidRequestError("\"input\" or \"content\" must be provided")
        normalize = get_int(body, "embd_normalize", self.state.settings.embd_normalize)
        result = engine.embed(_inputs(engine.model, value),
                              -1 if engine.embedder.pooling_name == "none" else normalize)
        if result.pooling == "none":
            data = [{"index": i, "embedding": e} for i, e in enumerate(result.embeddings)]
        else:
            data = [{"index": i, "embedding": [e]} for i, e in enumerate(result.embeddings)]
        write_json(resp, data)


class OAIEmbeddingResource:
    """POST /v1/embeddings: the OpenAI list format (a `content` body answers natively)."""

    def __init__(self, state) -> None:
        self.state = state
        self.native = EmbeddingResource(state)

    def on_post(self, req, resp):
        body = read_json(req, self.state.settings.max_body_mb << 20)
        if "input" not in body and "content" in body:
            req.context.body = body
            engine = _require_embeddings(self.state)
            result = engine.embed(_inputs(engine.model, body["content"]), self.state.settings.embd_normalize)
            write_json(resp, [{"index": i, "embedding": [e] if result.pooling != "none" else e}
                              for i, e in enumerate(result.embeddings)])
            return
        engine = _require_embeddings(self.state)
        if engine.embedder.pooling_name == "none":
            raise InvalidRequestError("Pooling type 'none' is not OAI compatible. Please use a different pooling type")
        if "input" not in body:
            raise InvalidRequestError("\"input\" must be provided")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise InvalidRequestError("The format to return the embeddings in. Can be either float or base64")
        normalize = get_int(body, "embd_normalize", self.state.settings.embd_normalize)
        result = engine.embed(_inputs(engine.model, body["input"]), normalize)
        data = []
        for i, vec in enumerate(result.embeddings):
            item = {"embedding": vec, "index": i, "object": "embedding"}
            if encoding == "base64":
                item["embedding"] = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
                item["encoding_format"] = "base64"
            data.append(item)
        n_tokens = sum(result.n_tokens)
        write_json(resp, {"model": body.get("model") or self.state.model_name, "object": "list",
                          "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}, "data": data})


def rerank_tokens(model, query: str, doc: str) -> list[int]:
    """The rerank prompt: the model's "rerank" template, else BOS query EOS SEP doc EOS
    as the vocabulary flags say (upstream's format_prompt_rerank)."""
    template = model.named_chat_template("rerank")
    if template:
        text = template.replace("{query}", query).replace("{document}", doc)
        return model.tokenize(text, add_special=True, parse_special=True)
    tokens = []
    if model.add_bos and model.token_bos is not None:
        tokens.append(model.token_bos)
    tokens += model.tokenize(query, add_special=False, parse_special=False)
    if model.add_eos and model.token_eos is not None:
        tokens.append(model.token_eos)
    if model.add_sep and model.token_sep is not None:
        tokens.append(model.token_sep)
    tokens += model.tokenize(doc, add_special=False, parse_special=False)
    if model.add_eos and model.token_eos is not None:
        tokens.append(model.token_eos)
    return tokens


class RerankResource:
    """POST /rerank, /reranking, /v1/rerank, /v1/reranking (needs --reranking)."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        body = read_json(req, self.state.settings.max_body_mb << 20)
        engine = self.state.require_ready()
        if not engine.embeddings or engine.embedder.pooling_name != "rank":
            raise NotSupportedError("This server does not support reranking. Start it with `--reranking`")
        query = body.get("query")
        if not isinstance(query, str):
            raise InvalidRequestError("\"query\" must be a string")
        tei = "texts" in body
        docs = body.get("texts") if tei else body.get("documents")
        if not isinstance(docs, list) or not docs or not all(isinstance(d, str) for d in docs):
            raise InvalidRequestError("\"documents\" must be a non-empty string array")
        top_n = get_int(body, "top_n", len(docs), lo=0)
        inputs = [rerank_tokens(engine.model, query, d) for d in docs]
        result = engine.embed(inputs, -1)
        scored = sorted(((s[0], i) for i, s in enumerate(result.embeddings)), key=lambda x: -x[0])[:top_n]
        n_tokens = sum(result.n_tokens)
        if tei:
            return_text = bool(body.get("return_text", False))
            write_json(resp, [{"index": i, "score": s, **({"text": docs[i]} if return_text else {})}
                              for s, i in scored])
        else:
            write_json(resp, {"model": body.get("model") or self.state.model_name, "object": "list",
                              "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
                              "results": [{"index": i, "relevance_score": s} for s, i in scored]})
