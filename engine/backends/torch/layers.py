"""Shared transformer pieces for the torch backend: RMSNorm, rotary embeddings,
grouped-query attention over a dense KV cache, and the gated MLP.

Everything here is functional (plain tensors, no nn.Module): at batch size 1 the
per-call overhead of modules is a visible part of decode time on a 2-core CPU.

References: RMSNorm (Zhang & Sennrich 2019); RoPE (Su et al. 2021, "RoFormer"),
applied to interleaved pairs (the q/k rows of Hugging Face's split-halves layout are
reordered at load, `interleave_rotary_rows`); Llama 3.1's
frequency-dependent RoPE scaling; GQA (Ainslie et al. 2023).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dimension (torch's fused kernel)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Per-pair inverse frequencies, (head_dim // 2,) fp32, with optional Llama 3 scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "llama3":
        factor = scaling["factor"]
        low = scaling.get("low_freq_factor", 1.0)
        high = scaling.get("high_freq_factor", 4.0)
        original = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = original / low, original / high
        smooth = (original / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        scaled = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
        inv_freq = scaled
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind not in ("default", None):
        raise ValueError(f"unsupported rope scaling '{kind}'")
    return inv_freq.float()


def interleave_rotary_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows from the split-halves RoPE layout of Hugging Face
    checkpoints (pairs (i, i + D/2)) to the interleaved layout (pairs (2i, 2i + 1)).

    q·k is unchanged when queries and keys are permuted alike, and the interleaved
    layout lets RoPE run as one complex multiplication (see `apply_rope`).
    Works for weights (H*D, in), biases (H*D,) and per-dimension norms (D,).
    """
    return weight.index_select(0, rotary_row_order(weight.shape[0], head_dim)).contiguous()


def rotary_row_order(rows: int, head_dim: int) -> torch.Tensor:
    """The row index `interleave_rotary_rows` selects (also for quantised weights)."""
    half = head_dim // 2
    order = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)  # (D,)
    heads = rows // head_dim
    return (torch.arange(heads).unsqueeze(1) * head_dim + order).reshape(-1)  # (H*D,)


class Rotary:
    """Complex rotations e^{i·pos·θ_j} for positions, grown on demand; one per RoPE base."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None) -> None:
        self.inv_freq = rope_inverse_frequencies(head_dim, theta, scaling)
        self.table = torch.empty(0, dtype=torch.complex64)

    def to(self, device: torch.device) -> Rotary:
        self.inv_freq = self.inv_freq.to(device)
        self.table = self.table.to(device)
        return self

    def _grow(self, length: int) -> None:
        length = max(length, 2 * self.table.shape[0], 256)
        positions = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        angles = torch.outer(positions, self.inv_freq)  # (T, D/2)
        self.table = torch.polar(torch.ones_like(angles), angles)  # (T, D/2) complex64

    def rotations(self, start: int, length: int) -> torch.Tensor:
        """(T, 1, D/2) complex rotations for positions [start, start + length)."""
        if start + length > self.table.shape[0]:
            self._grow(start + length)
        return self.table[start : start + length].unsqueeze(1)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate x (1, T, H, D), interleaved pair layout, by rotations (T, 1, D/2).

    Computed in fp32 whatever x's dtype (the rotation tables are fp32).
    """
    B, T, H, D = x.shape
    pairs = torch.view_as_complex(x.float().reshape(B, T, H, D // 2, 2))
    return torch.view_as_real(pairs * rotations).reshape(B, T, H, D).to(x.dtype)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    past: int,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Causal GQA attention of T new queries over S = past + T cached keys.

    q: (1, H, T, D); k, v: (1, Hkv, S, D). Returns (1, H, T, D).
    A sliding window lets query i see key j only when i - j < window.
    """
    T, S = q.shape[2], k.shape[2]
    assert S == past + T, (S, past, T)
    if T == 1:
        if window is not None and S > window:
            k, v = k[:, :, S - window :], v[:, :, S - window :]
        return decode_attention(q, k, v, scale)
    if q.device.type == "cpu":
        return blocked_attention(q, k, v, past=past, scale=scale, window=window)
    if past == 0 and (window is None or T <= window):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    if window is not None and S > window:
        return _windowed_attention(q, k, v, past=past, scale=scale, window=window)
    query_pos = torch.arange(past, past + T, device=q.device).unsqueeze(1)  # (T, 1)
    key_pos = torch.arange(S, device=q.device).unsqueeze(0)  # (1, S)
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= query_pos - key_pos < window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)


# Query rows per block of `blocked_attention`: 32 and 64 measured alike, 128 and 256
# slower (their float32 scores outgrow the caches).
ATTENTION_BLOCK = 64


def blocked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, past: int, scale: float, window: int | None = None
) -> torch.Tensor:
    """Causal GQA attention on the CPU, `ATTENTION_BLOCK` queries at a time, each block
    over only the keys it can see, as two batched bf16 matmuls around a float32
    softmax. torch's fused CPU kernel (flash attention) ran at a tenth of the bf16
    matmul peak here, the same in bf16 and float32; this ran 1.3-2x faster than it at
    512-8K tokens (docs/lab/quantised-weights.md, session 25). The scores are
    scaled in the activations' dtype, as transformers' eager attention does, and
    the softmax reads and writes that dtype, summing in float32 inside (a float32
    copy of the scores and back took 40% of this function's time at 1.8K tokens:
    docs/lab/answers-bench-qa.md, session 29). With a sliding `window` each block
    reads only the keys its queries can see (query i sees key j when i - j < window).

    q: (1, H, T, D); k, v: (1, Hkv, past + T, D). Returns (1, H, T, D).
    """
    H, T, D = q.shape[1], q.shape[2], q.shape[3]
    Hkv = k.shape[1]
    G = H // Hkv
    queries = q[0].view(Hkv, G, T, D)
    keys, values = k[0], v[0]
    out = torch.empty((Hkv, G, T, D), dtype=q.dtype, device=q.device)
    future = torch.full((ATTENTION_BLOCK, ATTENTION_BLOCK), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
    for start in range(0, T, ATTENTION_BLOCK):
        end = min(start + ATTENTION_BLOCK, T)
        rows, seen = end - start, past + end  # the block's queries see keys [first, past + end)
        first = 0 if window is None else max(0, past + start - window + 1)
        block = queries[:, :, start:end].reshape(Hkv, G * rows, D)
        scores = torch.bmm(block, keys[:, first:seen].transpose(1, 2)).mul_(scale).view(Hkv, G, rows, seen - first)
        if window is None or past + end - window <= first:  # no query of the block loses a key to the window
            scores[..., past + start - first :] += future[:rows, :rows]  # the block's own keys, causally
        else:
            query_pos = torch.arange(past + start, past + end, device=q.device).view(rows, 1)
            key_pos = torch.arange(first, seen, device=q.device).view(1, seen - first)
            scores.masked_fill_((key_pos > query_pos) | (query_pos - key_pos >= window), float("-inf"))
        weights = torch.softmax(scores, dim=-1).view(Hkv, G * rows, seen - first)
        out[:, :, start:end] = torch.bmm(weights, values[:, first:seen]).view(Hkv, G, rows, D)
    return out.view(1, H, T, D)


def _windowed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, past: int, scale: float, window: int
) -> torch.Tensor:
    """Sliding-window attention in query blocks of `window` rows, each over only the
    keys its rows can see (at most 2·window − 1), instead of one masked T × S pass:
    at 8K tokens and a 512 window that is ~8x less work."""
    T = q.shape[2]
    out = torch.empty_like(q)
    for start in range(0, T, window):
        end = min(start + window, T)
        first_key = max(0, past + start - window + 1)
        query_pos = torch.arange(past + start, past + end, device=q.device).unsqueeze(1)  # (t, 1)
        key_pos = torch.arange(first_key, past + end, device=q.device).unsqueeze(0)  # (1, s)
        allowed = (key_pos <= query_pos) & (query_pos - key_pos < window)
        out[:, :, start:end] = F.scaled_dot_product_attention(
            q[:, :, start:end],
            k[:, :, first_key : past + end],
            v[:, :, first_key : past + end],
            attn_mask=allowed,
            scale=scale,
            enable_gqa=True,
        )
    return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per head over S keys, as two small batched matmuls per KV head group.

    torch's fused CPU attention kernel is tuned for long query blocks; for a single
    query it was ~6 ms per layer at 2K context here, against well under 1 ms for this.
    q: (1, H, 1, D); k, v: (1, Hkv, S, D) → (1, H, 1, D).
    """
    H, D = q.shape[1], q.shape[3]
    Hkv = k.shape[1]
    # Multiply with the cached keys and values in their stored (S, D) layout: a
    # transposed view of the cache made bf16 matmuls copy the whole cache each step.
    # The scores are then copied to (Hkv, G, S), so that the softmax runs over
    # contiguous rows: over the middle dimension it took 60 us a layer at 2K (a third
    # of the attention), and decode after 2K ran 42.0 -> 46.5 tok/s with the copy
    # (0.5B, the same tokens; docs/lab/quantised-weights.md, session 25). The softmax
    # reads and writes the activations' dtype (it sums in float32 inside, as
    # `blocked_attention`'s does): 13-15% less time a layer at 2K than a float32 copy.
    grouped = q.view(Hkv, H // Hkv, D).transpose(1, 2)  # (Hkv, D, G)
    scores = torch.bmm(k[0], grouped).transpose(1, 2).contiguous().mul_(scale)  # (Hkv, G, S)
    return torch.bmm(torch.softmax(scores, dim=-1), v[0]).reshape(1, H, 1, D)


class Dense:
    """y = x Wᵀ + b, with W kept in the layout its dtype multiplies fastest here.

    Measured on a 2-core AVX-512 CPU at one token (decode is a matrix-vector
    product): fp32 ran 1.8x faster as x @ Wᵀ with Wᵀ stored contiguous than through
    F.linear on W; bf16 was as fast or faster through F.linear. Prefill (hundreds
    of rows) is about the same either way.
    """

    __slots__ = ("weight", "bias", "transposed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        # weight: (out, in) as stored in checkpoints.
        self.transposed = weight.dtype == torch.float32
        self.weight = weight.t().contiguous() if self.transposed else weight.contiguous()
        self.bias = bias

    @classmethod
    def laid_out(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Dense:
        """Wrap a weight already in this dtype's layout (from a prepared-weights file)."""
        dense = cls.__new__(cls)
        dense.transposed = weight.dtype == torch.float32
        dense.weight = weight
        dense.bias = bias
        return dense

    def to(self, device: torch.device) -> Dense:
        self.weight = self.weight.to(device)
        self.bias = None if self.bias is None else self.bias.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        y = torch.matmul(x, self.weight)
        return y if self.bias is None else y + self.bias

    def nbytes(self) -> int:
        total = self.weight.numel() * self.weight.element_size()
        return total + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


def gated_mlp(x: torch.Tensor, gate_up: Dense, down: Dense, activation: str) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) with gate and up fused into one (2I, hidden) matmul."""
    gate, up = gate_up(x).chunk(2, dim=-1)
    if activation == "silu":
        gate = F.silu(gate)
    elif activation in ("gelu_pytorch_tanh", "gelu_tanh"):
        gate = F.gelu(gate, approximate="tanh")
    elif activation == "gelu":
        gate = F.gelu(gate)
    else:
        raise ValueError(f"unsupported activation '{activation}'")
    return down(gate * up)
