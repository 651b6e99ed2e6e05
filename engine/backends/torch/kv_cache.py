"""Dense KV cache for the torch backend: one preallocated key and value buffer per
layer, written in place as tokens are prefilled or decoded (the layout of gpt-fast's
`KVCache`, without its batch dimension games: Quire runs one sequence at a time)."""

from __future__ import annotations

import torch

from engine.backends.torch.layers import Rotary, apply_rope, attend


class DenseKVCache:
    """Keys (after RoPE) and values of every token seen so far.

    keys[layer], values[layer]: (1, Hkv, capacity, D). `length` is the number of
    tokens already stored; `append` writes T more and returns views of all S.
    """

    def __init__(
        self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> None:
        self.capacity = capacity
        self.length = 0
        shape = (1, kv_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        rotary: Rotary,
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        """Rotate the new q, k (1, T, H, D) to positions [length, length + T), store
        k and v, and attend causally over everything stored. Returns (1, Hq, T, D)."""
        past, T = self.length, q.shape[1]
        rotations = rotary.rotations(past, T)
        q = apply_rope(q, rotations).transpose(1, 2)  # (1, Hq, T, D)
        k = apply_rope(k, rotations).transpose(1, 2)  # (1, Hkv, T, D)
        keys, values = self.append(layer, k, v.transpose(1, 2))
        return attend(q, keys, values, past=past, scale=scale, window=window)

    def advance(self, tokens: int) -> None:
        """Called once per forward pass, after every layer has appended."""
        self.length += tokens

    def truncate(self, length: int) -> None:
        """Forget tokens past `length` (regenerate, or reuse a shared prompt prefix)."""
        self.length = min(self.length, length)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
