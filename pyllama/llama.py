"""Llama: the engine in-process, with OpenAI-shaped results (completions, chat, embeddings).

The same continuous-batching engine as the server: several threads may call one Llama at
once and their requests share decodes. Chat uses llama.cpp's common chat code, as the server.
Imports: public `engine` names, `errors`, `models`, and the server's protocol helpers (no HTTP).
"""

from __future__ import annotations

import time
from typing import Iterator

from pyllama.engine import Engine, FinishEvent, Request, TokenEvent
from pyllama.errors import InvalidRequestError
from pyllama.server.protocol import completions as fmt
from pyllama.server.protocol.params import Defaults, build_request, parse_sampling, parse_stop


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
        self.defaults = Defaults()
        self.chat = None
        if not self.engine.embeddings:
            from pyllama.server.templates import ChatFormatter

            self.chat = ChatFormatter(self.model, chat_template)

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

    # --- completions ---------------------------------------------------------------------------
    def _request(self, prompt: str | list[int], options: dict) -> Request:
        tokens = prompt if isinstance(prompt, list) else self.tokenize(prompt)
        if "max_tokens" in options and "n_predict" not in options:
            options["n_predict"] = options.pop("max_tokens")
        sampling = parse_sampling(options, self.defaults, self.model)
        return build_request(options, tokens, sampling, self.defaults, parse_stop(options, self.defaults))

    def _run(self, request: Request) -> Iterator:
        handle = self.engine.submit(request)
        try:
            yield from handle
        finally:
            if handle.result is None:
                handle.cancel()

    def create_completion(self, prompt, *, max_tokens: int | None = 16, stream: bool = False, **options):
        """OpenAI text completion; `options` take llama-server's sampling fields.

        Returns a dict, or an iterator of chunk dicts with stream=True.
        """
        options = dict(options, n_predict=-1 if max_tokens is None else max_tokens)
        request = self._request(prompt, options)
        cid = fmt.completion_id()
        if not stream:
            result = self.engine.submit(request).wait()
            return fmt.oai_completion(cid, self.model_name, "pyllama", [(0, result, None)])
        return self._stream_completion(request, cid)

    def _stream_completion(self, request, cid):
        for event in self._run(request):
            if isinstance(event, TokenEvent) and event.text:
                yield fmt.oai_completion_chunk(cid, self.model_name, "pyllama", 0, event.text)
            elif isinstance(event, FinishEvent):
                chunk = fmt.oai_completion_chunk(cid, self.model_name, "pyllama", 0, "",
                                                 fmt.finish_reason(event))
                chunk["usage"] = fmt.usage(event.n_prompt_tokens, len(event.tokens), event.timings.cache_n)
                yield chunk

    def create_chat_completion(self, messages: list[dict], *, max_tokens: int | None = None,
                               stream: bool = False, **options):
        """OpenAI chat completion (tools, response_format, ... as the server accepts them).

        Returns a dict, or an iterator of chat.completion.chunk dicts with stream=True.
        """
        if self.chat is None:
            raise InvalidRequestError("chat is not available on an embedding model")
        from pyllama.server.resources.chat import prepare_chat
        from pyllama.server.templates import message_diffs

        body = dict(options, messages=messages)
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        native, parser = prepare_chat(_StateView(self), body)
        request = self._request(self.tokenize(native.pop("prompt")), native)
        cid = fmt.completion_id()
        if not stream:
            result = self.engine.submit(request).wait()
            msg = self.chat.parse(result.text, False, parser)
            message = {"role": "assistant", "content": msg.get("content") or ""}
            for key in ("reasoning_content", "tool_calls"):
                if msg.get(key):
                    message[key] = msg[key]
            finish = "length" if fmt.finish_reason(result) == "length" else \
                ("tool_calls" if msg.get("tool_calls") else "stop")
            return {"id": cid, "object": "chat.completion", "created": int(time.time()),
                    "model": self.model_name,
                    "choices": [{"index": 0, "finish_reason": finish, "message": message}],
                    "usage": fmt.usage(result.n_prompt_tokens, len(result.tokens), result.timings.cache_n)}

        def chunks():
            previous: dict = {}
            text = ""
            yield self._chat_chunk(cid, {"role": "assistant", "content": None})
            for event in self._run(request):
                if isinstance(event, TokenEvent):
                    text += event.text
                    current = self.chat.parse(text, True, parser)
                    for delta in message_diffs(previous, current):
                        yield self._chat_chunk(cid, delta)
                    previous = current
                elif isinstance(event, FinishEvent):
                    final = self.chat.parse(event.text, False, parser)
                    for delta in message_diffs(previous, final):
                        yield self._chat_chunk(cid, delta)
                    yield self._chat_chunk(cid, {}, fmt.finish_reason(event))

        return chunks()

    def _chat_chunk(self, cid: str, delta: dict, finish: str | None = None) -> dict:
        return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    # --- embeddings ----------------------------------------------------------------------------
    def create_embedding(self, input: str | list[str], normalize: int = 2) -> dict:
        """OpenAI embeddings (the Llama must be created with embeddings=True)."""
        texts = [input] if isinstance(input, str) else list(input)
        result = self.engine.embed([self.tokenize(t) for t in texts], normalize)
        n = sum(result.n_tokens)
        return {"object": "list", "model": self.model_name,
                "data": [{"object": "embedding", "index": i, "embedding": e}
                         for i, e in enumerate(result.embeddings)],
                "usage": {"prompt_tokens": n, "total_tokens": n}}


class _StateView:
    """The two things prepare_chat reads from a server state."""

    def __init__(self, llama: Llama) -> None:
        self.chat = llama.chat
        self.engine = llama.engine

    def require_ready(self):
        return self.engine


__all__ = ["Llama"]
