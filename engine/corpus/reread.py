"""Reading a question's blocks together: when the blocks a question singles out
were prefilled in separate segments, their text is prefilled again as one
segment, and the answer attends to that instead.

Why: every segment is prefilled on its own after the shared prefix, so a fact in
one segment never saw a fact in another. Asked for all the values of one key
spread over a book, the model read every needle's block (the tally found them)
and listed one value: it saw four unrelated fragments. The same blocks as one
plain prompt, or the needles written into one segment, listed all four
(docs/BENCHMARKS.md, session 10). Prefilling the selected runs together is a few
hundred tokens — the answer then reads them the way a dense prompt of just those
passages would, and evidence still maps to the corpus blocks they came from.

Backend-free: the engine asks the backend's `SegmentPrefiller` for the keys and
`MemoryAttentionCache(read_blocks=...)` for the second pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from engine.corpus.selection import best_blocks, hit_cover, hit_limit, layer_hits
from engine.corpus.settings import SparseSettings

# Before each run's text: runs are not contiguous in the corpus, and the model
# should not read the end of one as running into the next. The first run gets one
# too: a needle that opened the re-read segment, straight after the prefix, was
# the one value of four the model did not list (32K, session 13); with the
# separator before it, all four (session 14).
RUN_SEPARATOR = "\n\n"


def reread_hits(tally: np.ndarray, settings: SparseSettings, doc_of_block: np.ndarray) -> np.ndarray:
    """The blocks singled out for re-reading from the final tally, best first: those
    reaching `reread_ratio` of the best, as many as `hit_limit` allows; where more
    qualify, the best of them. Under `reread_pairs` a block is rated with the one
    after it (`pair_tally`), and a chosen block hides the two beside it, so that one
    fact takes one place: a fact cut by a block edge tallies in two halves, each
    under the blocks of a haystack that echo the question (1M, session 12: a value's
    halves 0.46 and 0.28 of the best, haystack blocks 0.47-0.53)."""
    limit = hit_limit(settings)
    ratio = min(settings.reread_ratio, settings.hit_ratio)
    if not (tally > 0).any():
        return np.zeros(0, dtype=np.int64)
    if not settings.reread_pairs:
        order = best_blocks(tally, limit)
        return order[tally[order] >= ratio * tally[order[0]]]
    rated = pair_tally(tally, doc_of_block)
    # Each choice hides at most two others: the best 3 * limit hold every choice.
    # Between equal pairs the block that tallies more itself comes first (a fact
    # whole in one block rates the same with its predecessor as with its successor),
    # then the earlier.
    candidates = best_blocks(rated, 3 * limit)
    candidates = candidates[np.lexsort((candidates, -tally[candidates], -rated[candidates]))]
    chosen: list[int] = []
    hidden: set[int] = set()
    for block in candidates:
        block = int(block)
        if block in hidden:
            continue
        if chosen and rated[block] < ratio * rated[chosen[0]]:
            break
        chosen.append(block)
        hidden.update((block - 1, block + 1))
        if len(chosen) == limit:
            break
    return np.asarray(chosen, dtype=np.int64)


def steepest_hits(tally: np.ndarray, limit: int) -> np.ndarray:
    """Where more than `limit` blocks reach the hit share: the best blocks down to
    the steepest fall among the best `limit` + 1 — those that stand out from the
    rest. A lone needle at the end of 128K tallied 1.0, nine haystack blocks
    0.63-0.78 (session 13): one block stands out, nothing is re-read. Four values
    of a key at 1.0, 0.94, 0.86, 0.65 above haystack at 0.62 (1M, session 12):
    three stand out, in separate runs, and are re-read."""
    top = best_blocks(tally, limit + 1)
    if len(top) < 2:
        return top
    return top[: int(np.argmax(-np.diff(tally[top]))) + 1]


def pair_tally(tally: np.ndarray, doc_of_block: np.ndarray) -> np.ndarray:
    """Each block's tally plus the next block's, where that continues the same
    document's text (the last block of a document keeps its own)."""
    rated = np.asarray(tally, dtype=np.float64).copy()
    continues = doc_of_block[1:] == doc_of_block[:-1]
    rated[:-1][continues] += tally[1:][continues]
    return rated


def reread_cover(hits: np.ndarray, settings: SparseSettings, doc_of_block: np.ndarray) -> np.ndarray:
    """Sorted global ids of the re-read `hits` with `reread_before` blocks before
    each and `neighbours` after, those in the hit's own document. Unlike the
    budget's cover (selection.hit_cover) not capped by `max_blocks`: the re-read is
    its own prompt, at most `hit_limit` hits."""
    hits = np.asarray(hits, dtype=np.int64)
    if not len(hits):
        return hits
    # Clipped at the scope's ends: a clipped id lands on a block the hit's range
    # already holds, so it adds nothing.
    wanted = np.clip(hits[:, None] + np.arange(-settings.reread_before, settings.neighbours + 1), 0, len(doc_of_block) - 1)
    return np.unique(wanted[doc_of_block[wanted] == doc_of_block[hits][:, None]])


def read_runs(blocks: np.ndarray, seg_of_block: np.ndarray) -> list[np.ndarray]:
    """`blocks` (sorted global ids) cut into runs that were prefilled together:
    consecutive blocks of one segment. A cut at a segment's edge counts too: the
    two sides never saw each other."""
    blocks = np.asarray(blocks, dtype=np.int64)
    if not len(blocks):
        return []
    segs = seg_of_block[blocks]
    cuts = np.flatnonzero((np.diff(blocks) != 1) | (np.diff(segs) != 0)) + 1
    return np.split(blocks, cuts)


def plan_reread(tally: np.ndarray, settings: SparseSettings, seg_of_block: np.ndarray, doc_of_block: np.ndarray) -> list[np.ndarray]:
    """The runs to read together after the question's first pass, from its final
    `tally`; empty where the first pass answers. Under `reread` "auto" a question
    re-reads when the layers' own hits (`hit_ratio`) lie in two or more separately
    prefilled runs — a single fact, read whole in one passage, does not pay for it
    (session 11: at 0.4 the trigger re-read 11 of 13 single needles). Where more
    blocks reach `hit_ratio` than the budget holds, so that the layers single
    nothing out (1M, session 12: four values of a key the best four blocks, eight
    haystack blocks within 0.6 of the best), `reread_flat` takes the blocks that
    stand out instead (`steepest_hits`). It then reads `reread_hits` with the blocks
    around them (`reread_cover`). "always" re-reads whatever is singled out;
    "never" nothing."""
    if settings.reread == "never":
        return []
    n_blocks = len(tally)
    hits = layer_hits(tally, settings)
    if hits is None or not (tally > 0).any():
        return []
    if not len(hits):
        if not settings.reread_flat:
            return []
        hits = steepest_hits(tally, hit_limit(settings))
    blocks = hit_cover(hits, settings, n_blocks)
    if blocks is None or (settings.reread == "auto" and len(read_runs(blocks, seg_of_block)) < 2):
        return []
    wider = reread_cover(reread_hits(tally, settings, doc_of_block), settings, doc_of_block)
    if not len(wider):
        return []
    runs = read_runs(wider, seg_of_block)
    return runs if settings.reread == "always" or len(runs) >= 2 else []


def reread_tokens(
    runs: Sequence[np.ndarray],
    block_chars: Callable[[int], tuple[int, int, int]],
    text_of: Callable[[int], str],
    encode: Callable[[str], list[int]],
    offsets: Callable[[list[int], str], np.ndarray],
) -> tuple[list[int], np.ndarray]:
    """The runs' text encoded again, in corpus order: token ids and each token's
    global block id. `block_chars(block)` is (entry, first char, end char) of a
    block, `text_of(entry)` that entry's text, `offsets(ids, text)` each token's
    first character (build.token_offsets). A token belongs to the block whose
    text holds its first character; the separator before each run to the run's
    first block."""
    tokens: list[int] = []
    owners: list[np.ndarray] = []
    for run in runs:
        spans = [block_chars(int(b)) for b in run]
        start, end = spans[0][1], spans[-1][2]
        text = text_of(spans[0][0])[start:end]
        block_starts = np.array([s[1] - start for s in spans], dtype=np.int64)
        text = RUN_SEPARATOR + text
        block_starts[1:] += len(RUN_SEPARATOR)
        ids = encode(text)
        if not ids:
            continue
        starts = offsets(ids, text)[: len(ids)]
        which = np.maximum(np.searchsorted(block_starts, starts, side="right") - 1, 0)
        tokens += ids
        owners.append(np.asarray(run)[which])
    owner = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)
    return tokens, owner.astype(np.int64)


class ReadScope:
    """The MemoryScope of a second pass: the re-read tokens' keys and values, each
    token owned by the corpus block it came from, so that evidence lands on the
    corpus's own block ids (`n_blocks` is the corpus scope's)."""

    levels = None

    def __init__(self, base, layers: Sequence[int], keys: np.ndarray, values: np.ndarray, owner: np.ndarray) -> None:
        self.n_blocks = base.n_blocks
        self.block_size = base.block_size
        self.total_tokens = len(owner)
        self._slot = {layer: index for index, layer in enumerate(layers)}
        self.keys, self.values, self.owner = keys, values, owner  # (L, Hkv, T, D) float32, (T,)
        # Only the re-read segment's first block starts a segment (its first tokens
        # take attention as sinks do and are not cited).
        self.local_block = np.ones(base.n_blocks, dtype=np.int64)
        if len(owner):
            self.local_block[owner[0]] = 0
        self.resident: dict = {}

    @property
    def blocks(self) -> np.ndarray:
        return np.unique(self.owner)

    def has_layer(self, layer: int) -> bool:
        return layer in self._slot

    def gather(self, layer: int, head: int, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every re-read token whose block is among `blocks`, in order."""
        slot = self._slot[layer]
        keep = np.isin(self.owner, blocks)
        return self.keys[slot, head][keep], self.values[slot, head][keep], self.owner[keep]
