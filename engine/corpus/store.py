"""The on-disk store of KV-cache segments: one file per segment, memory-mapped to read.

A segment is the keys and values a model produced for a run of T tokens, for some of
its layers and every KV head. Keys are kept before positional rotation, in the final
channel order, so a segment can be placed at any position later. Tokens are grouped
into blocks of `block_size`; the last block may be partial.

Keys are quantised per (layer, head, block, channel) and values per (layer, head,
token), both asymmetric (min + code * step). The per-block key min/max are stored for
every precision because they were also the retrieval index of the removed block-sparse
answer path: they bound q·k over a block (Quest, Tang et al. 2024,
https://arxiv.org/abs/2406.10774). The format keeps them. They are rounded to
float16 *outwards* (min down, max up), so the stored bounds always enclose the keys and
every code lies in [0, levels] without clipping.

File layout (all integers little-endian; `off_i` and `size_i` from the header table):

    offset            size    field
    0                 4       magic b"QKVS"
    4                 4       u32 format version (FORMAT_VERSION)
    8                 4       u32 header length n
    12                n       header JSON, utf-8: precision, block_size, tokens, layers,
                              kv_heads, head_dim, meta, index_crc, payload_crc and
                              arrays {name: {offset, dtype, shape}}
    12+n              pad     zeros up to data_start = 12 + n rounded up to 64
    data_start+off_i  size_i  array i, C order; every off_i is a multiple of 64 and
                              the gaps between arrays are zeros
    data_end          4       b"QEND", data_end = data_start + max(off_i + size_i)
    data_end+4        4       u32 zlib.crc32 of the header JSON bytes

Arrays, in file order (Tp = n_blocks * block_size; rows past T repeat the last token
for keys and are zero for values, and are never returned):

    key_min, key_max  <f2  (L, n_blocks, H, D)   index_crc covers these two and
    block_crc         <u4  (L, H, n_blocks)      (format 2) the checksum of each block:
                                                 zlib.crc32 of its key codes, then its
                                                 tokens' value parameters in file order,
                                                 then its value codes
    keys              |u1  (L, H, Tp, D)         int8 codes
                      |u1  (L, H, Tp, D/2)       int4 codes, low nibble = even channel,
                                                 high nibble = odd channel
                      <f2  (L, H, Tp, D)         fp16
    value_min         <f2  (L, H, T)             int8 only
    value_scale       <f2  (L, H, T)             int8/int4 only
    value_zero        |i1  (L, H, T)             int4 only: the token's minimum is
                                                 -value_zero * value_scale
    values            as keys, quantised per token over the D channels

int4 values keep an integer zero point (1 byte) instead of a float16 minimum (2
bytes), as GPTQ-style 4-bit formats do: one byte per token, head and layer less, which
is what brings a 4-bit cache under 1/3.5 of fp16 with the block index counted. The
minimum moves by at most half a step, so the error bound stays half a step.

Offsets are relative to data_start (as in GGUF), so the header never depends on its
own length. `payload_crc` covers every array after the index, in file order.

Format 2 added `block_crc`, so that a read checks exactly the blocks it reads: a
question over a million tokens reads a few thousand scattered blocks from hundreds
of segments, and checking each of those segments whole first (format 1's only
check) was most of a cold first question's wait (measured: 6.9 of 11.8 s at 1M).
Format 1 files are still read, and `SegmentStore.upgrade` rewrites one as format 2
(the removed block-sparse path's scope warm-up ran it, after checking the payload
whole; nothing in the app does now).
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import CorruptCacheError
from engine.paths import write_atomic

log = logging.getLogger(__name__)

PRECISIONS = ("int8", "int4", "fp16")
FORMAT_VERSION = 2  # what is written
READ_VERSIONS = (1, 2)  # what is read

MAGIC = b"QKVS"
TRAILER_MAGIC = b"QEND"
SUFFIX = ".qkv"
_PREFIX = struct.Struct("<4sII")  # magic, version, header length
_TRAILER = struct.Struct("<4sI")  # magic, crc32 of the header JSON
_ALIGN = 64
_LEVELS = {"int8": 255, "int4": 15, "fp16": None}
# Per-token value parameters, (L, H, T) each, in file order: what _quantize_values
# returns and _decode_values takes.
_VALUE_PARAMS = {
    "int8": (("value_min", np.dtype("<f2")), ("value_scale", np.dtype("<f2"))),
    "int4": (("value_scale", np.dtype("<f2")), ("value_zero", np.dtype("|i1"))),
    "fp16": (),
}
# Precisions whose array layout changed after format 1 shipped, with a tag that goes
# into segment and manifest addresses (engine/corpus/build.py), so files of the old
# layout are never looked up again (they are collected as garbage), while caches of
# the other precisions stay valid.
LAYOUT_TAGS = {"int4": "value-zero-point"}
_BOUNDS = ("key_min", "key_max")
_HEADER_FIELDS = frozenset(
    ("precision", "block_size", "tokens", "layers", "kv_heads", "head_dim", "meta", "arrays", "index_crc",
     "payload_crc")
)
_F16_LIMIT = float(np.finfo(np.float16).max)
_KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def _index_arrays(version: int) -> tuple[str, ...]:
    """The arrays `index_crc` covers (checked whenever a file is mapped)."""
    return _BOUNDS + (("block_crc",) if version >= 2 else ())


def _align(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


ArraySpec = tuple[str, np.dtype, tuple[int, ...]]  # name, dtype, shape


def _array_specs(
    precision: str, layers: int, heads: int, tokens: int, dim: int, block_size: int, version: int | None = None
) -> list[ArraySpec]:
    """Every array of a segment of format `version` (default: the current one), in file order."""
    version = FORMAT_VERSION if version is None else version
    n_blocks = math.ceil(tokens / block_size)
    padded = n_blocks * block_size
    f16, u8 = np.dtype("<f2"), np.dtype("|u1")
    specs = [(name, f16, (layers, n_blocks, heads, dim)) for name in _BOUNDS]
    if version >= 2:
        specs.append(("block_crc", np.dtype("<u4"), (layers, heads, n_blocks)))
    if precision == "fp16":
        return specs + [(name, f16, (layers, heads, padded, dim)) for name in ("keys", "values")]
    width = dim if precision == "int8" else dim // 2
    return (
        specs
        + [("keys", u8, (layers, heads, padded, width))]
        + [(name, dtype, (layers, heads, tokens)) for name, dtype in _VALUE_PARAMS[precision]]
        + [("values", u8, (layers, heads, padded, width))]
    )


def _round_f16(x: np.ndarray, direction: int) -> np.ndarray:
    """float32 -> float16 rounded down (direction < 0) or up (> 0), never to nearest."""
    rounded = x.astype(np.float16)
    wrong = rounded.astype(np.float32) > x if direction < 0 else rounded.astype(np.float32) < x
    rounded[wrong] = np.nextafter(rounded[wrong], np.float16(-np.inf if direction < 0 else np.inf))
    return rounded


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    return codes[..., 0::2] | (codes[..., 1::2] << 4)  # (..., D) -> (..., D/2)


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    unpacked = np.stack((packed & 0x0F, packed >> 4), axis=-1)  # (..., D/2, 2)
    return unpacked.reshape(*packed.shape[:-1], 2 * packed.shape[-1])  # (..., D)


def _quantize_keys(keys: np.ndarray, block_size: int, levels: int | None) -> tuple[np.ndarray, ...]:
    """keys (H, T, D) float32 -> key_min, key_max (n_blocks, H, D) f16, stored keys (H, Tp, D or D/2)."""
    heads, tokens, head_dim = keys.shape
    n_blocks = math.ceil(tokens / block_size)
    # Edge padding leaves each partial block's min/max those of its real tokens.
    padded = np.pad(keys, ((0, 0), (0, n_blocks * block_size - tokens), (0, 0)), mode="edge")
    blocks = padded.reshape(heads, n_blocks, block_size, head_dim)
    low = _round_f16(blocks.min(axis=2), -1)  # (H, n_blocks, D)
    high = _round_f16(blocks.max(axis=2), +1)
    if levels is None:
        stored = padded.astype(np.float16)
    else:
        low32 = low.astype(np.float32)[:, :, None, :]
        span = high.astype(np.float32)[:, :, None, :] - low32
        scaled = (blocks - low32) / np.where(span > 0, span, 1.0) * levels
        codes = np.clip(np.rint(np.where(span > 0, scaled, 0.0)), 0, levels).astype(np.uint8)
        stored = codes.reshape(heads, -1, head_dim)
        if levels == 15:
            stored = _pack_nibbles(stored)
    return low.transpose(1, 0, 2), high.transpose(1, 0, 2), stored


def decode_keys(stored: np.ndarray, low: np.ndarray, high: np.ndarray, levels: int | None) -> np.ndarray:
    """stored (..., block_size, D or D/2), low/high (..., D) f16 -> float32 (..., block_size, D)."""
    if levels is None:
        return stored.astype(np.float32)
    decoded = (_unpack_nibbles(stored) if levels == 15 else stored).astype(np.float32)
    low32 = low.astype(np.float32)[..., None, :]
    decoded *= (high.astype(np.float32)[..., None, :] - low32) / levels  # in place: one float32 array, not three
    decoded += low32
    return decoded


def _quantize_values(values: np.ndarray, padded: int, levels: int | None) -> tuple[np.ndarray | None, ...]:
    """values (H, T, D) float32 -> the per-token parameters (H, T) — value_min and
    value_scale f16 for int8, value_scale f16 and value_zero i1 for int4, None for
    fp16 — and the stored codes (H, Tp, D or D/2)."""
    pad = ((0, 0), (0, padded - values.shape[1]), (0, 0))
    if levels is None:
        return None, None, np.pad(values.astype(np.float16), pad)
    low32, high32 = values.min(axis=-1), values.max(axis=-1)  # (H, T)
    if levels == 15:
        # Integer zero point: codes cover [-zero·scale, (15 - zero)·scale]. A token whose
        # values share one sign and barely vary gets a wider step, so zero fits a byte.
        wide = np.maximum(np.abs(low32), np.abs(high32)) / 112
        scale = _round_f16(np.maximum((high32 - low32) / levels, wide), +1)
        scale32 = scale.astype(np.float32)
        step = np.where(scale32 > 0, scale32, 1.0)
        zero = np.clip(np.rint(-low32 / step), -128, 127).astype(np.int8)
        codes = np.clip(np.rint(values / step[..., None]) + zero[..., None], 0, levels)
        codes = np.pad(codes.astype(np.uint8), pad)
        return scale, zero, _pack_nibbles(codes)
    low = _round_f16(low32, -1)  # (H, T)
    low32 = low.astype(np.float32)[..., None]
    scale = _round_f16((high32 - low32[..., 0]) / levels, +1)  # up: codes stay ≤ levels
    scale32 = scale.astype(np.float32)[..., None]
    codes = np.clip(np.rint((values - low32) / np.where(scale32 > 0, scale32, 1.0)), 0, levels)
    codes = np.pad(codes.astype(np.uint8), pad)
    return low, scale, codes


def _decode_values(
    stored: np.ndarray, first: np.ndarray | None, second: np.ndarray | None, levels: int | None
) -> np.ndarray:
    """stored (..., D or D/2) and the per-token parameters (...) -> float32 (..., D):
    int8 (value_min, value_scale), int4 (value_scale, value_zero)."""
    if levels is None:
        return stored.astype(np.float32)
    if levels == 15:
        scale = first.astype(np.float32)[..., None]
        return (_unpack_nibbles(stored).astype(np.float32) - second.astype(np.float32)[..., None]) * scale
    return first.astype(np.float32)[..., None] + stored.astype(np.float32) * second.astype(np.float32)[..., None]


def _block_crcs(
    arrays: dict[str, np.ndarray], precision: str, slot: int, head: int, tokens: int, block_size: int,
    blocks: Sequence[int],
) -> np.ndarray:
    """zlib.crc32 of each of `blocks` of one stored layer and KV head, over its key
    codes, its tokens' value parameters in file order, then its value codes.
    -> (len(blocks),) uint32."""
    keys, values = arrays["keys"][slot, head], arrays["values"][slot, head]  # (Tp, ·)
    params = [arrays[name][slot, head] for name, _ in _VALUE_PARAMS[precision]]  # (T,) each
    out = np.empty(len(blocks), dtype=np.uint32)
    for i, block in enumerate(blocks):
        start, stop = block * block_size, (block + 1) * block_size
        crc = zlib.crc32(keys[start:stop])
        for param in params:
            crc = zlib.crc32(param[start:min(stop, tokens)], crc)
        out[i] = zlib.crc32(values[start:stop], crc)
    return out


@dataclass(frozen=True)
class _Layout:
    version: int
    header: dict
    arrays: dict[str, tuple[int, np.dtype, tuple[int, ...]]]  # name -> (absolute offset, dtype, shape)

    def span(self, names: Sequence[str]) -> list[tuple[int, int]]:
        """(start, end) byte ranges of the named arrays."""
        places = (self.arrays[name] for name in names)
        return [(offset, offset + math.prod(shape) * dtype.itemsize) for offset, dtype, shape in places]


def _crc(buffer: memoryview, ranges: list[tuple[int, int]]) -> int:
    crc = 0
    for start, end in ranges:
        with buffer[start:end] as part:
            crc = zlib.crc32(part, crc)
    return crc


_RANDOM = getattr(mmap, "MADV_RANDOM", None)
_WILLNEED = getattr(mmap, "MADV_WILLNEED", None)


def _parse(buffer: memoryview, path: Path, fd: int) -> _Layout:
    """Check magic, version, trailer, header and index CRC of a whole mapped file
    (the index read from its descriptor `fd` in one call)."""
    size = len(buffer)
    if size < _PREFIX.size + _TRAILER.size:
        raise CorruptCacheError(f"cache segment {path} is truncated ({size} bytes)")
    magic, version, header_length = _PREFIX.unpack_from(buffer, 0)
    if magic != MAGIC:
        raise CorruptCacheError(f"cache segment {path} has bad magic {bytes(magic)!r}")
    if version not in READ_VERSIONS:
        raise CorruptCacheError(f"cache segment {path} has format version {version}; this Quire reads {READ_VERSIONS}")
    header_end = _PREFIX.size + header_length
    trailer_magic, header_crc = _TRAILER.unpack_from(buffer, size - _TRAILER.size)
    if header_end > size - _TRAILER.size or trailer_magic != TRAILER_MAGIC:
        raise CorruptCacheError(f"cache segment {path} is truncated (no trailer)")
    header_bytes = bytes(buffer[_PREFIX.size:header_end])
    if zlib.crc32(header_bytes) != header_crc:
        raise CorruptCacheError(f"cache segment {path} has a damaged header (CRC mismatch)")
    try:
        header = json.loads(header_bytes)
        missing = sorted(_HEADER_FIELDS - header.keys())
        if missing or header["precision"] not in PRECISIONS:
            raise ValueError(f"missing fields {missing} or unknown precision")
        dims = (len(header["layers"]), header["kv_heads"], header["tokens"], header["head_dim"])
        expected = _array_specs(header["precision"], *dims, header["block_size"], version)
        table = header["arrays"]
        data_start = _align(header_end)
        arrays = {name: (data_start + table[name]["offset"], dtype, shape) for name, dtype, shape in expected}
        matches = len(table) == len(expected) and all(
            table[n]["dtype"] == d.str and tuple(table[n]["shape"]) == s for n, d, s in expected
        )
    except (ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError) as error:
        raise CorruptCacheError(f"cache segment {path} has an unreadable header: {error!r}") from error
    layout = _Layout(version, header, arrays)
    ends = [end for _, end in layout.span(list(arrays))]
    starts = [start for start, _ in layout.span(list(arrays))]
    if not matches or max(ends) != size - _TRAILER.size or any(o < data_start or o % _ALIGN for o in starts):
        raise CorruptCacheError(f"cache segment {path} has an array table that does not match its size")
    # The index leads the arrays: read it in one call. On a cold disk a mapping faults
    # it in a few pages at a time (at 1M, 1,122 segments' indexes: 7.5-8.4 s through
    # the mapping, 1.4 s read); what is read stays in the page cache.
    index = layout.span(_index_arrays(version))
    first = min(start for start, _ in index)
    data = memoryview(os.pread(fd, max(end for _, end in index) - first, first))
    if _crc(data, [(start - first, end - first) for start, end in index]) != header["index_crc"]:
        raise CorruptCacheError(f"cache segment {path} has a damaged index (CRC mismatch)")
    return layout


def _validate(
    keys: np.ndarray, values: np.ndarray, layers: Sequence[int], precision: str, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Checked float32 keys and values (L, H, T, D); ValueError with a reason otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    keys, values = np.asarray(keys), np.asarray(values)
    for name, array in (("keys", keys), ("values", values)):
        if array.ndim != 4:
            raise ValueError(f"{name} must be 4-D (layers, kv_heads, tokens, head_dim), got shape {array.shape}")
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{name} must be floating point, got {array.dtype}")
    if keys.shape != values.shape:
        raise ValueError(f"keys {keys.shape} and values {values.shape} must have the same shape")
    if keys.shape[0] != len(layers) or len(set(layers)) != len(layers):
        raise ValueError(f"layers must list {keys.shape[0]} distinct model layer indices, got {list(layers)}")
    if 0 in keys.shape:
        raise ValueError(f"keys and values must not be empty, got shape {keys.shape}")
    if precision == "int4" and keys.shape[3] % 2:
        raise ValueError(f"int4 needs an even head_dim, got {keys.shape[3]}")
    keys, values = keys.astype(np.float32, copy=False), values.astype(np.float32, copy=False)
    for name, array in (("keys", keys), ("values", values)):
        if not np.isfinite(array).all() or np.abs(array).max() > _F16_LIMIT:
            raise ValueError(f"{name} must be finite and within float16 range (±{_F16_LIMIT:g})")
    return keys, values


class Segment:
    """One mapped segment file. Arrays returned by `key_bounds` are read-only views that
    stay valid until `close()`; the others are fresh float32 arrays."""

    def __init__(self, key: str, path: Path, mapping: mmap.mmap, layout: _Layout) -> None:
        header = layout.header
        self.key, self.path = key, path
        self.precision: str = header["precision"]
        self.block_size: int = header["block_size"]
        self.tokens: int = header["tokens"]
        self.n_blocks = math.ceil(self.tokens / self.block_size)
        self.layers: tuple[int, ...] = tuple(header["layers"])
        self.kv_heads: int = header["kv_heads"]
        self.head_dim: int = header["head_dim"]
        self.meta: dict = header["meta"]
        self.nbytes = len(mapping)
        self.version: int = layout.version
        self._levels = _LEVELS[self.precision]
        self._slots = {layer: slot for slot, layer in enumerate(self.layers)}
        self._layout = layout
        self._mapping: mmap.mmap | None = mapping
        self._arrays = {
            name: np.frombuffer(mapping, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
            for name, (offset, dtype, shape) in layout.arrays.items()
        }

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def layer_slot(self, layer: int) -> int:
        try:
            return self._slots[layer]
        except KeyError:
            raise KeyError(f"layer {layer} is not stored in segment {self.key} ({list(self.layers)})") from None

    def _check(self, slot: int, head: int | None = None) -> None:
        if not self._arrays:
            raise ValueError(f"segment {self.key} is closed")
        if not 0 <= slot < len(self.layers):
            raise IndexError(f"slot {slot} out of range for {len(self.layers)} stored layers")
        if head is not None and not 0 <= head < self.kv_heads:
            raise IndexError(f"head {head} out of range for {self.kv_heads} KV heads")

    def _value_params(self, index: tuple) -> tuple[np.ndarray | None, np.ndarray | None]:
        params = _VALUE_PARAMS[self.precision]
        if not params:
            return None, None
        first, second = (self._arrays[name][index] for name, _ in params)
        return first, second

    def key_bounds(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """(key_min, key_max) float16 views, each (n_blocks, H, D)."""
        self._check(slot)
        return self._arrays["key_min"][slot], self._arrays["key_max"][slot]

    def key_bounds_all(self) -> tuple[np.ndarray, np.ndarray]:
        """(key_min, key_max) float16 views of every stored layer, each (L, n_blocks, H, D)."""
        self._check(0)
        return self._arrays["key_min"], self._arrays["key_max"]

    def gather(self, slot: int, head: int, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keys (N, D), values (N, D) float32 and token indices (N,) int64 of `blocks`, in that order.

        Only the requested blocks are read from the mapping; a partial last block
        contributes its real tokens only.
        """
        self._check(slot, head)
        blocks = np.asarray(blocks, dtype=np.int64)
        if blocks.ndim != 1:
            raise ValueError(f"blocks must be 1-D, got shape {blocks.shape}")
        if blocks.size and (blocks.min() < 0 or blocks.max() >= self.n_blocks):
            raise IndexError(f"block indices must lie in [0, {self.n_blocks}), got {blocks.min()}..{blocks.max()}")
        arrays, size = self._arrays, self.block_size
        if self.version >= 2:
            self._check_blocks(slot, head, blocks)
        tokens = (blocks[:, None] * size + np.arange(size)).reshape(-1)  # (Nb * block_size,)
        real = tokens < self.tokens
        # Fancy indexing a block view of the mapping copies just those blocks.
        stored_keys, low, high = self.stored_keys(slot, head)
        keys = decode_keys(stored_keys[blocks], low[blocks], high[blocks], self._levels).reshape(-1, self.head_dim)[real]  # (N, D)
        stored_values = arrays["values"][slot, head].reshape(self.n_blocks, size, -1)[blocks]
        stored_values = stored_values.reshape(tokens.size, stored_values.shape[-1])[real]  # (N, D or D/2)
        tokens = tokens[real]
        values = _decode_values(stored_values, *self._value_params((slot, head, tokens)), self._levels)
        return keys, values, tokens

    def _check_blocks(self, slot: int, head: int, blocks: np.ndarray) -> None:
        """CorruptCacheError unless each of `blocks` matches its stored checksum (format 2)."""
        found = _block_crcs(self._arrays, self.precision, slot, head, self.tokens, self.block_size, blocks.tolist())
        bad = found != self._arrays["block_crc"][slot, head, blocks]
        if bad.any():
            log.warning("cache segment %s fails a block checksum", self.path)
            raise CorruptCacheError(
                f"cache segment {self.key[:12]} is damaged (layer {self.layers[slot]}, KV head {head}, "
                f"block {int(blocks[bad][0])})"
            )

    def prefetch(self, name: str, lead: tuple[int, ...] = (), rows: Sequence[tuple[int, int]] | None = None) -> None:
        """Ask the kernel to read ahead, in the background, the sub-array
        `arrays[name][lead]` (e.g. lead = (slot, head)): all of it, or the ranges
        [start, end) of its first axis in `rows` (tokens, for keys and values)."""
        if _WILLNEED is None or self._mapping is None:
            return
        offset, dtype, shape = self._layout.arrays[name]
        inner = shape[len(lead) :]
        row_bytes = math.prod(inner[1:]) * dtype.itemsize
        index = 0
        for size, at in zip(shape, lead):
            index = index * size + at
        base = offset + index * inner[0] * row_bytes
        page = mmap.PAGESIZE
        for first, end in rows if rows is not None else [(0, inner[0])]:
            start = base + first * row_bytes
            aligned = start - start % page
            try:
                self._mapping.madvise(_WILLNEED, aligned, base + end * row_bytes - aligned)
            except OSError:  # a hint only
                return

    def prefetch_blocks(self, slot: int, head: int, first: int, end: int) -> None:
        """`prefetch` what `gather(slot, head, …)` reads of blocks first..end - 1."""
        rows = [(first * self.block_size, min(end * self.block_size, self.tokens))]
        for name in ("keys", "values", *(name for name, _ in _VALUE_PARAMS[self.precision])):
            self.prefetch(name, (slot, head), rows)

    @property
    def levels(self) -> int | None:
        """Quantisation levels of the codes: 255 (int8), 15 (int4), None (fp16)."""
        return self._levels

    def stored_keys(self, slot: int, head: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One stored layer and KV head's key codes as stored, (n_blocks, block_size,
        D or D/2) (rows past T repeat the last token), and its blocks' key_min and
        key_max (n_blocks, D): read-only views of the mapping, for `decode_keys`."""
        self._check(slot, head)
        arrays = self._arrays
        stored = arrays["keys"][slot, head].reshape(self.n_blocks, self.block_size, -1)
        return stored, arrays["key_min"][slot, :, head], arrays["key_max"][slot, :, head]

    def dequantize(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """All keys and values of one stored layer, float32 (H, T, D) each."""
        self._check(slot)
        arrays, heads = self._arrays, self.kv_heads
        # (H, n_blocks, block_size, D or D/2)
        stored_keys = arrays["keys"][slot].reshape(heads, self.n_blocks, self.block_size, -1)
        low = arrays["key_min"][slot].transpose(1, 0, 2)  # (H, n_blocks, D)
        high = arrays["key_max"][slot].transpose(1, 0, 2)
        keys = decode_keys(stored_keys, low, high, self._levels).reshape(heads, -1, self.head_dim)[:, : self.tokens]
        stored_values = arrays["values"][slot, :, : self.tokens]  # (H, T, D or D/2)
        values = _decode_values(stored_values, *self._value_params((slot,)), self._levels)
        return np.ascontiguousarray(keys), values

    def verify(self) -> bool:
        """Check both CRCs over every array byte (reads the whole file)."""
        if self._mapping is None:
            raise ValueError(f"segment {self.key} is closed")
        layout = self._layout
        if _WILLNEED is not None:
            self._mapping.madvise(_WILLNEED)  # read whole: read ahead
        index = _index_arrays(layout.version)
        payload = [name for name in layout.arrays if name not in index]
        with memoryview(self._mapping) as buffer:
            good = (_crc(buffer, layout.span(index)), _crc(buffer, layout.span(payload))) == (
                layout.header["index_crc"], layout.header["payload_crc"]
            )
        if not good:
            log.warning("cache segment %s fails its payload checksum", self.path)
        return good

    def close(self) -> None:
        self._arrays = {}
        if self._mapping is not None:
            try:
                self._mapping.close()
            except BufferError:
                log.debug("segment %s still has views alive; the mapping closes when they go", self.key)
            self._mapping = None


class SegmentStore:
    """Segments of one model, under `root/segments/<key[:2]>/<key>.qkv`.

    Writes are atomic (temp file, fsync, rename). `collect_garbage` deletes stray temp
    files, so it must not run while another thread or process writes to the store.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.folder = self.root / "segments"

    def path_for(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
            raise ValueError(f"segment key must be letters, digits, '_' or '-', got {key!r}")
        return self.folder / key[:2] / (key + SUFFIX)

    def has(self, key: str) -> bool:
        """Whether the segment exists and passes the cheap checks; a corrupt file is deleted."""
        path = self.path_for(key)
        try:
            self._map(path)[0].close()
        except FileNotFoundError:
            return False
        except CorruptCacheError as error:
            log.warning("deleting corrupt cache segment: %s", error)
            path.unlink(missing_ok=True)
            return False
        return True

    @staticmethod
    def _map(path: Path) -> tuple[mmap.mmap, _Layout]:
        with path.open("rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                raise CorruptCacheError(f"cache segment {path} is empty")
            mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            if _RANDOM is not None:
                # Reads are a few KB here and there (a page at each end and the index
                # on opening, a block's rows, one head's keys): no read-ahead on a
                # fault, which reads up to read_ahead_kb around it (8 MB on the machine of
                # docs/lab/corpus-cache-and-sparse-attention.md, session 9, most of a segment:
                # from a cold disk 1M's 1,122 segments opened in 7-10 s, against 1.2 s so).
                # Whoever reads more asks for it ahead (`Segment.prefetch`).
                mapping.madvise(_RANDOM)
            try:
                with memoryview(mapping) as buffer:
                    layout = _parse(buffer, path, handle.fileno())
            except BaseException:
                mapping.close()
                raise
        return mapping, layout

    def open(self, key: str) -> Segment:
        """Map a segment after the cheap checks (header, trailer, index CRC)."""
        path = self.path_for(key)
        return Segment(key, path, *self._map(path))

    def write(
        self, key: str, keys: np.ndarray, values: np.ndarray, *, layers: Sequence[int],
        precision: str = "int8", block_size: int = 32, meta: dict | None = None,
    ) -> int:
        """Quantise and write one segment; keys and values are (L, H, T, D). Returns the file size."""
        keys, values = _validate(keys, values, layers, precision, block_size)
        count, heads, tokens, head_dim = keys.shape
        levels = _LEVELS[precision]
        specs = _array_specs(precision, count, heads, tokens, head_dim, block_size)
        arrays = {name: np.empty(shape, dtype) for name, dtype, shape in specs if name != "block_crc"}
        padded = arrays["keys"].shape[2]
        for slot in range(count):  # one layer at a time keeps float32 temporaries small
            arrays["key_min"][slot], arrays["key_max"][slot], arrays["keys"][slot] = _quantize_keys(
                keys[slot], block_size, levels
            )
            *params, arrays["values"][slot] = _quantize_values(values[slot], padded, levels)
            for (name, _), param in zip(_VALUE_PARAMS[precision], params):
                arrays[name][slot] = param
        header = {"precision": precision, "block_size": block_size, "tokens": tokens, "layers": [int(x) for x in layers],
                  "kv_heads": heads, "head_dim": head_dim, "meta": meta or {}}
        return self._write_arrays(key, header, arrays)

    def _write_arrays(self, key: str, fields: dict, arrays: dict[str, np.ndarray]) -> int:
        """Write a segment in the current format from its quantised arrays (every one
        but `block_crc`, which is computed here) and header fields. Returns the file size."""
        path = self.path_for(key)
        precision, block_size, tokens = fields["precision"], fields["block_size"], fields["tokens"]
        count, heads = len(fields["layers"]), fields["kv_heads"]
        specs = _array_specs(precision, count, heads, tokens, fields["head_dim"], block_size)
        n_blocks = math.ceil(tokens / block_size)
        block_crc = np.empty((count, heads, n_blocks), np.dtype("<u4"))
        for slot in range(count):
            for head in range(heads):
                block_crc[slot, head] = _block_crcs(arrays, precision, slot, head, tokens, block_size, range(n_blocks))
        arrays = {name: block_crc if name == "block_crc" else np.ascontiguousarray(arrays[name]) for name, _, _ in specs}
        table, offset = {}, 0
        for name, dtype, shape in specs:
            table[name] = {"offset": offset, "dtype": dtype.str, "shape": list(shape)}
            offset = _align(offset + arrays[name].nbytes)
        index_crc = payload_crc = 0
        index = _index_arrays(FORMAT_VERSION)
        for name, array in arrays.items():
            if name in index:
                index_crc = zlib.crc32(array.data, index_crc)
            else:
                payload_crc = zlib.crc32(array.data, payload_crc)
        header = {**fields, "arrays": table, "index_crc": index_crc, "payload_crc": payload_crc}
        try:
            header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
        except (TypeError, ValueError) as error:
            raise ValueError(f"segment meta must be JSON-serialisable: {error}") from error
        data_start = _align(_PREFIX.size + len(header_bytes))

        path.parent.mkdir(parents=True, exist_ok=True)

        def write(temp: Path) -> None:
            with temp.open("wb") as out:
                out.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes)
                for array_name, array in arrays.items():
                    out.write(bytes(data_start + table[array_name]["offset"] - out.tell()))
                    out.write(array.data)
                out.write(_TRAILER.pack(TRAILER_MAGIC, zlib.crc32(header_bytes)))

        write_atomic(path, write)
        return path.stat().st_size

    def upgrade(self, segment: Segment) -> bool:
        """Rewrite an open segment of an older format in the current one (same arrays,
        with the block checksums added) once its own checksums pass. True if the file
        is now current (or already was); False if the segment is damaged, which is
        left to the caller.

        The rename leaves the open mapping (the old file) valid until it is closed."""
        if segment.version >= FORMAT_VERSION:
            return True
        if not segment.verify():
            return False
        header = segment._layout.header
        fields = {name: header[name] for name in ("precision", "block_size", "tokens", "layers", "kv_heads", "head_dim", "meta")}
        self._write_arrays(segment.key, fields, segment._arrays)  # straight from the mapping
        return True

    def remove(self, key: str) -> None:
        self.path_for(key).unlink(missing_ok=True)

    def _segment_files(self) -> list[Path]:
        found = self.folder.glob(f"*/*{SUFFIX}")
        return sorted(path for path in found if _KEY_PATTERN.fullmatch(path.stem) and path.parent.name == path.stem[:2])

    def keys(self) -> Iterator[str]:
        return (path.stem for path in self._segment_files())

    def total_bytes(self) -> int:
        """Bytes of the finished segment files (temp files are not counted)."""
        return sum(self._size(path) for path in self._segment_files())

    @staticmethod
    def _size(path: Path) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0

    def collect_garbage(self, keep: set[str]) -> int:
        """Delete segments not in `keep` and stray temp files; returns the bytes freed."""
        doomed = [path for path in self._segment_files() if path.stem not in keep]
        doomed += sorted(self.folder.glob("*/*.tmp"))
        freed = 0
        for path in doomed:
            size = self._size(path)
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as error:  # e.g. still mapped on Windows
                log.warning("could not delete cache file %s: %s", path, error)
                continue
            freed += size
        return freed
