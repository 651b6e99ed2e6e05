"""Shared transformer pieces for the MLX backend: RMSNorm, rotary embeddings,
grouped-query attention over a dense KV cache, and the gated MLP.

The counterpart of engine/backends/torch/layers.py, kept numerically alike on
purpose: the corpus cache stores keys computed by either backend, so both use the
same interleaved RoPE pair layout, the same rotation angles (fp32 positions times
fp32 inverse frequencies) and fp32 softmax.

References: RMSNorm (Zhang & Sennrich 2019); RoPE (Su et al. 2021, "RoFormer") in
the interleaved ("traditional") layout of `mx.fast.rope`; Llama 3.1's
frequency-dependent RoPE scaling; GQA (Ainslie et al. 2023); the MLX `fast` ops
(https://ml-explore.github.io/mlx/build/html/python/fast.html).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from engine import quant


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """x / rms(x) * weight over the last dimension (MLX's fused kernel)."""
    return mx.fast.rms_norm(x, weight, eps)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """Per-pair inverse frequencies, (head_dim // 2,) fp32, with optional Llama 3 scaling.

    Computed in float64 with numpy exactly as the torch backend does, then rounded to
    fp32, so that both backends rotate by the same angles.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "llama3":
        factor = scaling["factor"]
        low = scaling.get("low_freq_factor", 1.0)
        high = scaling.get("high_freq_factor", 4.0)
        original = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = original / low, original / high
        smooth = (original / wavelen - low) / (high - low)
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = np.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind not in ("default", None):
        raise ValueError(f"unsupported rope scaling '{kind}'")
    return inv_freq.astype(np.float32)


def rotary_row_order(rows: int, head_dim: int) -> np.ndarray:
    """The row index `interleave_rotary_rows` selects (also for quantised weights)."""
    half = head_dim // 2
    order = np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)  # (D,)
    return (np.arange(rows // head_dim)[:, None] * head_dim + order).reshape(-1)  # (H*D,)


def interleave_rotary_rows(weight: mx.array, head_dim: int) -> mx.array:
    """Reorder each head's rows from the split-halves RoPE layout of Hugging Face
    checkpoints (pairs (i, i + D/2)) to the interleaved layout (pairs (2i, 2i + 1)).

    The corpus cache stores pre-RoPE keys in this layout (the torch backend's), so
    a segment written by one backend reads the same in the other.
    Works for weights (H*D, in), biases (H*D,) and per-dimension norms (D,).
    """
    return mx.take(weight, mx.array(rotary_row_order(weight.shape[0], head_dim)), axis=0)


class Rotary:
    """RoPE for one base: contiguous positions from an offset."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None) -> None:
        self.head_dim = head_dim
        inv_freq = rope_inverse_frequencies(head_dim, theta, scaling)
        # mx.fast.rope takes periods (1 / inverse frequency) when given explicit ones.
        self.periods = mx.array((1.0 / inv_freq.astype(np.float64)).astype(np.float32))

    def rotate(self, x: mx.array, start: int) -> mx.array:
        """x (1, T, H, D) at positions [start, start + T) → (1, T, H, D)."""
        rotated = mx.fast.rope(
            x.transpose(0, 2, 1, 3), self.head_dim, traditional=True, base=None, scale=1.0, offset=start, freqs=self.periods
        )  # (1, H, T, D)
        return rotated.transpose(0, 2, 1, 3)


def attend(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    past: int,
    scale: float,
    window: int | None = None,
) -> mx.array:
    """Causal GQA attention of T new queries over S = past + T cached keys.

    q: (1, H, T, D); k, v: (1, Hkv, S, D). Returns (1, H, T, D).
    A sliding window lets query i see key j only when i - j < window.
    """
    T, S = q.shape[2], k.shape[2]
    assert S == past + T, (S, past, T)
    if T == 1:
        if window is not None and S > window:
            k, v = k[:, :, S - window :], v[:, :, S - window :]
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    if window is None or S <= window:
        # MLX's causal mask is aligned bottom-right: the last query sees every key,
        # which is exactly "query past + i sees keys ≤ past + i".
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
    return _windowed_attention(q, k, v, past=past, scale=scale, window=window)


def _windowed_attention(q: mx.array, k: mx.array, v: mx.array, *, past: int, scale: float, window: int) -> mx.array:
    """Sliding-window attention in query blocks of `window` rows, each over only the
    keys its rows can see (at most 2·window − 1), instead of one masked T × S pass."""
    T = q.shape[2]
    pieces = []
    for start in range(0, T, window):
        end = min(start + window, T)
        first_key = max(0, past + start - window + 1)
        query_pos = np.arange(past + start, past + end)[:, None]  # (t, 1)
        key_pos = np.arange(first_key, past + end)[None, :]  # (1, s)
        allowed = (key_pos <= query_pos) & (query_pos - key_pos < window)
        pieces.append(
            mx.fast.scaled_dot_product_attention(
                q[:, :, start:end],
                k[:, :, first_key : past + end],
                v[:, :, first_key : past + end],
                scale=scale,
                mask=mx.array(allowed),
            )
        )
    return mx.concatenate(pieces, axis=2)


class Dense:
    """y = x Wᵀ + b, with W kept in the layout this device multiplies fastest.

    Measured on MLX-CPU here (2-core AVX-512, the mlx-cpu wheel's bundled BLAS):
    x @ W with W stored (in, out) contiguous ran 2.4x faster than x @ Wᵀ over the
    checkpoint's (out, in), for one row (decode) and 512 rows (prefill) alike. On
    Metal, MLX's own kernels are written for the (out, in) layout (mlx-lm's
    `nn.Linear`), so GPU weights stay as stored.
    """

    __slots__ = ("weight", "bias", "transposed")

    def __init__(self, weight: mx.array, bias: mx.array | None = None, *, transposed: bool) -> None:
        # weight: (out, in) as stored in checkpoints.
        self.transposed = transposed
        self.weight = mx.contiguous(weight.T) if transposed else weight
        self.bias = bias

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self.weight if self.transposed else x @ self.weight.T
        return y if self.bias is None else y + self.bias

    def arrays(self) -> list[mx.array]:
        return [self.weight] + ([] if self.bias is None else [self.bias])

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())


class QuantDense:
    """y = x Wᵀ + b with W kept quantised (engine/quant.py), multiplied by
    `mx.quantized_matmul` (MLX's affine groups: w = scale · code + bias, codes
    packed eight 4-bit or four 8-bit to a uint32, the first in the low bits).

    Both of Quire's layouts map onto MLX's without a rounding of the codes:
    - Int4 (per 32 columns: w = (code − 8) · scale + zero, two codes a byte, the
      even column low): the bytes are MLX's words as they are; bias = zero − 8 · scale;
    - Int8 (per row: w = q · scale, q signed): code = q + 128, bias = −128 · scale,
      the row's scale repeated for each group.
    The scales and biases stay float32 whatever the model's dtype: rounded to bf16
    (as mlx-lm holds them) they shift every weight of a group together, by up to
    three quarters of an int8 step (code · scale's rounding plus the bias's), and
    SmolLM2's logits moved by 5.2 against the dequantised bf16 model's 0.7 from float32;
    with float32 scales the product is the float32 one, rounded to the dtype once.
    """

    __slots__ = ("weight", "scales", "biases", "bias", "group_size", "bits")

    def __init__(self, weight: quant.Int4 | quant.Int8, bias: mx.array | None = None) -> None:
        if isinstance(weight, quant.Int4):
            self.bits, self.group_size = 4, quant.GROUP
            codes = np.ascontiguousarray(weight.q).view(np.uint32)  # (N, K/8)
            scale = weight.scale.astype(np.float32)
            offset = weight.zero.astype(np.float32) - 8.0 * scale
        elif isinstance(weight, quant.Int8):
            k = weight.shape[1]
            self.bits = 8
            self.group_size = next(g for g in (128, 64, 32) if k % g == 0)
            codes = np.ascontiguousarray((weight.q.astype(np.int16) + 128).astype(np.uint8)).view(np.uint32)  # (N, K/4)
            scale = np.repeat(weight.scale.astype(np.float32)[:, None], k // self.group_size, axis=1)
            offset = -128.0 * scale
        else:
            raise TypeError(f"no quantised matmul for {type(weight).__name__}")
        self.weight = mx.array(codes)
        self.scales = mx.array(scale)
        self.biases = mx.array(offset)
        self.bias = bias

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.quantized_matmul(x, self.weight, self.scales, self.biases, transpose=True,
                                group_size=self.group_size, bits=self.bits).astype(x.dtype)
        return y if self.bias is None else y + self.bias

    def arrays(self) -> list[mx.array]:
        return [self.weight, self.scales, self.biases] + ([] if self.bias is None else [self.bias])

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())


def gated_mlp(x: mx.array, gate_up: Dense, down: Dense, activation: str) -> mx.array:
    """down(act(gate(x)) * up(x)) with gate and up fused into one (2I, hidden) matmul."""
    gate, up = mx.split(gate_up(x), 2, axis=-1)
    if activation == "silu":
        gate = gate * mx.sigmoid(gate)
    elif activation in ("gelu_pytorch_tanh", "gelu_tanh"):
        gate = 0.5 * gate * (1 + mx.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)))
    elif activation == "gelu":
        gate = 0.5 * gate * (1 + mx.erf(gate / math.sqrt(2)))
    else:
        raise ValueError(f"unsupported activation '{activation}'")
    return down(gate * up)
