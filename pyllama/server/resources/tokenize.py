"""/tokenize and /detokenize."""

from __future__ import annotations

from pyllama.server.protocol import tokenize
from pyllama.server.streaming import write_json


class TokenizeResource:
    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        write_json(resp, tokenize.tokenize(req.context.body, self.state.protocol))


class DetokenizeResource:
    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        write_json(resp, tokenize.detokenize(req.context.body, self.state.protocol))
