"""The PyllamaError hierarchy: every error pyllama raises on purpose.

Each class carries the HTTP status and the OpenAI-style `type` that llama-server answers with,
so the server maps any of them to upstream's JSON error shape in one place.
Imports: stdlib only.
"""

from __future__ import annotations


class PyllamaError(Exception):
    """Base of every pyllama error."""

    status: int = 500
    type: str = "server_error"
    code_in_body: bool = True  # False where upstream writes the error by hand, without "code"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(PyllamaError):
    """A request or argument that cannot be served as given."""

    status = 400
    type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    """A prompt that does not fit the context window."""

    type = "exceed_context_size_error"

    def __init__(self, message: str, *, n_prompt_tokens: int, n_ctx: int) -> None:
        super().__init__(message)
        self.n_prompt_tokens = n_prompt_tokens
        self.n_ctx = n_ctx


class InvalidTokenError(InvalidRequestError):
    """A token id outside the model's vocabulary."""


class RequestTimeoutError(InvalidRequestError):
    """A client that stopped sending its request body for longer than the I/O timeout."""

    status = 408


class AuthenticationError(PyllamaError):
    """A missing or wrong API key."""

    status = 401
    type = "authentication_error"


class PermissionDeniedError(PyllamaError):
    """An action the server is configured to refuse."""

    status = 403
    type = "permission_error"


class NotFoundError(PyllamaError):
    """Something that does not exist: an endpoint, a slot, a file."""

    status = 404
    type = "not_found_error"


class FeatureDisabledError(PyllamaError):
    """A route whose feature is off (server.cpp's res_403: no "code" in the body)."""

    status = 403
    type = "feature_disabled"
    code_in_body = False


class NotSupportedError(PyllamaError):
    """A feature this build or model does not offer."""

    status = 501
    type = "not_supported_error"


class UnavailableError(PyllamaError):
    """The server cannot serve now: loading, or shutting down."""

    status = 503
    type = "unavailable_error"


class EngineError(PyllamaError):
    """A failure inside the inference engine."""

    status = 500
    type = "server_error"


class ModelLoadError(EngineError):
    """A model file that could not be loaded."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """A model path that does not exist or is not a file."""


class InvalidModelError(ModelLoadError):
    """A file that is not a GGUF model, or a damaged one."""


class ContextCreationError(EngineError):
    """A llama_context that could not be created (memory, bad parameters)."""


class DecodeError(EngineError):
    """llama_decode failed; `code` is its return value."""

    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code


class DefaultModelMissingError(ModelLoadError):
    """The default model's packages are not installed."""


class ModelDownloadError(ModelLoadError):
    """A model that could not be downloaded, or is not in the cache in offline mode."""


def error_json(exc: BaseException) -> tuple[int, dict]:
    """The HTTP status and llama-server's error object for any exception.

    `{"error": {"code": <status>, "message": ..., "type": ...}}`, with n_prompt_tokens and n_ctx
    for context errors (upstream's format_error_response, tools/server/server-common.cpp).
    Anything that is not a PyllamaError is a 500 server_error.
    """
    if isinstance(exc, PyllamaError):
        error = {"code": exc.status, "message": exc.message, "type": exc.type}
        if not exc.code_in_body:
            del error["code"]
        if isinstance(exc, ContextLengthExceededError):
            error.update(n_prompt_tokens=exc.n_prompt_tokens, n_ctx=exc.n_ctx)
        return exc.status, {"error": error}
    return 500, {"error": {"code": 500, "message": str(exc) or type(exc).__name__, "type": "server_error"}}
