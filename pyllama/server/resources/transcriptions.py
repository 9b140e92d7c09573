"""/v1/audio/transcriptions, /audio/transcriptions: a transcript of one audio file."""

from __future__ import annotations

from pyllama.errors import NotSupportedError
from pyllama.server.protocol import transcriptions


class TranscriptionsResource:
    """POST /v1/audio/transcriptions, /audio/transcriptions (post_transcriptions_oai): a
    transcript with a projector that takes audio, else 501."""

    json_body = "raw"  # a multipart form upstream; the model check comes before it

    def __init__(self, state=None) -> None:
        self.state = state

    def on_post(self, req, resp):
        protocol = self.state.protocol if self.state is not None else None
        if protocol is None or protocol.media is None or not protocol.media.audio:
            raise NotSupportedError("The current model does not support audio input.")
        self.state.respond(resp, transcriptions.parse(req.content_type or "", req.context.raw_body or b"",
                                                      protocol))
