"""The app's device setting resolved on this machine: a backend and device, or a
clear error naming what to choose instead."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from app.service import resolve_device


@pytest.mark.skipif(sys.platform == "darwin", reason="automatic means MLX on Apple Silicon")
def test_automatic_is_torch_on_the_cpu_off_apple_silicon():
    assert resolve_device("auto") == ("torch", "cpu")
    assert resolve_device("cpu") == ("torch", "cpu")


def test_a_device_this_build_cannot_use_is_a_clear_error():
    from engine.runtime import device_available

    if device_available("cuda"):
        pytest.skip("a CUDA machine: the error names the CPU-only build instead")
    with pytest.raises(ValueError, match="CUDA is not available on this machine"):
        resolve_device("cuda")


def test_mlx_when_installed_else_a_clear_error():
    if importlib.util.find_spec("mlx") is None:
        with pytest.raises(ValueError, match="MLX is not installed"):
            resolve_device("mlx")
    else:
        backend, device = resolve_device("mlx")
        assert backend == "mlx" and device in ("cpu", "gpu")
