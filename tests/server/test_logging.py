"""The logging flags on a real server: one setup for pyllama's, libllama's and gunicorn's lines."""

from __future__ import annotations

import json
import re

import httpx

from .conftest import ServerProcess

STAMP = re.compile(r"^\d+\.\d\d\.\d{3}\.\d{3} [IWED] ")


def test_log_file_gets_every_layer_in_upstreams_format(synthetic_path, tmp_path):
    log = tmp_path / "server.log"
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "1", "-c", "256", "--offline",
                         "--log-file", str(log), "-lv", "4", "--log-colors", "on"])
    try:
        srv.wait_ready()
        assert httpx.post(srv.base + "/completion", json={"prompt": "hi", "n_predict": 2}).status_code == 200
    finally:
        srv.stop()
    lines = log.read_text().splitlines()
    text = "\n".join(lines)
    assert "model loaded" in text                      # pyllama's own logger
    assert "llama_model_loader" in text or "print_info" in text  # libllama's, through its callback
    assert "Booting worker" in text                    # gunicorn's error log
    assert all(STAMP.match(line) for line in lines if line and not line.startswith((" ", "\t"))), lines[:5]
    assert "\033[" not in text                         # the file never gets colours
    out = srv.proc.stdout.read().decode(errors="replace")
    assert "\033[32mI " in out                         # --log-colors on: the terminal copy does


def test_verbosity_and_jsonl(synthetic_path, tmp_path):
    log = tmp_path / "quiet.log"
    srv = ServerProcess(["-m", str(synthetic_path), "-np", "1", "-c", "256", "--log-file", str(log),
                         "-lv", "2", "--log-jsonl"])
    try:
        srv.wait_ready()
    finally:
        srv.stop()
    records = [json.loads(line) for line in log.read_text().splitlines() if line]
    assert all(r["type"] == "log" and r["level"] in ("warn", "error") for r in records), records[:3]
    assert not any("model loaded" in r["msg"] for r in records)  # info is below -lv 2
