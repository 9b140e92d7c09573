"""Speculative decoding through pyllama-server's flags: -md / --spec-type / --spec-*, the
timings, /slots, /metrics and the request params that report it (F32 synthetic model)."""

from __future__ import annotations

import json

import httpx
import pytest

from pyllama.synthetic import SyntheticSpec, write_synthetic_model
from server.conftest import ServerProcess

PROMPT = "the world is a world of the world and the world " * 4


def _body(**kw):
    return {"prompt": PROMPT, "n_predict": 32, "temperature": 0, "ignore_eos": True, **kw}


@pytest.fixture(scope="module")
def spec_server(synthetic_path):
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "2", "-c", "2048", "--metrics",
                         "--spec-type", "draft-simple", "-md", str(synthetic_path), "--spec-draft-n-max", "4",
                         "--draft-p-min", "0.0"])
    srv.wait_ready()
    yield srv
    srv.stop()


def test_output_timings_slots_and_metrics(spec_server, synthetic_server):
    want = httpx.post(synthetic_server.base + "/completion", json=_body(), timeout=120).json()
    got = httpx.post(spec_server.base + "/completion", json=_body(), timeout=120).json()
    assert got["content"] == want["content"]
    t = got["timings"]
    assert t["draft_n"] > 0 and 0 <= t["draft_n_accepted"] <= t["draft_n"]
    assert "draft_n" not in want["timings"]  # result_timings::to_json: only once something was drafted
    assert got["generation_settings"]["speculative.types"] == "none,draft-simple"
    assert want["generation_settings"]["speculative.types"] == "none"
    slots = httpx.get(spec_server.base + "/slots").json()
    assert all(s["speculative"] for s in slots)
    assert not any(s["speculative"] for s in httpx.get(synthetic_server.base + "/slots").json())
    metrics = httpx.get(spec_server.base + "/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("llamacpp:spec_decode")}
    assert values["llamacpp:spec_decode_num_draft_tokens_total"] >= t["draft_n"]
    assert 0 < values["llamacpp:spec_decode_num_accepted_tokens_total"] <= \
        values["llamacpp:spec_decode_num_draft_tokens_total"]
    assert values["llamacpp:spec_decode_num_drafts_total"] > 0


def test_stream_and_per_request_fields(spec_server):
    with httpx.Client(base_url=spec_server.base, timeout=120) as c:
        full = c.post("/completion", json=_body()).json()
        off = c.post("/completion", json=_body(**{"speculative.n_max": 0})).json()
        assert off["content"] == full["content"] and "draft_n" not in off["timings"]
        chunks = []
        with c.stream("POST", "/completion", json=_body(stream=True)) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        assert "".join(ch["content"] for ch in chunks) == full["content"]
        assert chunks[-1]["timings"]["draft_n"] > 0
        for bad in ({"speculative.n_max": -1}, {"speculative.n_min": "x"}, {"speculative.p_min": "x"}):
            r = c.post("/completion", json=_body(**bad))
            assert r.status_code == 400, bad
        chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPT}],
                                                      "max_tokens": 16, "temperature": 0}).json()
        assert chat["timings"]["predicted_n"] > 0


def test_a_draft_with_another_vocabulary_serves_without_speculation(synthetic_path, tmp_path):
    alien = write_synthetic_model(tmp_path / "alien.gguf", SyntheticSpec(extra_vocab=200))
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "1", "-c", "512",
                         "--spec-type", "draft-simple", "-md", str(alien)])
    try:
        srv.wait_ready()
        assert not httpx.get(srv.base + "/slots").json()[0]["speculative"]
        r = httpx.post(srv.base + "/completion", json=_body(n_predict=4), timeout=60).json()
        assert "draft_n" not in r["timings"]
    finally:
        srv.stop()
    assert "failed to initialize speculative decoding context" in srv.output()
