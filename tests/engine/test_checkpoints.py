"""Context checkpoints (--ctx-checkpoints, --checkpoint-min-step) as llama-server's.

A sliding-window layer drops the cells that fall out of its window, so a sequence cannot be
cut back to any earlier length: a later prompt that diverges further back than the cells
still held would be evaluated from its first token. Checkpoints of the window's state, made
while a prompt is processed (at user message starts and near its end), are restored instead.
The synthetic gemma3-architecture F32 model (window 32, KV cells for 256 of them) gives the
same numbers whatever the batch split, so a restored run must equal a full evaluation.
"""

from __future__ import annotations

import random

import pytest

from pyllama.engine import Engine, Request, SamplingParams
from pyllama.synthetic import SyntheticSpec, write_synthetic_model

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)
WORDS = range(259, 290)  # the synthetic model's word pieces, after the byte tokens


@pytest.fixture(scope="module")
def swa_path(tmp_path_factory):
    return str(write_synthetic_model(tmp_path_factory.mktemp("swa") / "swa.gguf",
                                     SyntheticSpec(sliding_window=32, n_layer=6)))


@pytest.fixture
def make(swa_path):
    engines = []

    def make_engine(path=swa_path, **options):
        options = {"n_ctx": 2048, "n_batch": 64, "n_ubatch": 64, "n_parallel": 1, "cache_ram_mib": 0,
                   **options}
        engine = Engine(path, **options)
        engines.append(engine)
        return engine

    yield make_engine
    for engine in engines:
        engine.close()


def _tokens(n, seed):
    rng = random.Random(seed)
    return [rng.choice(WORDS) for _ in range(n)]


def _run(engine, prompt, user_starts=(), n=8):
    return engine.submit(Request(prompt=prompt, sampling=GREEDY, n_predict=n,
                                 user_starts=tuple(user_starts))).wait()


def _checkpoints(engine, slot=0):
    return engine.call(lambda core: [(c.n_tokens, c.pos_min, c.pos_max) for c in core.slots[slot].checkpoints])


FIRST = [1] + _tokens(699, seed=1)  # 700 tokens: the window's cells then hold 451 onwards
USER = 350  # a user message starts here


def _edit(n_keep, n_new, seed):
    # FIRST's first n_keep tokens, then n_new others: it diverges exactly at n_keep
    tail = _tokens(n_new, seed)
    tail[0] = WORDS[0] if FIRST[n_keep] != WORDS[0] else WORDS[1]
    return FIRST[:n_keep] + tail


def test_a_change_outside_the_window_restores_a_checkpoint(make):
    edited = _edit(400, 40, seed=2)  # diverges at 400: its cells are gone
    engine = make()
    assert engine.call(lambda core: core.do_checkpoints)
    _run(engine, FIRST, user_starts=[USER])
    # at the user message, 4 + n_ubatch before the end (n_batch caps it to 64) and 4 before it;
    # each holds the window's state before those tokens
    made = _checkpoints(engine)
    assert [n for n, _, _ in made] == [USER, 700 - 64, 700 - 4]
    assert all(pos_max == n - 1 for n, _, pos_max in made)
    restored = _run(engine, edited, user_starts=[USER])
    # the checkpoint at 350 serves: the prompt resumes one token before it
    assert restored.timings.cache_n == USER - 1 and restored.timings.prompt_n == len(edited) - USER + 1
    fresh = make(n_ctx_checkpoints=0)
    _run(fresh, FIRST, user_starts=[USER])
    full = _run(fresh, edited, user_starts=[USER])
    assert fresh.call(lambda core: core.do_checkpoints) is False and _checkpoints(fresh) == []
    assert full.timings.cache_n == 0  # without checkpoints: everything again
    assert restored.tokens == full.tokens and restored.text == full.text
    # the checkpoints past the divergence went; new ones stand for the new prompt
    assert [n for n, _, _ in _checkpoints(engine)] == [USER, 440 - 64, 440 - 4]


def test_a_change_inside_the_window_needs_no_checkpoint(make):
    edited = _edit(650, 40, seed=3)  # the cells from 451 on are still there
    engine, fresh = make(), make(n_ctx_checkpoints=0)
    for e in (engine, fresh):
        _run(e, FIRST, user_starts=[USER])
    with_ckpt, without = _run(engine, edited, user_starts=[USER]), _run(fresh, edited, user_starts=[USER])
    assert with_ckpt.timings.cache_n == without.timings.cache_n == 650
    assert with_ckpt.tokens == without.tokens


def test_no_checkpoint_is_restored_past_the_divergence(make):
    # a change before every checkpoint: nothing can be restored, the prompt starts over
    edited = _edit(300, 40, seed=4)
    engine = make()
    _run(engine, FIRST, user_starts=[USER])
    result = _run(engine, edited)
    assert result.timings.cache_n == 0
    assert [n for n, _, _ in _checkpoints(engine)] == [340 - 64, 340 - 4]  # only the new prompt's


def test_checkpoints_are_capped_per_slot_and_spaced(make):
    starts = list(range(100, 700, 100))  # six user messages
    spaced = make()  # --checkpoint-min-step 8192: only the first and the last user message
    _run(spaced, FIRST, user_starts=starts)
    assert [n for n, _, _ in _checkpoints(spaced)] == [100, 600, 636, 696]
    dense = make(checkpoint_min_step=0, n_ctx_checkpoints=3)
    _run(dense, FIRST, user_starts=starts)
    # every user message breaks the batch, the oldest checkpoints make room for newer ones
    assert [n for n, _, _ in _checkpoints(dense)] == [600, 636, 696]


def test_checkpoints_travel_with_the_prompt_cache(make):
    # one slot, another conversation in between: the first is saved to host RAM with its
    # checkpoints, restored from there, and then its checkpoint serves the edit
    edited = _edit(400, 40, seed=5)
    engine = make(cache_ram_mib=256)
    _run(engine, FIRST, user_starts=[USER])
    _run(engine, [1] + _tokens(300, seed=6))
    assert engine.call(lambda core: [len(s.checkpoints) for s in core.prompt_cache.states]) == [3]
    result = _run(engine, edited, user_starts=[USER])
    assert result.timings.cache_n == USER - 1
    fresh = make(n_ctx_checkpoints=0)
    assert _run(fresh, edited).tokens == result.tokens
    # the size the cache accounts for includes the checkpoints
    state_sizes = engine.call(lambda core: [(s.size, sum(c.size for c in s.checkpoints))
                                            for s in core.prompt_cache.states])
    assert all(size > ckpt > 0 for size, ckpt in state_sizes)


def test_models_that_can_cut_back_make_no_checkpoints(make, synthetic_path):
    engine = make(path=synthetic_path)  # llama architecture: full attention only
    assert engine.call(lambda core: core.do_checkpoints) is False
    _run(engine, FIRST[:500], user_starts=[USER])
    assert _checkpoints(engine) == []
    assert _run(engine, _edit(400, 20, seed=7)).timings.cache_n == 400


@pytest.mark.parametrize("cut", [0, 1, 2])
def test_a_state_from_the_prompt_cache_serves_up_to_the_window_edge(make, cut):
    # A state saved to host RAM keeps only the window's cells (its end - 32 + 1 on). A prompt
    # that continues it to within a token of its end still has every cell its first new token
    # attends to (cut 0 and 1: the whole cached prefix serves); one token earlier (cut 2) the
    # first cell is missing, and the checkpoint 4 tokens before the old prompt's end serves
    # (resuming one token before it, as upstream). Each answer must equal a full evaluation.
    first = FIRST[:300]
    engine = make(cache_ram_mib=256)
    _run(engine, first)
    held = engine.call(lambda core: core.slots[0].cached_tokens)  # the prompt + 7 decoded
    _run(engine, [1] + _tokens(200, seed=8))  # the slot goes to another conversation
    tail = [WORDS[0] if held[len(held) - cut] != WORDS[0] else WORDS[1]] if cut else []
    prompt = held[:len(held) - cut] + tail + _tokens(20, seed=9)
    result = _run(engine, prompt)
    assert result.timings.cache_n == (len(held) - cut if cut < 2 else 300 - 4 - 1)
    assert result.tokens == _run(make(cache_ram_mib=0), prompt).tokens
