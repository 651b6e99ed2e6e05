"""The MLX backend multiplies Quire's quantised matrices as they are
(layers.QuantDense over mx.quantized_matmul): each layout maps onto MLX's affine
groups without rounding a code, so the product equals the dequantised matrix's, and
a converted model loads quantised and gives the dequantised model's logits."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from engine import quant  # noqa: E402
from engine.backends.mlx.layers import QuantDense  # noqa: E402

pytestmark = pytest.mark.mlx


def random_int4(rows: int, columns: int, seed: int = 0) -> quant.Int4:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, size=(rows, columns))
    scale = rng.uniform(0.001, 0.05, size=(rows, columns // quant.GROUP)).astype(np.float16)
    zero = rng.normal(0, 0.05, size=(rows, columns // quant.GROUP)).astype(np.float16)
    return quant.Int4(quant.pack_nibbles(codes), scale, zero)


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quantised_matmul_equals_the_dequantised_matrix(kind):
    rng = np.random.default_rng(1)
    weight = random_int4(96, 256) if kind == "int4" else quant.quantise_int8(rng.normal(0, 0.1, size=(96, 192)))
    bias = mx.array(rng.normal(0, 1, size=96).astype(np.float32))
    dense = QuantDense(weight, bias)
    assert dense.bits == (4 if kind == "int4" else 8)
    x = rng.normal(0, 1, size=(5, weight.shape[1])).astype(np.float32)
    expected = x @ weight.dequantize().T + np.asarray(bias)
    got = np.asarray(dense(mx.array(x)))
    assert got.shape == (5, 96)
    # float32 sums in another order: a few ulps of values of size ~1.
    assert np.abs(got - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())
    # The stored codes are a quarter (int4: an eighth) of float32's bytes, plus a scale and a bias per group.
    assert dense.weight.nbytes == weight.shape[0] * weight.shape[1] * dense.bits // 8


def test_rows_permuted_before_quantising_match_permuted_float_rows():
    from engine.backends.mlx.layers import interleave_rotary_rows, rotary_row_order

    weight = random_int4(64, 64, seed=2)
    permuted = QuantDense(weight.rows(rotary_row_order(64, 16)))
    expected = interleave_rotary_rows(mx.array(weight.dequantize()), 16)
    x = np.eye(64, dtype=np.float32)
    assert np.abs(np.asarray(permuted(mx.array(x))) - np.asarray(expected).T).max() < 1e-6


@pytest.mark.slow
def test_a_converted_model_loads_quantised_with_the_dequantised_logits():
    from engine.backends import mlx as backend
    from engine.backends.mlx.models import FAMILIES
    from engine.model_store import open_model
    from engine.paths import models_dir

    name = "smollm2-135m-instruct"
    if not (models_dir() / name).is_dir():
        pytest.skip(f"{name} is not installed (quire models install)")
    folder = open_model(name)
    model = backend.load(folder.config, folder.weight_files, dtype="float32")
    matrices = [getattr(layer, f) for layer in model.layers for f in ("qkv", "out", "gate_up", "down")]
    assert all(isinstance(m, QuantDense) for m in matrices)
    tensors = {}
    for path in folder.weight_files:
        tensors.update(mx.load(str(path)))
    floats = quant.dequantize_state({k: np.array(v) for k, v in tensors.items()})
    reference = FAMILIES[folder.config.family](folder.config, {k: mx.array(v) for k, v in floats.items()},
                                               mx.float32, transposed=True)
    prompt = list(range(100, 140))
    got = np.asarray(model.forward(prompt, model.new_cache(len(prompt)), last_only=False))
    want = np.asarray(reference.forward(prompt, reference.new_cache(len(prompt)), last_only=False))
    assert np.abs(got - want).max() < 1e-3
    assert (got.argmax(-1) == want.argmax(-1)).all()
    # The layers' weights in a fifth of float32's bytes (4- and 8-bit codes, scales, biases).
    layer_bytes = sum(a.nbytes for layer in model.layers for a in layer.arrays())
    assert layer_bytes < 0.25 * sum(a.nbytes for layer in reference.layers for a in layer.arrays())
    # In bf16 the logits stay as near float32's as the dequantised model's in bf16 do
    # (0.69 here): the scales stay float32 (with bf16 scales and biases they moved by 5.2).
    half = backend.load(folder.config, folder.weight_files, dtype="bfloat16")
    bf16 = np.asarray(half.forward(prompt, half.new_cache(len(prompt)), last_only=False))
    assert np.abs(bf16 - want).max() < 1.5
