"""Backend choice: "auto" picks MLX on Apple Silicon where MLX is installed and
torch everywhere else; explicit names are checked; the MLX backend reports its
devices."""

from __future__ import annotations

import importlib.util

import pytest

from engine import runtime

pytestmark = pytest.mark.mlx


@pytest.mark.parametrize(
    ("platform", "machine", "installed", "expected"),
    [
        ("darwin", "arm64", True, "mlx"),
        ("darwin", "arm64", False, "torch"),
        ("darwin", "x86_64", True, "torch"),
        ("linux", "x86_64", True, "torch"),
        ("linux", "aarch64", True, "torch"),
    ],
)
def test_auto_picks_mlx_only_on_apple_silicon(monkeypatch, platform, machine, installed, expected):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(runtime.sys, "platform", platform)
    monkeypatch.setattr(runtime.platform, "machine", lambda: machine)
    def find_spec(name: str, *args):
        if name == "mlx":
            return object() if installed else None
        return real_find_spec(name, *args)

    monkeypatch.setattr(runtime.importlib.util, "find_spec", find_spec)
    assert runtime.resolve_backend("auto") == expected


def test_explicit_backends_and_unknown_names():
    assert runtime.BACKENDS == ("torch", "mlx")
    assert runtime.resolve_backend("mlx") == "mlx" and runtime.resolve_backend("torch") == "torch"
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        runtime.resolve_backend("jax")


def test_mlx_devices():
    mx = pytest.importorskip("mlx.core")
    assert runtime.device_available("cpu", backend="mlx")
    assert runtime.device_available("gpu", backend="mlx") == bool(mx.metal.is_available())
    assert not runtime.device_available("cuda", backend="mlx")
