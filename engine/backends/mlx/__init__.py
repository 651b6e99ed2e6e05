"""The MLX backend: the same dense decoder models as the torch backend, for Apple
Silicon (Metal, unified memory) and, for testing, MLX's CPU build on Linux.

`load(config, weight_files)` returns a model object with `new_cache(capacity)` and
`forward(tokens, cache, last_only=True) -> logits`; engine/generate.py drives it,
and engine/backends/mlx/memory.py gives it the corpus cache, exactly as for torch.
Weights are the converted safetensors of the model store: GGUF files are
dequantised once with gguf-py, and `mx.load` never reads a GGUF (on Q4_K it
returned values matching gguf-py for only half of each super-block, when this
backend was written).

Reference: MLX (https://ml-explore.github.io/mlx/), mlx-lm's model layout.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from engine import quant
from engine.backends.mlx.models import FAMILIES, DecoderModel
from engine.config import ModelConfig
from engine.errors import ModelFileError, UnsupportedModelError

log = logging.getLogger(__name__)

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def on_gpu() -> bool:
    """Whether MLX runs on Metal here (Apple Silicon), rather than its CPU build."""
    return mx.default_device() == mx.gpu


def fastest_dtype() -> str:
    """"bfloat16" on Metal, "float32" on MLX's CPU build.

    CPU: measured here (mlx 0.32.4, 2-core AVX-512 BF16 EPYC) MLX-CPU multiplies bf16
    no faster than fp32 (5.7 against 6.0 GFLOP/s with the wheel's BLAS; 5.7 against
    102 with OpenBLAS preloaded), because bf16 matmuls do not reach the BLAS.
    Metal: not measured on this machine; decode reads every weight once per token,
    so halving the bytes is what sets its speed (mlx-lm runs bf16 models as stored).
    The dtype is part of the corpus cache's fingerprint: a cache is shared with the
    torch backend when both run the same dtype (see engine/corpus/cache.py `model_fingerprint`).
    """
    return "bfloat16" if on_gpu() else "float32"


def device_available(device: str) -> bool:
    """Whether MLX can use `device` here: "cpu" always; "gpu" (also "metal", "mlx")
    where Metal is available."""
    if device == "cpu":
        return True
    if device in ("gpu", "metal", "mlx"):
        return bool(mx.metal.is_available())
    return False


def load(
    config: ModelConfig,
    weight_files: list[Path],
    *,
    dtype: str = "auto",
    threads: int | None = None,
) -> DecoderModel:
    """Build the family's model from safetensors files with Hugging Face tensor names.

    dtype "auto" is `fastest_dtype()`. `threads` is accepted for the backend
    interface and ignored: MLX sizes its own CPU pool (and its BLAS its own).
    """
    if dtype in ("auto", "quantised"):  # a quantised folder's matrices stay quantised either way
        dtype = fastest_dtype()
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}' (choose from: auto, {', '.join(DTYPES)})")
    if threads:
        log.debug("the MLX backend ignores threads=%d", threads)
    try:
        family = FAMILIES[config.family]
    except KeyError:
        raise UnsupportedModelError(f"the MLX backend has no '{config.family}' family") from None
    started = time.perf_counter()
    tensors: dict[str, mx.array] = {}
    if len(weight_files) == 1 and weight_files[0].suffix.lower() == ".gguf":
        # A float dtype named: the GGUF dequantised by gguf-py, as torch reads it then.
        from engine.gguf_loader import read_gguf

        tensors = {name: mx.array(values) for name, values in read_gguf(weight_files[0]).iter_tensors()}
        weight_files = []
    for path in weight_files:
        if path.suffix != ".safetensors":
            raise ModelFileError(f"the MLX backend reads converted .safetensors or GGUF weights, not {path.name}")
        try:
            tensors.update(mx.load(str(path)))
        except (OSError, RuntimeError, ValueError) as error:
            raise ModelFileError(f"cannot read weights {path.name}: {error}") from None
    if quant.is_quantised_state(tensors):
        # Quantised matrices (engine/quant.py) stay quantised: the model multiplies them
        # with mx.quantized_matmul (layers.QuantDense); a table kept in its GGUF blocks
        # (read by rows, never multiplied) is dequantised.
        state = quant.from_arrays({name: np.array(value) for name, value in tensors.items()})
        tensors = {
            name: value if isinstance(value, quant.Int4 | quant.Int8)
            else mx.array(value.dequantize() if isinstance(value, quant.Blocks) else value)
            for name, value in state.items()
        }
    model = family(config, tensors, DTYPES[dtype], transposed=not on_gpu())
    seconds = time.perf_counter() - started
    log.info("loaded %s (%s, MLX %s) in %.2f s", config.name or config.family, dtype, mx.default_device(), seconds)
    return model
