"""-ot / --cpu-moe / --n-cpu-ffn and --fit in a real server, as upstream's common_init_from_params."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import ServerProcess

SERVER = str(Path(sys.executable).parent / "pyllama-server")


def _serve(synthetic_path, *flags) -> tuple[dict, str]:
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "2", *flags])
    try:
        srv.wait_ready()
        slots = httpx.get(srv.base + "/slots", timeout=30).json()
        assert httpx.post(srv.base + "/completion", json={"prompt": "one two", "n_predict": 2},
                          timeout=60).status_code == 200
    finally:
        srv.stop()
    return slots, srv.proc.stdout.read().decode(errors="replace")


def _overridden(log: str) -> list[str]:
    # libllama's debug line per tensor placed by an override (llama_model_loader)
    return re.findall(r"tensor (\S+) \(.*\) buffer type overridden to CPU", log)


def test_override_tensor_places_the_matching_tensors(synthetic_path):
    _, log = _serve(synthetic_path, "-c", "512", "-v", "-ot", r"blk\.0\.=CPU")
    names = _overridden(log)
    assert names and all(n.startswith("blk.0.") for n in names), names
    assert "tensor overrides to CPU are used with mmap enabled" in log  # upstream's hint


def test_n_cpu_ffn_keeps_the_first_layers_ffn_on_the_cpu(synthetic_path):
    _, log = _serve(synthetic_path, "-c", "512", "-v", "-ncffn", "1", "--cpu-moe")
    # a dense model: --cpu-moe matches nothing; -ncffn 1 the FFN weights of layer 0 only
    assert set(_overridden(log)) == {"blk.0.ffn_down.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"}


def test_unknown_buffer_type_stops_the_server():
    out = subprocess.run([SERVER, "-m", "/nonexistent.gguf", "-ot", "x"], capture_output=True, text=True)
    assert out.returncode != 0 and 'error while handling argument "-ot": invalid value' in out.stderr


def test_unknown_buffer_type_is_refused_at_load(synthetic_path):
    srv = ServerProcess(["-m", str(synthetic_path), "-c", "256", "-ot", "blk=NOPE"])
    assert srv.proc.wait(60) != 0
    assert "unknown buffer type 'NOPE'" in srv.proc.stdout.read().decode(errors="replace")


@pytest.mark.parametrize("flags,n_ctx_slot", [
    (["-c", "0"], 2048),                       # --fit resolves -c 0 to the training context per slot
    (["-c", "0", "-fit", "off"], 1024),        # without it libllama splits the training context
    (["-c", "0", "-fitt", "100000000", "-fitc", "256"], 256),  # no room: down to --fit-ctx
    (["-c", "1024", "-fitt", "100000000"], 512),  # a size the user gave is kept
])
def test_fit_sets_the_context_as_upstream(synthetic_path, flags, n_ctx_slot):
    slots, _ = _serve(synthetic_path, *flags)
    assert {s["n_ctx"] for s in slots} == {n_ctx_slot}


def test_control_vector_flags(synthetic_path, tmp_path):
    from pyllama.synthetic import write_synthetic_control_vector as write_control_vector

    vector = write_control_vector(tmp_path / "steer.gguf")

    def text(*flags):
        srv = ServerProcess(["-m", str(synthetic_path), "-np", "1", "-c", "256", *flags])
        try:
            srv.wait_ready()
            r = httpx.post(srv.base + "/completion", json={"prompt": "one two three", "n_predict": 12,
                                                           "temperature": 0, "ignore_eos": True}, timeout=60)
            return r.json()["content"]
        finally:
            srv.stop()

    plain = text()
    assert text("--control-vector", str(vector)) != plain
    assert text("--control-vector-scaled", f"{vector}:0") == plain
    assert text("--control-vector", str(vector), "--control-vector-layer-range", "2", "2") == plain
    srv = ServerProcess(["-m", str(synthetic_path), "-c", "256", "--control-vector", str(tmp_path / "no.gguf")])
    assert srv.proc.wait(60) != 0 and "control vector not found" in srv.proc.stdout.read().decode()
