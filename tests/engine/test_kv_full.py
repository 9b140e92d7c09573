"""A shared KV cache that fills up: idle caches go first, then smaller batches, then one request."""

from __future__ import annotations

import random
import threading

import pytest

from pyllama.engine import Engine, ErrorEvent, FinishEvent, FinishReason, Request, SamplingParams
from pyllama.errors import ContextLengthExceededError

NO_EOS = SamplingParams(temperature=0.0, ignore_eos=True)
N_VOCAB_TEXT = range(259, 290)  # the synthetic model's word pieces, after the byte tokens


@pytest.fixture(scope="module")
def engine(synthetic_path):
    # one KV buffer of 256 cells shared by 4 slots, each allowed all of it
    eng = Engine(synthetic_path, n_parallel=4, n_ctx=256, n_batch=256, kv_unified=True)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def engine_keeping_idle_slots(synthetic_path):
    # --no-cache-idle-slots: idle slots keep their cache until a busy one needs the room (by
    # default each is saved to the prompt cache and cleared as soon as another request starts)
    eng = Engine(synthetic_path, n_parallel=4, n_ctx=256, n_batch=256, kv_unified=True,
                 cache_idle_slots=False)
    yield eng
    eng.close()


def _prompt(seed, n):
    rng = random.Random(seed)
    return [1] + [rng.choice(N_VOCAB_TEXT) for _ in range(n - 1)]


def _events(handle):
    events = []
    while True:
        event = handle.get(timeout=120)
        assert event is not None, "no event in 120 s"
        events.append(event)
        if isinstance(event, (FinishEvent, ErrorEvent)):
            return events


def _erase_all(engine):
    for i in range(engine.n_slots):
        engine.erase_slot(i)


def _all_at_once(engine, requests):
    # Holds the engine thread in a call until every request is queued: they are admitted together.
    gate = threading.Event()
    blocker = threading.Thread(target=engine.call, args=(lambda core: gate.wait(60),), daemon=True)
    blocker.start()
    handles = [engine.submit(r) for r in requests]
    gate.set()
    blocker.join(60)
    return [_events(h)[-1] for h in handles]


def test_more_requests_than_the_kv_holds_end_one_at_a_time(engine, caplog):
    # 4 x (100 prompt + 40 generated) tokens want 560 cells of 256: batches shrink, and when
    # one token per slot no longer fits, the request holding the most KV ends, the others go on.
    caplog.set_level("WARNING", logger="pyllama.engine")
    _erase_all(engine)
    requests = [Request(prompt=_prompt(i, 100), sampling=NO_EOS, n_predict=40) for i in range(4)]
    ends = _all_at_once(engine, requests)
    finished = [e for e in ends if isinstance(e, FinishEvent)]
    failed = [e for e in ends if isinstance(e, ErrorEvent)]
    assert finished and failed
    assert all(e.reason == FinishReason.LIMIT and len(e.tokens) == 40 for e in finished)
    for e in failed:
        assert isinstance(e.error, ContextLengthExceededError), e.error
        assert e.error.message == "Context size has been exceeded." and e.error.status == 400
        # what the ended request held: at least its share of the full cache
        assert e.error.n_ctx == 256 and 64 <= e.error.n_prompt_tokens <= 256
    assert "retrying with smaller batch size" in caplog.text
    # the engine serves on, with the whole cache again
    assert len(engine.submit(Request(prompt=_prompt(9, 150), sampling=NO_EOS, n_predict=60)).wait().tokens) == 60
    assert engine.stats()["n_busy"] == 0


def test_an_idle_slot_cache_gives_way_to_a_busy_slot(engine_keeping_idle_slots, caplog):
    # The first request's cache stays in its slot for reuse; the second needs its room.
    engine = engine_keeping_idle_slots
    caplog.set_level("WARNING", logger="pyllama.engine")
    _erase_all(engine)
    first = engine.submit(Request(prompt=_prompt(20, 180), sampling=NO_EOS, n_predict=4, id_slot=0)).wait()
    assert engine.slot_info()[0]["n_tokens"] == 183
    second = engine.submit(Request(prompt=_prompt(21, 150), sampling=NO_EOS, n_predict=20, id_slot=1)).wait()
    assert len(first.tokens) == 4 and len(second.tokens) == 20
    assert "purging slot 0 with 183 tokens" in caplog.text
    assert engine.slot_info()[0]["n_tokens"] == 0
