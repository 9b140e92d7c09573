"""/embedding(s) (native), /v1/embeddings (OpenAI) and /rerank (Jina and TEI forms), §4.6-4.7.

`parse_*(body, ctx)` gives an EmbeddingJob: the token inputs for Engine.embed and the function
that writes the family's JSON from its EmbeddingResult.
Imports: `engine` types, `errors`, the request-field helpers.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Callable

from pyllama.engine import EmbeddingResult
from pyllama.errors import InvalidRequestError, NotSupportedError
from pyllama.server.protocol.base import ProtocolContext
from pyllama.server.protocol.params import check_embedding_input, get_int, parses_body, tokenize_prompt


@dataclass
class EmbeddingJob:
    """The inputs of one embedding call and how to answer it."""

    inputs: list[list[int]]
    normalize: int
    respond: Callable[[EmbeddingResult], object]

    def response(self, result: EmbeddingResult):
        return self.respond(result)


def _inputs(model, value, n_ubatch: int = 0) -> list[list[int]]:
    if isinstance(value, list) and value and all(isinstance(v, (str, list, dict)) for v in value) \
            and not all(isinstance(v, int) for v in value):
        items = value
    else:
        items = [value]
    if not items or value == []:
        raise InvalidRequestError("Input content cannot be empty", param="input")
    out = []
    for item in items:
        if isinstance(item, dict) and "content" in item:
            item = _content_text(item["content"])
        if isinstance(item, str):
            check_embedding_input(model, item, n_ubatch)
        tokens = tokenize_prompt(model, item)
        if not tokens:
            raise InvalidRequestError("Input content cannot be empty", param="input")
        out.append(tokens)
    return out


def _content_text(content):
    """An input's OAI content (tokenize_oai_content_array): its text parts joined as they are.

    Raises:
        NotSupportedError: an image, audio or video part (multimodal embeddings).
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError("\"content\" must be an array", param="input")
    text = []
    for part in content:
        if not isinstance(part, dict):
            raise InvalidRequestError("\"content\" must be an array of objects", param="input")
        if part.get("type", "text") not in ("text", "media_marker"):
            # NOTE(pyllama): upstream embeds media through libmtmd; the embedding engine does not
            raise NotSupportedError("multimodal embeddings are not supported by pyllama yet")
        value = part.get("text", "")
        if not isinstance(value, str):
            raise InvalidRequestError("a content part's \"text\" must be a string", param="input")
        text.append(value)
    return "".join(text)


def _require_embeddings(ctx: ProtocolContext) -> None:
    if not ctx.embeddings:
        raise NotSupportedError("This server does not support embeddings. Start it with `--embeddings`")


def _native_data(result: EmbeddingResult) -> list:
    if result.pooling == "none":
        return [{"index": i, "embedding": e} for i, e in enumerate(result.embeddings)]
    return [{"index": i, "embedding": [e]} for i, e in enumerate(result.embeddings)]


@parses_body
def parse_native(body: dict, ctx: ProtocolContext) -> EmbeddingJob:
    """POST /embedding, /embeddings: [{index, embedding}] (native format)."""
    _require_embeddings(ctx)
    value = body.get("input", body.get("content"))
    if value is None:
        raise InvalidRequestError("\"input\" or \"content\" must be provided", param="input")
    normalize = get_int(body, "embd_normalize", ctx.embd_normalize)
    return EmbeddingJob(_inputs(ctx.model, value, ctx.n_ubatch), -1 if ctx.pooling == "none" else normalize, _native_data)


@parses_body
def parse_oai(body: dict, ctx: ProtocolContext) -> EmbeddingJob:
    """POST /v1/embeddings: the OpenAI list format (a `content` body answers natively)."""
    if "input" not in body and "content" in body:
        _require_embeddings(ctx)
        return EmbeddingJob(_inputs(ctx.model, body["content"], ctx.n_ubatch), ctx.embd_normalize, _native_data)
    _require_embeddings(ctx)
    if ctx.pooling == "none":
        raise InvalidRequestError("Pooling type 'none' is not OAI compatible. Please use a different pooling type")
    if "input" not in body:
        raise InvalidRequestError("\"input\" must be provided", param="input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise InvalidRequestError("The format to return the embeddings in. Can be either float or base64",
                                  param="encoding_format")
    normalize = get_int(body, "embd_normalize", ctx.embd_normalize)
    model_name = body.get("model") or ctx.model_name

    def respond(result: EmbeddingResult) -> dict:
        data = []
        for i, vec in enumerate(result.embeddings):
            item = {"embedding": vec, "index": i, "object": "embedding"}
            if encoding == "base64":
                item["embedding"] = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
                item["encoding_format"] = "base64"
            data.append(item)
        n_tokens = sum(result.n_tokens)
        return {"model": model_name, "object": "list",
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}, "data": data}

    return EmbeddingJob(_inputs(ctx.model, body["input"], ctx.n_ubatch), normalize, respond)


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


@parses_body
def parse_rerank(body: dict, ctx: ProtocolContext) -> EmbeddingJob:
    """POST /rerank, /reranking, /v1/rerank, /v1/reranking (needs --reranking)."""
    if not ctx.embeddings or ctx.pooling != "rank":
        raise NotSupportedError("This server does not support reranking. Start it with `--reranking`")
    query = body.get("query")
    if not isinstance(query, str):
        raise InvalidRequestError("\"query\" must be a string", param="query")
    tei = "texts" in body
    docs = body.get("texts") if tei else body.get("documents")
    if not isinstance(docs, list) or not docs or not all(isinstance(d, str) for d in docs):
        raise InvalidRequestError("\"documents\" must be a non-empty string array", param="documents")
    top_n = get_int(body, "top_n", len(docs), lo=0)
    return_text = bool(body.get("return_text", False))
    model_name = body.get("model") or ctx.model_name

    def respond(result: EmbeddingResult):
        scored = sorted(((s[0], i) for i, s in enumerate(result.embeddings)), key=lambda x: -x[0])[:top_n]
        if tei:
            return [{"index": i, "score": s, **({"text": docs[i]} if return_text else {})} for s, i in scored]
        n_tokens = sum(result.n_tokens)
        return {"model": model_name, "object": "list",
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
                "results": [{"index": i, "relevance_score": s} for s, i in scored]}

    for text in (query, *docs):
        check_embedding_input(ctx.model, text, ctx.n_ubatch, add_special=False, parse_special=False)
    return EmbeddingJob([rerank_tokens(ctx.model, query, d) for d in docs], -1, respond)
