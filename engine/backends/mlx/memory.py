"""Corpus memory for the MLX backend: capturing segment keys and values at build
time, and block-sparse attention over the cached corpus at question time.

The same algorithm, settings and segment files as engine/backends/torch/memory.py
(read its module docstring for the method); this file is its MLX transcription,
kept step for step alike so that either backend answers a question over a cache
the other one built:

Build: a segment is prefilled after the shared prefix (the attention sinks), and
each global-attention layer's keys are captured *before* RoPE, in the interleaved
pair layout (see layers.interleave_rotary_rows), as float32 numpy arrays that
engine/corpus/store.py writes.

Ask: `MemoryAttentionCache` stands in for the dense KV cache. At each global layer,
the first pass that holds question tokens selects blocks per KV head:
  1. bound pass: an upper bound of q·k per block from per-channel key min/max
     (Quest, Tang et al. 2024), for every block in scope — or, for the model's
     retrieval heads, an exact scan of every key (as the torch backend);
  2. exact pass over a shortlist: token-level scores, softmax mass per block;
  3. dynamic budget: the smallest set of blocks reaching `mass` of the estimated
     attention, clamped to [min_blocks, max_blocks];
then places those blocks ("ordered", "fixed" or "block" positions; InfLLM's
fixed-distance rotation for scoring, Xiao et al. 2024) and attends over sinks +
memory + question, accumulating the attention each memory block receives as
evidence.

The matrix work (bounds, exact scores, attention) runs in MLX, so on Apple
Silicon it runs on the GPU; ranking and bookkeeping over a few hundred blocks run
in numpy, with stable sorts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from engine.backends.mlx.kv_cache import DenseKVCache
from engine.backends.mlx.layers import Rotary, attend
from engine.backends.mlx.models.llama import DecoderModel
from engine.corpus.selection import (
    SEGMENT_SINK_TOKENS,
    MemoryScope,
    SelectionStats,
    decided_blocks,
    global_layers,
    layer_hits,
    rule_selection,
    with_successors,
)
from engine.corpus.settings import SparseSettings

# --- build ---------------------------------------------------------------------


class CaptureCache(DenseKVCache):
    """A dense cache that also keeps the pre-RoPE keys and the values of the tokens
    from `capture_from` on, for the layers in `layers`."""

    def __init__(self, model: DecoderModel, capacity: int, layers: Sequence[int]) -> None:
        c = model.config
        super().__init__(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, capacity, model.dtype)
        self.layers = set(layers)
        self.capture_from = 0  # index within the next forward pass's tokens
        self.captured: dict[int, tuple[mx.array, mx.array]] = {}

    def attend_layer(self, layer: int, q: mx.array, k: mx.array, v: mx.array, **kwargs) -> mx.array:
        if layer in self.layers:
            start = self.capture_from
            # (1, T, H, D) → (H, T', D): the segment's own tokens, before rotation.
            self.captured[layer] = (
                k[0, start:].transpose(1, 0, 2).astype(mx.float32),
                v[0, start:].transpose(1, 0, 2).astype(mx.float32),
            )
        return super().attend_layer(layer, q, k, v, **kwargs)

    def state(self) -> list[mx.array]:
        return super().state() + [a for pair in self.captured.values() for a in pair]


class SegmentPrefiller:
    """Prefills segments one after another behind a shared prefix computed once."""

    def __init__(self, model: DecoderModel, prefix: Sequence[int], max_tokens: int) -> None:
        self.model = model
        self.layers = global_layers(model)
        self.prefix_len = len(prefix)
        self.cache = CaptureCache(model, len(prefix) + max_tokens, self.layers)
        if prefix:
            self.cache.layers = set()
            model.forward(list(prefix), self.cache)
            self.cache.layers = set(self.layers)

    def run(
        self,
        context: Sequence[int],
        segment: Sequence[int],
        on_layer: Callable[[int, int], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Keys (pre-RoPE) and values of `segment`, prefilled after the prefix and
        the read-only `context`: float32 arrays (L, Hkv, T, D), L = len(self.layers)."""
        self.cache.truncate(self.prefix_len)
        self.cache.capture_from = len(context)
        self.cache.captured = {}
        self.model.forward([*context, *segment], self.cache, on_layer=on_layer)
        keys = mx.stack([self.cache.captured[i][0] for i in self.layers])  # (L, H, T, D)
        values = mx.stack([self.cache.captured[i][1] for i in self.layers])
        self.cache.captured = {}
        return np.array(keys), np.array(values)


# --- ask -----------------------------------------------------------------------


def cover_scores(rows: np.ndarray, threshold: float) -> np.ndarray:
    """The torch backend's cover_scores in numpy (standard deviation with ddof=1, as torch)."""
    standard = (rows - rows.mean(axis=1, keepdims=True)) / np.maximum(rows.std(axis=1, ddof=1, keepdims=True), 1e-6)
    return np.maximum(standard - threshold, 0).sum(axis=0)


# Keys per matmul in the scan of a retrieval head (as the torch backend).
SCAN_CHUNK = 65_536


@dataclass
class PlacedMemory:
    """One layer's selected memory, rotated to its positions and padded to M per head."""

    keys: mx.array  # (1, Hkv, M, D) rotated, model dtype
    values: mx.array  # (1, Hkv, M, D)
    valid: np.ndarray  # (Hkv, M) bool: a real token, not padding
    cited: np.ndarray  # (Hkv, M) bool: valid and counted as evidence
    owners: np.ndarray  # (Hkv, M) int64: global block id of each token


def _block_index(owner: np.ndarray) -> np.ndarray:
    """(N,) position of each token's block among the blocks present, for token block
    ids that come block by block (what `torch.unique_consecutive` returns)."""
    return np.concatenate([[0], np.cumsum(owner[1:] != owner[:-1])]).astype(np.int64)


class MemoryAttentionCache:
    """Real tokens in a dense cache, plus per-layer selected memory (see module doc)."""

    def __init__(
        self,
        model: DecoderModel,
        scope: MemoryScope,
        settings: SparseSettings,
        *,
        prefix_len: int,
        capacity: int,
        scan_heads: Sequence[tuple[int, int]] = (),
        probe: Callable[[int, int, np.ndarray], None] | None = None,
        read_blocks: np.ndarray | None = None,
    ) -> None:
        c = model.config
        self.model = model
        self.scope = scope
        self.settings = settings
        self.prefix_len = prefix_len
        self.kv_heads, self.head_dim = c.num_key_value_heads, c.head_dim
        self.group = c.num_attention_heads // c.num_key_value_heads
        self.memory_layers = {i for i in global_layers(model) if scope.has_layer(i)}
        self.max_tokens = min(settings.max_blocks * scope.block_size, scope.total_tokens)
        # A second pass over re-read blocks (engine/corpus/reread.py): every memory
        # layer reads just these, all of the scope's tokens, packed before the question.
        self.read_blocks = None if read_blocks is None else np.asarray(read_blocks, dtype=np.int64)
        if self.read_blocks is not None:
            self.max_tokens = scope.total_tokens
        if settings.positions == "ordered":
            self.question_start = prefix_len + self.max_tokens
        else:
            self.question_start = prefix_len + settings.memory_distance
        self.real = DenseKVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, capacity, model.dtype)
        self.memory: dict[int, PlacedMemory] = {}
        # float64 numpy, as the torch backend's float64 tensor (evidence_weights).
        self.evidence = np.zeros(scope.n_blocks, dtype=np.float64)
        self.votes = np.zeros(scope.n_blocks, dtype=np.float64)  # cross-layer vote (carry_blocks)
        self.scan_votes = np.zeros(scope.n_blocks, dtype=np.float64)  # the retrieval heads' own tally (scan_carry)
        self.evidence_from = capacity  # query index from which attention counts as evidence
        self.stats = SelectionStats()
        self.decode_steps = 0
        # (layer, query head) pairs whose queries score every block exactly (retrieval
        # heads, engine/corpus/retrieval.py); `probe` sees each one's scores (calibration).
        self.scan_heads = {(int(layer), int(head)) for layer, head in scan_heads}
        self.probe = probe

    @property
    def length(self) -> int:
        return self.real.length

    def evidence_weights(self) -> np.ndarray:
        """Attention mass per scope block so far, (n_blocks,) float64."""
        return self.evidence

    def scan_tally(self) -> np.ndarray:
        """The retrieval heads' tally so far (the sum of their standardised scores per
        scope block), (n_blocks,) float64: what `layer_hits` singles blocks out by."""
        return self.scan_votes.copy()

    def advance(self, tokens: int) -> None:
        self.real.advance(tokens)
        if tokens == 1:
            self.decode_steps += 1

    def truncate(self, length: int) -> None:
        self.real.truncate(length)

    def state(self) -> list[mx.array]:
        return self.real.state()

    def positions(self, start: int, count: int) -> np.ndarray:
        index = np.arange(start, start + count)
        return np.where(index < self.prefix_len, index, index - self.prefix_len + self.question_start)

    def attend_layer(
        self,
        layer: int,
        q: mx.array,
        k: mx.array,
        v: mx.array,
        *,
        rotary: Rotary,
        scale: float,
        window: int | None,
    ) -> mx.array:
        past, T = self.real.length, q.shape[1]
        positions = self.positions(past, T)
        q_rot = rotary.rotate_at(q, positions).transpose(0, 2, 1, 3)  # (1, Hq, T, D)
        k_rot = rotary.rotate_at(k, positions).transpose(0, 2, 1, 3)  # (1, Hkv, T, D)
        keys, values = self.real.append(layer, k_rot, v.transpose(0, 2, 1, 3))
        if layer not in self.memory_layers or past + T <= self.prefix_len:
            return attend(q_rot, keys, values, past=past, scale=scale, window=window)
        refresh = self.settings.refresh_every
        if layer not in self.memory or (T == 1 and refresh and self.decode_steps and self.decode_steps % refresh == 0):
            self._select(layer, q, positions, rotary, scale)
        return self._attend_with_memory(layer, q_rot, keys, values, past, scale)

    # -- selection ---------------------------------------------------------------

    def _query_count(self, positions) -> int:
        """How many of the last queries score blocks: up to `selection_queries`, from
        the question only (the chat prefix before memory says nothing about it)."""
        return max(1, min(self.settings.selection_queries, int((np.asarray(positions) >= self.question_start).sum())))

    def _selection_queries(self, q: mx.array, positions: np.ndarray, rotary: Rotary, scale: float) -> mx.array:
        """The last question queries, rotated as if every memory key sat
        `memory_distance` before the question: (Hkv, G·n, D) fp32, scaled."""
        n = self._query_count(positions)
        anchor = self.question_start - self.settings.memory_distance
        return self._grouped(q[:, -n:], positions[-n:] - anchor, rotary, scale)

    def _grouped(self, q: mx.array, positions: np.ndarray, rotary: Rotary, scale: float) -> mx.array:
        """Queries (1, n, Hq, D) rotated and gathered per KV head: (Hkv, G·n, D) fp32,
        scaled; rows are head-in-group major, token minor."""
        n = q.shape[1]
        rotated = rotary.rotate_at(q.astype(mx.float32), positions)[0]  # (n, Hq, D)
        grouped = rotated.reshape(n, self.kv_heads, self.group, self.head_dim).transpose(1, 2, 0, 3)
        return grouped.reshape(self.kv_heads, self.group * n, self.head_dim) * scale

    def _select(self, layer: int, q: mx.array, positions: np.ndarray, rotary: Rotary, scale: float) -> None:
        if self.read_blocks is not None:
            self._read_decided(layer, self.read_blocks, rotary)
            return
        s = self.settings
        queries = self._selection_queries(q, positions, rotary, scale)  # (Hkv, J, D)
        n_blocks = self.scope.n_blocks
        shortlist = min(n_blocks, s.shortlist_factor * s.max_blocks)
        layer_votes = np.zeros_like(self.votes)
        scanned: dict[int, np.ndarray] = {}
        n = queries.shape[1] // self.group  # rows per query head (head-in-group major)
        for head in range(self.kv_heads):
            members = [g for g in range(self.group) if (layer, head * self.group + g) in self.scan_heads]
            if not members:
                continue
            if self.probe is not None:  # calibration: each query head on its own
                each = [self._scan(layer, head, queries[head, g * n : (g + 1) * n]) for g in members]
                for g, best in zip(members, each):
                    self.probe(layer, head * self.group + g, best)
                best = np.max(np.stack(each), axis=0)
            else:
                best = self._scan_score(self._scan_rows(layer, head, mx.concatenate([queries[head, g * n : (g + 1) * n] for g in members])))
            scanned[head] = best
            # Standardised over the whole scope, a retrieval head's scores add up in a
            # tally of their own (as the torch backend).
            standard = (best - best.mean()) / max(float(best.std(ddof=1)), 1e-6)
            self.scan_votes += np.maximum(standard, 0).astype(np.float64)
            if s.carry_blocks:
                layer_votes += np.maximum(standard - s.carry_threshold, 0).astype(np.float64)
        hits = layer_hits(self.scan_votes, s)
        decided = decided_blocks(hits, s, n_blocks)
        if decided is not None:
            self._read_decided(layer, decided, rotary)
            self.votes += layer_votes
            return
        if shortlist < n_blocks:
            bound = np.empty((self.kv_heads, n_blocks), dtype=np.float32)  # the scans, else the bound
            for head, best in scanned.items():
                bound[head] = best
            bounded = [h for h in range(self.kv_heads) if h not in scanned]
            if bounded:
                pairs = mx.array(self.scope.bound_pairs(layer)[bounded]).astype(mx.float32)  # (h, NB, 2D): [max | min]
                # max over the block of q·k ≤ Σ_c max(q_c·min_c, q_c·max_c) = q⁺·max + q⁻·min
                rows = queries[mx.array(bounded)]
                signed = mx.concatenate([mx.maximum(rows, 0), mx.minimum(rows, 0)], axis=2)  # (h, J, 2D)
                bound[bounded] = np.array((pairs @ signed.transpose(0, 2, 1)).max(axis=2))
            keep = max(1, shortlist // 2)
            # The `keep` best blocks per head (as a set: candidates are sorted below).
            top = np.argpartition(-bound, keep - 1, axis=1)[:, :keep]  # (Hkv, keep)
            # Each candidate brings the blocks after it: text runs across block edges.
            paired = np.concatenate([top] + [np.minimum(top + i, n_blocks - 1) for i in range(1, s.neighbours + 1)], axis=1)
            candidates = [np.unique(paired[h]) for h in range(self.kv_heads)]
            self.stats.blocks_bounded += n_blocks * len(bounded)
        else:
            candidates = [np.arange(n_blocks)] * self.kv_heads
        real_lse = self._real_logmass(layer, q, positions, rotary, scale) if s.budget_share == "total" else None
        carried = self._carried()
        per_head = []
        for head in range(self.kv_heads):
            blocks = candidates[head]
            if len(carried):
                blocks = np.union1d(blocks, carried)
            keys, values, owner = self.scope.gather(layer, head, blocks)
            self.stats.blocks_scored_exactly += len(blocks)
            self.stats.bytes_gathered += keys.nbytes + values.nbytes
            chosen = self._budget(
                queries[head],
                keys,
                owner,
                blocks,
                None if real_lse is None else real_lse[head],
                carried,
                None if head in scanned else layer_votes,
                hits,
            )
            keep_tokens = np.isin(owner, chosen)
            per_head.append((keys[keep_tokens], values[keep_tokens], owner[keep_tokens]))
            self.stats.blocks_selected.append(len(chosen))
        self.stats.selected[layer] = [np.unique(o) for _, _, o in per_head]
        self.memory[layer] = self._place(per_head, rotary)
        self.votes += layer_votes

    def _read_decided(self, layer: int, blocks: np.ndarray, rotary: Rotary) -> None:
        """Every head of `layer` attends to `blocks` (decided_blocks): only they are read."""
        per_head = []
        for head in range(self.kv_heads):
            keys, values, owner = self.scope.gather(layer, head, blocks)
            self.stats.bytes_gathered += keys.nbytes + values.nbytes
            per_head.append((keys, values, owner))
            self.stats.blocks_selected.append(len(blocks))
        self.stats.selected[layer] = [blocks] * self.kv_heads
        self.memory[layer] = self._place(per_head, rotary)

    def _scan(self, layer: int, head: int, queries: mx.array) -> np.ndarray:
        """Every block's best single match (max over its tokens and the queries) in
        fp32: (n_blocks,) fp32."""
        return self._scan_rows(layer, head, queries).max(axis=0)

    def _scan_rows(self, layer: int, head: int, queries: mx.array) -> np.ndarray:
        """Each query's best match in every block (max over the block's tokens), from
        the scope's resident bfloat16 keys (block_size rows a block): (J, n_blocks) fp32."""
        bits = self.scope.head_keys(layer, head)
        size = self.scope.block_size
        chunk = max(1, SCAN_CHUNK // size) * size
        rows = np.empty((queries.shape[0], self.scope.n_blocks), dtype=np.float32)
        for start in range(0, len(bits), chunk):
            keys = mx.array(bits[start : start + chunk]).view(mx.bfloat16).astype(mx.float32)
            scores = queries @ keys.T  # (J, chunk)
            rows[:, start // size : (start + keys.shape[0]) // size] = np.array(scores.reshape(scores.shape[0], -1, size).max(axis=2))
        self.stats.tokens_scanned += self.scope.total_tokens  # padding rows are not tokens
        return rows

    def _scan_score(self, rows: np.ndarray) -> np.ndarray:
        """A scanned block's score under `scan_score` (as the torch backend): (n_blocks,)."""
        s = self.settings
        if s.scan_score == "best":
            return rows.max(axis=0)
        return cover_scores(rows, s.scan_threshold)

    def _carried(self) -> np.ndarray:
        """Global ids of the blocks the layers so far agree on (carry_blocks) and of
        those the retrieval heads' scans rate highest together (scan_carry), with
        their successors, sorted; empty when neither tally has a winner yet."""
        s = self.settings
        tops = []
        for tally, wanted in ((self.votes, s.carry_blocks), (self.scan_votes, s.scan_carry)):
            count = min(wanted, int((tally > 0).sum()))
            if count:
                tops.append(np.argsort(-tally, kind="stable")[:count])
        if not tops:
            return np.zeros(0, dtype=np.int64)
        top = np.concatenate(tops)
        following = [np.minimum(top + i, self.scope.n_blocks - 1) for i in range(s.neighbours + 1)]
        return np.unique(np.concatenate(following))

    def _real_logmass(self, layer: int, q: mx.array, positions: np.ndarray, rotary: Rotary, scale: float) -> np.ndarray:
        """log Σ exp(q·k) of the selection queries over the real tokens they see
        (sinks and the question so far), at their true positions: (Hkv, G·n)."""
        n = self._query_count(positions)
        grouped = self._grouped(q[:, -n:], positions[-n:], rotary, scale)
        end = self.real.length + q.shape[1]
        keys = self.real.keys[layer][0, :, :end].astype(mx.float32)  # (Hkv, S, D)
        scores = grouped @ keys.transpose(0, 2, 1)  # (Hkv, G·n, S)
        query_index = np.tile(np.arange(end - n, end), self.group)
        allowed = np.arange(end)[None, :] <= query_index[:, None]
        return np.array(mx.logsumexp(mx.where(mx.array(allowed), scores, -mx.inf), axis=-1))

    def _budget(
        self,
        queries: mx.array,
        keys: np.ndarray,
        owner: np.ndarray,
        blocks: np.ndarray,
        real_lse: np.ndarray | None,
        carried: np.ndarray | None = None,
        votes: np.ndarray | None = None,
        hits: np.ndarray | None = None,
    ) -> np.ndarray:
        """Global block ids to attend, by the budget rule (SparseSettings): the
        question's `hits` first ("tally"), then the `carried` blocks, then this
        head's own ranking; adds this head's standardised scores to `votes`."""
        s = self.settings
        covered = s.budget == "fixed" or (s.budget == "mass" and s.mass >= 1.0)
        if len(blocks) <= s.min_blocks or (covered and len(blocks) <= s.max_blocks):
            return blocks
        scores = queries @ mx.array(keys).T  # (J, N)
        local = _block_index(owner)  # (N,) in [0, B)
        # Rank by the best single match (max over the block's tokens and the queries):
        # a needle is one strong match; softmax mass favours blocks of many mild ones.
        best = np.full(len(blocks), -np.inf, dtype=np.float32)
        np.maximum.at(best, local, np.array(scores.max(axis=0)))
        if votes is not None and s.carry_blocks:
            # Unbiased standard deviation, as torch.std computes it.
            standard = (best - best.mean()) / max(float(best.std(ddof=1)), 1e-6)
            np.add.at(votes, blocks, np.maximum(standard - s.carry_threshold, 0).astype(np.float64))
        order = np.argsort(-best, kind="stable")
        if carried is not None and len(carried):
            # The vote's winners go first; the head's own ranking fills the rest.
            first = np.isin(blocks, carried)
            order = np.concatenate([order[first[order]], order[~first[order]]])
        if s.budget != "mass":
            return rule_selection(blocks, order, hits, s)
        top = scores.max(axis=1, keepdims=True)  # (J, 1)
        if real_lse is not None:
            top = mx.maximum(top, mx.array(real_lse)[:, None])
        weights = mx.exp(scores - top)  # (J, N)
        # Σ over each block's tokens, as a scatter-add along the token axis: (B, J) → (J, B).
        per_block = np.array(mx.zeros((len(blocks), weights.shape[0])).at[mx.array(local)].add(weights.T)).T
        if real_lse is None:
            # Share of the attention that goes to memory.
            shares = per_block / per_block.sum(axis=1, keepdims=True)
            cumulative = np.cumsum(shares.mean(axis=0)[order])
            reached = int(np.searchsorted(cumulative, np.float32(s.mass * 0.99999))) + 1
        else:
            # Share of all attention (sinks and question included): stop once what
            # is left out weighs at most 1 − mass of it.
            real = np.exp(real_lse - np.array(top)[:, 0])[:, None]  # (J, 1)
            shares = per_block / (per_block.sum(axis=1, keepdims=True) + real)
            left_out = (shares.sum(axis=1, keepdims=True) - np.cumsum(shares[:, order], axis=1)).mean(axis=0)  # (B,)
            reached = int(np.searchsorted(-left_out, np.float32(-(1 - s.mass)))) + 1
        count = max(s.min_blocks, min(s.max_blocks, reached))
        return np.sort(with_successors(blocks, order, count, s.neighbours))

    def _place(self, per_head: list[tuple[np.ndarray, np.ndarray, np.ndarray]], rotary: Rotary) -> PlacedMemory:
        """Rotate each head's selected keys to their positions and pad heads to one length."""
        M = max(1, max(len(k) for k, _, _ in per_head))
        D, dtype = self.head_dim, self.model.dtype
        keys, values = [], []
        valid = np.zeros((self.kv_heads, M), dtype=bool)
        cited = np.zeros((self.kv_heads, M), dtype=bool)
        owners = np.zeros((self.kv_heads, M), dtype=np.int64)
        for head, (k, v, owner) in enumerate(per_head):
            n = len(k)
            padding = np.zeros((M - n, D), dtype=np.float32)
            if n == 0:
                keys.append(mx.array(padding))
                values.append(mx.array(padding))
                continue
            within = np.arange(n) - np.searchsorted(owner, owner, side="left")
            if self.settings.positions == "ordered":
                positions = np.arange(self.question_start - n, self.question_start)
            elif self.settings.positions == "block":
                # Each block at the same distance, its tokens in their own order.
                positions = self.question_start - self.settings.memory_distance - self.scope.block_size + within
            else:
                positions = np.full(n, self.question_start - self.settings.memory_distance)
            rotated = rotary.rotate_at(mx.array(k).reshape(1, n, 1, D), positions)  # (1, n, 1, D)
            keys.append(mx.concatenate([rotated.reshape(n, D), mx.array(padding)]))
            values.append(mx.array(np.concatenate([v, padding])))
            valid[head, :n] = True
            owners[head, :n] = owner
            # A segment's first tokens draw attention the way sinks do, whatever
            # they say: attend to them, but do not count them as evidence.
            starts = self.scope.local_block[owner] == 0
            cited[head, :n] = ~(starts & (within < SEGMENT_SINK_TOKENS))
        return PlacedMemory(
            keys=mx.stack(keys)[None].astype(dtype),  # (1, Hkv, M, D)
            values=mx.stack(values)[None].astype(dtype),
            valid=valid,
            cited=valid & cited,
            owners=owners,
        )

    # -- attention ---------------------------------------------------------------

    def _attend_with_memory(
        self, layer: int, q: mx.array, keys: mx.array, values: mx.array, past: int, scale: float
    ) -> mx.array:
        """q (1, Hq, T, D) over real keys (1, Hkv, S, D) and this layer's memory."""
        memory = self.memory[layer]
        T, S, M = q.shape[2], keys.shape[2], memory.keys.shape[2]
        Hkv, G, D = self.kv_heads, self.group, self.head_dim
        grouped = q[0].astype(mx.float32).reshape(Hkv, G * T, D)  # rows: head-in-group major, token minor
        all_keys = mx.concatenate([keys[0], memory.keys[0]], axis=1).astype(mx.float32)  # (Hkv, S+M, D)
        all_values = mx.concatenate([values[0], memory.values[0]], axis=1).astype(mx.float32)
        scores = (grouped @ all_keys.transpose(0, 2, 1)) * scale  # (Hkv, G·T, S+M)
        query_index = np.tile(np.arange(past, past + T), G)  # (G·T,)
        real_ok = np.arange(S)[None, :] <= query_index[:, None]  # (G·T, S)
        memory_ok = memory.valid[:, None, :] & (query_index >= self.prefix_len)[None, :, None]  # (Hkv, G·T, M)
        allowed = np.concatenate([np.broadcast_to(real_ok, (Hkv, G * T, S)), memory_ok], axis=2)
        scores = mx.where(mx.array(allowed), scores, -mx.inf)
        weights = mx.softmax(scores, axis=-1, precise=True)
        out = weights @ all_values  # (Hkv, G·T, D)
        counted = np.flatnonzero(query_index >= self.evidence_from)
        if len(counted):
            mass = np.array(weights[:, mx.array(counted), S:].sum(axis=1)).astype(np.float64)  # (Hkv, M)
            np.add.at(self.evidence, memory.owners[memory.cited], mass[memory.cited])
        return out.reshape(1, Hkv * G, T, D).astype(q.dtype)
