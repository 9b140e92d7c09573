"""Contexts, decoding and sampling through llama.cpp's sampler chain."""

from __future__ import annotations

import pytest

from pyllama.engine import Context, Model, SamplerChain
from pyllama.errors import ContextLengthExceededError, InvalidRequestError, InvalidTokenError

PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def ctx(gemma):
    context = Context(gemma, n_ctx=512, n_batch=64)
    yield context
    context.close()


def _run(ctx, model, sampler, n=24, prompt=PROMPT):
    # The quantised model's text depends on the CPU's kernels: tests compare runs on this
    # machine, never the text itself. stop_at_eog=False: exactly n tokens, whenever it would stop.
    return list(ctx.generate(model.tokenize(prompt), sampler, max_tokens=n, stop_at_eog=False))


def test_context_parameters(gemma):
    c = Context(gemma, n_ctx=1024, n_batch=256, n_ubatch=128, n_seq_max=2, n_threads=1,
                flash_attn="off", type_k="q8_0", type_v="f16", kv_unified=True)
    assert c.n_ctx == 1024 and c.n_batch == 256 and c.n_ubatch == 128 and c.n_seq_max == 2
    assert c.n_ctx_seq == 1024  # unified KV: every sequence may use the whole context
    assert c.n_threads == 1
    split = Context(gemma, n_ctx=1024, n_seq_max=4)
    assert split.n_ctx_seq == 256
    default = Context(gemma, n_ctx=0)
    assert default.n_ctx == gemma.n_ctx_train


def test_greedy_is_deterministic(ctx, gemma):
    first = _run(ctx, gemma, SamplerChain.greedy(gemma))
    second = _run(ctx, gemma, SamplerChain.greedy(gemma))
    assert first == second and len(first) == 24
    assert all(0 <= t < gemma.n_vocab for t in first) and gemma.detokenize(first)
    # stopping at the end-of-generation token only ever shortens the same greedy run
    stopped = list(ctx.generate(gemma.tokenize(PROMPT), SamplerChain.greedy(gemma), max_tokens=24))
    assert stopped == first[:len(stopped)] and not any(gemma.is_eog(t) for t in stopped)


def test_seeded_sampling_is_deterministic(ctx, gemma):
    def sampler(seed):
        return SamplerChain(gemma, temperature=1.0, top_k=40, top_p=0.95, min_p=0.05, seed=seed)

    a = _run(ctx, gemma, sampler(1234), n=32)
    b = _run(ctx, gemma, sampler(1234), n=32)
    assert a == b
    # The same chain re-run gives the same tokens too (generate resets it).
    chain = sampler(99)
    assert _run(ctx, gemma, chain, n=32) == _run(ctx, gemma, chain, n=32)
    others = {tuple(_run(ctx, gemma, sampler(seed), n=32)) for seed in (1, 2, 3)}
    assert len(others | {tuple(a)}) > 1
    # upstream's default chain; "?" marks samplers that pass logits through at these values
    assert [n.lstrip("?") for n in chain.names] == [
        "penalties", "dry", "top-n-sigma", "top-k", "typical", "top-p", "min-p", "xtc",
        "temp-ext", "dist"]
    assert [n.lstrip("?") for n in SamplerChain(gemma, mirostat=2).names] == ["temp", "mirostat-v2"]
    assert SamplerChain(gemma, seed=1234).seed == 1234


def test_stop_reasons(ctx, gemma):
    gen = ctx.generate(gemma.tokenize(PROMPT), SamplerChain.greedy(gemma), max_tokens=3, stop_at_eog=False)
    assert len(list(gen)) == 3
    gen = ctx.generate(gemma.tokenize(PROMPT), SamplerChain.greedy(gemma), max_tokens=2, stop_at_eog=False)
    with pytest.raises(StopIteration) as info:
        while True:
            next(gen)
    assert info.value.value == "limit"


def test_generation_stops_at_the_end_of_the_context(gemma):
    small = Context(gemma, n_ctx=256, n_batch=256)
    prompt = gemma.tokenize(PROMPT)
    tokens = list(small.generate(prompt, SamplerChain(gemma, seed=5), max_tokens=-1,
                                 stop_at_eog=False))
    assert len(prompt) + len(tokens) == 256 + 1 or len(prompt) + len(tokens) == 256


def test_prompt_longer_than_the_context(gemma):
    small = Context(gemma, n_ctx=256)
    prompt = gemma.tokenize("word " * 400)
    with pytest.raises(ContextLengthExceededError) as info:
        list(small.generate(prompt, SamplerChain.greedy(gemma)))
    assert info.value.n_prompt_tokens == len(prompt) and info.value.n_ctx == 256
    assert info.value.status == 400 and info.value.type == "exceed_context_size_error"


def test_long_prompt_is_decoded_in_batches(gemma):
    # The same 32-token micro-batches either way (the quantised kernels' numbers depend on the
    # batch shape): only how generate() splits the prompt into decode calls differs.
    c = Context(gemma, n_ctx=1024, n_batch=32, n_ubatch=32)
    prompt = gemma.tokenize("One two three four five six seven eight nine ten. " * 12)
    assert len(prompt) > 100
    full = Context(gemma, n_ctx=1024, n_batch=1024, n_ubatch=32)
    greedy = SamplerChain.greedy(gemma)
    chunked = list(c.generate(prompt, greedy, max_tokens=8, stop_at_eog=False))
    assert len(chunked) == 8 and chunked == list(full.generate(prompt, greedy, max_tokens=8, stop_at_eog=False))


def test_bad_generate_arguments(ctx, gemma, synthetic):
    greedy = SamplerChain.greedy(gemma)
    with pytest.raises(InvalidRequestError, match="empty"):
        list(ctx.generate([], greedy))
    with pytest.raises(InvalidTokenError):
        list(ctx.generate([2, 999999], greedy))
    with pytest.raises(InvalidTokenError):
        list(ctx.generate([-5], greedy))
    with pytest.raises(InvalidRequestError, match="seq_id"):
        list(ctx.generate([2], greedy, seq_id=3))
    with pytest.raises(InvalidRequestError, match="another model"):
        list(ctx.generate([2], SamplerChain.greedy(synthetic)))


@pytest.mark.parametrize(
    "kwargs",
    [dict(flash_attn="maybe"), dict(type_k="q3"), dict(n_batch=0), dict(pooling="max"),
     dict(n_seq_max=100000), dict(n_threads=0)],
)
def test_bad_context_parameters(gemma, kwargs):
    with pytest.raises(InvalidRequestError):
        Context(gemma, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(top_p=1.5), dict(min_p=-0.1), dict(min_keep=-1),
                                    dict(grammar="root ::= ("), dict(mirostat=3),
                                    dict(repeat_penalty=0.0)])
def test_bad_sampler_parameters(gemma, kwargs):
    with pytest.raises(InvalidRequestError):
        SamplerChain(gemma, **kwargs)


def test_synthetic_model_loads_and_decodes(synthetic):
    assert synthetic.architecture == "llama" and synthetic.n_vocab == 297
    assert synthetic.detokenize(synthetic.tokenize("Hello world", add_special=False)) == "Hello world"
    c = Context(synthetic, n_ctx=128)
    greedy = SamplerChain.greedy(synthetic)
    prompt = synthetic.tokenize("the end")
    out = list(c.generate(prompt, greedy, max_tokens=16, stop_at_eog=False))
    assert len(out) == 16 and all(0 <= t < synthetic.n_vocab for t in out)
    assert out == list(c.generate(prompt, greedy, max_tokens=16, stop_at_eog=False))


def test_closed_objects_raise_instead_of_crashing(synthetic_path):
    model = Model(synthetic_path)
    c = Context(model, n_ctx=64)
    c.close()
    with pytest.raises(Exception):
        _ = c.n_ctx
    with pytest.raises(Exception):
        list(c.generate([1, 2], SamplerChain.greedy(model)))
    model.close()
    with pytest.raises(Exception):
        model.tokenize("x")


def test_kv_overrides_and_rope_options(gemma_path):
    plain = Model(gemma_path)
    no_bos = Model(gemma_path, kv_overrides={"tokenizer.ggml.add_bos_token": False})
    assert plain.tokenize("Hi")[0] == plain.token_bos and no_bos.tokenize("Hi") == plain.tokenize("Hi")[1:]
    with pytest.raises(InvalidRequestError):
        Model(gemma_path, kv_overrides={"x": [1]})
    with pytest.raises(InvalidRequestError):
        Context(plain, rope_scaling="cubic")
    # The override reaches the graph: after a prompt long enough for positions to matter, the
    # next token's log-probabilities move well beyond the run-to-run noise (none: the same
    # computation twice gives the same numbers). Greedy tokens alone may not change on some
    # CPU's kernels.
    default = _next_token_logprobs(gemma_path)
    assert default == _next_token_logprobs(gemma_path)
    for options in (dict(rope_scaling="linear", rope_freq_scale=0.25), dict(rope_freq_base=100.0),
                    dict(rope_scaling="yarn", rope_freq_scale=0.25, yarn_orig_ctx=128)):
        assert _mean_logprob_change(default, _next_token_logprobs(gemma_path, **options)) > 0.1, options


ROPE_PROMPT = " ".join(f"Line {i}: the {c} box holds {i * 7 % 13} stones." for i, c in
                       zip(range(16), ["red", "green", "blue", "white", "black"] * 4))


def _next_token_logprobs(gemma_path, **context_options):
    # {token id: log p} of the 40 likeliest next tokens after ROPE_PROMPT, before sampling
    import math

    from pyllama.engine import Engine, Request, SamplingParams, TokenEvent

    with Engine(gemma_path, n_ctx=512, n_batch=512, context_options=context_options) as eng:
        prompt = eng.model.tokenize(ROPE_PROMPT)
        assert len(prompt) > 180
        handle = eng.submit(Request(prompt=prompt, sampling=SamplingParams(temperature=0.0, n_probs=40),
                                    n_predict=1))
        (_, top), = [p for e in handle if isinstance(e, TokenEvent) and e.probs for p in e.probs]
    return {t.id: math.log(t.prob) for t in top}


def _mean_logprob_change(default, other):
    # over the default's 10 likeliest tokens; one that left the other's top 40 counts as 5
    ids = sorted(default, key=default.get, reverse=True)[:10]
    return sum(min(5.0, abs(default[i] - other[i])) if i in other else 5.0 for i in ids) / len(ids)
