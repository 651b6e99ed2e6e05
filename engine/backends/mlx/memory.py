"""Corpus memory for the MLX backend: capturing segment keys and values at build
time, as engine/backends/torch/memory.py does (read its module docstring), kept
step for step alike so that either backend reads a cache the other one built.

Build: a segment is prefilled after the shared prefix (the attention sinks), and
each global-attention layer's keys are captured *before* RoPE, in the interleaved
pair layout (see layers.interleave_rotary_rows), as float32 numpy arrays that
engine/corpus/store.py writes.

There is no `append_stored` here yet: `Answerer.ask` on MLX prefills the passages'
text even where `read_cached` is set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from engine.backends.mlx.kv_cache import DenseKVCache
from engine.backends.mlx.models.llama import DecoderModel


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
        super().__init__(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, capacity, model.dtype)
        self.layers = set(layers)
        self.capture_from = 0  # index within the next forward pass's tokens
        self.captured: dict[int, tuple[mx.array, mx.array]] = {}

    def attend_layer(self, layer: int, q: mx.array, k: mx.array, v: mx.array, **kwargs) -> mx.array:
        if layer in self.layers:
            start = self.capture_from
            # (1, T, H, D) → (H, T', D): the segment's own tokens, before rotation.
            self.captured[layer] = (
                k[0, start:].transpose(1, 0, 2).astype(mx.float32),
                v[0, start:].transpose(1, 0, 2).astype(mx.float32),
            )
        return super().attend_layer(layer, q, k, v, **kwargs)

    def state(self) -> list[mx.array]:
        return super().state() + [a for pair in self.captured.values() for a in pair]


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
        keys = mx.stack([self.cache.captured[i][0] for i in self.layers])  # (L, H, T, D)
        values = mx.stack([self.cache.captured[i][1] for i in self.layers])
        self.cache.captured = {}
        return np.array(keys), np.array(values)
