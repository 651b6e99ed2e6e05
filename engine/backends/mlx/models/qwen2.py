"""Qwen2 / Qwen2.5 family for MLX: the Llama layout with biases on the q, k and v
projections (loaded by the shared skeleton whenever the checkpoint has them).

Reference: Qwen2 technical report (Yang et al. 2024).
"""

from __future__ import annotations

from engine.backends.mlx.models.llama import DecoderModel


class Qwen2Model(DecoderModel):
    """Qwen2: q/k/v biases, large RoPE base; otherwise the Llama skeleton."""
