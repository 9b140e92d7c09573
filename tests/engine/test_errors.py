"""Bad model files raise typed errors; the process never crashes."""

from __future__ import annotations

import os

import pytest

from pyllama.engine import Model
from pyllama.errors import InvalidModelError, ModelLoadError, ModelNotFoundError, PyllamaError


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model file not found"):
        Model(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError):
        Model(tmp_path / "nope.gguf")


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(ModelNotFoundError):
        Model(tmp_path)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is a text file, not a model\n")
    with pytest.raises(InvalidModelError, match="not a GGUF file"):
        Model(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(InvalidModelError):
        Model(path)


def test_garbage_after_magic(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(InvalidModelError, match="failed to load model"):
        Model(path)


@pytest.mark.parametrize("fraction", [0.0001, 0.005, 0.5, 0.999])
def test_truncated_gguf(synthetic_path, tmp_path, fraction):
    data = synthetic_path.read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: max(8, int(len(data) * fraction))])
    with pytest.raises(InvalidModelError) as info:
        Model(path)
    assert isinstance(info.value, ModelLoadError) and isinstance(info.value, PyllamaError)
    assert str(path) in str(info.value)
