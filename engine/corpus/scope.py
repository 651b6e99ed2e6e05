"""The memory one question may read: the blocks of the documents in its scope.

Blocks are numbered globally in scope order (document by document, segment by
segment). A segment that recurs (the same text, cached once under one key: a book
added twice, a licence repeated in every volume) is read at its first occurrence
only: a question gains nothing from the same keys twice, and copies would crowd the
shortlist and the budget with one passage. Its evidence cites that occurrence. The block index (per-channel key min/max per block and KV head) is
concatenated per layer on first use and kept in RAM while the scope is open; keys
and values stay in the memory-mapped segment files and are read block by block.
Each block's checksum is verified whenever it is read (a segment of the older
format, without block checksums, is checked whole the first time it is read).

The retrieval heads' keys are held decoded to bfloat16 in the segments' padded
layout: row r belongs to block r // block_size (a partial block's padding rows
repeat its last token, so they never change a block's best match), and no per-token
block id is stored.

Loading that index (and the retrieval heads' keys) is most of a first question's
wait on a large scope: `warm` loads it on background threads as soon as the scope
opens (every layer's bounds in one pass over the segments, then the scanned heads'
keys in layer order), and an accessor that finds its array still loading waits for
that one load instead of repeating it.

A question on the CPU does not wait for that warm-up (`asking`): while it runs the
warm-up starts no further load, and what is not loaded yet the question streams from
the segments' mappings — the scanned heads' key codes a few hundred blocks at a time
into scratch, which it decodes itself (`code_steps`), one layer's bounds at a time
(`layer_bound_pairs`).
Memory a process has not touched before is slow to fault in (about 2 s a GB on the
VM these figures come from), so at 1M tokens the index's 1.2 GB cost a first question
more than decoding what it reads into the same few megabytes again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from engine.corpus.build import CorpusDocument, Manifest
from engine.corpus.store import FORMAT_VERSION, Segment, SegmentStore, decode_keys
from engine.errors import CorruptCacheError

log = logging.getLogger(__name__)

# Blocks decoded at a time: the float32 scratch (256 KB at block 32, D = 64) stays in
# the core's cache through the nine passes. Measured on one head of 1M tokens: 0.12 s,
# against 0.77 s in steps of 2,048 blocks (16 MB); torch took 0.11 s, but torch calls
# from the warm-up's threads slowed the question's own torch work after them (32K
# decode 7.7-10.3 tok/s against 9.8-12.3).
DECODE_BLOCKS = 32
# Blocks a question decodes per step when it streams a head's keys (1 MB of scratch
# at block 32, D = 64): one matmul a step.
STREAM_BLOCKS = 256
# Segments whose next array a pass over the scope asks the kernel to read ahead.
READ_AHEAD = 16


def _ahead(segments: Sequence[Segment], fetch: Callable[[Segment], None]) -> Iterator[tuple[int, Segment]]:
    """(index, segment) in order, each asked for (`fetch`) READ_AHEAD segments before
    it is read, so the disk has several reads in hand (segment mappings read no more
    than a fault's page by themselves)."""
    for segment in segments[:READ_AHEAD]:
        fetch(segment)
    for index, segment in enumerate(segments):
        if index + READ_AHEAD < len(segments):
            fetch(segments[index + READ_AHEAD])
        yield index, segment


def bfloat16_bits(values: np.ndarray, *, overwrite: bool = False) -> np.ndarray:
    """float32 → bfloat16 bit patterns (uint16), rounded to nearest even; a backend
    views them as its bfloat16 type without a copy. With `overwrite` a float32
    array the caller owns is used as scratch (a million keys a head: half the time)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    if not overwrite and np.may_share_memory(bits, values):
        bits = bits.copy()  # not the caller's to change
    rounding = bits >> 16
    rounding &= 1
    rounding += 0x7FFF
    bits += rounding
    bits >>= 16
    return bits.astype(np.uint16)


def decode_scan_keys(
    stored: np.ndarray, low: np.ndarray, high: np.ndarray, levels: int | None, out: np.ndarray | None = None
) -> np.ndarray:
    """Stored key codes (NB, block_size, D or D/2) with their blocks' key_min and
    key_max (NB, D) float16 → bfloat16 bit patterns (NB, block_size, D) uint16 (into
    `out` when given): decoded as a read decodes them, then rounded to nearest even."""
    n_blocks, block_size = stored.shape[:2]
    if out is None:
        out = np.empty((n_blocks, block_size, low.shape[-1]), np.uint16)
    for start in range(0, n_blocks, DECODE_BLOCKS):
        part = slice(start, start + DECODE_BLOCKS)
        out[part] = bfloat16_bits(decode_keys(stored[part], low[part], high[part], levels), overwrite=True)
    return out


def _fetch_keys(slot: int, head: int) -> Callable[[Segment], None]:
    """What a pass over one head's keys reads of a segment."""
    return lambda segment: segment.prefetch("keys", (slot, head))


def _fetch_bounds(slot: int | None = None) -> Callable[[Segment], None]:
    """What a pass over block bounds (one stored layer's, or every layer's) reads."""
    lead = () if slot is None else (slot,)

    def fetch(segment: Segment) -> None:
        segment.prefetch("key_min", lead)
        segment.prefetch("key_max", lead)

    return fetch


@dataclass
class ScopeEntry:
    document: CorpusDocument
    manifest: Manifest


class CorpusScope:
    def __init__(self, store: SegmentStore, entries: list[ScopeEntry], block_size: int) -> None:
        if not entries or not any(e.manifest.tokens for e in entries):
            raise ValueError("the scope holds no cached text")
        self.store = store
        self.entries = entries
        self.block_size = block_size
        handles: dict[str, Segment] = {}
        self.segments: list[Segment] = []  # one per distinct segment, in scope order
        self.duplicate_tokens = 0  # tokens of recurring segments, not read again
        seg_of_block, local_block, doc_of_block, first_token = [], [], [], []
        try:
            for entry_index, entry in enumerate(entries):
                for ref in entry.manifest.segments:
                    if ref.key in handles:
                        self.duplicate_tokens += ref.tokens
                        continue
                    segment = handles[ref.key] = store.open(ref.key)
                    shape = (segment.block_size, segment.precision, segment.layers, segment.kv_heads, segment.head_dim)
                    first = self.segments[0] if self.segments else segment
                    if shape != (block_size, first.precision, first.layers, first.kv_heads, first.head_dim):
                        # One engine's cache settings built them all: a stray file.
                        raise CorruptCacheError(f"segment {ref.key[:12]} does not match the scope's layout ({shape})")
                    n = segment.n_blocks
                    seg_of_block.append(np.full(n, len(self.segments)))
                    local_block.append(np.arange(n))
                    doc_of_block.append(np.full(n, entry_index))
                    first_token.append(ref.start + np.arange(n) * block_size)
                    self.segments.append(segment)
        except BaseException:
            for segment in handles.values():
                segment.close()
            raise
        self._handles = handles
        self.seg_of_block = np.concatenate(seg_of_block)
        self.local_block = np.concatenate(local_block)
        self.doc_of_block = np.concatenate(doc_of_block)
        self.block_first_token = np.concatenate(first_token)
        ends = [min(s + block_size, entries[d].manifest.tokens) for s, d in zip(self.block_first_token, self.doc_of_block)]
        self.block_end_token = np.asarray(ends, dtype=np.int64)
        self.n_blocks = len(self.seg_of_block)
        self.seg_first_block = np.concatenate([[0], np.cumsum([s.n_blocks for s in self.segments])[:-1]]).astype(np.int64)
        self.total_tokens = int(sum(s.tokens for s in self.segments))  # distinct tokens held in memory
        self.layers = set(self.segments[0].layers)
        # ("bounds",) → every layer's bound pairs; ("keys", layer, head) → head_keys: each
        # made once, by whichever thread asks first (a question or the warm-up).
        self._loaded: dict[tuple, Future] = {}
        self._lock = threading.Lock()
        self._warming: ThreadPoolExecutor | None = None
        self._index_loads: list[Future] = []
        self._closed = False
        self._questions = 0  # questions running (`asking`): the warm-up waits for none
        self._no_question = threading.Condition(self._lock)
        self._wanted: set[tuple] = set()  # keys a caller waits for: their loads never pause
        self._local = threading.local()  # .warming on the warm-up's threads
        # Copies of index arrays a backend keeps on its device (a GPU) while the
        # scope stays open, so each question does not upload them again.
        self.resident: dict[tuple, object] = {}

    def has_layer(self, layer: int) -> bool:
        return layer in self.layers

    def bounds(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(n_blocks, Hkv, D) float16 key minimum and maximum of every block (views
        of `bound_pairs`)."""
        pairs = self.bound_pairs(layer)
        D = pairs.shape[2] // 2
        return pairs[:, :, D:].transpose(1, 0, 2), pairs[:, :, :D].transpose(1, 0, 2)

    def _load(self, key: tuple, make: Callable[[], object]):
        """The array under `key`, made by the first thread that asks; the others wait."""
        with self._lock:
            if self._closed:
                raise ValueError("the scope is closed")
            future = self._loaded.get(key)
            mine = future is None
            if mine:
                future = self._loaded[key] = Future()
            else:  # a load the warm-up paused goes on for its caller
                self._wanted.add(key)
                self._no_question.notify_all()
        if mine:
            try:
                future.set_result(make())
            except BaseException as error:
                with self._lock:
                    self._loaded.pop(key, None)  # a later call tries again
                future.set_exception(error)
                raise
        return future.result()

    def warm(self, layers: Sequence[int], heads: Sequence[tuple[int, int]] = (), threads: int | None = None) -> None:
        """Start loading the block index (every layer's at once: one copy per segment,
        not one per segment and layer) when `layers` holds a stored layer, and the
        keys of the (layer, KV head) pairs in `heads`, earliest layer first, on
        background threads; then checking and rewriting older-format segments."""
        if self._warming is not None or self._closed:
            return
        threads = threads or max(1, min(8, os.cpu_count() or 1))
        self._warming = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="scope-warm")
        wanted = sorted(layer for layer in layers if layer in self.layers)
        if wanted:
            self._index_loads.append(self._warming.submit(self._quietly, self.bound_pairs, wanted[0]))
        for layer, head in sorted(heads):
            if layer in self.layers:
                self._index_loads.append(self._warming.submit(self._quietly, self.head_keys, layer, head))
        # Then segments of the older format (no block checksums): each is checked
        # whole, which a question would otherwise do for each it first reads, and
        # rewritten in the current format for the next scope (zlib releases the GIL:
        # the threads overlap). Current segments need nothing: a read checks its blocks.
        older = [segment for segment in self.segments if segment.version < FORMAT_VERSION]
        if older:
            log.info("checking and rewriting %d cache segments of an older format in the background", len(older))
        for segment in older:
            self._warming.submit(self._quietly, self._upgrade, segment)

    @contextmanager
    def asking(self) -> Iterator[None]:
        """While a question runs, the warm-up starts no further load (those running
        finish): on a CPU the question has the cores, and streams what is not loaded
        (`code_steps`, `layer_bound_pairs`); the warm-up goes on after it."""
        with self._lock:
            self._questions += 1
        try:
            yield
        finally:
            with self._lock:
                self._questions -= 1
                self._no_question.notify_all()

    def _quietly(self, load: Callable, *args) -> None:
        self._pause()
        if self._closed:
            return
        self._local.warming = True
        try:
            load(*args)
        except Exception:  # noqa: BLE001 — the question that needs it loads it again and reports
            pass
        finally:
            self._local.warming = False

    def _pause(self, key: tuple | None = None) -> None:
        """On a warm-up thread, wait while a question runs (unless someone waits for
        `key`, the load in hand); called between loads and between segments."""
        if key is not None and not getattr(self._local, "warming", False):
            return
        with self._lock:
            while self._questions and not self._closed and key not in self._wanted:
                self._no_question.wait()
            if key is not None and self._closed:
                raise ValueError("the scope is closed")  # the load stops; close goes on

    def loaded(self, key: tuple) -> bool:
        """Whether the array under `key` (("bounds",) or ("keys", layer, head)) is in RAM."""
        with self._lock:
            future = self._loaded.get(key)
        return future is not None and future.done() and future.exception() is None

    def wait_warm(self) -> None:
        """Block until the warm-up started by `warm` has finished."""
        if self._warming is not None:
            self._warming.shutdown(wait=True)

    def bound_pairs(self, layer: int) -> np.ndarray:
        """(Hkv, n_blocks, 2·D) float16: each block's key maximum, then its minimum,
        per KV head — the layout of the bound pass, one matmul with [q⁺, q⁻]. A view
        of every layer's pairs, loaded together on first use."""

        def make() -> np.ndarray:
            first = self.segments[0]
            D = first.head_dim
            pairs = np.empty((len(first.layers), first.kv_heads, self.n_blocks, 2 * D), np.float16)
            for index, segment in _ahead(self.segments, _fetch_bounds()):
                self._pause(("bounds",))
                low, high = segment.key_bounds_all()  # (L, nb, H, D) each
                start = self.seg_first_block[index]
                pairs[:, :, start : start + low.shape[1], :D] = high.transpose(0, 2, 1, 3)
                pairs[:, :, start : start + low.shape[1], D:] = low.transpose(0, 2, 1, 3)
            return pairs

        return self._load(("bounds",), make)[self.segments[0].layer_slot(layer)]

    def index_bytes(self) -> int:
        """Bytes of the index and keys loaded so far."""
        with self._lock:
            done = [f.result() for key, f in self._loaded.items() if key[0] != "verified" and f.done() and f.exception() is None]
        return sum(value.nbytes for value in done)

    def head_keys(self, layer: int, head: int) -> np.ndarray:
        """Every key of the scope for one layer and KV head as bfloat16 bit patterns
        (n_blocks · block_size, D) uint16, row r in block r // block_size (padding
        rows repeat their block's last token); kept in RAM while the scope is open,
        for the full scan of the model's retrieval heads.

        Blocks are not checksummed here: the scan only ranks blocks, and a block
        chosen to be attended is read through `gather`, which checks it."""

        def make() -> np.ndarray:
            first = self.segments[0]
            slot = first.layer_slot(layer)
            # Straight from each segment's mapping into the array kept: no copy of
            # the codes first (at 1M, 64 MB a head of memory touched for nothing).
            bits = np.empty((self.n_blocks, self.block_size, first.head_dim), np.uint16)
            for index, segment in _ahead(self.segments, _fetch_keys(slot, head)):
                self._pause(("keys", layer, head))
                start = self.seg_first_block[index]
                decode_scan_keys(*segment.stored_keys(slot, head), first.levels, out=bits[start : start + segment.n_blocks])
            return bits.reshape(-1, first.head_dim)

        return self._load(("keys", layer, head), make)

    def code_steps(self, layer: int, head: int) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """The stored key codes of (layer, head), STREAM_BLOCKS blocks at a time as
        `Segment.stored_keys` gives them: (first block, codes (blocks, block_size, D
        or D/2), key_min, key_max (blocks, D)), copied from the segments into scratch
        that the next step overwrites — for a question that decodes them itself while
        `head_keys` is not loaded (decoded by `decode_keys`, they are its rows)."""
        first = self.segments[0]
        slot = first.layer_slot(layer)
        scratch = None
        filled = start = 0
        for _, segment in _ahead(self.segments, _fetch_keys(slot, head)):
            stored, low, high = segment.stored_keys(slot, head)
            if scratch is None:
                scratch = tuple(np.empty((STREAM_BLOCKS, *a.shape[1:]), a.dtype) for a in (stored, low, high))
            done = 0
            while done < segment.n_blocks:
                take = min(segment.n_blocks - done, STREAM_BLOCKS - filled)
                for into, source in zip(scratch, (stored, low, high)):
                    into[filled : filled + take] = source[done : done + take]
                filled += take
                done += take
                if filled == STREAM_BLOCKS:
                    yield (start, *scratch)
                    start += filled
                    filled = 0
        if filled:
            yield (start, *(a[:filled] for a in scratch))

    @property
    def levels(self) -> int | None:
        """The segments' key code levels (255 int8, 15 int4, None fp16)."""
        return self.segments[0].levels

    def layer_bound_pairs(self, layer: int, heads: Sequence[int]) -> np.ndarray:
        """`bound_pairs(layer)` of the KV heads `heads`: (len(heads), n_blocks, 2·D)
        float16, a copy — from the loaded index, or else from the segments for this
        layer only (the warm-up's one load of every layer is not started)."""
        heads = list(heads)
        if self.loaded(("bounds",)):
            return self.bound_pairs(layer)[heads]
        first = self.segments[0]
        slot, D = first.layer_slot(layer), first.head_dim
        pairs = np.empty((len(heads), self.n_blocks, 2 * D), np.float16)
        for index, segment in _ahead(self.segments, _fetch_bounds(slot)):
            low, high = segment.key_bounds_all()  # (L, nb, H, D) each
            part = slice(self.seg_first_block[index], self.seg_first_block[index] + segment.n_blocks)
            for row, head in enumerate(heads):
                pairs[row, part, :D] = high[slot, :, head]
                pairs[row, part, D:] = low[slot, :, head]
        return pairs

    def gather(self, layer: int, head: int, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys, values, owners = [], [], []
        blocks = np.asarray(blocks, dtype=np.int64)
        if len(blocks) == 0:
            D = self.segments[0].head_dim
            return np.zeros((0, D), np.float32), np.zeros((0, D), np.float32), np.zeros(0, np.int64)
        segs = self.seg_of_block[blocks]
        # Runs of blocks from one segment are read in one call, and each is asked for
        # before the first is read: the disk reads them together (mappings read no
        # more than a fault's page by themselves).
        cuts = np.flatnonzero(np.diff(segs)) + 1
        runs = np.split(np.arange(len(blocks)), cuts)
        slot, starts = self.segments[0].layer_slot(layer), np.r_[0, cuts]
        local = self.local_block[blocks]
        lows, highs = np.minimum.reduceat(local, starts).tolist(), np.maximum.reduceat(local, starts).tolist()
        for seg, low, high in zip(segs[starts].tolist(), lows, highs):
            self.segments[seg].prefetch_blocks(slot, head, low, high + 1)
        for run in runs:
            segment = self.segments[segs[run[0]]]
            self._verify(segment)
            k, v, tokens = segment.gather(slot, head, local[run])
            keys.append(k)
            values.append(v)
            owners.append(self.seg_first_block[segs[run[0]]] + tokens // self.block_size)
        return np.concatenate(keys), np.concatenate(values), np.concatenate(owners)

    def _verify(self, segment: Segment) -> None:
        """Check an older-format segment's payload checksum once per open scope (the
        warm-up does it in the background; a question, for what it reads first). A
        current segment checks each block as it is read (`Segment.gather`)."""
        if segment.version < FORMAT_VERSION and not self._load(("verified", segment.key), segment.verify):
            raise CorruptCacheError(f"cache segment {segment.key[:12]} is damaged")

    def _upgrade(self, segment: Segment) -> None:
        """Check an older-format segment whole and rewrite it in the current format
        (for later scopes; this one keeps reading the old mapping, now checked)."""
        self._load(("verified", segment.key), lambda: self.store.upgrade(segment))

    def block_passage(self, block: int) -> tuple[int, int, int]:
        """(entry index, first token, end token) of a global block."""
        return int(self.doc_of_block[block]), int(self.block_first_token[block]), int(self.block_end_token[block])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._no_question.notify_all()
        if self._warming is not None:
            # Loads not started are dropped; those running finish before the files close.
            self._warming.shutdown(wait=True, cancel_futures=True)
        for segment in self._handles.values():
            segment.close()
        self._loaded.clear()
        self.resident.clear()
