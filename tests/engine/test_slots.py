"""Slot operations on Engine: info, save, restore, erase; file I/O with the GIL released."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time

import pytest

from pyllama.engine import Engine, Request, SamplingParams
from pyllama.errors import EngineError, InvalidRequestError

NO_EOS = SamplingParams(temperature=0.0, ignore_eos=True)
# How long a GIL-holding engine thread may block the test before another process unblocks it.
DEADLOCK_S = 60


@pytest.fixture(scope="module")
def engine(synthetic_path):
    eng = Engine(synthetic_path, n_parallel=2, n_ctx=1024, n_batch=64)
    yield eng
    eng.close()


def _prompt(engine, n_tokens):
    return engine.model.tokenize("Hello world, the world is a hello to it " * 8)[:n_tokens]


def _run(engine, prompt, n=8, slot=0):
    return engine.submit(Request(prompt=prompt, sampling=NO_EOS, n_predict=n, id_slot=slot)).wait()


def _through_fifo(fifo, engine_op, peer_flags, peer_io):
    """Run engine_op() (which opens `fifo`) while a Python thread opens the other end.

    The engine's fopen() blocks until the peer opens the fifo, and the peer is a Python thread:
    it can only run if the engine thread released the GIL. If it did not, nothing in this
    process runs again, so a second process opens the fifo after DEADLOCK_S to end the
    deadlock, and the test fails instead of hanging. Returns (engine outcome, peer result,
    whether the rescue was needed).
    """
    rescue = subprocess.Popen([sys.executable, "-c",
                               f"import os, time; time.sleep({DEADLOCK_S}); "
                               f"os.close(os.open({str(fifo)!r}, {peer_flags}))"])
    out = {}

    def run_engine():
        try:
            out["engine"] = engine_op()
        except Exception as exc:
            out["engine"] = exc

    def run_peer():
        fd = os.open(fifo, peer_flags)
        out["opened"] = True
        try:
            out["peer"] = peer_io(fd, lambda: "engine" in out)
        finally:
            os.close(fd)

    deadline = time.monotonic() + DEADLOCK_S
    try:
        engine_thread = threading.Thread(target=run_engine, daemon=True)
        engine_thread.start()
        time.sleep(1.0)  # the engine thread is now inside fopen(), waiting for the other end
        peer_thread = threading.Thread(target=run_peer, daemon=True)
        peer_thread.start()
        engine_thread.join(max(0.0, deadline - time.monotonic()))
        peer_thread.join(max(1.0, deadline - time.monotonic()))
        rescued = rescue.poll() is not None
    finally:
        rescue.kill()
        rescue.wait()
    if peer_thread.is_alive():  # a peer opened too late: give it its other end, so it ends
        try:
            os.close(os.open(fifo, (os.O_WRONLY if peer_flags == os.O_RDONLY else os.O_RDONLY) | os.O_NONBLOCK))
        except OSError:
            pass
    assert not rescued, "the engine thread held the GIL inside fopen(): only another process got through"
    assert not engine_thread.is_alive() and out.get("opened"), "the engine call or its peer did not finish"
    return out["engine"], out.get("peer")


def _read_all(fd, engine_done):
    # Reads until EOF; gives up once the engine call returned and nothing more comes (a failed
    # llama_file keeps its end open: it throws from its constructor, leaking the FILE).
    data = b""
    idle_since = None
    while True:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return data
            data += chunk
            idle_since = None
        elif engine_done():
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 0.5:
                return data


def test_save_slot_writes_with_the_gil_released(engine, tmp_path):
    prompt = _prompt(engine, 30)
    _run(engine, prompt)
    fifo = tmp_path / "slot0.fifo"
    os.mkfifo(fifo)
    outcome, data = _through_fifo(fifo, lambda: engine.save_slot(0, str(fifo)), os.O_RDONLY, _read_all)
    if isinstance(outcome, EngineError):
        # NOTE: llama_file seeks to the end when it opens a file, which a fifo refuses,
        # so the save fails once both ends met; that they met is what this test is about.
        assert data == b""
    else:
        n_tokens, n_bytes = outcome
        assert len(data) == n_bytes and n_tokens == len(prompt) + 7

    # and through a regular file: the restored cache serves the same prompt again
    path = tmp_path / "slot0.bin"
    again = _run(engine, prompt)  # from the cache, as after the restore below
    n_tokens, n_bytes = engine.save_slot(0, str(path))
    assert n_tokens == len(prompt) + 7 and n_bytes == path.stat().st_size
    assert engine.erase_slot(0) == n_tokens
    assert engine.slot_info()[0]["n_tokens"] == 0
    assert engine.restore_slot(0, str(path)) == (n_tokens, n_bytes)
    assert engine.slot_info()[0]["n_tokens"] == n_tokens
    restored = _run(engine, prompt)
    assert restored.timings.cache_n == len(prompt) - 1 == again.timings.cache_n
    assert restored.tokens == again.tokens


def test_restore_slot_reads_with_the_gil_released(engine, tmp_path):
    prompt = _prompt(engine, 24)
    _run(engine, prompt)
    path = tmp_path / "state.bin"
    n_tokens, n_bytes = engine.save_slot(0, str(path))
    state = path.read_bytes()
    engine.erase_slot(0)
    fifo = tmp_path / "state.fifo"
    os.mkfifo(fifo)

    def write_state(fd, engine_done):
        os.set_blocking(fd, False)
        try:
            return os.write(fd, state)  # into the pipe buffer: nobody may read it all
        except (BlockingIOError, BrokenPipeError):
            return 0

    outcome, _ = _through_fifo(fifo, lambda: engine.restore_slot(0, str(fifo)), os.O_WRONLY, write_state)
    if isinstance(outcome, InvalidRequestError):  # a fifo cannot seek (see above)
        assert outcome.message.startswith("Unable to restore slot")
        assert engine.slot_info()[0]["n_tokens"] == 0
    else:
        assert outcome == (n_tokens, n_bytes)

    assert engine.restore_slot(0, str(path)) == (n_tokens, n_bytes)
    assert _run(engine, prompt).timings.cache_n == len(prompt) - 1


def test_slot_actions_wait_until_the_slot_is_idle(engine, tmp_path):
    prompt = _prompt(engine, 20)
    handle = engine.submit(Request(prompt=prompt, sampling=NO_EOS, n_predict=120, id_slot=1,
                                   return_progress=True))
    assert handle.get(timeout=60) is not None  # admitted: the slot is busy from now on
    saved = []
    saver = threading.Thread(target=lambda: saved.append(engine.save_slot(1, str(tmp_path / "s1"))),
                             daemon=True)
    saver.start()
    result = handle.wait()
    saver.join(60)
    # everything the finished request left in the cache: the prompt and all but the last token
    assert saved == [(len(prompt) + 119, (tmp_path / "s1").stat().st_size)]
    assert len(result.tokens) == 120
    assert engine.erase_slot(1) == len(prompt) + 119


def test_slot_info_describes_every_slot(engine):
    infos = engine.slot_info()
    assert [i["id"] for i in infos] == [0, 1]
    assert all(i["n_ctx"] == engine.n_ctx_slot and i["is_processing"] is False for i in infos)


@pytest.mark.parametrize("slot_id", [-1, 2, 99, True, "0"])
def test_slot_ids_out_of_range_are_refused(engine, tmp_path, slot_id):
    with pytest.raises(InvalidRequestError, match="Invalid slot ID"):
        engine.erase_slot(slot_id)
    with pytest.raises(InvalidRequestError, match="Invalid slot ID"):
        engine.save_slot(slot_id, str(tmp_path / "x"))


def test_restoring_a_missing_or_bad_file_is_a_request_error(engine, tmp_path):
    with pytest.raises(InvalidRequestError) as err:
        engine.restore_slot(0, str(tmp_path / "missing.bin"))
    assert err.value.message == "Unable to restore slot: missing.bin does not exist"
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a slot state")
    with pytest.raises(InvalidRequestError, match="Unable to restore slot"):
        engine.restore_slot(0, str(bad))
    assert engine.slot_info()[0]["n_tokens"] == 0
