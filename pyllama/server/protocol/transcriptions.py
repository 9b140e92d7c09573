"""/v1/audio/transcriptions: OpenAI's transcription API over chat with one audio file.

As upstream: the multipart form's text fields become the body (server_http_context::post),
its `file` the audio; convert_transcriptions_to_chatcmpl turns them into a chat whose user
message is the prompt ("Transcribe audio to text" by default, `language` appended) and the
media marker, and the result is transcript.text.done (to_json_oaicompat_asr), or
transcript.text.delta events when streamed. 501 without a projector that takes audio.
Imports: `engine`, `errors`, the chat protocol, the stdlib.
"""

from __future__ import annotations

import email.policy
from email.parser import BytesParser

from pyllama.engine import FinishEvent, TokenEvent
from pyllama.errors import InvalidRequestError, NotSupportedError
from pyllama.server.protocol.base import ProtocolContext, Task
from pyllama.server.protocol.chat import ChatCall, ChatStream, chat_tasks, render

ASR_PROMPT = "Transcribe audio to text"  # common_chat_get_asr_prompt


def parse_form(content_type: str, raw: bytes) -> tuple[dict, dict]:
    """A multipart/form-data body -> (text fields, {name: file bytes})."""
    if not (content_type or "").lower().startswith("multipart/form-data"):
        return {}, {}
    msg = BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw)
    fields: dict = {}
    files: dict = {}
    if msg.is_multipart():
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if not name:
                continue
            payload = part.get_payload(decode=True) or b""
            if part.get_filename() is not None:
                files[name] = payload
            else:
                fields[name] = payload.decode("utf-8", "replace")
    return fields, files


class TranscriptionCall(ChatCall):
    """The transcript of one audio file: transcript.text.done, or delta events."""

    def response(self):
        task = self.tasks[0]
        stream: ChatStream = task.state
        stream.finish(task.result.chat_text, task.result.text)
        return self._done(task)

    def _done(self, task: Task) -> dict:
        event = task.result
        n_prompt, n_out = event.n_prompt_tokens, len(event.tokens)
        return {"type": "transcript.text.done", "text": task.state.message.get("content") or "",
                "usage": {"type": "tokens", "input_tokens": n_prompt, "output_tokens": n_out,
                          "total_tokens": n_prompt + n_out,
                          "input_tokens_details": {"cached_tokens": event.timings.cache_n}}}

    def frames(self, task: Task, event) -> bytes:
        from pyllama.server import sse

        return sse.frames(self.chunks(task, event))

    def chunks(self, task: Task, event) -> list:
        stream: ChatStream = task.state
        if isinstance(event, TokenEvent):
            return [{"type": "transcript.text.delta", "delta": d["content"]}
                    for d in (stream.update(event.text) if event.text else []) if d.get("content")]
        if isinstance(event, FinishEvent):
            out = [{"type": "transcript.text.delta", "delta": d["content"]}
                   for d in stream.finish(event.chat_text, event.text) if d.get("content")]
            return out + [self._done(task)]
        return []


def parse(content_type: str, raw: bytes, ctx: ProtocolContext) -> TranscriptionCall:
    """A transcription form -> its call (post_transcriptions_oai). HTTP thread.

    Raises:
        NotSupportedError: no projector that takes audio.
        InvalidRequestError: no `file`, a response_format other than json, bad numbers.
    """
    if ctx.media is None or not ctx.media.audio:
        raise NotSupportedError("The current model does not support audio input.")
    fields, files = parse_form(content_type, raw)
    if "file" not in files:
        raise InvalidRequestError("No input file found for transcription", param="file")
    if fields.get("response_format", "json") != "json":
        raise InvalidRequestError("Only 'json' response_format is supported for transcription",
                                  param="response_format")
    prompt = fields.get("prompt") or ASR_PROMPT
    if fields.get("language"):
        prompt += f" (language: {fields['language']})"
    body: dict = {k: v for k, v in fields.items() if k not in ("prompt", "language", "response_format")}
    body["messages"] = [{"role": "user", "content": prompt + ctx.media.marker}]
    body["stream"] = fields.get("stream", "false") == "true"
    try:
        if "max_tokens" in fields:
            body["max_tokens"] = int(fields["max_tokens"])
        if "temperature" in fields:
            body["temperature"] = float(fields["temperature"])
    except ValueError as exc:
        raise InvalidRequestError(f"invalid number in the form: {exc}") from None
    chat = render(body, ctx)
    chat.files, chat.names = [files["file"]], ["file"]
    return TranscriptionCall(chat_tasks(chat, ctx)[:1], body, ctx)
