"""/v1/messages and /v1/messages/count_tokens: Anthropic's Messages API."""

from __future__ import annotations

from pyllama.server.protocol import anthropic
from pyllama.server.streaming import write_json


class MessagesResource:
    """POST /v1/messages."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        self.state.respond(resp, anthropic.parse(req.context.body, self.state.protocol))


class CountTokensResource:
    """POST /v1/messages/count_tokens: {"input_tokens": N}."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        write_json(resp, anthropic.count_message_tokens(req.context.body, self.state.protocol))
