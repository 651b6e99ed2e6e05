"""Dense KV cache for the MLX backend: one preallocated key and value buffer per
layer, written in place as tokens are prefilled or decoded (gpt-fast's `KVCache`
layout, batch size 1; the slice assignment mlx-lm's `KVCache.update_and_fetch`
relies on, which reuses the buffer once nothing else holds it).
"""

from __future__ import annotations

import mlx.core as mx

from engine.backends.mlx.layers import Rotary, attend


class DenseKVCache:
    """Keys (after RoPE) and values of every token seen so far.

    keys[layer], values[layer]: (1, Hkv, capacity, D). `length` is the number of
    tokens already stored; `append` writes T more and returns views of all S.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: mx.Dtype) -> None:
        self.capacity = capacity
        self.length = 0
        shape = (1, kv_heads, capacity, head_dim)
        self.keys = [mx.zeros(shape, dtype=dtype) for _ in range(layers)]
        self.values = [mx.zeros(shape, dtype=dtype) for _ in range(layers)]

    def append(self, layer: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Store k, v (1, Hkv, T, D) at positions [length, length + T) of `layer`."""
        T = k.shape[2]
        end = self.length + T
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} tokens > capacity {self.capacity}")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def attend_layer(
        self,
        layer: int,
        q: mx.array,
        k: mx.array,
        v: mx.array,
        *,
        rotary: Rotary,
        scale: float,
        window: int | None,
    ) -> mx.array:
        """Rotate the new q, k (1, T, H, D) to positions [length, length + T), store
        k and v, and attend causally over everything stored. Returns (1, Hq, T, D)."""
        past = self.length
        q = rotary.rotate(q, past).transpose(0, 2, 1, 3)  # (1, Hq, T, D)
        k = rotary.rotate(k, past).transpose(0, 2, 1, 3)  # (1, Hkv, T, D)
        keys, values = self.append(layer, k, v.transpose(0, 2, 1, 3))
        return attend(q, keys, values, past=past, scale=scale, window=window)

    def advance(self, tokens: int) -> None:
        """Called once per forward pass, after every layer has appended."""
        self.length += tokens

    def truncate(self, length: int) -> None:
        """Forget tokens past `length` (regenerate, or reuse a shared prompt prefix)."""
        self.length = min(self.length, length)

    def state(self) -> list[mx.array]:
        """The buffers a forward pass wrote: evaluated with its logits so that no
        lazy update chain outlives the pass."""
        return self.keys + self.values

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.keys + self.values)
