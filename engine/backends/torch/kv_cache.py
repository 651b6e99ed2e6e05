"""KV caches for the torch backend.

`DenseKVCache`: one preallocated key and value buffer per layer, written in place as
tokens are prefilled or decoded (the layout of gpt-fast's `KVCache`), one sequence.

`BatchKVCache`: several sequences, each prefilled on its own into a `DenseKVCache`,
then decoded together, one new token each per step. Decode on a CPU is bound by
reading the weights, so B rows cost little more than one: on the 2-core box the
0.5B default decoded 40 tok/s alone and 118 tok/s as 8 sequences
(docs/lab/conversations-and-tasks.md). The sequences keep their own lengths and
positions; the model sees the B new tokens as one forward pass of T = B, and the
cache attends each token over its own sequence only."""

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


class BatchKVCache:
    """Keys and values of B sequences decoded together.

    keys[layer], values[layer]: (B, Hkv, capacity, D); `lengths[b]` tokens of row b
    are stored. A forward pass through it takes exactly one new token per row (its
    T is B): row b's token is rotated to position lengths[b], stored there, and
    attends over row b's tokens alone. `keep(rows)` drops finished rows.
    """

    def __init__(self, caches: list[DenseKVCache], room: int) -> None:
        """The rows of `caches` (each one prefilled sequence), with `room` more tokens each."""
        if not caches:
            raise ValueError("a batch needs at least one sequence")
        first = caches[0].keys[0]
        self.lengths = torch.tensor([c.length for c in caches], dtype=torch.long, device=first.device)
        self.capacity = int(self.lengths.max()) + room
        rows, heads, dim = len(caches), first.shape[1], first.shape[3]
        self.keys, self.values = [], []
        for layer in range(len(caches[0].keys)):
            keys = first.new_zeros((rows, heads, self.capacity, dim))
            values = first.new_zeros((rows, heads, self.capacity, dim))
            for row, cache in enumerate(caches):
                keys[row, :, : cache.length] = cache.keys[layer][0, :, : cache.length]
                values[row, :, : cache.length] = cache.values[layer][0, :, : cache.length]
            self.keys.append(keys)
            self.values.append(values)

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

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
        """q (1, B, Hq, D), k and v (1, B, Hkv, D): one new token per row. Returns
        (1, Hq, B, D), as `DenseKVCache.attend_layer` does for B tokens."""
        rows, heads, dim = q.shape[1], q.shape[2], q.shape[3]
        if rows != len(self):
            raise ValueError(f"a batch of {len(self)} sequences got {rows} new tokens")
        kv_heads = k.shape[2]
        positions = self.lengths
        span = int(positions.max()) + 1  # slots any row reads, its new token's included
        if span > self.capacity:
            raise ValueError(f"KV cache full: {span} tokens > capacity {self.capacity}")
        rotations = rotary.rotations(0, span)[positions]  # (B, 1, D/2)
        q = apply_rope(q.transpose(0, 1), rotations.unsqueeze(1))[:, 0]  # (B, Hq, D)
        k = apply_rope(k.transpose(0, 1), rotations.unsqueeze(1))[:, 0]  # (B, Hkv, D)
        slot = positions.view(rows, 1, 1, 1).expand(rows, kv_heads, 1, dim)
        keys, values = self.keys[layer], self.values[layer]
        keys.scatter_(2, slot, k.unsqueeze(2).to(keys.dtype))
        values.scatter_(2, slot, v[0].unsqueeze(2).to(values.dtype))
        group = heads // kv_heads
        # As `decode_attention`, per row: the cached keys in their stored layout.
        # The scores copied to (B·Hkv, G, S) float32, the softmax over contiguous rows.
        grouped = q.reshape(rows * kv_heads, group, dim).transpose(1, 2)  # (B·Hkv, D, G)
        scores = torch.bmm(keys[:, :, :span].reshape(rows * kv_heads, span, dim), grouped).transpose(1, 2).float()
        slots = torch.arange(span, device=positions.device).view(1, span)
        hidden = slots > positions.view(rows, 1)  # (B, S): past the row's own tokens
        if window is not None:
            hidden |= slots <= positions.view(rows, 1) - window
        scores = scores.mul_(scale).view(rows, kv_heads, group, span).masked_fill(hidden.view(rows, 1, 1, span), float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(values.dtype).view(rows * kv_heads, group, span)
        out = torch.bmm(weights, values[:, :, :span].reshape(rows * kv_heads, span, dim))  # (B·Hkv, G, D)
        return out.view(rows, heads, dim).transpose(0, 1).unsqueeze(0)  # (1, Hq, B, D)

    def advance(self, tokens: int) -> None:
        """Called once per forward pass: every row gained one token."""
        if tokens != len(self):
            raise ValueError(f"a batch of {len(self)} sequences advanced by {tokens} tokens")
        self.lengths = self.lengths + 1

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order): the sequences still being decoded."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        self.lengths = self.lengths.index_select(0, index)
        self.keys = [t.index_select(0, index) for t in self.keys]
        self.values = [t.index_select(0, index) for t in self.values]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
