"""Chat templates on the HTTP side: messages -> prompt, model output -> message (and deltas).

Everything model-family specific comes from llama.cpp's common chat code (pyllama._chat over
csrc/pyllama_bridge.cpp): template rendering, tool-call grammars and triggers, reasoning and
tool-call parsing. This module only moves JSON in and out and computes stream deltas
(upstream's common_chat_msg_diff).
"""

from __future__ import annotations

import json
import secrets
import string

from pyllama._chat import ChatTemplates, parse_json
from pyllama.errors import InvalidRequestError

_ALNUM = string.ascii_letters + string.digits


def random_id() -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(32))


class ChatFormatter:
    """The server's chat templates (from the GGUF or --chat-template). Thread-safe."""

    def __init__(self, model, template_override: str = "", *, use_jinja: bool = True,
                 reasoning_format: str = "auto", template_kwargs: dict | None = None,
                 prefill_assistant: bool = True) -> None:
        self.templates = ChatTemplates(model, template_override)
        self.info = json.loads(self.templates.info_json())
        self.use_jinja = use_jinja
        self.reasoning_format = reasoning_format
        self.template_kwargs = template_kwargs or {}
        self.prefill_assistant = prefill_assistant

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
                    if kind != "text":
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
        for key, value in extra_kwargs.items():
            kwargs[key] = json.dumps(value)
        enable_thinking = True
        if kwargs.get("enable_thinking") == "false":
            enable_thinking = False
        elif kwargs.get("enable_thinking", "true") not in ("true", "false"):
            raise InvalidRequestError('invalid type for "enable_thinking" (expected boolean, got string)')
        if body.get("reasoning_effort") == "none":
            enable_thinking = False
        elif isinstance(body.get("reasoning_effort"), str):
            kwargs["reasoning_effort"] = json.dumps(body["reasoning_effort"])
        json_schema = body.get("json_schema")
        inputs = {
            "messages": messages, "tools": tools or None, "tool_choice": tool_choice,
            "json_schema": json.dumps(json_schema) if json_schema is not None else "",
            "grammar": body.get("grammar") or "",
            "add_generation_prompt": bool(add_generation_prompt),
            "continue_final_message": continue_final if continue_final else None,
            "use_jinja": self.use_jinja,
            "parallel_tool_calls": body.get("parallel_tool_calls",
                                            self.caps.get("supports_parallel_tool_calls", False)),
            "reasoning_format": body.get("reasoning_format") or self.reasoning_format,
            "enable_thinking": enable_thinking,
            "chat_template_kwargs": kwargs,
        }
        return json.loads(self.templates.apply_json(json.dumps(inputs)))

    def parse(self, text: str, is_partial: bool, params: dict) -> dict:
        """Model output -> {role, content, reasoning_content?, tool_calls?}.

        Output the format's parser cannot read (e.g. cut off by max_tokens) stays plain content.
        """
        try:
            return json.loads(parse_json(text, is_partial, json.dumps(params)))
        except InvalidRequestError:
            return {"role": "assistant", "content": text}


def message_diffs(previous: dict, current: dict) -> list[dict]:
    """The stream deltas that turn `previous` into `current` (common_chat_msg_diff)."""
    deltas = []
    prev_reason = previous.get("reasoning_content") or ""
    cur_reason = current.get("reasoning_content") or ""
    if cur_reason != prev_reason and cur_reason.startswith(prev_reason):
        deltas.append({"reasoning_content": cur_reason[len(prev_reason):]})
    prev_text = previous.get("content") or ""
    cur_text = current.get("content") or ""
    if cur_text != prev_text and cur_text.startswith(prev_text):
        deltas.append({"content": cur_text[len(prev_text):]})
    prev_calls = previous.get("tool_calls") or []
    for i, call in enumerate(current.get("tool_calls") or []):
        fn = call.get("function", {})
        if i >= len(prev_calls):
            deltas.append({"tool_calls": [{"index": i, "id": call.get("id") or random_id(),
                                           "type": "function",
                                           "function": {"name": fn.get("name", ""),
                                                        "arguments": fn.get("arguments", "")}}]})
        else:
            before = prev_calls[i].get("function", {}).get("arguments", "")
            after = fn.get("arguments", "")
            if after != before and after.startswith(before):
                deltas.append({"tool_calls": [{"index": i, "function": {"arguments": after[len(before):]}}]})
    return deltas
