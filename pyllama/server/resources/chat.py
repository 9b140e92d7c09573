"""/chat/completions, /v1/chat/completions (OpenAI chat), /apply-template, and input_tokens."""

from __future__ import annotations

from pyllama.server.protocol import anthropic, chat
from pyllama.server.streaming import write_json


class ChatResource:
    """POST /chat/completions and /v1/chat/completions."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        self.state.respond(resp, chat.parse(req.context.body, self.state.protocol))


class ChatControlResource:
    """POST /v1/chat/completions/control: act on a live completion (action reasoning_end)."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        cmpl_id = chat.parse_control(req.context.body)
        self.state.require_ready()
        write_json(resp, chat.control_result(self.state.end_reasoning(cmpl_id)))


class ApplyTemplateResource:
    """POST /apply-template: the rendered prompt, no inference."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        write_json(resp, chat.apply_template(req.context.body, self.state.protocol))


class ChatInputTokensResource:
    """POST /chat/completions/input_tokens, /v1/chat/completions/input_tokens."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        write_json(resp, anthropic.count_chat_tokens(req.context.body, self.state.protocol))
