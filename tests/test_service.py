"""The app's device setting resolved on this machine: a backend and device, or a
clear error naming what to choose instead."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from app.service import resolve_device


@pytest.mark.skipif(sys.platform == "darwin", reason="automatic means MLX on Apple Silicon")
def test_automatic_is_torch_on_a_cuda_gpu_where_there_is_one_else_the_cpu():
    from engine.runtime import device_available

    assert resolve_device("auto") == ("torch", "cuda" if device_available("cuda") else "cpu")
    assert resolve_device("cpu") == ("torch", "cpu")


def test_a_device_missing_here_is_a_clear_error():
    from engine.runtime import device_available

    if device_available("cuda"):
        assert resolve_device("cuda") == ("torch", "cuda")
    else:
        with pytest.raises(ValueError, match="CUDA is not available on this machine"):
            resolve_device("cuda")
    if not device_available("mps"):
        with pytest.raises(ValueError, match="MPS is not available on this machine"):
            resolve_device("mps")


def test_mlx_when_installed_else_a_clear_error():
    if importlib.util.find_spec("mlx") is None:
        with pytest.raises(ValueError, match="MLX is not installed"):
            resolve_device("mlx")
    else:
        backend, device = resolve_device("mlx")
        assert backend == "mlx" and device in ("cpu", "gpu")
