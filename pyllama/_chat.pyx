# cython: language_level=3, embedsignature=True
"""ChatTemplates and ChatParser: llama.cpp's common chat code (templates, tool calls, reasoning).

A thin shell over csrc/pyllama_bridge.cpp. JSON crosses the boundary as UTF-8 bytes, once each
way (orjson on this side, common_json on the other); server/templates.py turns it into Python
objects. Templates are pure CPU work over the template, thread-safe, run on the HTTP threads;
a ChatParser belongs to the one thread that streams its request.
Imports: `_bridge`, `_llama` (declarations only), `engine._model`, `errors`.
"""

from libcpp.string cimport string

from pyllama._bridge cimport (
    pyllama_common_log_configure,
    pyllama_chat,
    pyllama_chat_apply,
    pyllama_chat_free,
    pyllama_chat_info,
    pyllama_chat_init,
    pyllama_chat_parser,
    pyllama_chat_parser_free,
    pyllama_chat_parser_is_pure_content,
    pyllama_chat_parser_message,
    pyllama_chat_parser_new,
    pyllama_chat_parser_update,
)
from pyllama.engine._model cimport Model

from pyllama.errors import InvalidRequestError


cdef class ChatTemplates:
    """The chat templates of a model, or of an override (a built-in name or Jinja source).

    Raises:
        InvalidRequestError: the template does not parse.
    """

    cdef pyllama_chat * ptr
    cdef readonly Model model

    def __cinit__(self, Model model, str template_override=""):
        self.ptr = NULL
        self.model = model
        cdef string c_override = template_override.encode()
        try:
            with nogil:
                self.ptr = pyllama_chat_init(model.ptr, c_override)
        except Exception as exc:
            raise InvalidRequestError(f"failed to parse the chat template: {exc}") from None

    def __dealloc__(self):
        if self.ptr != NULL:
            pyllama_chat_free(self.ptr)
            self.ptr = NULL

    def info_json(self):
        """Source, capabilities and origin of the template, as JSON bytes."""
        return <bytes>pyllama_chat_info(self.ptr)

    def apply_json(self, bytes inputs_json):
        """Apply the template; JSON bytes in (see csrc/pyllama_bridge.h), JSON bytes out.

        Raises:
            InvalidRequestError: with upstream's message, for input the template refuses.
        """
        cdef string c_in = inputs_json
        cdef string out
        try:
            with nogil:
                out = pyllama_chat_apply(self.ptr, c_in)
        except Exception as exc:
            raise InvalidRequestError(str(exc)) from None
        return <bytes>out


cdef class ChatParser:
    """One request's chat output parser: the text so far and its last message live in C++.

    Args:
        params_json: the parser parameters as JSON bytes (format, reasoning_format,
            generation_prompt, parse_tool_calls, parser, ...), loaded once here.

    Raises:
        InvalidRequestError: the parameters do not load.
    """

    cdef pyllama_chat_parser * ptr

    def __cinit__(self, bytes params_json):
        self.ptr = NULL
        cdef string c_params = params_json
        try:
            with nogil:
                self.ptr = pyllama_chat_parser_new(c_params)
        except Exception as exc:
            raise InvalidRequestError(f"failed to load the chat parser: {exc}") from None

    def __dealloc__(self):
        if self.ptr != NULL:
            pyllama_chat_parser_free(self.ptr)
            self.ptr = NULL

    def update(self, str text, bint is_partial, bint replace=False):
        """Add new output text (or, with replace, the whole output) and return the message
        diffs as OpenAI delta objects: JSON texts, one per line (b"" when nothing changed)."""
        # PERF(pyllama): GIL held: a parse takes microseconds, and handing the GIL to the
        # engine thread and back costs more than it (two futex round trips, cold caches).
        cdef string c_text = text.encode("utf-8", "surrogatepass")
        cdef string out = pyllama_chat_parser_update(self.ptr, c_text, is_partial, replace)
        return <bytes>out

    @property
    def pure_content(self):
        """Whether the parser takes the whole output as content: its message is the text."""
        return pyllama_chat_parser_is_pure_content(self.ptr)

    def message_json(self):
        """The last parsed message, OpenAI-shaped, as JSON bytes."""
        return <bytes>pyllama_chat_parser_message(self.ptr)


def configure_common_log(bint prefix, bint timestamps, int colors, bint jsonl, int verbosity, bint disable):
    """common's own log lines (common_log) in the format of the logging flags; see
    pyllama_bridge.h. colors: -1 auto, 0 off, 1 on. Call once, at start-up."""
    pyllama_common_log_configure(prefix, timestamps, colors, jsonl, verbosity, disable)
