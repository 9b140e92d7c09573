"""Speculative decoding in the engine loop: draft models, n-gram drafters, verification.

The F32 synthetic model computes the same numbers whatever the batch, so greedy output with
speculation must equal greedy output without it token for token. The quantised default model's
CPU kernels give slightly different logits for different batch shapes (a verification batch
holds several tokens of a sequence), so there the two runs may part at a near-tie of the
target's distribution, never elsewhere (see _same_up_to_ties).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter

import pytest

from pyllama.engine import Engine, SpecConfig
from pyllama.engine.types import Request, SamplingParams, TokenEvent
from pyllama.synthetic import SyntheticSpec, write_synthetic_model

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)
REPEAT = "the world is a world of the world and the world " * 4


@pytest.fixture(scope="module")
def other_draft(tmp_path_factory):
    # the same vocabulary, other weights: a draft the target mostly rejects
    return str(write_synthetic_model(tmp_path_factory.mktemp("spec") / "draft.gguf", SyntheticSpec(seed=99)))


@pytest.fixture(scope="module")
def alien_draft(tmp_path_factory):
    # 200 more tokens: beyond common's SPEC_VOCAB_MAX_SIZE_DIFFERENCE (128)
    return str(write_synthetic_model(tmp_path_factory.mktemp("spec") / "alien.gguf", SyntheticSpec(extra_vocab=200)))


def _gen(engine, text, sampling=GREEDY, n=48, **kw):
    handle = engine.submit(Request(prompt=engine.model.tokenize(text), sampling=sampling, n_predict=n, **kw))
    events = list(handle)
    text = "".join(e.text for e in events if isinstance(e, TokenEvent))
    return handle.result, text


def _all(engine, prompts, **kw):
    out = [None] * len(prompts)

    def work(i):
        out[i] = _gen(engine, prompts[i], **kw)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


PROMPTS = [REPEAT, "Hello world", "the a of and to is in it " * 3, "a"]


@pytest.fixture(scope="module")
def baseline(synthetic_path):
    with Engine(synthetic_path, n_parallel=4, n_ctx=2048, n_batch=64) as eng:
        return [_gen(eng, p) for p in PROMPTS]


@pytest.mark.parametrize("spec", [
    SpecConfig(types=("ngram-simple",), ngram_simple=(2, 8, 1)),
    SpecConfig(types=("ngram-map-k",), ngram_map_k=(2, 6, 1)),
    SpecConfig(types=("ngram-map-k4v",), ngram_map_k4v=(2, 6, 1)),
    SpecConfig(types=("ngram-mod",), ngram_mod=(4, 16, 1)),
    SpecConfig(types=("ngram-simple", "ngram-mod"), ngram_simple=(3, 4, 1), ngram_mod=(4, 16, 1)),
    "self", "other",
], ids=["ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "two-types", "self-draft", "other-draft"])
def test_greedy_with_speculation_is_token_identical(synthetic_path, other_draft, baseline, spec):
    if spec == "self":
        spec = SpecConfig(types=("draft-simple",), draft_model=str(synthetic_path), n_max=6)
    elif spec == "other":
        spec = SpecConfig(types=("draft-simple",), draft_model=other_draft, n_max=4)
    with Engine(synthetic_path, n_parallel=4, n_ctx=2048, n_batch=64, speculative=spec) as eng:
        assert eng.core.speculative
        alone = [_gen(eng, p) for p in PROMPTS]
        together = _all(eng, PROMPTS)  # the drafts of several slots verified in one batch
        stats = eng.core.stats()
    for (want, want_text), (got, got_text), (par, par_text) in zip(baseline, alone, together):
        assert got.tokens == want.tokens and got_text == want_text
        assert par.tokens == want.tokens and par_text == want_text
        assert got.timings.draft_n_accepted <= got.timings.draft_n
    assert stats["n_draft_tokens"] > 0 and stats["n_draft_verif_steps"] > 0
    if spec.draft_model == str(synthetic_path):
        # the target as its own draft: nearly every draft token is accepted, in fewer decodes
        assert stats["n_draft_accepted"] >= 0.7 * stats["n_draft_tokens"]
        assert stats["n_decode_calls"] < stats["n_tokens_predicted"]


def test_limits_and_stop_strings_hold_with_speculation(synthetic_path):
    spec = SpecConfig(types=("draft-simple",), draft_model=str(synthetic_path), n_max=8)
    with Engine(synthetic_path, n_parallel=1, n_ctx=256, n_batch=64) as eng:
        want = [_gen(eng, REPEAT, n=n) for n in (1, 2, 7, 500)]
        want_stop = _gen(eng, REPEAT, n=64, stop=("world",))
    with Engine(synthetic_path, n_parallel=1, n_ctx=256, n_batch=64, speculative=spec) as eng:
        got = [_gen(eng, REPEAT, n=n) for n in (1, 2, 7, 500)]
        got_stop = _gen(eng, REPEAT, n=64, stop=("world",))
    for (w, wt), (g, gt) in zip(want, got):
        assert g.tokens == w.tokens and gt == wt and g.reason == w.reason and g.truncated == w.truncated
    assert got[2][0].timings.predicted_n == 7  # n_predict holds although a draft could run past it
    assert got[3][0].truncated  # the context filled up at the same token
    assert got_stop[1] == want_stop[1] and got_stop[0].stopping_word == want_stop[0].stopping_word


def test_per_request_limits(synthetic_path):
    spec = SpecConfig(types=("draft-simple",), draft_model=str(synthetic_path), n_max=8)
    with Engine(synthetic_path, n_parallel=1, n_ctx=1024, n_batch=64, speculative=spec) as eng:
        off, _ = _gen(eng, REPEAT, spec_n_max=0)
        one, _ = _gen(eng, REPEAT, spec_n_max=1)
        big_min, _ = _gen(eng, REPEAT, spec_n_min=9)
        probs, _ = _gen(eng, REPEAT, sampling=SamplingParams(temperature=0.0, ignore_eos=True, n_probs=2))
        full, _ = _gen(eng, REPEAT)
    assert off.timings.draft_n == 0 and probs.timings.draft_n == 0 and big_min.timings.draft_n == 0
    assert 0 < one.timings.draft_n <= one.timings.predicted_n
    assert full.timings.draft_n > one.timings.draft_n
    assert off.tokens == one.tokens == big_min.tokens == probs.tokens == full.tokens


def test_slot_cache_reuse_and_prompt_cache_keep_the_draft_in_step(synthetic_path):
    # a second turn that continues the first reuses the slot's cache; the draft context
    # catches up with what the target holds, whatever the engine did to it
    spec = SpecConfig(types=("draft-simple",), draft_model=str(synthetic_path), n_max=4)
    first = REPEAT
    with Engine(synthetic_path, n_parallel=2, n_ctx=2048, n_batch=64) as eng:
        a, at = _gen(eng, first)
        b, bt = _gen(eng, first + at + " and")
        c, _ = _gen(eng, "Hello world Hello world")
        d, _ = _gen(eng, first + at + " and")
    with Engine(synthetic_path, n_parallel=2, n_ctx=2048, n_batch=64, speculative=spec) as eng:
        a2, at2 = _gen(eng, first)
        b2, bt2 = _gen(eng, first + at2 + " and")
        c2, _ = _gen(eng, "Hello world Hello world")
        d2, _ = _gen(eng, first + at2 + " and")
        assert eng.core.stats()["n_draft_accepted"] > 0
    assert (a2.tokens, b2.tokens, c2.tokens, d2.tokens) == (a.tokens, b.tokens, c.tokens, d.tokens)
    assert b2.timings.cache_n > 0


def test_seeded_sampling_keeps_the_target_distribution(synthetic_path, other_draft):
    # Verification samples every position with the request's own chain, so a seeded request
    # draws the same tokens with or without a draft; over many seeds the token frequencies at
    # each position (a vocabulary of 4 after top-k) must agree (two-sample chi-square).
    sampling = [SamplingParams(temperature=1.5, top_k=4, top_p=1.0, min_p=0.0, seed=s, ignore_eos=True)
                for s in range(160)]
    n = 6

    def draws(spec):
        with Engine(synthetic_path, n_parallel=4, n_ctx=2048, n_batch=64, speculative=spec) as eng:
            out = []
            for group in range(0, len(sampling), 4):
                res = [None] * 4

                def work(i, s=sampling[group:group + 4]):
                    res[i] = _gen(eng, REPEAT, sampling=s[i], n=n)[0].tokens

                threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(120)
                out += res
            return out, eng.core.stats()

    plain, _ = draws(None)
    for spec in (SpecConfig(types=("draft-simple",), draft_model=str(synthetic_path), n_max=4),
                 SpecConfig(types=("draft-simple",), draft_model=other_draft, n_max=3)):
        spec_draws, stats = draws(spec)
        assert stats["n_draft_tokens"] > 0
        assert sum(a == b for a, b in zip(plain, spec_draws)) >= 0.95 * len(plain)
        for pos in range(n):
            a = Counter(t[pos] for t in plain)
            b = Counter(t[pos] for t in spec_draws)
            cats = [k for k in set(a) | set(b) if a[k] + b[k] >= 10]
            other_a = len(plain) - sum(a[k] for k in cats)
            other_b = len(plain) - sum(b[k] for k in cats)
            pairs = [(a[k], b[k]) for k in cats] + ([(other_a, other_b)] if other_a + other_b else [])
            chi2 = sum((x - y) ** 2 / (x + y) for x, y in pairs if x + y)
            df = max(1, len(pairs) - 1)
            # chi-square critical value at p = 0.001 (Wilson-Hilferty approximation)
            crit = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3
            assert chi2 < crit, (pos, pairs)


def test_a_draft_with_another_vocabulary_is_refused_as_upstream(synthetic_path, alien_draft, caplog):
    # common_speculative_are_compatible fails: upstream logs the error and serves without
    # speculative decoding (server_context::init)
    caplog.set_level(logging.ERROR, "pyllama.engine")
    spec = SpecConfig(types=("draft-simple",), draft_model=alien_draft)
    with Engine(synthetic_path, n_parallel=1, n_ctx=512, n_batch=64, speculative=spec) as eng:
        assert not eng.core.speculative and eng.core.spec_n_max == 0
        assert eng._draft_context is None  # freed again
        result, _ = _gen(eng, "Hello world", n=8)
        assert result.timings.draft_n == 0 and len(result.tokens) == 8
    assert "failed to initialize speculative decoding context: draft model vocab type must match" in caplog.text


def test_draft_simple_without_a_draft_model_is_refused(synthetic_path, caplog):
    caplog.set_level(logging.ERROR, "pyllama.engine")
    with Engine(synthetic_path, n_parallel=1, n_ctx=512, speculative=SpecConfig(types=("draft-simple",))) as eng:
        assert not eng.core.speculative
    assert "draft-simple requires a draft context" in caplog.text
    with Engine(synthetic_path, n_parallel=1, n_ctx=512, speculative=SpecConfig(types=("none", "ngram-mod"))) as eng:
        assert not eng.core.speculative  # "none" anywhere turns speculation off, as upstream


def _same_up_to_ties(engine, prompt, want, got):
    # The two greedy runs agree, or part where the target's two best tokens are within the
    # batch-shape noise of the quantised CPU kernels: both are its top two, close in probability.
    d = next((i for i in range(min(len(want), len(got))) if want[i] != got[i]), None)
    if d is None:
        assert len(want) == len(got)
        return
    sampling = SamplingParams(temperature=0.0, ignore_eos=True, n_probs=2)
    handle = engine.submit(Request(prompt=engine.model.tokenize(prompt) + want[:d], sampling=sampling, n_predict=1,
                                   cache_prompt=False))
    probs = next(e.probs for e in handle if isinstance(e, TokenEvent) and e.probs)
    top = {p.id: p.prob for p in probs[0][1]}
    assert set(top) == {want[d], got[d]}, (d, top)
    assert min(top.values()) > 0.6 * max(top.values()), (d, top)


def test_default_model_as_its_own_draft_and_with_ngrams(gemma_path):
    text = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
    prompt = "Copy this code exactly:\n\n" + text + "\nCopy:\n\n"
    with Engine(gemma_path, n_parallel=1, n_ctx=2048, n_batch=256) as plain:
        want = _gen(plain, prompt, n=40)[0].tokens
        for spec in (SpecConfig(types=("draft-simple",), draft_model=gemma_path, n_max=4),
                     SpecConfig(types=("ngram-simple",), ngram_simple=(3, 8, 1))):
            with Engine(gemma_path, n_parallel=1, n_ctx=2048, n_batch=256, speculative=spec) as eng:
                got = _gen(eng, prompt, n=40)[0]
                assert got.timings.draft_n > 0
                if spec.draft_model:
                    assert got.timings.draft_n_accepted >= 0.5 * got.timings.draft_n
            _same_up_to_ties(plain, prompt, want, got.tokens)


def test_ngram_cache_and_unsupported_types(synthetic_path, baseline, caplog):
    caplog.set_level(logging.ERROR, "pyllama.engine")
    spec = SpecConfig(types=("ngram-cache", "draft-mtp"))
    with Engine(synthetic_path, n_parallel=4, n_ctx=2048, n_batch=64, speculative=spec) as eng:
        assert eng.core.speculative and eng.core.spec_types == ("ngram-cache",)
        got = [_gen(eng, p) for p in PROMPTS]
    assert [g.tokens for g, _ in got] == [w.tokens for w, _ in baseline]
    assert "draft-mtp not supported by pyllama yet" in caplog.text


def test_synthetic_acceptance_for_benchmarks(synthetic_path):
    # --spec-synth-rates: drafts accepted at random (server_sample_and_accept_synth); output not valid
    spec = SpecConfig(types=("draft-simple",), draft_model=str(synthetic_path), n_max=4, synth_rates=(0.9, 0.5, 0.3, 0.1))
    with Engine(synthetic_path, n_parallel=1, n_ctx=1024, n_batch=64, speculative=spec) as eng:
        result, _ = _gen(eng, REPEAT, sampling=SamplingParams(temperature=0.0, ignore_eos=True, seed=7), n=40)
    assert len(result.tokens) == 40 and 0 < result.timings.draft_n_accepted < result.timings.draft_n
    with pytest.raises(Exception, match="synthetic acceptance rates must contain 4 values"):
        Engine(synthetic_path, n_parallel=1, n_ctx=1024,
               speculative=SpecConfig(types=("draft-simple",), draft_model=str(synthetic_path), n_max=4,
                                      synth_rates=(0.5,)))


def test_grammar_and_seeded_sampling_with_drafts(synthetic_path):
    # the chain's grammar advances with each accepted draft token, as it would token by token
    grammar = SamplingParams(temperature=0.0, ignore_eos=True, grammar='root ::= ("the" | " world" | " a")+')
    seeded = SamplingParams(temperature=1.0, top_k=5, seed=3, ignore_eos=True)
    spec = SpecConfig(types=("draft-simple", "ngram-simple"), draft_model=str(synthetic_path), n_max=4,
                      ngram_simple=(2, 8, 1))
    runs, drafted = [], 0
    for s in (None, spec):
        with Engine(synthetic_path, n_parallel=2, n_ctx=1024, n_batch=64, speculative=s) as eng:
            runs.append([_gen(eng, REPEAT, sampling=p, n=40)[1] for p in (grammar, seeded)])
            drafted = eng.core.stats()["n_draft_tokens"]
    assert runs[0] == runs[1] and drafted > 0
    assert set(runs[0][0].replace("the", " ").replace("world", " ").replace("a", " ")) <= {" "}
