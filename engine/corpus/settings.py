"""Settings of the corpus cache (how segments are built and stored), a plain
dataclass that both backends read. Defaults are the measured choices recorded in
docs/lab/corpus-cache-and-sparse-attention.md.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CacheSettings:
    """How documents become cached segments. Changing any of these changes the
    segments' content, so each is part of a segment's content address."""

    segment_tokens: int = 1024  # tokens prefilled together after the shared prefix
    context_tokens: int = 0  # tail of the previous segment prefilled as read-only context
    # Tokens per block: the unit keys are quantised and checksummed by (store.py). It
    # was the unit of selection of the removed block-sparse path too.
    block_size: int = 32
    precision: str = "int8"  # "int8", "int4" or "fp16"

    def __post_init__(self) -> None:
        if self.precision not in ("int8", "int4", "fp16"):
            raise ValueError(f"unknown cache precision '{self.precision}' (int8, int4, fp16)")
        if self.segment_tokens < self.block_size or self.segment_tokens % self.block_size:
            raise ValueError("segment_tokens must be a positive multiple of block_size")
        if self.context_tokens < 0:
            raise ValueError("context_tokens must be ≥ 0")
