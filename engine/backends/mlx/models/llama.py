"""Llama family (Llama 2/3, SmolLM2, Mistral without sliding window) for MLX:
pre-norm decoder, RoPE, grouped-query attention, SwiGLU MLP.

This module also holds `DecoderModel`, the skeleton the other families subclass
(the layout of engine/backends/torch/models/llama.py, so that a family reads the
same in both backends): each overrides only what its architecture changes,
never the generation loop or the cache.

Reference: Touvron et al. 2023, "Llama 2"; the Llama 3 herd paper for RoPE scaling;
mlx-lm's `models/llama.py` for the MLX idioms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import mlx.core as mx
import numpy as np

from engine.backends.mlx.kv_cache import DenseKVCache
from engine.backends.mlx.layers import (
    Dense,
    QuantDense,
    Rotary,
    gated_mlp,
    interleave_rotary_rows,
    rms_norm,
    rotary_row_order,
)
from engine.config import ModelConfig
from engine.errors import ModelFileError
from engine.quant import Int4, Int8, concat_rows


@dataclass
class LayerWeights:
    input_norm: mx.array
    qkv: Dense | QuantDense  # hidden → Hq*D + 2*Hkv*D: q, k, v projections fused
    out: Dense | QuantDense  # Hq*D → hidden
    post_attention_norm: mx.array
    gate_up: Dense | QuantDense  # hidden → 2*I: gate and up fused
    down: Dense | QuantDense  # I → hidden
    q_norm: mx.array | None = None
    k_norm: mx.array | None = None
    pre_feedforward_norm: mx.array | None = None
    post_feedforward_norm: mx.array | None = None

    def arrays(self) -> list[mx.array]:
        out: list[mx.array] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Dense | QuantDense):
                out += value.arrays()
            elif value is not None:
                out.append(value)
        return out


class WeightSource:
    """Pops named tensors from a loaded state dict, failing with a clear line."""

    def __init__(self, tensors: dict[str, mx.array], dtype: mx.Dtype) -> None:
        self.tensors = tensors
        self.dtype = dtype

    def has(self, name: str) -> bool:
        return name in self.tensors

    def take_matrix(self, name: str) -> mx.array | Int4 | Int8:
        """The named matrix: a quantised one (engine/quant.py) as it is, else in the dtype."""
        try:
            tensor = self.tensors.pop(name)
        except KeyError:
            raise ModelFileError(f"model weights lack tensor '{name}'") from None
        return tensor if isinstance(tensor, Int4 | Int8) else tensor.astype(self.dtype)

    def take(self, name: str) -> mx.array:
        return self.as_float(self.take_matrix(name))

    def as_float(self, tensor: mx.array | Int4 | Int8) -> mx.array:
        if isinstance(tensor, Int4 | Int8):
            return mx.array(tensor.dequantize()).astype(self.dtype)
        return tensor

    def take_optional(self, name: str) -> mx.array | None:
        return self.take(name) if name in self.tensors else None


class DecoderModel:
    """A decoder-only transformer over a dense KV cache, batch size 1.

    `forward(tokens, cache)` runs T new tokens at positions [cache.length,
    cache.length + T) and returns fp32 logits as an evaluated mx.array, (T, vocab)
    or (1, vocab); numpy reads it without a copy.
    """

    # Gemma stores norm weights as an offset from 1; Llama stores them directly.
    norm_offset = 0.0

    def __init__(self, config: ModelConfig, tensors: dict[str, mx.array], dtype: mx.Dtype, *, transposed: bool) -> None:
        self.config = config
        self.dtype = dtype
        self.transposed = transposed
        source = WeightSource(tensors, dtype)
        self.embed = source.take("model.embed_tokens.weight")  # (V, hidden)
        self.final_norm = self._norm_weight(source.take("model.norm.weight"))
        if config.tie_word_embeddings or not source.has("lm_head.weight"):
            self.lm_head = Dense(self.embed, transposed=transposed)
        else:
            self.lm_head = self._linear(source.take_matrix("lm_head.weight"))
        self.layers = [self._load_layer(source, i) for i in range(config.num_hidden_layers)]
        self._setup()
        # Materialise every weight now: MLX is lazy, and a model that finished
        # "loading" should not spend its first forward pass reading files.
        mx.eval(self.arrays())

    def _setup(self) -> None:
        """Everything derived from the config rather than loaded."""
        c = self.config
        self.rotary = Rotary(c.head_dim, c.rope_theta, c.rope_scaling)
        self.q_size = c.num_attention_heads * c.head_dim
        self.kv_size = c.num_key_value_heads * c.head_dim

    def arrays(self) -> list[mx.array]:
        """Every weight array (the embedding once even when the head is tied to it)."""
        head = [a for a in self.lm_head.arrays() if a is not self.embed]
        return [self.embed, self.final_norm, *head, *(a for layer in self.layers for a in layer.arrays())]

    def weight_bytes(self) -> tuple[int, int]:
        """(bytes of non-embedding weights, bytes of the output projection): what one
        decoded token reads, for `quire bench runtime`'s bandwidth bound."""
        layers = sum(a.nbytes for layer in self.layers for a in layer.arrays())
        return layers + self.final_norm.nbytes, self.lm_head.nbytes()

    # -- loading -------------------------------------------------------------

    def _norm_weight(self, weight: mx.array) -> mx.array:
        return (weight.astype(mx.float32) + self.norm_offset).astype(self.dtype) if self.norm_offset else weight

    def _dense(self, weight: mx.array, bias: mx.array | None = None) -> Dense:
        return Dense(weight, bias, transposed=self.transposed)

    def _linear(self, weight: mx.array | Int4 | Int8, bias: mx.array | None = None) -> Dense | QuantDense:
        """A quantised matrix multiplied as it is (QuantDense), a float one as Dense."""
        if isinstance(weight, Int4 | Int8):
            return QuantDense(weight, bias)
        return self._dense(weight, bias)

    def _fused(self, source: WeightSource, parts: list, bias: mx.array | None = None) -> Dense | QuantDense:
        """One matrix of `parts` stacked by rows; quantised when they all are."""
        if all(isinstance(part, Int4 | Int8) for part in parts):
            return QuantDense(concat_rows(parts), bias)
        return self._dense(mx.concatenate([source.as_float(p) for p in parts], axis=0), bias)

    def _load_layer(self, source: WeightSource, i: int) -> LayerWeights:
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        D = self.config.head_dim
        q, k, v = (source.take_matrix(attn + f"{n}_proj.weight") for n in "qkv")
        # Queries and keys move to the interleaved RoPE layout once, here (see layers).
        q, k = (
            w.rows(rotary_row_order(w.shape[0], D)) if isinstance(w, Int4 | Int8) else interleave_rotary_rows(w, D)
            for w in (q, k)
        )
        biases = [source.take_optional(attn + f"{n}_proj.bias") for n in "qkv"]
        qkv_bias = None
        if all(b is not None for b in biases):
            qkv_bias = mx.concatenate(
                [interleave_rotary_rows(biases[0], D), interleave_rotary_rows(biases[1], D), biases[2]]
            )
        gate_up = [source.take_matrix(p + "mlp.gate_proj.weight"), source.take_matrix(p + "mlp.up_proj.weight")]
        optional = {
            "q_norm": source.take_optional(attn + "q_norm.weight"),
            "k_norm": source.take_optional(attn + "k_norm.weight"),
            "pre_feedforward_norm": source.take_optional(p + "pre_feedforward_layernorm.weight"),
            "post_feedforward_norm": source.take_optional(p + "post_feedforward_layernorm.weight"),
        }
        for name in ("q_norm", "k_norm"):
            if optional[name] is not None:
                optional[name] = interleave_rotary_rows(optional[name], D)
        optional = {k: (self._norm_weight(v) if v is not None else None) for k, v in optional.items()}
        return LayerWeights(
            input_norm=self._norm_weight(source.take(p + "input_layernorm.weight")),
            qkv=self._fused(source, [q, k, v], qkv_bias),
            out=self._linear(source.take_matrix(attn + "o_proj.weight")),
            post_attention_norm=self._norm_weight(source.take(p + "post_attention_layernorm.weight")),
            gate_up=self._fused(source, gate_up),
            down=self._linear(source.take_matrix(p + "mlp.down_proj.weight")),
            **optional,
        )

    # -- running -------------------------------------------------------------

    def new_cache(self, capacity: int) -> DenseKVCache:
        c = self.config
        return DenseKVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, capacity, self.dtype)

    def embed_tokens(self, ids: mx.array) -> mx.array:
        return self.embed[ids]

    def rotary_for(self, layer: int) -> Rotary:
        return self.rotary

    def window_for(self, layer: int) -> int | None:
        if self.config.layer_types[layer] == "sliding_attention":
            return self.config.sliding_window
        return None

    def project_qkv(self, layer: LayerWeights, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """x (1, T, hidden) → q (1, T, Hq, D), k and v (1, T, Hkv, D), before RoPE;
        q and k in the interleaved pair layout."""
        c = self.config
        T = x.shape[1]
        qkv = layer.qkv(x)
        q, k, v = mx.split(qkv, [self.q_size, self.q_size + self.kv_size], axis=-1)
        q = q.reshape(1, T, c.num_attention_heads, c.head_dim)
        k = k.reshape(1, T, c.num_key_value_heads, c.head_dim)
        v = v.reshape(1, T, c.num_key_value_heads, c.head_dim)
        return q, k, v

    def self_attention(self, index: int, layer: LayerWeights, x: mx.array, cache: DenseKVCache) -> mx.array:
        T = x.shape[1]
        q, k, v = self.project_qkv(layer, x)
        # The cache owns positions and attention: a dense cache rotates and attends
        # over everything it holds; the build's capture cache also keeps the keys.
        out = cache.attend_layer(
            index,
            q,
            k,
            v,
            rotary=self.rotary_for(index),
            scale=self.config.attention_scale,
            window=self.window_for(index),
        )  # (1, Hq, T, D)
        out = out.transpose(0, 2, 1, 3).reshape(1, T, self.q_size)  # (1, T, Hq*D)
        return layer.out(out)

    def decoder_layer(self, index: int, layer: LayerWeights, x: mx.array, cache: DenseKVCache) -> mx.array:
        eps = self.config.rms_norm_eps
        x = x + self.self_attention(index, layer, rms_norm(x, layer.input_norm, eps), cache)
        h = rms_norm(x, layer.post_attention_norm, eps)
        return x + gated_mlp(h, layer.gate_up, layer.down, self.config.hidden_act)

    def forward(
        self,
        tokens: Sequence[int] | np.ndarray,
        cache: DenseKVCache,
        *,
        last_only: bool = True,
        on_layer: Callable[[int, int], None] | None = None,
    ) -> mx.array:
        """`on_layer(done, total)` runs after each layer: progress inside a long chunk,
        and a place to cancel (raising there is safe: the cache only counts the new
        tokens once every layer has stored them). With `on_layer`, each layer is
        evaluated before it is reported, so progress follows real work; without it
        the pass is one lazy graph, evaluated once (what decoding wants)."""
        ids = mx.array(np.asarray(tokens, dtype=np.int32).reshape(1, -1))  # (1, T)
        T = ids.shape[1]
        x = self.embed_tokens(ids)  # (1, T, hidden)
        for index, layer in enumerate(self.layers):
            x = self.decoder_layer(index, layer, x, cache)
            if on_layer is not None:
                mx.eval(x)
                on_layer(index + 1, len(self.layers))
        if last_only:
            x = x[:, -1:]
        x = rms_norm(x, self.final_norm, self.config.rms_norm_eps)
        logits = self.lm_head(x[0]).astype(mx.float32)  # (T or 1, V)
        mx.eval(logits, *cache.state())
        cache.advance(T)
        return logits


class LlamaModel(DecoderModel):
    """Llama: the skeleton as it is."""
