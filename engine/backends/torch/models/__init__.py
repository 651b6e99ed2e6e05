"""Model families of the torch backend, found by family name.

Adding an architecture = one file here plus one line in `FAMILIES`; the alias
table that maps architecture names onto families lives in engine/config.py.
"""

from __future__ import annotations

from engine.backends.torch.models.gemma3 import Gemma3Model
from engine.backends.torch.models.llama import DecoderModel, LlamaModel
from engine.backends.torch.models.qwen2 import Qwen2Model
from engine.backends.torch.models.qwen3 import Qwen3Model

FAMILIES: dict[str, type[DecoderModel]] = {
    "llama": LlamaModel,
    "qwen2": Qwen2Model,
    "qwen3": Qwen3Model,
    "gemma3": Gemma3Model,
}
