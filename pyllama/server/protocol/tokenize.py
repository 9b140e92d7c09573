"""/tokenize and /detokenize, on the model's thread-safe vocabulary functions."""

from __future__ import annotations

from pyllama.errors import InvalidRequestError
from pyllama.server.protocol.base import ProtocolContext
from pyllama.server.protocol.params import get_bool, parses_body


@parses_body
def tokenize(body: dict, ctx: ProtocolContext) -> dict:
    """{"tokens": [...]}, with pieces when `with_pieces` is set."""
    model = ctx.model
    content = body.get("content")
    if content is None:
        return {"tokens": []}
    add_special = get_bool(body, "add_special", False)
    parse_special = get_bool(body, "parse_special", True)
    parts = content if isinstance(content, list) else [content]
    tokens = []
    for i, part in enumerate(parts):
        if isinstance(part, str):
            tokens += model.tokenize(part, add_special=add_special and i == 0, parse_special=parse_special)
        elif isinstance(part, int) and not isinstance(part, bool):
            tokens.append(part)
        else:
            raise InvalidRequestError("\"content\" must be a string or an array of strings and tokens",
                                      param="content")
    if not get_bool(body, "with_pieces", False):
        return {"tokens": tokens}
    out = []
    for tok in tokens:
        piece = model.token_to_piece(tok, special=True)
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError:
            text = list(piece)
        out.append({"id": tok, "piece": text})
    return {"tokens": out}


@parses_body
def detokenize(body: dict, ctx: ProtocolContext) -> dict:
    """{"content": text}."""
    tokens = body.get("tokens")
    if tokens is None:
        return {"content": ""}
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise InvalidRequestError("\"tokens\" must be an array of token ids", param="tokens")
    return {"content": ctx.model.detokenize(tokens, unparse_special=True)}
