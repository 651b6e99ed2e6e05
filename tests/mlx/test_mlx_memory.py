"""The MLX corpus memory against the torch one on tiny random-weight models: the same
captured keys and values at build time, so that either backend reads a cache the
other one built.
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from engine.backends.mlx import memory as mlx_memory  # noqa: E402
from engine.backends.torch import memory as torch_memory  # noqa: E402
from tests.mlx.test_mlx_models import mlx_load  # noqa: E402
from tests.test_torch_models import tiny_model_pair  # noqa: E402

pytestmark = pytest.mark.mlx

FAMILIES = ["llama", "qwen2", "qwen3", "gemma3"]
PREFIX = 16


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 211, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=FAMILIES)
def models(request, tmp_path_factory):
    reference, torch_model = tiny_model_pair(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, reference, torch_model, mlx_load(torch_model.folder)


def test_segment_capture_matches_torch(models):
    family, _, torch_model, mlx_model = models
    prefix, context, segment = ids(PREFIX, 1), ids(7, 2), ids(100, 3)
    by_torch = torch_memory.SegmentPrefiller(torch_model, prefix, 120)
    by_mlx = mlx_memory.SegmentPrefiller(mlx_model, prefix, 120)
    assert by_mlx.layers == by_torch.layers
    for _ in range(2):  # the second run reuses the prefix: truncation must work too
        keys_t, values_t = by_torch.run(context, segment)
        keys_m, values_m = by_mlx.run(context, segment)
        assert keys_m.dtype == values_m.dtype == np.float32
        assert keys_m.shape == keys_t.shape == (len(by_torch.layers), 2, len(segment), torch_model.config.head_dim)
        assert np.abs(keys_m - keys_t).max() < 1e-4 and np.abs(values_m - values_t).max() < 1e-4, family
