"""--cache-ram and --cache-idle-slots on a real server (upstream's test_kv_keep_only_active.py)."""

from __future__ import annotations

import random

import httpx
import pytest

from pyllama.cli import parse_server_args
from pyllama.server.app import engine_config

from .conftest import ServerProcess

WORDS = range(259, 290)  # the synthetic model's word pieces


def _conversations(n, shared, unique, seed=0):
    rng = random.Random(seed)
    prefix = [1] + [rng.choice(WORDS) for _ in range(shared - 1)]
    return [prefix + [WORDS[i]] + [rng.choice(WORDS) for _ in range(unique - 1)] for i in range(n)]


class LogReader:
    def __init__(self, path):
        self.path = path
        self.pos = 0

    def drain(self):
        with open(self.path, errors="replace") as f:
            f.seek(self.pos)
            content = f.read()
            self.pos = f.tell()
        return content


def _complete(srv, prompt, **body):
    res = httpx.post(srv.base + "/completion", timeout=120,
                     json={"prompt": prompt, "n_predict": 4, "temperature": 0.0, **body})
    assert res.status_code == 200, res.text
    return res.json()


@pytest.fixture
def start(synthetic_path, tmp_path):
    servers = []

    def run(*args):
        log = tmp_path / f"server{len(servers)}.log"
        srv = ServerProcess(["-m", str(synthetic_path), "-c", "2048", "--log-file", str(log), *args])
        servers.append(srv)
        srv.wait_ready()
        return srv, LogReader(log)

    yield run
    for srv in servers:
        srv.stop()


@pytest.mark.parametrize("argv,env,expected", [
    ([], {}, (8192, True)),  # upstream's defaults
    (["-cram", "0", "--no-cache-idle-slots"], {}, (0, False)),
    (["--cache-ram", "-1", "--cache-idle-slots"], {"LLAMA_ARG_CACHE_IDLE_SLOTS": "0"}, (-1, True)),
    ([], {"LLAMA_ARG_CACHE_RAM": "256", "LLAMA_ARG_CACHE_IDLE_SLOTS": "false"}, (256, False)),
])
def test_the_flags_and_variables_become_engine_options(argv, env, expected):
    s = parse_server_args(argv, environ=env)
    assert (s.cache_ram, s.cache_idle_slots) == expected
    config = engine_config(s)
    assert (config.cache_ram_mib, config.cache_idle_slots) == expected


def test_a_returning_conversation_reports_the_tokens_restored_from_ram(start):
    # one slot for three conversations: each return is restored whole, and says so in cache_n
    convs = _conversations(3, shared=40, unique=200)
    srv, log = start("-np", "1", "--cache-ram", "64", "-lv", "4")
    assert "prompt cache is enabled, size limit: 64 MiB" in log.drain()
    first = [_complete(srv, c) for c in convs]
    assert [r["timings"]["cache_n"] for r in first] == [0, 40, 40]
    again = _complete(srv, convs[0])
    assert again["timings"]["cache_n"] == again["tokens_evaluated"] - 1 == 239
    assert again["timings"]["prompt_n"] == 1
    assert again["content"] == first[0]["content"]
    assert "updating prompt cache" in log.drain()


def test_cache_ram_0_turns_the_cache_and_idle_slots_off(start):
    convs = _conversations(2, shared=40, unique=200)
    srv, log = start("-np", "1", "--cache-ram", "0")
    assert "--cache-idle-slots requires --cache-ram, disabling" in log.drain()
    for c in convs:
        _complete(srv, c)
    assert _complete(srv, convs[0])["timings"]["cache_n"] == 40  # recomputed past the prefix


def test_idle_slots_are_cleared_and_restored_from_ram(start):
    # upstream's test_clear_and_restore: two slots over a unified KV cache
    convs = _conversations(2, shared=10, unique=200, seed=1)
    srv, log = start("-np", "2", "-kvu", "--cache-ram", "100", "-lv", "5")
    assert "__TEST_TAG_CACHE_IDLE_SLOTS_ENABLED__" in log.drain()
    original = _complete(srv, convs[0], id_slot=0)
    assert "__TEST_TAG_CACHE_IDLE_SLOT__" not in log.drain()  # slot 0 was the only one with KV
    _complete(srv, convs[1], id_slot=1)
    assert "__TEST_TAG_CACHE_IDLE_SLOT__" in log.drain()  # launching slot 1 cleared slot 0
    res = _complete(srv, convs[0])
    assert "updating prompt cache" in log.drain()
    assert res["timings"]["cache_n"] == 209 and res["timings"]["prompt_n"] < original["timings"]["prompt_n"]
    assert res["content"] == original["content"]


def test_no_cache_idle_slots_reaches_the_engine(start):
    # upstream's test_disabled_with_flag
    convs = _conversations(2, shared=10, unique=200, seed=1)
    srv, log = start("-np", "2", "-kvu", "--cache-ram", "100", "--no-cache-idle-slots", "-lv", "5")
    assert "__TEST_TAG_CACHE_IDLE_SLOTS_ENABLED__" not in log.drain()
    _complete(srv, convs[0], id_slot=0)
    _complete(srv, convs[1], id_slot=1)
    assert "__TEST_TAG_CACHE_IDLE_SLOT__" not in log.drain()
