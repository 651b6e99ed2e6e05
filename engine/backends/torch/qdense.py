"""Quantised matrices for the torch backend: `QuantDense`, a drop-in for `Dense`
that keeps engine/quant.py's Int4 or Int8 weights in memory and multiplies them
with the weight-only kernels torch ships.

Measured on the 2-core AVX-512 box (docs/lab/quantised-weights.md): at one row
(decode) `_weight_int4pack_mm_for_cpu` and `_weight_int8pack_mm` ran 2.5-7x faster
than a bf16 `F.linear` on the same matrix, because decode reads every weight once
and they read a half or a quarter of the bytes. At hundreds of rows (prefill) they
ran 2x slower than bf16's matmul, so above `PREFILL_ROWS` rows the weight is
dequantised into a transient bf16 matrix, a slice of rows at a time, and multiplied
with `F.linear`.

The int4 CPU kernel wants its weight in torch's packed layout: for each block of 64
output rows, for each input column k, 32 bytes, byte j holding row j in its low
nibble and row j + 32 in its high one. `_pack_int4` builds it directly (equal to
torch._convert_weight_to_int4pack_for_cpu, which tests/test_quant.py checks) and
`_unpack_int4` reads it back, so only the packed copy is kept.

On CUDA (`to("cuda")`) int4 goes to the layout of torch's CUDA kernel
(`_convert_weight_to_int4pack`, tinygemm: the same W = (q-8)·scale + zero in groups
of 32, fed two columns per byte, the even one in the high nibble) and multiplies
with `_weight_int4pack_mm` at every row count, in bf16; int8 as (x·qᵀ)·scale, q cast
to bf16 per call. An int4 embedding table keeps its CPU copy for look-ups (`to(..., table=True)`):
the CUDA layout cannot be read row by row.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from engine.quant import GROUP, Blocks, Int4, Int8, Quantised

# Rows of input above which a matrix is dequantised and multiplied in the model's
# dtype rather than through the weight-only kernel.
PREFILL_ROWS = 16
# Weights dequantised at a time on that path: a slice of whole rows, a multiple of
# 64, of about this many values. It bounds the transient copy, which sets the peak
# memory of a prompt: a 7B's int8 down projection (3,584 x 18,944) dequantised whole
# took 260 MiB through the cast and scale, a 16,384-row slice of its int4 gate/up
# about 350 MiB through the unpacking.
DEQUANT_VALUES = 1 << 24
# Rows repacked at a time into torch's int4 layout at load, for the same reason: the
# whole matrix's unpacked values and their packing temporaries took ~400 MB at once.
PACK_ROWS = 4096
_BLOCK_N = 64


def _pack_int4(values: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 values 0..15, N a multiple of 64 -> torch's CPU int4 layout."""
    N, K = values.shape
    v = values.view(N // _BLOCK_N, _BLOCK_N, K)
    packed = v[:, :32, :] | (v[:, 32:, :] << 4)  # (N/64, 32, K)
    return packed.permute(0, 2, 1).contiguous().view(N, K // 2)


def _unpack_int4(packed: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) (multiples of 64) of a packed weight -> (rows, K) uint8."""
    N, half = packed.shape
    K = half * 2
    blocks = packed.view(N // _BLOCK_N, K, 32)[start // _BLOCK_N : stop // _BLOCK_N]
    values = torch.stack([blocks & 0x0F, blocks >> 4], dim=1)  # (b, 2, K, 32): rows j, then j + 32
    return values.permute(0, 1, 3, 2).reshape(stop - start, K)


def _cuda_int4(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, K) uint8 values 0..15 -> the layout of torch's CUDA int4 kernel (tinygemm)."""
    K = values.shape[1]
    paired = (values[:, 0::2] << 4) | values[:, 1::2]  # the even column in the high nibble
    inner_k_tiles = 8 if K % 128 == 0 else 4 if K % 64 == 0 else 2
    return torch._convert_weight_to_int4pack(paired.to(device), inner_k_tiles)


class QuantDense:
    """y = x Wᵀ + b with W held as Int4 (groups of 32) or Int8 (per row)."""

    __slots__ = ("kind", "q", "scales", "bias", "rows", "columns", "dtype", "host")

    def __init__(self, weight: Quantised, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.rows, self.columns = weight.shape
        self.dtype = dtype
        self.bias = bias
        self.host: tuple[torch.Tensor, torch.Tensor] | None = None  # CPU copy of a table on CUDA
        if isinstance(weight, Int4):
            self.kind = "int4"
            N = self.rows
            padded = -N % _BLOCK_N
            self.q = torch.empty((N + padded, self.columns // 2), dtype=torch.uint8)
            for start in range(0, N + padded, PACK_ROWS):  # a multiple of 64: blocks pack alone
                stop = min(start + PACK_ROWS, N + padded)
                values = np.full((stop - start, self.columns), 8, dtype=np.uint8)  # padding rows: q = 8
                nibbles = weight.q[start:stop]  # the GGUF's bytes: even column low, odd high
                values[: len(nibbles), 0::2] = nibbles & 0x0F
                values[: len(nibbles), 1::2] = nibbles >> 4
                self.q[start:stop] = _pack_int4(torch.from_numpy(values))
            scale = np.pad(np.asarray(weight.scale, dtype=np.float32), ((0, padded), (0, 0)))
            zero = np.pad(np.asarray(weight.zero, dtype=np.float32), ((0, padded), (0, 0)))
            # (K/32, N, 2): scale then zero, in the activations' dtype, as the kernel wants.
            self.scales = torch.from_numpy(np.stack([scale.T, zero.T], axis=-1)).to(dtype).contiguous()
        elif isinstance(weight, Int8):
            self.kind = "int8"
            self.q = torch.from_numpy(np.ascontiguousarray(weight.q))
            self.scales = torch.from_numpy(np.asarray(weight.scale, dtype=np.float32)).to(dtype)
        else:
            raise TypeError(f"not a quantised weight: {type(weight).__name__}")

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of W in the model's dtype.

        Computed in that dtype (bf16 here), not through float32: for a 9728 x 896
        matrix that took int8 from 42 ms to 1.4-2.5 ms and int4 from 128 ms to 15-18 ms,
        against 109 ms for the matmul of 2,048 rows it feeds. int8 loses nothing by
        it (q is exact in bf16, the product is rounded once); int4 rounds twice
        (q·scale, then + zero) instead of once.
        """
        stop = self.rows if stop is None else stop
        if self.kind == "int8":
            return self.q[start:stop].to(self.dtype).mul_(self.scales[start:stop, None])
        block_start = start - start % _BLOCK_N
        block_stop = min(stop + (-stop % _BLOCK_N), self.q.shape[0])
        rows = block_stop - block_start
        values = _unpack_int4(self.q, block_start, block_stop).to(self.dtype).view(rows, -1, GROUP)
        sz = self.scales[:, block_start:block_stop].permute(1, 0, 2).float()  # (rows, K/32, 2)
        scale = sz[..., 0:1]
        offset = sz[..., 1:2] - 8.0 * scale  # W = q·scale + offset, q in 0..15
        w = torch.addcmul(offset.to(self.dtype), values, scale.to(self.dtype), out=torch.empty_like(values))
        return w.view(rows, -1)[start - block_start : stop - block_start]

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W (an embedding table), in the model's dtype."""
        if self.kind == "int8":
            return (self.q[ids].to(torch.float32) * self.scales[ids].float()[..., None]).to(self.dtype)
        if self.host is not None:  # on CUDA: look up in the CPU copy, hand the rows over
            q, scales = self.host
            return self._lookup_int4(q, scales, ids.cpu()).to(self.q.device)
        return self._lookup_int4(self.q, self.scales, ids)

    def _lookup_int4(self, q: torch.Tensor, scales: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        lane = (flat % _BLOCK_N) % 32
        # Row r's bytes: block r // 64, every column, lane r % 32 (not the whole
        # (K, 32) blocks, which for a 7B's 512-token prompt were 56 MiB).
        columns = torch.arange(self.columns, device=q.device)
        picked = q.view(-1, self.columns, 32)[(flat // _BLOCK_N)[:, None], columns, lane[:, None]]  # (T, K)
        values = torch.where((flat % _BLOCK_N < 32)[:, None], picked & 0x0F, picked >> 4).to(torch.float32) - 8.0
        sz = scales[:, flat].float()  # (K/32, T, 2)
        w = values.view(flat.shape[0], -1, GROUP) * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]
        return w.view(*ids.shape, self.columns).to(self.dtype)

    def to(self, device: torch.device | str, *, table: bool = False) -> QuantDense:
        """Move to `device`: the CPU (no change) or a CUDA GPU, into the CUDA kernels'
        layout; `table`: also used for embedding look-ups (keeps a CPU copy of int4)."""
        device = torch.device(device)
        if device.type == self.q.device.type:
            return self
        if device.type != "cuda" or self.q.device.type != "cpu":
            raise ValueError(f"quantised weights run on the CPU or a CUDA GPU, not {device.type}")
        if self.dtype != torch.bfloat16:
            raise ValueError("quantised weights on CUDA need bfloat16 activations")
        if self.kind == "int4":
            if table:
                self.host = (self.q, self.scales)
            self.q = _cuda_int4(_unpack_int4(self.q, 0, self.q.shape[0]), device)
        else:
            self.q = self.q.to(device)
        self.scales = self.scales.to(device)
        self.bias = None if self.bias is None else self.bias.to(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.is_cuda:
            y = self._cuda_mm(x2.contiguous())
        elif x2.shape[0] > PREFILL_ROWS:
            step = max(_BLOCK_N, DEQUANT_VALUES // self.columns // _BLOCK_N * _BLOCK_N)
            parts = [
                F.linear(x2, self.dequantize(start, min(start + step, self.rows))) for start in range(0, self.rows, step)
            ]
            y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        elif self.kind == "int8":
            y = torch._weight_int8pack_mm(x2, self.q, self.scales)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.q, GROUP, self.scales)[:, : self.rows]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.rows)

    def _cuda_mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "int4":
            return torch._weight_int4pack_mm(x, self.q, GROUP, self.scales)[:, : self.rows]
        # int8: cast to bf16 per call and scale the product's columns. torch's CUDA
        # `_weight_int8pack_mm` read 80-120 GB/s at one row on an H200 (the cast path:
        # the bf16 matmul's ~2 TB/s after an elementwise pass), 0.9 TFLOP/s at 2,048.
        return F.linear(x, self.q.to(x.dtype)) * self.scales

    def nbytes(self) -> int:
        total = self.q.numel() * self.q.element_size() + self.scales.numel() * self.scales.element_size()
        return total + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


class BlockTable:
    """An embedding table left in its GGUF's blocks (engine/quant.py `Blocks`): only
    looked up, never multiplied, so each token's row is dequantised by gguf-py as it
    is asked for, exactly. The blocks stay on the CPU; the rows go to `device`."""

    __slots__ = ("blocks", "dtype", "device")

    def __init__(self, blocks: Blocks, dtype: torch.dtype) -> None:
        self.blocks = blocks
        self.dtype = dtype
        self.device = torch.device("cpu")

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the table, in the model's dtype, on its device."""
        values = self.blocks.dequantize(ids.cpu().numpy())
        return torch.from_numpy(values).to(self.dtype).to(self.device)

    def to(self, device: torch.device | str, *, table: bool = True) -> BlockTable:
        self.device = torch.device(device)
        return self

    def nbytes(self) -> int:
        return self.blocks.data.nbytes
