"""The reasoning budget: common's budget sampler first in the chain, as common_sampler runs it."""

from __future__ import annotations

from pyllama.engine import Context, SamplerChain


def _find(seq, sub):
    return next((i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub), -1)


def _tags(model):
    tok = lambda text: tuple(model.tokenize(text, add_special=False, parse_special=True))  # noqa: E731
    start, end, message = tok("<think>"), tok("</think>"), tok(" Enough.")
    return start, end, message


def _chain(model, **fields):
    start, end, message = _tags(model)
    return SamplerChain(model, temperature=0.0, reasoning_budget_start=start, reasoning_budget_end=(end,),
                        reasoning_budget_forced=message + end, reasoning_budget_prefill=start, **fields)


def _run(model, chain, n=30, stop_after=None):
    ctx = Context(model, n_ctx=256, n_threads=1)
    prompt = model.tokenize("one two <think>", parse_special=True)
    out = []
    for token in ctx.generate(prompt, chain, max_tokens=n, stop_at_eog=False):
        out.append(token)
        if stop_after is not None and len(out) == stop_after:
            assert chain.end_reasoning()
    return out


def test_the_budget_forces_the_end_of_thinking(synthetic):
    start, end, message = _tags(synthetic)
    plain = _run(synthetic, SamplerChain(synthetic, temperature=0.0))
    chain = _chain(synthetic, reasoning_budget_tokens=4)
    assert chain.has_reasoning_budget and chain.reasoning_state == "counting"  # the prefill opened it
    out = _run(synthetic, chain)
    at = _find(out, list(message + end))
    # after 4 thinking tokens (a few more while a UTF-8 character completes) the message and
    # the end tag are forced, then generation goes on freely
    assert 4 <= at <= 8 and out[:4] == plain[:4], (at, out)
    assert chain.reasoning_state == "done"


def test_a_zero_budget_ends_thinking_at_once(synthetic):
    start, end, message = _tags(synthetic)
    out = _run(synthetic, _chain(synthetic, reasoning_budget_tokens=0))
    assert out[:len(message + end)] == list(message + end)


def test_reasoning_control_ends_thinking_on_demand(synthetic):
    start, end, message = _tags(synthetic)
    chain = _chain(synthetic, reasoning_control=True)  # no budget: thinking runs until told
    out = _run(synthetic, chain, stop_after=6)
    assert _find(out, list(message + end)) in range(6, 11), out
    free = _run(synthetic, _chain(synthetic, reasoning_control=True))
    assert _find(free, list(message + end)) == -1  # not told: nothing forced


def test_no_budget_sampler_without_a_budget_or_control(synthetic):
    assert not _chain(synthetic).has_reasoning_budget and _chain(synthetic).reasoning_state is None
    assert not SamplerChain(synthetic, reasoning_budget_tokens=3).has_reasoning_budget  # no tags
    assert not _chain(synthetic).end_reasoning()
