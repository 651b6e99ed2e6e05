"""The MLX backend against the torch backend and transformers, family by family,
on tiny random-weight models (the shared check of tests/test_torch_models.py).

For each family: the same safetensors loaded by both backends in fp32 give the
same logits for a whole sequence, for chunked prefill followed by decode, and the
same greedy tokens; transformers is the independent reference for both.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from engine.backends import mlx as mlx_backend  # noqa: E402
from engine.config import ModelConfig  # noqa: E402
from tests.test_torch_models import FAMILIES, reference_logits, tiny_model_pair  # noqa: E402

pytestmark = pytest.mark.mlx

# fp32, max abs logit difference: the two backends differ only in summation order.
TOLERANCE = 1e-4


def mlx_load(folder, dtype: str = "float32"):
    config = ModelConfig.from_hf_dict(json.loads((folder / "config.json").read_text()))
    return mlx_backend.load(config, sorted(folder.glob("*.safetensors")), dtype=dtype)


@pytest.fixture(scope="module", params=FAMILIES)
def trio(request, tmp_path_factory):
    """(family, transformers model, torch backend model, MLX backend model) on one set of weights."""
    reference, torch_model = tiny_model_pair(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, reference, torch_model, mlx_load(torch_model.folder)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 211, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_full_sequence_logits_match_torch_and_transformers(trio):
    family, reference, torch_model, mlx_model = trio
    tokens = ids(40, 1)
    got = mlx_model.forward(tokens, mlx_model.new_cache(64), last_only=False)
    assert isinstance(got, mx.array) and got.dtype == mx.float32
    got = np.asarray(got)
    from_torch = torch_model.forward(tokens, torch_model.new_cache(64), last_only=False).numpy()
    expected = reference_logits(reference, tokens).numpy()
    assert got.shape == from_torch.shape == expected.shape
    assert np.abs(got - from_torch).max() < TOLERANCE, family
    assert np.abs(got - expected).max() < TOLERANCE, family


def test_chunked_prefill_then_decode_matches_torch(trio):
    """Chunks after the first go through the masked (past > 0) path and decode
    through the one-query path; Gemma's sliding layers (window 8) through the
    windowed one."""
    family, _, torch_model, mlx_model = trio
    tokens = ids(37, 2)
    expected = torch_model.forward(tokens, torch_model.new_cache(64), last_only=False).numpy()
    cache = mlx_model.new_cache(64)
    pieces = [
        np.asarray(mlx_model.forward(tokens[0:13], cache, last_only=False)),
        np.asarray(mlx_model.forward(tokens[13:30], cache, last_only=False)),
    ]
    pieces += [np.asarray(mlx_model.forward([token], cache)) for token in tokens[30:]]
    assert cache.length == len(tokens)
    assert np.abs(np.concatenate(pieces) - expected).max() < TOLERANCE, family


def test_greedy_decode_gives_the_same_tokens(trio):
    family, reference, torch_model, mlx_model = trio
    prompt = [5, 17, 99, 3, 150, 42, 7]
    sequences = []
    for model in (torch_model, mlx_model):
        cache = model.new_cache(64)
        logits = model.forward(prompt, cache)
        tokens = []
        for _ in range(12):
            tokens.append(int(np.asarray(logits)[-1].argmax()))
            logits = model.forward([tokens[-1]], cache)
        sequences.append(tokens)
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    assert sequences[0] == sequences[1] == out[0, len(prompt):].tolist(), family


def test_generation_loop_and_cancel_run_unchanged_on_mlx(trio):
    """engine/generate.py is backend-agnostic: prefill in chunks with progress, and a
    cancel inside a chunk leaves the MLX cache as it was."""
    from engine.errors import Cancelled
    from engine.generate import prefill

    family, _, torch_model, mlx_model = trio
    tokens = ids(30, 5)
    expected = prefill(torch_model, tokens, torch_model.new_cache(64))
    progress = []
    got = prefill(mlx_model, tokens, mlx_model.new_cache(64), chunk_size=12, on_progress=lambda d, t: progress.append(d))
    assert np.abs(got - expected).max() < TOLERANCE and progress[-1] == len(tokens), family
    cache = mlx_model.new_cache(64)
    prefill(mlx_model, tokens[:10], cache)
    checks = {"n": 0}

    def cancel_mid_chunk() -> bool:
        checks["n"] += 1
        return checks["n"] > 2

    with pytest.raises(Cancelled):
        prefill(mlx_model, tokens[10:], cache, cancel=cancel_mid_chunk)
    assert cache.length == 10
    assert np.abs(prefill(mlx_model, tokens[10:], cache) - expected).max() < TOLERANCE, family


def test_bfloat16_tracks_float32(trio):
    family, _, torch_model, mlx_model = trio
    half = mlx_load(torch_model.folder, "bfloat16")
    tokens = ids(40, 3)
    full = np.asarray(mlx_model.forward(tokens, mlx_model.new_cache(64), last_only=False))
    got = np.asarray(half.forward(tokens, half.new_cache(64), last_only=False))
    # bf16 keeps 8 bits of mantissa: logits of O(1) move by a few hundredths.
    assert np.abs(got - full).max() < 0.15, family
    assert (got.argmax(-1) == full.argmax(-1)).mean() >= 0.9, family
