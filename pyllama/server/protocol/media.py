"""Media in requests (--mmproj): content parts and multimodal_data -> files -> media tokens.

Upstream's handle_media / oaicompat_content_load_media / process_mtmd_prompt
(tools/server/server-common.cpp): an `image_url`, `input_audio` or video part of a chat
message becomes the media marker in the text and its file's bytes; /completion's
{"prompt_string", "multimodal_data": [base64, ...]} carries the marker itself. The files and
the rendered prompt are tokenized by the engine's MediaContext (thread-safe). Every error is
a 400 that names the part it is about ("messages[0].content[1]").
Imports: `errors`, the stdlib.
"""

from __future__ import annotations

import base64
import binascii
import os
import urllib.request

from pyllama.errors import InvalidRequestError

MAX_DOWNLOAD = 10 * 1024 * 1024  # handle_media's common_remote_params: 10 MB, 10 s
DOWNLOAD_TIMEOUT = 10

_NOT_SUPPORTED = "{} input is not supported - hint: if this is unexpected, you may need to provide the mmproj"


def _b64(data: str, name: str) -> bytes:
    try:
        out = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{name}: Invalid base64 value", param=name) from None
    if not out:
        raise InvalidRequestError(f"{name}: Invalid base64 value", param=name)
    return out


_FORBIDDEN = set(':*?"<>|') | {"\uff0e", "\u2215", "\u2216", "\ufffd", "\ufeff"}


def _safe_relative(path: str) -> bool:
    # fs_validate_filename(path, allow_subdirs=true): under --media-path whatever its slashes
    # ("file:////a//b.png" is a/b.png there), no "..", no control or reserved characters
    if not path or len(path.encode("utf-8", "surrogatepass")) > 255 or path == ".":
        return False
    if any(ord(c) <= 0x1F or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF or c in _FORBIDDEN for c in path):
        return False
    return not (path[0] == " " or path[-1] in " ." or ".." in path)


def load_url(url, media_path: str, name: str) -> bytes:
    """The bytes a media URL stands for (handle_media): data: URLs, raw base64, file:// under
    --media-path, http(s) downloads (10 MB, 10 s). HTTP thread."""
    if not isinstance(url, str) or not url:
        raise InvalidRequestError(f"{name}: the media url is missing", param=name)
    if url.startswith("http"):
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as resp:
                data = resp.read(MAX_DOWNLOAD + 1)
        except (OSError, ValueError) as exc:
            raise InvalidRequestError(f"{name}: Failed to download image ({exc})", param=name) from None
        if len(data) > MAX_DOWNLOAD:
            raise InvalidRequestError(f"{name}: Failed to download image (over {MAX_DOWNLOAD} bytes)", param=name)
        return data
    if url.startswith("file://"):
        if not media_path:
            raise InvalidRequestError(f"{name}: file:// URLs are not allowed unless --media-path is specified",
                                      param=name)
        rel = url[7:]
        if not _safe_relative(rel):
            raise InvalidRequestError(f"{name}: file path is not allowed: {rel}", param=name)
        full = media_path + rel  # media_path ends with the separator (flags.py), as upstream joins them
        # a symlink out of the folder is not followed out of it
        if not os.path.realpath(full).startswith(os.path.realpath(media_path) + os.sep):
            raise InvalidRequestError(f"{name}: file path is not allowed: {rel}", param=name)
        try:
            with open(full, "rb") as f:
                return f.read()
        except OSError:
            raise InvalidRequestError(f"{name}: file does not exist or cannot be opened: {rel}",
                                      param=name) from None
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or "," in data:
            raise InvalidRequestError(f"{name}: Invalid uri-encoded base64 value", param=name)
        if not head.startswith(("data:image/", "data:video/", "data:audio/")):
            raise InvalidRequestError(f"{name}: Invalid uri format: {head}", param=name)
        if not head.endswith("base64"):
            raise InvalidRequestError(f"{name}: uri must be base64 encoded", param=name)
        return _b64(data, name)
    return _b64(url, name)


def load_content_media(messages: list, media, media_path: str) -> tuple[list, list, list]:
    """Replace every media part of the messages by a media_marker text part
    (oaicompat_content_load_media). Returns (messages, files, names); messages are copies
    where they changed. HTTP thread.

    Raises:
        InvalidRequestError: a media part without a projector that takes it, or whose file
            cannot be read; the message names the part.
    """
    files: list = []
    names: list = []
    out = []
    for i, msg in enumerate(messages):
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            out.append(msg)
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            name = f"messages[{i}].content[{j}]"
            if kind == "image_url":
                if media is None or not media.vision:
                    raise InvalidRequestError(f"{name}: " + _NOT_SUPPORTED.format("image"), param=name)
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
            elif kind == "input_audio":
                if media is None or not media.audio:
                    raise InvalidRequestError(f"{name}: " + _NOT_SUPPORTED.format("audio"), param=name)
                spec = part.get("input_audio")
                spec = spec if isinstance(spec, dict) else {}
                url = spec.get("data", spec.get("url"))
            elif kind in ("input_video", "video_url"):
                if media is None or not media.video:
                    raise InvalidRequestError(f"{name}: " + _NOT_SUPPORTED.format("video"), param=name)
                spec = part.get(kind)
                spec = spec if isinstance(spec, dict) else {}
                url = spec.get("data", spec.get("url"))
            else:
                parts.append(part)
                continue
            files.append(load_url(url, media_path, name))
            names.append(name)
            parts.append({"type": "media_marker", "text": media.marker})
        out.append(dict(msg, content=parts) if files and parts != content else msg)
    return out, files, names


def tokenize_multimodal(prompt: dict, media, index: int = 0) -> tuple[list, dict]:
    """/completion's {"prompt_string", "multimodal_data": [base64, ...]} -> (tokens, media
    chunks) (tokenize_input_subprompt). HTTP thread."""
    if media is None:
        raise InvalidRequestError("Multimodal data provided, but model does not support multimodal requests.",
                                  param="multimodal_data")
    text = prompt.get("prompt_string")
    if not isinstance(text, str):
        raise InvalidRequestError("\"prompt_string\" must be a string", param="prompt_string")
    data = prompt.get("multimodal_data")
    if not isinstance(data, list):
        raise InvalidRequestError("\"multimodal_data\" must be an array of base64 strings", param="multimodal_data")
    prefix = "multimodal_data" if index == 0 else f"prompt[{index}].multimodal_data"
    names = [f"{prefix}[{i}]" for i in range(len(data))]
    files = []
    for item, name in zip(data, names):
        if not isinstance(item, str):
            raise InvalidRequestError(f"{name}: expected a base64 string", param=name)
        files.append(_b64(item, name))
    return media.tokenize(text, files, names)
