"""The fault suite's servers: real pyllama-server processes on 127.0.0.1, synthetic models.

ServerProcess (tests/server_process.py, shared with tests/server) gives what faults need
besides: the gunicorn worker's pid (the master is the process started here) and resident
memory read from /proc.
"""

from __future__ import annotations

import pytest
from server_process import ServerProcess, children, free_port, rss_kib  # noqa: F401


@pytest.fixture(scope="session")
def fim_model(tmp_path_factory):
    """The synthetic model with fill-in-the-middle tokens, so /infill serves too."""
    from pyllama.synthetic import SyntheticSpec, write_synthetic_model

    return write_synthetic_model(tmp_path_factory.mktemp("reliability") / "fim.gguf", SyntheticSpec(fim=True))


@pytest.fixture(scope="module")
def gen_server(fim_model, tmp_path_factory):
    """Every generation route on: slots save/restore, POST /props, /infill."""
    slots = tmp_path_factory.mktemp("slots")
    srv = ServerProcess(["-m", str(fim_model), "-np", "2", "-c", "2048", "--props",
                         "--slot-save-path", str(slots)])
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def embed_server(synthetic_path):
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "2", "-c", "2048", "--embeddings",
                         "--reranking"])
    srv.wait_ready()
    yield srv
    srv.stop()
