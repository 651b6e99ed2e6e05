"""The torch backend: dense decoder models for CPU and CUDA.

`load(config, weight_files)` returns a model object with `new_cache(capacity)` and
`forward(tokens, cache, last_only=True) -> logits`; engine/generate.py drives it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.backends.torch.models import FAMILIES, DecoderModel
from engine.config import ModelConfig
from engine.errors import ModelFileError, UnsupportedModelError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_measured_dtype: str | None = None


def fastest_dtype() -> str:
    """"bfloat16" where this CPU runs bf16 matmuls clearly faster than fp32, else "float32".

    Measured, not guessed from CPU flags: CPUs with AVX-512 BF16 or AMX run bf16
    several times faster than fp32, AVX2-only CPUs several times slower. The probe
    takes ~0.1 s and runs once per process.
    """
    global _measured_dtype
    if _measured_dtype is None:
        import time

        def best_time(dtype: torch.dtype) -> float:
            a = torch.randn(256, 1024).to(dtype)
            b = torch.randn(1024, 1024).to(dtype)
            torch.mm(a, b)
            best = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                torch.mm(a, b)
                best = min(best, time.perf_counter() - started)
            return best

        _measured_dtype = "bfloat16" if best_time(torch.bfloat16) * 1.5 < best_time(torch.float32) else "float32"
        log.info("fastest dtype on this CPU: %s", _measured_dtype)
    return _measured_dtype


def load(
    config: ModelConfig,
    weight_files: list[Path],
    *,
    dtype: str = "auto",
    threads: int | None = None,
) -> DecoderModel:
    """Build the family's model from safetensors files with Hugging Face tensor names.

    dtype "auto" picks the faster of fp32 and bf16 on this machine (`fastest_dtype`).
    """
    if dtype == "auto":
        dtype = fastest_dtype()
    if threads:
        torch.set_num_threads(threads)
    try:
        family = FAMILIES[config.family]
    except KeyError:
        raise UnsupportedModelError(f"the torch backend has no '{config.family}' family") from None
    started = time.perf_counter()
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files:
        try:
            tensors.update(load_file(str(path)))
        except (OSError, RuntimeError, ValueError) as error:
            raise ModelFileError(f"cannot read weights {path.name}: {error}") from None
    model = family(config, tensors, DTYPES[dtype])
    log.info("loaded %s (%s) in %.2f s", config.name or config.family, dtype, time.perf_counter() - started)
    return model
