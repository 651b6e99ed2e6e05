"""MLX-side measurements for `quire bench runtime`: the matmul peak MLX reaches on
this machine, kept here because only backends may import mlx.

On Linux the mlx-cpu wheel multiplies fp32 through the BLAS it bundles (a reference
build: a few GFLOP/s here, against torch's ~190); preloading an optimised BLAS
changes that, so the figure belongs beside every MLX-CPU speed reported.
"""

from __future__ import annotations

import time

import mlx.core as mx


def matmul_peak_gflops(size: int = 1024, repeats: int = 4, dtype: str = "float32") -> float:
    """Best GFLOP/s of one square matmul (smaller than torch's probe: the bundled
    BLAS needs seconds for 2048²)."""
    a = mx.random.normal((size, size)).astype(getattr(mx, dtype))
    b = mx.random.normal((size, size)).astype(getattr(mx, dtype))
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def version() -> str:
    return mx.__version__


def device() -> str:
    return str(mx.default_device())
