"""Llama: the engine in-process, with OpenAI-shaped results (completions, chat, responses, embeddings).

The same continuous-batching engine as the server: several threads may call one Llama at
once and their requests share decodes. Requests are parsed and results formatted by the
server's protocol layer (pyllama.server.protocol), so the JSON is the server's, from the same
code; only HTTP is left out.
Imports: public `engine` names, `errors`, `models`, the protocol layer and chat templates.
"""

from __future__ import annotations

from typing import Iterator

from pyllama.engine import Engine
from pyllama.server.protocol import chat, completions, embeddings, responses
from pyllama.server.protocol.base import Call, ProtocolContext, Run
from pyllama.server.protocol.params import Defaults


class Llama:
    """A model served in-process.

    Args:
        model_path: a GGUF file; None takes the default model.
        chat_template: a built-in template name or Jinja text (default: the model's own).
        **engine_options: Engine options (n_parallel, n_ctx, n_batch, n_threads, embeddings,
            pooling, ...).
    """

    def __init__(self, model_path=None, *, chat_template: str = "", **engine_options) -> None:
        from pyllama.models import default_model_path

        self.model_path = str(model_path or default_model_path())
        engine_options.setdefault("n_parallel", 4)
        engine_options.setdefault("kv_unified", True)
        self.engine = Engine(self.model_path, **engine_options)
        self.model = self.engine.model
        self.model_name = self.model_path.rsplit("/", 1)[-1]
        self.chat = None
        if not self.engine.embeddings:
            from pyllama.server.templates import ChatFormatter

            self.chat = ChatFormatter(self.model, chat_template)
        self.protocol = ProtocolContext(
            model=self.model, n_slots=self.engine.n_slots, n_ctx_slot=self.engine.n_ctx_slot,
            defaults=Defaults(), chat=self.chat, model_name=self.model_name, fingerprint="pyllama",
            embeddings=self.engine.embeddings,
            pooling=self.engine.embedder.pooling_name if self.engine.embeddings else "",
            n_ubatch=self.engine.embedder.n_ubatch if self.engine.embeddings else 0,
            media=self.engine.media)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "Llama":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- vocabulary ------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.model.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.model.detokenize(tokens)

    # --- running protocol calls ----------------------------------------------------------------
    def _run(self, call: Call):
        run = Run(self.engine, call)
        if not call.stream:
            run.gather()
            return call.response()
        return self._chunks(run)

    @staticmethod
    def _chunks(run: Run) -> Iterator:
        try:
            while run.open:
                task, event = run.next(None)
                yield from run.call.chunks(task, event)
        finally:
            if run.open:
                run.cancel()  # the caller stopped iterating

    # --- completions ---------------------------------------------------------------------------
    def create_completion(self, prompt, *, max_tokens: int | None = 16, stream: bool = False, **options):
        """OpenAI text completion; `options` take llama-server's sampling fields.

        Returns a dict, or an iterator of chunk dicts with stream=True.
        """
        body = dict(options, prompt=prompt, stream=stream, max_tokens=-1 if max_tokens is None else max_tokens)
        return self._run(completions.parse_oai(body, self.protocol))

    def create_chat_completion(self, messages: list[dict], *, max_tokens: int | None = None,
                               stream: bool = False, **options):
        """OpenAI chat completion (tools, response_format, ... as the server accepts them).

        Returns a dict, or an iterator of chat.completion.chunk dicts with stream=True.
        """
        body = dict(options, messages=messages, stream=stream)
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        return self._run(chat.parse(body, self.protocol))

    def create_response(self, input, *, max_output_tokens: int | None = None, stream: bool = False,
                        **options):
        """OpenAI Responses API (instructions, input items, tools, reasoning, ...).

        Returns a `response` dict, or with stream=True an iterator of upstream's events as
        {"event": name, "data": {...}} dicts.
        """
        body = dict(options, input=input, stream=stream)
        if max_output_tokens is not None:
            body["max_output_tokens"] = max_output_tokens
        return self._run(responses.parse(body, self.protocol))

    # --- embeddings ----------------------------------------------------------------------------
    def create_embedding(self, input: str | list[str], normalize: int = 2) -> dict:
        """OpenAI embeddings (the Llama must be created with embeddings=True)."""
        job = embeddings.parse_oai({"input": input, "embd_normalize": normalize, "model": self.model_name},
                                   self.protocol)
        return job.response(self.engine.embed(job.inputs, job.normalize))


__all__ = ["Llama"]
