"""pyllama: serve GGUF models from Python the way llama.cpp's llama-server does.

Importing this package loads nothing: the compiled engine is imported on first use.
"""

__version__ = "0.1.0"

__all__ = ["Llama", "__version__", "default_model_path"]


def __getattr__(name):
    # `pyllama.Llama` without importing the engine at `import pyllama`
    if name == "Llama":
        from pyllama.llama import Llama

        return Llama
    raise AttributeError(name)


def default_model_path():
    """Return the path of the default model (gemma-3-270m Q4_K_M), assembling it if needed."""
    from pyllama.models import default_model_path as _default_model_path

    return _default_model_path()
