"""Shared transformer pieces for the torch backend: RMSNorm, rotary embeddings,
grouped-query attention over a dense KV cache, and the gated MLP.

Everything here is functional (plain tensors, no nn.Module): at batch size 1 the
per-call overhead of modules is a visible part of decode time on a 2-core CPU.

References: RMSNorm (Zhang & Sennrich 2019); RoPE (Su et al. 2021, "RoFormer"),
applied in the split-halves layout that Hugging Face checkpoints use; Llama 3.1's
frequency-dependent RoPE scaling; GQA (Ainslie et al. 2023).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight, computed in fp32 whatever the activation dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * weight.float()).to(x.dtype)


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


class Rotary:
    """cos/sin tables for positions, grown on demand; one per distinct RoPE base."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, dtype: torch.dtype) -> None:
        self.inv_freq = rope_inverse_frequencies(head_dim, theta, scaling)
        self.dtype = dtype
        self.cos = torch.empty(0)
        self.sin = torch.empty(0)

    def _grow(self, length: int) -> None:
        length = max(length, 2 * self.cos.shape[0], 256)
        positions = torch.arange(length, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq)  # (T, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (T, D): split-halves layout
        self.cos = angles.cos().to(self.dtype)
        self.sin = angles.sin().to(self.dtype)

    def tables(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + length > self.cos.shape[0]:
            self._grow(start + length)
        return self.cos[start : start + length], self.sin[start : start + length]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by per-position tables (T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


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
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    if past == 0 and (window is None or T <= window):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    query_pos = torch.arange(past, past + T).unsqueeze(1)  # (T, 1)
    key_pos = torch.arange(S).unsqueeze(0)  # (1, S)
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= query_pos - key_pos < window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)


def gated_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, activation: str) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) with gate and up fused into one (2I, hidden) matmul."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    if activation == "silu":
        gate = F.silu(gate)
    elif activation in ("gelu_pytorch_tanh", "gelu_tanh"):
        gate = F.gelu(gate, approximate="tanh")
    elif activation == "gelu":
        gate = F.gelu(gate)
    else:
        raise ValueError(f"unsupported activation '{activation}'")
    return F.linear(gate * up, down)
