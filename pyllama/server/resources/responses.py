"""/v1/responses, /responses and their /input_tokens: OpenAI's Responses API."""

from __future__ import annotations

from pyllama.server.protocol import responses
from pyllama.server.streaming import write_json


class ResponsesResource:
    """POST /v1/responses and /responses."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        self.state.respond(resp, responses.parse(req.context.body, self.state.protocol))


class ResponsesInputTokensResource:
    """POST /v1/responses/input_tokens and /responses/input_tokens."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        write_json(resp, responses.count_input_tokens(req.context.body, self.state.protocol))
