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


def load(
    config: ModelConfig,
    weight_files: list[Path],
    *,
    dtype: str = "float32",
    threads: int | None = None,
) -> DecoderModel:
    """Build the family's model from safetensors files with Hugging Face tensor names."""
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
