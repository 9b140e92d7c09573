"""Shared fixtures: the real default model and tiny synthetic models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (embedding_models)


@pytest.fixture(scope="session")
def gemma_path():
    from pyllama.models import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def gemma(gemma_path):
    from pyllama.engine import Model

    model = Model(gemma_path)
    yield model
    model.close()


@pytest.fixture(scope="session")
def synthetic_path(tmp_path_factory):
    from pyllama.synthetic import write_synthetic_model

    return write_synthetic_model(tmp_path_factory.mktemp("models") / "synthetic.gguf")


@pytest.fixture(scope="session")
def synthetic(synthetic_path):
    from pyllama.engine import Model

    model = Model(synthetic_path)
    yield model
    model.close()
