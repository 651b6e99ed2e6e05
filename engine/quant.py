"""Quantised weights kept quantised: GGUF blocks repacked into two layouts that
backends multiply directly, with no floating-point copy of the weights.

Two kinds of quantised matrix W (N rows = outputs, K columns = inputs):

- `Int4`, groups of 32 along K: W[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g],
  g = k // 32, q in 0..15. `q` is stored two to a byte: byte j of a row holds
  column 2j in its low nibble and column 2j + 1 in its high nibble. GGUF's Q4_0,
  Q4_1 and Q4_K map onto it exactly: only the per-group scale and zero are rounded
  (to float16 on disk, to the activations' dtype in the kernel).
- `Int8`, one scale per row: W[n, k] = q[n, k] * scale[n], q in -127..127. Every
  other quantised GGUF type (Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, ...) is dequantised with
  gguf-py and requantised to it. This is lossy: a row's step becomes max|W| / 127,
  where the GGUF had a step per block of 16 or 32; tests/test_quant.py measures it.

- `Blocks`, an embedding table left in the GGUF's own blocks (any type gguf-py reads),
  row by row. A table that is only looked up (an untied model's: the output head is a
  matrix of its own) is never multiplied, so it needs no kernel's layout: each token's
  row is dequantised as it is looked up, exactly. Qwen2.5-0.5B's Q5_0 table took
  136 MB as Int8 against its 94 MB here.

Int4 and Int8 use the weight-only kernels that torch ships (`_weight_int4pack_mm_for_cpu`,
`_weight_int8pack_mm`) on the backend side; this module is numpy only, so the model
store can write these layouts and any backend can read them back.

On disk (a converted model's safetensors file) a matrix named NAME is stored as
NAME.q4, NAME.q4_scale, NAME.q4_zero (float16), NAME.q8, NAME.q8_scale (float32), or
NAME.gguf_blocks (uint8, a row of blocks per row) and NAME.gguf_kind (int32: the GGML
type and the row's length); float tensors keep their plain name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, ReaderTensor
from gguf.quants import Q4_K, dequantize

GROUP = 32

# GGUF types that map onto Int4 exactly (up to the scale's dtype).
INT4_TYPES = {GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K}
# Float types are left as floats: nothing was quantised, so nothing is kept quantised.
FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}


@dataclass
class Int4:
    """q: uint8 (N, K/2); scale, zero: float (N, K/32)."""

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1] * 2

    def dequantize(self) -> np.ndarray:
        return dequantize_int4(self.q, self.scale, self.zero)

    def rows(self, index: np.ndarray) -> Int4:
        return Int4(self.q[index], self.scale[index], self.zero[index])


@dataclass
class Int8:
    """q: int8 (N, K); scale: float (N,)."""

    q: np.ndarray
    scale: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def dequantize(self) -> np.ndarray:
        return self.q.astype(np.float32) * self.scale.astype(np.float32)[:, None]

    def rows(self, index: np.ndarray) -> Int8:
        return Int8(self.q[index], self.scale[index])


@dataclass
class Blocks:
    """data: uint8 (N, bytes a row), the GGUF's blocks; kind: its GGMLQuantizationType;
    columns: K. Looked up by rows (`dequantize(index)`), never multiplied."""

    data: np.ndarray
    kind: int
    columns: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape[0], self.columns

    def dequantize(self, index: np.ndarray | None = None) -> np.ndarray:
        """float32 (N, K), or the rows `index` (any shape) as (*index.shape, K)."""
        rows = self.data if index is None else self.data[np.asarray(index).reshape(-1)]
        values = dequantize(rows, GGMLQuantizationType(self.kind)).reshape(rows.shape[0], self.columns)
        return values if index is None else values.reshape(*np.shape(index), self.columns)

    def rows(self, index: np.ndarray) -> Blocks:
        return Blocks(self.data[index], self.kind, self.columns)


Quantised = Int4 | Int8 | Blocks


def dequantize_int4(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """(N, K/2) packed nibbles and (N, K/32) scales and zeros -> float32 (N, K)."""
    N = q.shape[0]
    values = np.empty((N, q.shape[1], 2), dtype=np.uint8)
    values[..., 0] = q & 0x0F
    values[..., 1] = q >> 4
    w = values.reshape(N, -1, GROUP).astype(np.float32) - 8.0
    w = w * scale.astype(np.float32)[..., None] + zero.astype(np.float32)[..., None]
    return w.reshape(N, -1)


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """(N, K) integers in 0..15 -> (N, K/2) uint8, column 2j low, 2j + 1 high."""
    values = values.astype(np.uint8)
    return values[:, 0::2] | (values[:, 1::2] << 4)


def quantise_int8(w: np.ndarray) -> Int8:
    """Symmetric per-row int8 of a float matrix (N, K)."""
    w = np.asarray(w, dtype=np.float32)
    peak = np.abs(w).max(axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return Int8(q, scale)


def kind_of(tensor: ReaderTensor, *, table: bool = False) -> str | None:
    """"int4", "int8", "blocks", or None (kept as a float) for a GGUF tensor; see
    `from_gguf`. `table`: the tensor is an embedding table that is only looked up."""
    if tensor.tensor_type in FLOAT_TYPES or len(tensor.shape) != 2:
        return None
    if tensor.tensor_type in INT4_TYPES and not int(tensor.shape[0]) % GROUP:
        return "int4"
    if table:
        return "blocks"
    return None if int(tensor.shape[0]) % GROUP else "int8"


def from_gguf(tensor: ReaderTensor, *, table: bool = False) -> Quantised | None:
    """The quantised form of a 2-D GGUF tensor in HF shape (N, K), or None where it
    stays a float (a float type, a 1-D tensor, or K not a multiple of 32). A `table`
    (an embedding table only looked up) of a type that is not Int4 keeps its blocks."""
    kind = kind_of(tensor, table=table)
    if kind is None:
        return None
    K, N = (int(x) for x in tensor.shape)  # GGUF lists the inner dimension first
    if kind == "blocks":
        return Blocks(np.asarray(tensor.data).reshape(N, -1), int(tensor.tensor_type), K)
    return from_blocks(tensor.tensor_type, np.asarray(tensor.data), N, K)


def from_blocks(kind: GGMLQuantizationType, raw: np.ndarray, N: int, K: int) -> Quantised:
    """The quantised form of raw GGUF data of type `kind` for an (N, K) matrix."""
    blocks = raw.reshape(-1)
    if kind == GGMLQuantizationType.Q4_0:
        return _from_q4_0(blocks.reshape(-1, 18), N, K)
    if kind == GGMLQuantizationType.Q4_1:
        return _from_q4_1(blocks.reshape(-1, 20), N, K)
    if kind == GGMLQuantizationType.Q4_K:
        return _from_q4_k(blocks.reshape(-1, 144), N, K)
    return quantise_int8(dequantize(raw, kind).reshape(N, K))


def _half(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32).reshape(-1)


def _low_high(qs: np.ndarray) -> np.ndarray:
    """(B, 16) bytes of a 32-value block, low nibbles first -> (B, 32) values."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _from_q4_0(blocks: np.ndarray, N: int, K: int) -> Int4:
    # Block of 32: d (f16), 16 bytes; values 0..15 in the low nibbles, 16..31 high.
    d = _half(blocks[:, :2])
    q = _low_high(blocks[:, 2:])
    return Int4(pack_nibbles(q.reshape(N, K)), d.reshape(N, -1), np.zeros((N, K // GROUP), np.float32))


def _from_q4_1(blocks: np.ndarray, N: int, K: int) -> Int4:
    # W = d * q + m = (q - 8) * d + (m + 8 d).
    d, m = _half(blocks[:, :2]), _half(blocks[:, 2:4])
    q = _low_high(blocks[:, 4:])
    return Int4(pack_nibbles(q.reshape(N, K)), d.reshape(N, -1), (m + 8 * d).reshape(N, -1))


def _from_q4_k(blocks: np.ndarray, N: int, K: int) -> Int4:
    # Super-block of 256: d, dmin (f16), 12 bytes of 6-bit scales and mins for eight
    # sub-blocks of 32, 128 bytes of nibbles: bytes 32j..32j+31 hold sub-block 2j in
    # their low nibbles and 2j + 1 in their high ones. W = d sc q - dmin m.
    count = blocks.shape[0]
    d, dmin = _half(blocks[:, :2]), _half(blocks[:, 2:4])
    sc, mins = Q4_K.get_scale_min(blocks[:, 4:16])
    scale = d[:, None] * sc.astype(np.float32)  # (B, 8)
    offset = dmin[:, None] * mins.astype(np.float32)
    qs = blocks[:, 16:].reshape(count, 4, 32)
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(count, 256)
    return Int4(pack_nibbles(q.reshape(N, K)), scale.reshape(N, -1), (8 * scale - offset).reshape(N, -1))


def concat_rows(parts: list[Quantised]) -> Quantised:
    """Stack matrices with the same K along N (fused q/k/v, gate/up). Mixed kinds
    become Int8 (the Int4 parts requantised)."""
    if all(isinstance(p, Int4) for p in parts):
        return Int4(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("q", "scale", "zero")))
    eights = [p if isinstance(p, Int8) else quantise_int8(p.dequantize()) for p in parts]
    return Int8(np.concatenate([p.q for p in eights]), np.concatenate([p.scale for p in eights]))


# -- on disk ------------------------------------------------------------------


def to_arrays(name: str, weight: Quantised) -> dict[str, np.ndarray]:
    """The named arrays a safetensors file stores for one quantised matrix."""
    if isinstance(weight, Int4):
        return {
            f"{name}.q4": np.ascontiguousarray(weight.q),
            f"{name}.q4_scale": weight.scale.astype(np.float16),
            f"{name}.q4_zero": weight.zero.astype(np.float16),
        }
    if isinstance(weight, Blocks):
        return {f"{name}.gguf_blocks": np.ascontiguousarray(weight.data), f"{name}.gguf_kind": kind_array(weight)}
    return {f"{name}.q8": np.ascontiguousarray(weight.q), f"{name}.q8_scale": weight.scale.astype(np.float32)}


def kind_array(weight: Blocks) -> np.ndarray:
    """NAME.gguf_kind: the GGML type and the row's length."""
    return np.array([weight.kind, weight.columns], dtype=np.int32)


# The arrays of a quantised matrix NAME besides NAME.q4 / NAME.q8 / NAME.gguf_blocks.
SCALE_SUFFIXES = (".q4_scale", ".q4_zero", ".q8_scale", ".gguf_kind")
# The array that holds a quantised matrix's values, by its suffix.
VALUE_SUFFIXES = (".q4", ".q8", ".gguf_blocks")
# safetensors dtype names of the arrays a converted model holds -> numpy type codes.
SAFETENSORS_DTYPES = {"F32": "f4", "F16": "f2", "U8": "u1", "I8": "i1", "I32": "i4"}


def base_name(name: str) -> str:
    """The matrix an array belongs to: NAME for NAME.q4_scale and the like."""
    for suffix in (*VALUE_SUFFIXES, *SCALE_SUFFIXES):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def from_arrays(arrays: dict) -> dict:
    """Group a loaded state dict: NAME.q4/... and NAME.q8/... entries become one
    Int4/Int8 under NAME (arrays of whatever library loaded them); floats pass through."""
    out: dict = {}
    for key, value in arrays.items():
        if key.endswith(".q4"):
            name = key[:-3]
            out[name] = Int4(value, arrays[name + ".q4_scale"], arrays[name + ".q4_zero"])
        elif key.endswith(".q8"):
            name = key[:-3]
            out[name] = Int8(value, arrays[name + ".q8_scale"])
        elif key.endswith(".gguf_blocks"):
            name = key[: -len(".gguf_blocks")]
            kind, columns = (int(x) for x in np.asarray(arrays[name + ".gguf_kind"]).reshape(-1))
            out[name] = Blocks(np.asarray(value), kind, columns)
        elif not key.endswith(SCALE_SUFFIXES):
            out[key] = value
    return out


def dequantize_state(arrays: dict) -> dict[str, np.ndarray]:
    """A loaded state dict with every quantised matrix turned back into float32 (for
    backends or settings that run float weights)."""
    return {
        name: value.dequantize() if isinstance(value, Int4 | Int8 | Blocks) else value
        for name, value in from_arrays(arrays).items()
    }


class LazyState:
    """The tensors of safetensors files, read one at a time as a loader pops them:
    `pop(name)` gives a float array, or an Int4/Int8 for a quantised matrix. Each
    array is read straight into its own memory (no memory map whose pages would
    count twice), so loading holds the weights once, plus the tensor in hand."""

    def __init__(self, paths) -> None:
        self._where: dict[str, tuple[object, str, tuple[int, ...], int]] = {}
        for path in paths:
            with open(path, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(length))
            base = 8 + length
            for name, entry in header.items():
                if name != "__metadata__":
                    start = base + entry["data_offsets"][0]
                    self._where[name] = (path, entry["dtype"], tuple(entry["shape"]), start)
        self._names = {base_name(n) for n in self._where}
        self.quantised = is_quantised_state(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def parameter_count(self) -> int:
        """Weights left to pop (a quantised matrix counts its values, not its bytes)."""
        total = 0
        for key, (_, _, shape, _) in self._where.items():
            if key.endswith(".gguf_blocks"):
                total += shape[0] * int(self._peek(key[: -len(".gguf_blocks")] + ".gguf_kind")[1])
            elif not key.endswith(SCALE_SUFFIXES):
                total += math.prod(shape) * (2 if key.endswith(".q4") else 1)
        return total

    def _peek(self, key: str) -> np.ndarray:
        """An array, read without taking it."""
        where = self._where[key]
        value = self._read(key)
        self._where[key] = where
        return value

    def _read(self, key: str) -> np.ndarray:
        path, dtype, shape, start = self._where.pop(key)
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{key}: dtype {dtype} is not one a converted model holds")
        kind = np.dtype(SAFETENSORS_DTYPES[dtype]).newbyteorder("<")
        count = int(np.prod(shape)) if shape else 1
        with open(path, "rb") as handle:
            return np.fromfile(handle, dtype=kind, count=count, offset=start).reshape(shape)

    def pop(self, name: str):
        if name not in self._names:
            raise KeyError(name)
        self._names.discard(name)
        if name + ".q4" in self._where:
            return Int4(self._read(name + ".q4"), self._read(name + ".q4_scale"), self._read(name + ".q4_zero"))
        if name + ".q8" in self._where:
            return Int8(self._read(name + ".q8"), self._read(name + ".q8_scale"))
        if name + ".gguf_blocks" in self._where:
            kind, columns = (int(x) for x in self._read(name + ".gguf_kind"))
            return Blocks(self._read(name + ".gguf_blocks"), kind, columns)
        return self._read(name)


def is_quantised_state(names) -> bool:
    return any(n.endswith(VALUE_SUFFIXES) for n in names)
