"""pyllama-serve-cuda13: ggml's CUDA backend (CUDA 13) for pyllama-serve.

Nothing to import by hand: pyllama finds this package through its "pyllama.backends" entry
point and loads lib/libggml-cuda.so with ggml_backend_load().
"""

__version__ = "0.1.0"
