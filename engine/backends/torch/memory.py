"""Corpus memory for the torch backend: capturing segment keys and values at build
time, and placing stored keys and values in a dense cache at question time.

Build: a segment is prefilled after the shared prefix (the attention sinks), and
each global-attention layer's keys are captured *before* RoPE (interleaved pair
layout, see layers.interleave_rotary_rows), so that a question can place them at
any position.

Ask: `append_stored` puts a cached passage's keys and values into the dense KV cache
as if it had been prefilled there, its keys rotated to their new positions
(Answerer._read_cached).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from engine.backends.torch.kv_cache import DenseKVCache
from engine.backends.torch.layers import apply_rope
from engine.backends.torch.models.llama import DecoderModel


def global_layers(model: DecoderModel) -> list[int]:
    """Layers that attend over the whole context; only these keep long-range memory
    (Gemma 3's sliding layers see 512 tokens by design and store nothing)."""
    return [i for i in range(model.config.num_hidden_layers) if model.window_for(i) is None]


# --- build ---------------------------------------------------------------------


class CaptureCache(DenseKVCache):
    """A dense cache that also keeps the pre-RoPE keys and the values of the tokens
    from `capture_from` on, for the layers in `layers`."""

    def __init__(self, model: DecoderModel, capacity: int, layers: Sequence[int]) -> None:
        c = model.config
        super().__init__(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, capacity, model.dtype, model.device)
        self.layers = set(layers)
        self.capture_from = 0  # index within the next forward pass's tokens
        self.captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend_layer(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
        if layer in self.layers:
            start = self.capture_from
            # (1, T, H, D) → (H, T', D): the segment's own tokens, before rotation.
            self.captured[layer] = (k[0, start:].transpose(0, 1).float(), v[0, start:].transpose(0, 1).float())
        return super().attend_layer(layer, q, k, v, **kwargs)


class SegmentPrefiller:
    """Prefills segments one after another behind a shared prefix computed once."""

    def __init__(self, model: DecoderModel, prefix: Sequence[int], max_tokens: int) -> None:
        self.model = model
        self.layers = global_layers(model)
        self.prefix_len = len(prefix)
        self.cache = CaptureCache(model, len(prefix) + max_tokens, self.layers)
        if prefix:
            self.cache.layers = set()
            model.forward(list(prefix), self.cache)
            self.cache.layers = set(self.layers)

    def run(
        self,
        context: Sequence[int],
        segment: Sequence[int],
        on_layer: Callable[[int, int], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Keys (pre-RoPE) and values of `segment`, prefilled after the prefix and
        the read-only `context`: float32 arrays (L, Hkv, T, D), L = len(self.layers)."""
        self.cache.truncate(self.prefix_len)
        self.cache.capture_from = len(context)
        self.cache.captured = {}
        self.model.forward([*context, *segment], self.cache, on_layer=on_layer)
        keys = torch.stack([self.cache.captured[i][0] for i in self.layers])  # (L, H, T, D)
        values = torch.stack([self.cache.captured[i][1] for i in self.layers])
        self.cache.captured = {}
        return keys.cpu().numpy(), values.cpu().numpy()


# --- ask -----------------------------------------------------------------------


def append_stored(model: DecoderModel, cache: DenseKVCache, layers: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    """Append T tokens read from the corpus cache to a dense cache, as if they had been
    prefilled there: for every layer, keys (before RoPE) and values (Hkv, T, D)
    float32, the keys rotated to the cache's next T positions (RoPE is relative, so a
    passage's keys read the same wherever it is placed)."""
    start, T = cache.length, layers[0][0].shape[1]
    if start + T > cache.capacity:
        raise ValueError(f"KV cache full: {start + T} tokens > capacity {cache.capacity}")
    for layer, (keys, values) in enumerate(layers):
        target = cache.keys[layer]
        k = torch.from_numpy(keys).to(target.device).transpose(0, 1).unsqueeze(0)  # (1, T, Hkv, D)
        rotated = apply_rope(k, model.rotary_for(layer).rotations(start, T).to(target.device))
        target[:, :, start : start + T] = rotated.transpose(1, 2).to(target.dtype)
        cache.values[layer][:, :, start : start + T] = torch.from_numpy(values).to(target.device, target.dtype).unsqueeze(0)
    cache.advance(T)
