"""/tokenize and /detokenize, on the model's thread-safe vocabulary functions."""

from __future__ import annotations

from pyllama.errors import InvalidRequestError
from pyllama.server.protocol.params import get_bool
from pyllama.server.resources.body import read_json, write_json


class TokenizeResource:
    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        body = read_json(req, self.state.settings.max_body_mb << 20)
        model = self.state.require_ready().model
        content = body.get("content")
        if content is None:
            write_json(resp, {"tokens": []})
            return
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
                raise InvalidRequestError("\"content\" must be a string or an array of strings and tokens")
        if get_bool(body, "with_pieces", False):
            out = []
            for tok in tokens:
                piece = model.token_to_piece(tok, special=True)
                try:
                    text = piece.decode("utf-8")
                except UnicodeDecodeError:
                    text = list(piece)
                out.append({"id": tok, "piece": text})
            write_json(resp, {"tokens": out})
        else:
            write_json(resp, {"tokens": tokens})


class DetokenizeResource:
    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        body = read_json(req, self.state.settings.max_body_mb << 20)
        model = self.state.require_ready().model
        tokens = body.get("tokens")
        if tokens is None:
            write_json(resp, {"content": ""})
            return
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise InvalidRequestError("\"tokens\" must be an array of token ids")
        write_json(resp, {"content": model.detokenize(tokens, unparse_special=True)})
