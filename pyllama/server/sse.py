"""Server-Sent Events framing, as llama-server writes it.

Each event is `data: <json>` and a blank line; keep-alive pings are a `:` comment; OpenAI-style
streams end with `data: [DONE]`. Chunks are encoded once, with orjson.
"""

from __future__ import annotations

import orjson

PING = b":\n\n"
DONE = b"data: [DONE]\n\n"


def frame(obj) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def frames(objs) -> bytes:
    return b"".join(frame(o) for o in objs)
