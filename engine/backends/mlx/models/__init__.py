"""Model families of the MLX backend, found by family name.

Adding an architecture = one file here plus one line in `FAMILIES` (and the same in
the torch backend); the alias table that maps architecture names onto families
lives in engine/config.py.
"""

from __future__ import annotations

from engine.backends.mlx.models.gemma3 import Gemma3Model
from engine.backends.mlx.models.llama import DecoderModel, LlamaModel
from engine.backends.mlx.models.qwen2 import Qwen2Model
from engine.backends.mlx.models.qwen3 import Qwen3Model

FAMILIES: dict[str, type[DecoderModel]] = {
    "llama": LlamaModel,
    "qwen2": Qwen2Model,
    "qwen3": Qwen3Model,
    "gemma3": Gemma3Model,
}
