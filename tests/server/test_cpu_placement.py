"""-C/-Cr and --prio reach the CPU backend's threads in a real server (upstream's threadpools)."""

from __future__ import annotations

import os
import subprocess

import httpx
import pytest

from .conftest import ServerProcess

SCHED_BATCH = 3


def _worker_threads(server: ServerProcess) -> list[dict]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(server.proc.pid)], capture_output=True, text=True)
    pid = int(out.stdout.split()[0])  # gunicorn's one worker owns the engine
    threads = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        base = f"/proc/{pid}/task/{tid}"
        status = dict(line.split(":\t", 1) for line in open(f"{base}/status").read().splitlines() if ":\t" in line)
        stat = open(f"{base}/stat").read().rsplit(")", 1)[1].split()
        threads.append({"name": status["Name"].strip(), "cpus": status["Cpus_allowed_list"].strip(),
                        "nice": int(stat[16]), "policy": int(stat[38])})
    return threads


@pytest.fixture
def start(synthetic_path):
    servers = []

    def run(*flags):
        srv = ServerProcess(["-m", str(synthetic_path), "-np", "1", "-c", "256", "-t", "2", *flags])
        servers.append(srv)
        srv.wait_ready()
        r = httpx.post(srv.base + "/completion", json={"prompt": "one two three", "n_predict": 4}, timeout=60)
        assert r.status_code == 200
        return _worker_threads(srv)

    yield run
    for srv in servers:
        srv.stop()


@pytest.mark.parametrize("flags", [("-C", "0x1"), ("-Cr", "0-0"), ("--cpu-mask", "1", "--cpu-strict", "1")])
def test_cpu_mask_pins_the_compute_threads(start, flags):
    engine = [t for t in start(*flags) if t["name"] == "pyllama-engine"]
    assert [t for t in engine if t["cpus"] == "0"], engine


def test_no_mask_leaves_the_threads_free(start):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs to tell pinned from free")
    assert not [t for t in start() if t["cpus"] == "0"]


def test_low_priority_reaches_the_engine(start):
    # --prio -1: the process priority (nice 5) and SCHED_BATCH on the compute threads, as
    # set_process_priority and ggml_thread_apply_priority do; normal priority changes neither.
    engine = [t for t in start("--prio", "-1") if t["name"] == "pyllama-engine"]
    assert [t for t in engine if t["policy"] == SCHED_BATCH] and [t for t in engine if t["nice"] == 5]
    inherited = os.getpriority(os.PRIO_PROCESS, 0)  # a test run may itself be niced
    assert not [t for t in start() if t["policy"] == SCHED_BATCH or t["nice"] != inherited]
