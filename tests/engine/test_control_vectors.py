"""Control vectors (--control-vector, --control-vector-scaled, --control-vector-layer-range),
loaded by common_control_vector_load and applied as common_init_from_params applies them."""

from __future__ import annotations

import pytest

from pyllama.engine import Context, SamplerChain
from pyllama.errors import InvalidRequestError, ModelLoadError
from pyllama.synthetic import write_synthetic_control_vector as write_control_vector


def _greedy(ctx, model, n=12):
    return list(ctx.generate(model.tokenize("one two three"), SamplerChain.greedy(model), max_tokens=n,
                             stop_at_eog=False))


@pytest.fixture(scope="module")
def vector(tmp_path_factory):
    return write_control_vector(tmp_path_factory.mktemp("cvec") / "steer.gguf")


def test_a_control_vector_steers_the_output(synthetic, vector):
    plain = _greedy(Context(synthetic, n_ctx=256, n_threads=1), synthetic)
    steered = _greedy(Context(synthetic, n_ctx=256, n_threads=1, control_vectors=[(vector, 1.0)]), synthetic)
    zero = _greedy(Context(synthetic, n_ctx=256, n_threads=1, control_vectors=[(vector, 0.0)]), synthetic)
    assert steered != plain
    assert zero == plain  # scaled to nothing: the model's own output
    # two vectors are summed: +1 and -1 of the same one cancel
    cancel = Context(synthetic, n_ctx=256, n_threads=1, control_vectors=[(vector, 1.0), (vector, -1.0)])
    assert _greedy(cancel, synthetic) == plain


def test_the_layer_range_limits_where_it_applies(synthetic, vector):
    def run(layers=None):
        extra = {} if layers is None else {"control_vector_layers": layers}
        return _greedy(Context(synthetic, n_ctx=256, n_threads=1, control_vectors=[(vector, 1.0)], **extra),
                       synthetic)

    plain = _greedy(Context(synthetic, n_ctx=256, n_threads=1), synthetic)
    # direction.N steers the output of layer N (0-based): of this 2-layer model only layer 1 has one
    assert run((0, 0)) == run((1, 2)) == run((1, 1)) != plain  # 0, 0: 1 to the model's layer count
    assert run((2, 2)) == plain


def test_bad_control_vectors_are_refused(synthetic, vector, tmp_path):
    with pytest.raises(InvalidRequestError, match="control vector not found"):
        Context(synthetic, n_ctx=256, control_vectors=[(tmp_path / "missing.gguf", 1.0)])
    wrong = write_control_vector(tmp_path / "wide.gguf", n_embd=32)
    with pytest.raises(ModelLoadError, match="control vector"):
        Context(synthetic, n_ctx=256, control_vectors=[(wrong, 1.0)])
    mixed = write_control_vector(tmp_path / "other.gguf", n_embd=32)
    with pytest.raises(ModelLoadError, match="failed to load the control vector"):
        Context(synthetic, n_ctx=256, control_vectors=[(vector, 1.0), (mixed, 1.0)])
