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


def test_warmup_runs_bos_and_eos_and_leaves_nothing_behind(synthetic):
    ctx = Context(synthetic, n_ctx=256, n_threads=1)
    assert ctx.warmup() == 2  # BOS and EOS, as common_init_from_params
    assert ctx.seq_pos_max(0) == -1  # the memory is cleared again
    assert ctx.perf()["t_p_eval_ms"] == 0 and ctx.perf()["t_eval_ms"] == 0  # and the counters reset
    cold = Context(synthetic, n_ctx=256, n_threads=1)
    assert _decode(ctx, synthetic, 6) == _decode(cold, synthetic, 6)  # nothing of it leaks into a run


def test_tensor_overrides_reach_the_model(synthetic_path):
    from pyllama.engine import Model, ModelParams

    params = ModelParams(tensor_overrides=[(r"blk\.0\.", "CPU")])
    assert Model(synthetic_path, params=params).n_vocab > 0
    with pytest.raises(InvalidRequestError, match="unknown buffer type 'NOPE'"):
        ModelParams(tensor_overrides=[("x", "NOPE")])


def test_fit_resolves_an_unset_context_as_upstream(synthetic_path):
    from pyllama.engine import ContextParams, ModelParams, fit_params

    # n_ctx 0 and two non-unified sequences: the training context for each (common_fit_params)
    params = ContextParams(n_ctx=0, n_seq_max=2)
    assert fit_params(synthetic_path, ModelParams(), params) == 0 and params.n_ctx == 2 * 2048
    unified = ContextParams(n_ctx=0, n_seq_max=2, kv_unified=True)
    assert fit_params(synthetic_path, ModelParams(), unified) == 0 and unified.n_ctx == 2048
    # no host memory can leave a 100 TB margin: the context falls to --fit-ctx, fitting fails
    tight = ContextParams(n_ctx=0, n_seq_max=1)
    assert fit_params(synthetic_path, ModelParams(), tight, margins_mib=(100_000_000,), n_ctx_min=256) == 1
    assert tight.n_ctx == 256
    given = ContextParams(n_ctx=512)  # a size the user chose is kept
    fit_params(synthetic_path, ModelParams(), given, margins_mib=(100_000_000,), n_ctx_min=256)
    assert given.n_ctx == 512
