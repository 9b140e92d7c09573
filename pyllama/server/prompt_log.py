"""--log-prompts-dir DIR: each generation request's prompt written to `DIR/<ms>.txt`.

As handle_completions_impl does (tools/server/server-context.cpp): the file is named by
ggml_time_ms() (the monotonic clock, in ms, 12 digits zero-padded) and holds the prompt the
completion runs on: a string as it is (the rendered template for chat-type routes), any other
prompt (token ids, several prompts, the infill tokens) as JSON indented by 2. A file that
cannot be written is logged and the request goes on.
Imports: stdlib only.
"""

from __future__ import annotations

import json
import logging
import os
import time

logger = logging.getLogger(__name__)


def prompt_text(prompt) -> str:
    """What upstream writes: the string up to a NUL (it goes through c_str()), or JSON dump(2)."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, indent=2, ensure_ascii=False)
    return text.split("\0", 1)[0]


def write(folder: str, prompt) -> None:
    """Write one request's prompt into `folder`. HTTP thread; never raises."""
    path = os.path.join(folder, "%012d.txt" % (time.monotonic_ns() // 1_000_000))
    try:
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as fh:
            fh.write(prompt_text(prompt))
    except (OSError, ValueError, TypeError):
        logger.error("failed to create %s", path)
