"""The CPU backend's threadpools as common_init_from_params attaches them, and --perf.

Affinity and priority are checked in a real server process (tests/server/test_cpu_placement.py):
pinning this test process's OpenMP threads would slow every later test down.
"""

from __future__ import annotations

import pytest

from pyllama.engine import Context, CpuPlacement, SamplerChain, default_threads
from pyllama.errors import InvalidRequestError


def _decode(ctx, model, n=4):
    return list(ctx.generate(model.tokenize("one two three"), SamplerChain.greedy(model), max_tokens=n,
                             stop_at_eog=False))


def test_default_threads_are_upstreams(synthetic):
    assert 1 <= default_threads()
    assert Context(synthetic, n_ctx=256).n_threads == default_threads()


def test_perf_timings_follow_the_perf_option(synthetic):
    on = Context(synthetic, n_ctx=256, n_threads=1)
    off = Context(synthetic, n_ctx=256, n_threads=1, perf=False)
    assert _decode(on, synthetic) == _decode(off, synthetic)
    with_perf, without = on.perf(), off.perf()
    assert with_perf["n_p_eval"] == without["n_p_eval"] > 0 and with_perf["n_eval"] == without["n_eval"] > 0
    assert with_perf["t_p_eval_ms"] > 0 and with_perf["t_eval_ms"] > 0
    assert without["t_p_eval_ms"] == 0 and without["t_eval_ms"] == 0


def test_separate_batch_threadpool_gives_the_same_tokens(synthetic):
    plain = Context(synthetic, n_ctx=256, n_threads=1)
    split = Context(synthetic, n_ctx=256, n_threads=1, n_threads_batch=2,
                    cpu=CpuPlacement(poll=0), cpu_batch=CpuPlacement(poll=100))
    assert split.n_threads == 1 and split.n_threads_batch == 2
    assert _decode(plain, synthetic, 8) == _decode(split, synthetic, 8)


@pytest.mark.parametrize("cpu,message", [
    (CpuPlacement(mask="0xq"), "invalid cpumask"),
    (CpuPlacement(range="7"), "invalid range"),
    (CpuPlacement(range="a-b"), "invalid range"),
    (CpuPlacement(prio=9), "invalid value"),
])
def test_bad_placement_is_refused(synthetic, cpu, message):
    with pytest.raises(InvalidRequestError, match=message):
        Context(synthetic, n_ctx=256, cpu=cpu)
