"""Qwen3 family for MLX: the Llama layout with an RMSNorm over each head's queries
and keys before RoPE (QK-norm), and no q/k/v biases.

Reference: Qwen3 technical report (Yang et al. 2025).
"""

from __future__ import annotations

import mlx.core as mx

from engine.backends.mlx.layers import rms_norm
from engine.backends.mlx.models.llama import DecoderModel, LayerWeights


class Qwen3Model(DecoderModel):
    def project_qkv(self, layer: LayerWeights, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        q, k, v = super().project_qkv(layer, x)  # (1, T, H, D)
        eps = self.config.rms_norm_eps
        return rms_norm(q, layer.q_norm, eps), rms_norm(k, layer.k_norm, eps), v
