"""What runs as a generation call starts, before the engine sees it (handle_completions_impl's
opening): --log-prompts-dir's prompt file, and the X-Conversation-Id stream session.

`GenerationHooks` puts `resp.context.before_generation(call)` on the requests that need it;
server/streaming.py's respond() calls it once per call and gets the session's tee or None.
Only generation routes (completion, chat, infill, messages, responses) reach respond(), as only
they reach handle_completions_impl upstream.
Imports: the stream store and the prompt log.
"""

from __future__ import annotations

from pyllama.server import prompt_log

CONVERSATION_HEADER = "X-Conversation-Id"


class GenerationHooks:
    """Falcon middleware over the ServerState (its settings and its StreamStore)."""

    def __init__(self, state) -> None:
        self.state = state

    def process_request(self, req, resp) -> None:
        conversation_id = req.get_header(CONVERSATION_HEADER) or ""  # any case, as upstream
        folder = self.state.settings.log_prompts_dir
        if not conversation_id and not folder:
            return
        streams = self.state.streams

        def before_generation(call):
            if folder and call.tasks:
                prompt_log.write(folder, call.tasks[0].source_prompt)
            return streams.producer(conversation_id)

        resp.context.before_generation = before_generation
