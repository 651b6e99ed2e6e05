"""Gemma 3 (text) family for MLX.

What differs from the Llama skeleton:
- embeddings scaled by sqrt(hidden_size);
- RMSNorm weights stored as offsets from 1 (the norm multiplies by 1 + w);
- four norms per layer: before and after attention, before and after the MLP;
- QK-norm on each head's queries and keys;
- queries scaled by query_pre_attn_scalar**-0.5;
- 5 of every 6 layers attend within a sliding window, with their own RoPE base
  (10,000 locally, 1,000,000 on the global layers); GELU-tanh MLP; tied embeddings.

Reference: Gemma 3 technical report (Gemma Team 2025).
"""

from __future__ import annotations

import mlx.core as mx

from engine.backends.mlx.kv_cache import DenseKVCache
from engine.backends.mlx.layers import Rotary, gated_mlp, rms_norm
from engine.backends.mlx.models.llama import DecoderModel, LayerWeights


class Gemma3Model(DecoderModel):
    norm_offset = 1.0

    def _setup(self) -> None:
        super()._setup()
        c = self.config
        self.local_rotary = Rotary(c.head_dim, c.rope_local_theta or 10000.0, None)
        # transformers multiplies by the scale cast to the weights' dtype; do the same.
        self.embed_scale = mx.array(c.hidden_size**0.5, dtype=self.dtype)

    def embed_tokens(self, ids: mx.array) -> mx.array:
        return super().embed_tokens(ids) * self.embed_scale

    def rotary_for(self, layer: int) -> Rotary:
        return self.local_rotary if self.config.layer_types[layer] == "sliding_attention" else self.rotary

    def project_qkv(self, layer: LayerWeights, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        q, k, v = super().project_qkv(layer, x)  # (1, T, H, D)
        eps = self.config.rms_norm_eps
        return rms_norm(q, layer.q_norm, eps), rms_norm(k, layer.k_norm, eps), v

    def decoder_layer(self, index: int, layer: LayerWeights, x: mx.array, cache: DenseKVCache) -> mx.array:
        eps = self.config.rms_norm_eps
        h = self.self_attention(index, layer, rms_norm(x, layer.input_norm, eps), cache)
        x = x + rms_norm(h, layer.post_attention_norm, eps)
        h = gated_mlp(rms_norm(x, layer.pre_feedforward_norm, eps), layer.gate_up, layer.down, self.config.hidden_act)
        return x + rms_norm(h, layer.post_feedforward_norm, eps)
