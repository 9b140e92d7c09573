"""Chat templates on the HTTP side: messages -> prompt, model output -> message (and deltas).

Everything model-family specific comes from llama.cpp's common chat code (pyllama._chat over
csrc/pyllama_bridge.cpp): template rendering, tool-call grammars and triggers, reasoning and
tool-call parsing. This module only moves JSON in and out and computes stream deltas
(upstream's common_chat_msg_diff).
"""

from __future__ import annotations

import orjson

from pyllama._chat import ChatParser, ChatTemplates
from pyllama.errors import InvalidRequestError
from pyllama.server.protocol import schema


class _PureContent:
    """The parser of a template whose whole output is content: nothing to run."""

    pure_content = True


PURE_CONTENT = _PureContent()


class ChatFormatter:
    """The server's chat templates (from the GGUF or --chat-template). Thread-safe."""

    def __init__(self, model, template_override: str = "", *, use_jinja: bool = True,
                 reasoning_format: str = "auto", template_kwargs: dict | None = None,
                 prefill_assistant: bool = True, force_pure_content: bool = False,
                 enable_reasoning: bool = True) -> None:
        self.templates = ChatTemplates(model, template_override)
        self.info = orjson.loads(self.templates.info_json())
        self.use_jinja = use_jinja
        self.reasoning_format = reasoning_format
        self.template_kwargs = template_kwargs or {}
        self.prefill_assistant = prefill_assistant
        self.force_pure_content = force_pure_content  # --skip-chat-parsing
        # a request thinks unless -rea off or the template cannot (upstream's enable_thinking)
        self.enable_thinking = enable_reasoning and use_jinja and bool(self.info.get("supports_enable_thinking"))
        self._pure: dict = {}  # (parser definition, generation prompt) -> pure content?

    @property
    def caps(self) -> dict:
        return self.info["caps"]

    def apply(self, body: dict) -> dict:
        """Render a chat request (OpenAI fields) into common_chat_params, as a dict.

        Raises:
            InvalidRequestError: bad messages or options (upstream's wording).
        """
        messages = body.get("messages")
        if messages is None:
            raise InvalidRequestError("'messages' is required")
        if not isinstance(messages, list):
            raise InvalidRequestError("Expected 'messages' to be an array")
        for msg in messages:
            if not isinstance(msg, dict):
                raise InvalidRequestError("Expected 'messages' to be an array of objects")
            role = msg.get("role")
            if role != "assistant" and "content" not in msg:
                raise InvalidRequestError("All non-assistant messages must contain 'content'")
            if role == "assistant" and "content" not in msg and "tool_calls" not in msg:
                raise InvalidRequestError("Assistant message must contain either 'content' or 'tool_calls'!")
            content = msg.get("content")
            if content is not None and not isinstance(content, (str, list)):
                raise InvalidRequestError("Expected 'content' to be a string or an array")
            if isinstance(content, list):
                for part in content:
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind not in ("text", "media_marker"):
                        if kind in ("image_url", "input_audio", "input_video", "video_url"):
                            raise InvalidRequestError(
                                "image input is not supported - hint: if this is unexpected, you may "
                                "need to provide the mmproj")
                        raise InvalidRequestError("unsupported content[].type")
        tools = body.get("tools")
        tool_choice = body.get("tool_choice", "auto")
        if not isinstance(tool_choice, str):
            tool_choice = "auto"  # upstream ignores the object form
        if tool_choice not in ("auto", "none", "required"):
            raise InvalidRequestError(f"Invalid tool_choice: {tool_choice}")
        if tools and not self.use_jinja:
            raise InvalidRequestError("tools param requires --jinja flag")
        add_generation_prompt = body.get("add_generation_prompt", True)
        continue_final = body.get("continue_final_message")
        if continue_final is None and self.prefill_assistant and messages and \
                messages[-1].get("role") == "assistant":
            if len(messages) >= 2 and messages[-2].get("role") == "assistant":
                raise InvalidRequestError("Cannot have 2 or more assistant messages at the end of the list.")
            continue_final = True
            add_generation_prompt = False
        if continue_final and add_generation_prompt:
            raise InvalidRequestError("Cannot set both add_generation_prompt and continue_final_message to true.")
        kwargs = dict(self.template_kwargs)
        extra_kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(extra_kwargs, dict):
            raise InvalidRequestError("\"chat_template_kwargs\" must be an object")
        kwargs.update(extra_kwargs)  # values reach the template as their JSON text
        enable_thinking = kwargs.get("enable_thinking", self.enable_thinking)
        if not isinstance(enable_thinking, bool):
            raise InvalidRequestError('invalid type for "enable_thinking" (expected boolean, got string)')
        effort = body.get("reasoning_effort")  # the OAI field; "none" disables reasoning
        if effort == "none":
            enable_thinking = False
            kwargs.pop("reasoning_effort", None)
        elif isinstance(effort, str) and effort:
            kwargs["reasoning_effort"] = effort
        json_schema = body.get("json_schema")
        inputs = {
            "messages": messages, "tools": tools or None, "tool_choice": tool_choice,
            # (deeper than orjson.dumps writes: a body parses to 1024 levels)
            "json_schema": schema.dumps(json_schema) if json_schema is not None else "",
            "grammar": body.get("grammar") or "",
            "add_generation_prompt": bool(add_generation_prompt),
            "continue_final_message": continue_final if continue_final else None,
            "use_jinja": self.use_jinja,
            "parallel_tool_calls": body.get("parallel_tool_calls",
                                            self.caps.get("supports_parallel_tool_calls", False)),
            "reasoning_format": body.get("reasoning_format") or self.reasoning_format,
            "enable_thinking": enable_thinking,
            "chat_template_kwargs": kwargs,
            "force_pure_content": self.force_pure_content,
        }
        return orjson.loads(self.templates.apply_json(orjson.dumps(inputs)))

    def parser(self, params: dict):
        """A stateful output parser for one request (see ChatParser).

        A parser that takes the whole output as content needs no C++ state (ChatStream keeps
        the text): once a parser definition is known to be one, PURE_CONTENT stands for it.
        """
        key = (params.get("parser", ""), params.get("generation_prompt", ""))
        if self._pure.get(key):
            return PURE_CONTENT
        parser = ChatParser(orjson.dumps(params))
        if len(self._pure) < 256:  # a server sees a handful of definitions
            self._pure[key] = parser.pure_content
        return parser
