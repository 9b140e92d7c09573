"""A real pyllama-server process on 127.0.0.1 per configuration, talked to over HTTP."""

from __future__ import annotations

import httpx
import pytest
from server_process import ServerProcess, free_port  # noqa: F401  (the suite imports them from here)


@pytest.fixture(scope="session")
def slot_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("slots")


@pytest.fixture(scope="session")
def server(gemma_path, slot_dir):
    srv = ServerProcess(["-m", str(gemma_path), "-np", "4", "-c", "8192", "--metrics",
                         "--slot-save-path", str(slot_dir)])
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def synthetic_server(synthetic_path):
    # The F32 synthetic model gives the same numbers whatever the batch: runs side by side
    # must equal runs alone (the quantised default model's batched kernels differ).
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "4", "-c", "2048"])
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.base, timeout=120) as client:
        yield client
