"""/completion, /completions, /infill (native) and /v1/completions (OpenAI text completion)."""

from __future__ import annotations

from pyllama.server.protocol import completions, infill


class CompletionResource:
    """POST /completion, /completions: llama-server's native completion."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        self.state.respond(resp, completions.parse_native(req.context.body, self.state.protocol))


class OAICompletionResource:
    """POST /v1/completions."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        self.state.respond(resp, completions.parse_oai(req.context.body, self.state.protocol))


class InfillResource:
    """POST /infill: the FIM prompt, then answered as /completion."""

    def __init__(self, state) -> None:
        self.state = state

    def on_post(self, req, resp):
        self.state.respond(resp, infill.parse(req.context.body, self.state.protocol))
