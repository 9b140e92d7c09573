"""KV cache reuse by shifting (--cache-reuse, a request's n_cache_reuse) as llama-server's.

After the common prefix of a slot's cache and a new prompt, server_context::update_slots moves
every cached run of at least n_cache_reuse tokens that continues the prompt down into place
(llama_memory_seq_rm + llama_memory_seq_add), so an editor that drops a few lines near the top
of its context gets the rest back from the cache.

The reused cells are an approximation upstream accepts: past the first layer, a cell's K and V
were computed while the removed text was in view. A one-layer model has no such layer (K and V
of a token depend on it and its position only), so there the shifted cells must give what a
fresh engine computes: F32 weights and KV cache, greedy outputs compared for equality.
"""

from __future__ import annotations

import random

import pytest

from pyllama.engine import Engine, Request, SamplingParams
from pyllama.synthetic import SyntheticSpec, write_synthetic_model

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)
WORDS = range(259, 290)  # the synthetic model's word pieces, after the byte tokens


def _chunks(*sizes, seed=0):
    # random word runs; each starts with its own token, so no run continues into another
    rng = random.Random(seed)
    return [[WORDS[i]] + [rng.choice(WORDS) for _ in range(n - 1)] for i, n in enumerate(sizes)]


def _run(engine, prompt, n=12, **kw):
    return engine.submit(Request(prompt=prompt, sampling=GREEDY, n_predict=n, **kw)).wait()


@pytest.fixture(scope="module")
def one_layer_path(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("models") / "one-layer.gguf", SyntheticSpec(n_layer=1))


@pytest.fixture
def engine_factory(one_layer_path):
    engines = []

    def make(**options):
        # one slot, no host-RAM prompt cache: what the slot holds is all there is to reuse
        eng = Engine(one_layer_path, n_ctx=2048, n_batch=128, n_parallel=1, cache_ram_mib=0,
                     type_k="f32", type_v="f32", **options)
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng.close()


@pytest.fixture
def fresh(engine_factory):
    eng = engine_factory()
    return lambda prompt, n=12: _run(eng, prompt, n, cache_prompt=False)


def test_a_chunk_removed_near_the_start_reuses_the_rest(engine_factory, fresh):
    a, b, c = _chunks(30, 40, 150)
    eng = engine_factory(n_cache_reuse=16)
    assert eng.config.n_cache_reuse == 16
    first = _run(eng, [1] + a + b + c)
    assert first.tokens == fresh([1] + a + b + c).tokens
    edited = [1] + a + c
    second = _run(eng, edited)
    # all but the last token, which is evaluated for its logits (not just the 31 of the prefix)
    assert second.timings.cache_n == len(edited) - 1 and second.timings.prompt_n == 1
    assert second.tokens == fresh(edited).tokens and second.text == fresh(edited).text
    # the slot's cache is the edited prompt now, in place: its continuation is a plain prefix
    longer = edited + second.tokens + a
    third = _run(eng, longer)
    assert third.timings.cache_n == len(edited) + len(second.tokens) - 1
    assert third.tokens == fresh(longer).tokens


def test_several_removed_chunks_and_a_new_tail(engine_factory, fresh):
    a, b, c, d, e, tail = _chunks(20, 25, 40, 30, 60, 20, seed=1)
    eng = engine_factory(n_cache_reuse=16)
    _run(eng, [1] + a + b + c + d + e)
    edited = [1] + a + c + e + tail
    result = _run(eng, edited)
    assert result.timings.cache_n == 1 + len(a) + len(c) + len(e)
    assert result.timings.prompt_n == len(tail)
    assert result.tokens == fresh(edited).tokens


def test_without_cache_reuse_only_the_prefix_is_reused(engine_factory, fresh):
    a, b, c = _chunks(30, 40, 150, seed=2)
    eng = engine_factory()  # upstream's default, 0
    assert eng.config.n_cache_reuse == 0
    _run(eng, [1] + a + b + c)
    edited = [1] + a + c
    result = _run(eng, edited)
    assert result.timings.cache_n == 1 + len(a) and result.tokens == fresh(edited).tokens


def test_the_request_field_overrides_the_engine_default(engine_factory):
    a, b, c = _chunks(30, 40, 150, seed=3)
    off = engine_factory(n_cache_reuse=16)
    _run(off, [1] + a + b + c)
    assert _run(off, [1] + a + c, n_cache_reuse=0).timings.cache_n == 1 + len(a)
    on = engine_factory()
    _run(on, [1] + a + b + c)
    assert _run(on, [1] + a + c, n_cache_reuse=16).timings.cache_n == len(a) + len(c)


def test_cache_prompt_off_reuses_nothing(engine_factory):
    a, b, c = _chunks(30, 40, 150, seed=4)
    eng = engine_factory(n_cache_reuse=16)
    _run(eng, [1] + a + b + c)
    assert _run(eng, [1] + a + c, cache_prompt=False).timings.cache_n == 0


def test_chunks_shorter_than_n_cache_reuse_stop_the_search(engine_factory, fresh):
    # upstream's search never skips prompt tokens: a run too short to reuse at the prompt's
    # head leaves the rest of the prompt to be computed, even where it is cached further on
    a, b, c, d, e = _chunks(20, 30, 10, 30, 100, seed=5)
    edited = [1] + a + c + e
    results = {}
    for n_cache_reuse in (16, 8):
        eng = engine_factory(n_cache_reuse=n_cache_reuse)
        _run(eng, [1] + a + b + c + d + e)
        results[n_cache_reuse] = _run(eng, edited)
    assert results[16].timings.cache_n == 1 + len(a)
    assert results[8].timings.cache_n == len(edited) - 1
    assert results[8].tokens == results[16].tokens == fresh(edited).tokens


def test_an_inserted_chunk_keeps_only_the_prefix(engine_factory, fresh):
    # the cache head only moves forward: text after an insertion sits later in the prompt
    # than in the cache, and upstream does not move cells up (nor do we)
    a, b, c, x = _chunks(30, 40, 150, 20, seed=6)
    eng = engine_factory(n_cache_reuse=16)
    _run(eng, [1] + a + b + c)
    edited = [1] + a + x + b + c
    result = _run(eng, edited)
    assert result.timings.cache_n == 1 + len(a) and result.tokens == fresh(edited).tokens


def test_on_a_deeper_model_the_reused_cells_are_kept_as_they_are(synthetic_path):
    # two layers: the second layer's cells of the reused chunk saw the removed one, so the
    # output may differ from a fresh run (as upstream's); the counts and positions do not
    a, b, c = _chunks(30, 40, 150, seed=7)
    eng = Engine(synthetic_path, n_ctx=2048, n_batch=128, n_parallel=1, cache_ram_mib=0, n_cache_reuse=16)
    try:
        _run(eng, [1] + a + b + c)
        edited = [1] + a + c
        result = _run(eng, edited)
        assert result.timings.cache_n == len(edited) - 1 and len(result.tokens) == 12
        info = eng.slot_info()[result.id_slot]
        assert info["n_tokens"] == len(edited) + 11
        # the cells sit at 0 .. n_tokens - 1: the shifted chunk moved down, nothing is left above
        assert eng.call(lambda core: core.context.seq_pos_max(result.id_slot)) == len(edited) + 10
    finally:
        eng.close()
