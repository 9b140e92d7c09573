# cython: language_level=3, embedsignature=True
"""ChatTemplates: llama.cpp's common chat code (templates, tool calls, reasoning parsing).

A thin shell over csrc/pyllama_bridge.cpp; JSON text goes in and out, and server/templates.py
turns it into Python objects. Everything here is pure CPU work over the template, so it is
thread-safe and runs on the HTTP threads.
Imports: `_bridge`, `_llama` (declarations only), `engine._model`, `errors`.
"""

from libcpp.string cimport string

from pyllama._bridge cimport (
    pyllama_chat,
    pyllama_chat_apply,
    pyllama_chat_free,
    pyllama_chat_info,
    pyllama_chat_init,
    pyllama_chat_parse,
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
        """Source, capabilities and origin of the template, as JSON text."""
        return pyllama_chat_info(self.ptr).decode("utf-8", "replace")

    def apply_json(self, str inputs_json):
        """Apply the template; JSON text in (see csrc/pyllama_bridge.h), JSON text out.

        Raises:
            InvalidRequestError: with upstream's message, for input the template refuses.
        """
        cdef string c_in = inputs_json.encode()
        cdef string out
        try:
            with nogil:
                out = pyllama_chat_apply(self.ptr, c_in)
        except Exception as exc:
            raise InvalidRequestError(str(exc)) from None
        return out.decode("utf-8", "replace")


def parse_json(str text, bint is_partial, str params_json):
    """Parse model output into an OpenAI message, as JSON text (common_chat_parse). Thread-safe."""
    cdef string c_text = text.encode()
    cdef string c_params = params_json.encode()
    cdef string out
    try:
        with nogil:
            out = pyllama_chat_parse(c_text, is_partial, c_params)
    except Exception as exc:
        raise InvalidRequestError(f"failed to parse the model output: {exc}") from None
    return out.decode("utf-8", "replace")
