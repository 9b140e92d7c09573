"""The host-RAM prompt cache (--cache-ram, --cache-idle-slots) as llama-server's server_prompt_cache.

More conversations than slots: a slot about to serve another prompt is saved to host memory,
and a conversation that comes back gets its KV state copied back instead of recomputed. The
F32 synthetic model gives the same numbers whatever the batch, so outputs can be compared
with runs that recompute everything.
"""

from __future__ import annotations

import logging
import random

import pytest

from pyllama.engine import Engine, Request, SamplingParams

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)
WORDS = range(259, 290)  # the synthetic model's word pieces, after the byte tokens


def _conversations(n, shared, unique, seed=0):
    # n prompts with one common prefix of `shared` tokens: far less than half of each, so a
    # slot serving another one would lose most of its cache (f_keep < 0.5)
    rng = random.Random(seed)
    prefix = [1] + [rng.choice(WORDS) for _ in range(shared - 1)]
    # (each tail starts with its own token, so the common prefix is exactly `shared`)
    return [prefix + [WORDS[i]] + [rng.choice(WORDS) for _ in range(unique - 1)] for i in range(n)]


def _run(engine, prompt, n=8, **kw):
    return engine.submit(Request(prompt=prompt, sampling=GREEDY, n_predict=n, **kw)).wait()


def _cached(engine):
    # the token lists of the saved states, oldest first (engine thread)
    return engine.call(lambda core: [s.token_list for s in core.prompt_cache.states])


@pytest.fixture
def engine_factory(synthetic_path):
    engines = []

    def make(**options):
        eng = Engine(synthetic_path, n_ctx=options.pop("n_ctx", 2048), n_batch=128, **options)
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        eng.close()


def test_returning_conversations_are_restored_from_ram(engine_factory):
    # one slot, three conversations taking turns: each return restores the whole prompt
    convs = _conversations(3, shared=40, unique=200)
    cached = engine_factory(n_parallel=1)
    plain = engine_factory(n_parallel=1, cache_ram_mib=0)
    assert cached.config.cache_ram_mib == 8192 and cached.config.cache_idle_slots  # upstream's defaults
    for turn, prompt in enumerate(convs * 2):
        with_cache, without = _run(cached, prompt), _run(plain, prompt)
        assert with_cache.tokens == without.tokens and with_cache.text == without.text
        assert without.timings.cache_n == (0 if turn == 0 else 40)  # the shared prefix only
        if turn < 3:
            assert with_cache.timings.cache_n == without.timings.cache_n
        else:
            # all of it: every prompt token but the last, which is evaluated for its logits
            assert with_cache.timings.cache_n == len(prompt) - 1
            assert with_cache.timings.prompt_n == 1 and with_cache.tokens_cached == len(prompt) + 7
    stats = cached.stats()
    assert stats["n_prompt_cache_loaded"] == 3 and stats["n_prompt_cache_saved"] == 5
    # a restored state leaves the cache; the slot holds conversation 3, the cache 1 and 2
    # (a slot holds its prompt and the generated tokens but the last, never decoded)
    assert stats["prompt_cache_states"] == 2 and stats["prompt_cache_tokens"] == 2 * (240 + 7)
    assert [c[:240] for c in _cached(cached)] == convs[:2]
    assert stats["n_prompt_tokens"] == 240 + 2 * 200 + 3 * 1  # then one token per return
    assert plain.stats()["prompt_cache_states"] == 0


def test_a_similar_slot_keeps_its_cache_without_the_ram_cache(engine_factory):
    # f_keep >= 0.5: the slot is reused as it is, nothing is saved (get_available_slot)
    convs = _conversations(2, shared=200, unique=40)
    eng = engine_factory(n_parallel=1)
    for prompt in convs:
        _run(eng, prompt)
    assert eng.stats()["n_prompt_cache_saved"] == 0 and _run(eng, convs[0]).timings.cache_n == 200


def test_the_oldest_states_are_evicted_to_stay_within_the_limit(engine_factory, caplog):
    # f32 K and V: about 0.5 KiB per token, so a 700-token state takes ~0.36 MiB and a 1 MiB
    # cache holds two of them
    caplog.set_level(logging.WARNING, logger="pyllama.engine")
    convs = _conversations(4, shared=20, unique=680, seed=1)
    eng = engine_factory(n_parallel=1, cache_ram_mib=1, type_k="f32", type_v="f32")
    for prompt in convs:
        _run(eng, prompt, n=4)
    states = _cached(eng)
    assert [s[:700] for s in states] == convs[1:3]  # conversation 0 made room for 2
    assert "making room for prompt cache entry, removing oldest entry" in caplog.text
    assert eng.stats()["prompt_cache_size"] <= 1024 * 1024
    assert _run(eng, convs[2], n=4).timings.cache_n == 699  # still there
    assert _run(eng, convs[0], n=4).timings.cache_n == 20  # gone: only the shared prefix


def test_a_state_larger_than_the_limit_is_not_saved(engine_factory, caplog):
    caplog.set_level(logging.WARNING, logger="pyllama.engine")
    convs = _conversations(2, shared=10, unique=2100, seed=2)  # > 1 MiB of f32 K and V
    eng = engine_factory(n_parallel=1, n_ctx=4096, cache_ram_mib=1, type_k="f32", type_v="f32")
    for prompt in convs:
        _run(eng, prompt, n=2)
    assert "exceeds cache size limit 1.000 MiB, skipping" in caplog.text
    assert eng.stats()["prompt_cache_states"] == 0


def test_cache_ram_0_disables_the_cache_and_the_idle_slots(engine_factory, caplog):
    caplog.set_level(logging.WARNING, logger="pyllama.engine")
    eng = engine_factory(n_parallel=1, cache_ram_mib=0)
    assert "--cache-idle-slots requires --cache-ram, disabling" in caplog.text
    assert eng.call(lambda core: (core.prompt_cache, core.cache_idle_slots)) == (None, False)
    convs = _conversations(2, shared=40, unique=200)
    for prompt in convs + convs:
        _run(eng, prompt)
    assert _run(eng, convs[0]).timings.cache_n == 40
    stats = eng.stats()
    assert stats["n_prompt_cache_saved"] == stats["n_prompt_cache_loaded"] == 0


def test_idle_slots_are_saved_when_a_request_starts(engine_factory):
    # two slots, one KV stream each: the idle slot is copied to RAM and keeps its cache
    a, b = _conversations(2, shared=10, unique=200, seed=3)
    eng = engine_factory(n_parallel=2)
    first = _run(eng, a)
    assert eng.stats()["prompt_cache_states"] == 0  # nothing idle held anything yet
    _run(eng, b)
    assert [s[:210] for s in _cached(eng)] == [a]
    assert eng.slot_info()[first.id_slot]["n_tokens"] == 210 + 7
    again = _run(eng, a)  # back to its own slot, by similarity
    assert again.id_slot == first.id_slot and again.timings.cache_n == 209


def test_idle_slots_are_cleared_with_a_unified_kv_and_restored_from_ram(engine_factory, caplog):
    caplog.set_level(5, logger="pyllama.engine")
    a, b = _conversations(2, shared=10, unique=200, seed=4)
    eng = engine_factory(n_parallel=2, kv_unified=True)
    assert "__TEST_TAG_CACHE_IDLE_SLOTS_ENABLED__" in caplog.text
    alone = _run(engine_factory(n_parallel=1, cache_ram_mib=0), a)
    first = _run(eng, a, id_slot=0)
    caplog.clear()
    _run(eng, b, id_slot=1)
    assert "slot 0: __TEST_TAG_CACHE_IDLE_SLOT__" in caplog.text
    info = eng.slot_info()
    assert info[0]["n_tokens"] == 0 and info[1]["n_tokens"] == 210 + 7  # slot 1 was busy then
    assert [s[:210] for s in _cached(eng)] == [a]
    again = _run(eng, a)
    assert again.timings.cache_n == 209 and again.timings.prompt_n == 1
    assert again.tokens == first.tokens == alone.tokens
    assert eng.stats()["n_prompt_cache_loaded"] == 1


def test_no_cache_idle_slots_leaves_idle_slots_alone(engine_factory, caplog):
    caplog.set_level(5, logger="pyllama.engine")
    a, b = _conversations(2, shared=10, unique=200, seed=4)
    eng = engine_factory(n_parallel=2, kv_unified=True, cache_idle_slots=False)
    assert "__TEST_TAG_CACHE_IDLE_SLOTS_ENABLED__" not in caplog.text
    _run(eng, a, id_slot=0)
    _run(eng, b, id_slot=1)
    assert "__TEST_TAG_CACHE_IDLE_SLOT__" not in caplog.text
    assert eng.slot_info()[0]["n_tokens"] == 210 + 7 and eng.stats()["prompt_cache_states"] == 0


def test_a_request_without_cache_prompt_restores_nothing(engine_factory):
    # its slot is still saved first; restoring would only throw the state away
    convs = _conversations(2, shared=10, unique=200, seed=5)
    eng = engine_factory(n_parallel=1)
    for prompt in convs:
        _run(eng, prompt)
    assert _run(eng, convs[0], cache_prompt=False).timings.cache_n == 0
    stats = eng.stats()
    assert stats["n_prompt_cache_loaded"] == 0 and stats["n_prompt_cache_saved"] == 2
    assert [s[:210] for s in _cached(eng)] == convs


def test_a_state_saved_from_one_slot_restores_into_another(engine_factory):
    # one KV stream per slot: slot 0's state goes to RAM, and comes back in slot 1
    a, b = _conversations(2, shared=10, unique=200, seed=6)
    eng = engine_factory(n_parallel=2, cache_idle_slots=False)
    first = _run(eng, a, id_slot=0)
    _run(eng, b, id_slot=0)  # not similar: slot 0's cache is saved before it is lost
    assert [s[:210] for s in _cached(eng)] == [a]
    again = _run(eng, a)  # slot 1, the least recently used, gets the state
    assert again.id_slot == 1 and again.timings.cache_n == 209
    assert again.tokens == first.tokens
    assert eng.slot_info()[1]["n_tokens"] == 210 + 7 and eng.stats()["prompt_cache_states"] == 0


def test_conversations_never_receive_each_others_state_under_concurrency(engine_factory):
    # six conversations over two slots, three clients at a time, three turns each: every turn
    # continues that conversation's own history. They share a 60-token prefix, so cached
    # states of the others always match part of each prompt; only a state whose tokens are a
    # prefix of the prompt may serve it (the identical-prefix rule), so every answer must
    # equal a run without any cache (the F32 model's numbers do not depend on the batch).
    import threading

    convs = _conversations(6, shared=60, unique=120, seed=7)
    cached = engine_factory(n_parallel=2, kv_unified=True)
    plain = engine_factory(n_parallel=1, cache_ram_mib=0)
    rng = random.Random(8)
    histories = [list(c) for c in convs]
    for turn in range(3):
        results = {}

        def serve(i):
            results[i] = _run(cached, histories[i])

        order = list(range(6))
        rng.shuffle(order)
        for group in (order[:3], order[3:]):
            threads = [threading.Thread(target=serve, args=(i,)) for i in group]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        for i, history in enumerate(histories):
            expected = _run(plain, history, cache_prompt=False)
            assert results[i].tokens == expected.tokens, (turn, i)
            assert results[i].timings.cache_n < len(history)
            if turn:
                # the RAM cache or a slot held this conversation: at least its previous prompt
                assert results[i].timings.cache_n >= len(history) - 1 - 8 - 20
            history += results[i].tokens + [rng.choice(WORDS) for _ in range(20)]
    assert cached.stats()["n_prompt_cache_loaded"] > 0
