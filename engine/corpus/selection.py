"""Backend-free parts of block selection shared by the torch and MLX corpus memory
(engine/backends/*/memory.py): the scope protocol, the successor rule, the
selection statistics, which layers keep memory, and how many tokens at a
segment's start are never cited.
Both backends import these, so they select and cite alike by construction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from engine.config import ModelConfig
from engine.corpus.settings import SparseSettings

# The first tokens of every segment, whose attention is not counted as evidence.
SEGMENT_SINK_TOKENS = 4


class LayeredModel(Protocol):
    """What `global_layers` needs of a backend's model."""

    config: ModelConfig

    def window_for(self, layer: int) -> int | None: ...


def global_layers(model: LayeredModel) -> list[int]:
    """Layers that attend over the whole context; only these keep long-range memory
    (Gemma 3's sliding layers see 512 tokens by design and store nothing)."""
    return [i for i in range(model.config.num_hidden_layers) if model.window_for(i) is None]


def with_successors(blocks: np.ndarray, order: np.ndarray, count: int, neighbours: int = 1) -> np.ndarray:
    """The first `count` blocks of ranked `order` (indices into sorted `blocks`),
    each followed by up to `neighbours` blocks after it that are candidates too: a
    fact whose key matches one block often ends in the next ones (a sentence
    naming the key, then a number split over a block edge)."""
    following = np.full(len(blocks), -1)
    consecutive = np.flatnonzero(blocks[1:] == blocks[:-1] + 1)
    following[consecutive] = consecutive + 1
    steps = [order]
    for _ in range(neighbours):
        steps.append(np.where(steps[-1] >= 0, following[np.maximum(steps[-1], 0)], -1))
    sequence = np.stack(steps, axis=1).reshape(-1)
    sequence = sequence[sequence >= 0]
    _, first = np.unique(sequence, return_index=True)
    return blocks[sequence[np.sort(first)][:count]]


def best_blocks(tally: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` highest values of `tally`, best first (ties in block
    order). Partitions first: the tally has a value per block of the scope, 330K at
    10M tokens, and this runs once per layer."""
    top = np.argpartition(-tally, count - 1)[:count] if len(tally) > count else np.arange(len(tally))
    return top[np.argsort(-tally[top], kind="stable")]


def question_hits(tally: np.ndarray, ratio: float, limit: int) -> np.ndarray:
    """The blocks the question singles out so far, best first: those whose tally
    (the retrieval heads' standardised scores, summed over the scans so far)
    reaches `ratio` of the best block's. None before a scan has run, where the
    scope is small enough that no head scans it, or where more than `limit` blocks
    qualify: a tally that flat singles nothing out, and each head's own ranking is
    the better guide (measured: a 1M needle lost when its heads were overruled)."""
    if not (tally > 0).any():
        return np.zeros(0, dtype=np.int64)
    # Only the best limit + 1 matter.
    order = best_blocks(tally, limit + 1)
    hits = order[tally[order] >= ratio * tally[order[0]]]
    return hits if len(hits) <= limit else np.zeros(0, dtype=np.int64)


def tally_budget(hits: np.ndarray, min_blocks: int, max_blocks: int, neighbours: int) -> int:
    """Blocks to read for the singled-out `hits`: each with its successors (hits
    next to each other share them), clamped to [min_blocks, max_blocks]. With
    nothing singled out (no scan yet, or none in a small scope) the whole budget:
    there is no evidence to read less."""
    if not len(hits):
        return max_blocks
    covered = len(np.unique(np.asarray(hits)[:, None] + np.arange(neighbours + 1)))
    return max(min_blocks, min(max_blocks, covered))


def hits_first(order: np.ndarray, blocks: np.ndarray, hits: np.ndarray) -> np.ndarray:
    """`order` (indices into sorted `blocks`) with the blocks among `hits` moved to
    the front, in the hits' order; hits that are not candidates are skipped."""
    if not len(hits) or not len(blocks):
        return order
    position = np.minimum(np.searchsorted(blocks, hits), len(blocks) - 1)
    front = position[blocks[position] == hits]
    return np.concatenate([front, order[~np.isin(order, front)]])


def layer_hits(scan_tally: np.ndarray, settings: SparseSettings) -> np.ndarray | None:
    """What the "tally" budget reads first in this layer (question_hits, at most as
    many hits as the budget holds with their successors); None under another rule."""
    if settings.budget != "tally":
        return None
    return question_hits(scan_tally, settings.hit_ratio, hit_limit(settings))


def hit_limit(settings: SparseSettings) -> int:
    """The most hits a question may single out: as many as the budget holds with
    their successors."""
    return max(1, settings.max_blocks // (1 + settings.neighbours))


def hit_cover(hits: np.ndarray | None, settings: SparseSettings, n_blocks: int) -> np.ndarray | None:
    """Sorted global ids of `hits` with their `neighbours` successors (cut at the
    scope's end), topped up to `min_blocks` with the blocks just before the hits
    (every hit's predecessor, then the one before that, ...; each once and only if
    not read already). None where there are no hits or the cover exceeds
    `max_blocks`; fewer than `min_blocks` where the scope's start leaves no more."""
    if hits is None or not len(hits):
        return None
    hits = np.asarray(hits, dtype=np.int64)
    wanted = np.unique(hits[:, None] + np.arange(settings.neighbours + 1))
    wanted = wanted[wanted < n_blocks]
    if len(wanted) > settings.max_blocks:
        return None
    short = settings.min_blocks - len(wanted)
    if short > 0:
        before = (hits[None, :] - np.arange(1, settings.min_blocks)[:, None]).reshape(-1)
        before = before[(before >= 0) & ~np.isin(before, wanted)]
        _, first = np.unique(before, return_index=True)
        wanted = np.union1d(wanted, before[np.sort(first)][:short])
    return wanted


def decided_blocks(hits: np.ndarray | None, settings: SparseSettings, n_blocks: int) -> np.ndarray | None:
    """Sorted global ids every head of a layer reads when the question has singled
    out `hits`: each with its successors, topped up to `min_blocks` with the blocks
    just before the hits (a lone hit covers 3 blocks with its two successors; the
    block before it holds the start of a sentence that runs into it). No head's own
    ranking is needed for that choice (with the hits' cover at least `min_blocks`
    it is the very one `rule_selection` makes from any candidates that hold them),
    so a layer skips the bound pass and the exact pass over its shortlist and reads
    just these. Topping up from the tally instead was measured to read a
    distractor key's block (multi-key 80% against 100%). None where each head must
    rank for itself: no hits, more blocks than the budget, or hits at the scope's
    edges."""
    if hits is None or not len(hits) or int(np.max(hits)) + settings.neighbours >= n_blocks:
        return None
    wanted = hit_cover(hits, settings, n_blocks)
    return wanted if wanted is not None and len(wanted) >= settings.min_blocks else None


def rule_selection(blocks: np.ndarray, order: np.ndarray, hits: np.ndarray | None, settings: SparseSettings) -> np.ndarray:
    """Sorted global block ids one head reads under the "fixed" or "tally" budget,
    from its candidates `blocks` (sorted) ranked by `order` (indices into them)."""
    if settings.budget == "fixed":
        count = settings.max_blocks
    else:
        hits = np.zeros(0, dtype=np.int64) if hits is None else hits
        order = hits_first(order, blocks, hits)
        count = tally_budget(hits, settings.min_blocks, settings.max_blocks, settings.neighbours)
    return np.sort(with_successors(blocks, order, count, settings.neighbours))


class MemoryScope(Protocol):
    """The blocks a question may read (engine/corpus/scope.py)."""

    n_blocks: int
    total_tokens: int
    block_size: int
    levels: int | None  # key code levels: 255 int8, 15 int4, None fp16
    local_block: np.ndarray  # (n_blocks,) each block's index within its segment

    def has_layer(self, layer: int) -> bool: ...

    def bounds(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel key min and max of every block: (n_blocks, Hkv, D) each."""
        ...

    def bound_pairs(self, layer: int) -> np.ndarray:
        """The same as (Hkv, n_blocks, 2·D): each block's maximum, then its minimum."""
        ...

    def layer_bound_pairs(self, layer: int, heads: Sequence[int]) -> np.ndarray:
        """`bound_pairs(layer)[heads]`, loaded or streamed for this layer only."""
        ...

    def head_keys(self, layer: int, head: int) -> np.ndarray:
        """Every key of one KV head as bfloat16 bits (n_blocks · block_size, D)
        uint16, row r in block r // block_size."""
        ...

    def loaded(self, key: tuple) -> bool:
        """Whether ("bounds",) or ("keys", layer, head) is loaded in RAM."""
        ...

    def code_steps(self, layer: int, head: int) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """`head_keys`' stored codes and block bounds a few hundred blocks at a time,
        streamed from the segments: (first block, codes, key_min, key_max)."""
        ...

    def gather(self, layer: int, head: int, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keys (N, D), values (N, D) float32 and each token's block id (N,) for the
        given global block ids, block by block in the order given."""
        ...


@dataclass
class SelectionStats:
    blocks_selected: list[int] = field(default_factory=list)  # per (layer, head)
    blocks_scored_exactly: int = 0
    blocks_bounded: int = 0
    tokens_scanned: int = 0  # keys scored by the full scan of retrieval heads
    bytes_gathered: int = 0
    selected: dict[int, list[np.ndarray]] = field(default_factory=dict)  # layer → per head block ids
