"""Corpus memory for the torch backend: capturing segment keys and values at build
time, and block-sparse attention over the cached corpus at question time.

Build: a segment is prefilled after the shared prefix (the attention sinks), and
each global-attention layer's keys are captured *before* RoPE (interleaved pair
layout, see layers.interleave_rotary_rows), so that a question can place them at
any position.

Ask: `MemoryAttentionCache` stands in for the dense KV cache. The prompt's real
tokens are the prefix (positions 0..P-1) and the question (positions from
`question_start` on); between them sits a virtual memory region. At each global
layer, the first pass that holds question tokens selects blocks per KV head:
  1. bound pass: an upper bound of q·k per block from per-channel key min/max
     (Quest, Tang et al. 2024), for every block in scope; for the KV heads of the
     model's retrieval heads (engine/corpus/retrieval.py), instead, an exact scan of
     every key held in RAM with those query heads' queries, whose clear winners also
     vote for every later layer;
  2. exact pass over a shortlist: token-level scores, softmax mass per block;
  3. dynamic budget: the smallest set of blocks reaching `mass` of the estimated
     attention, clamped to [min_blocks, max_blocks];
then gathers those blocks, rotates them to their positions and attends over
sinks + memory + question. Scoring uses the fixed-distance rotation of InfLLM
(Xiao et al. 2024): every memory key at one distance before the question.
Positions for attention follow `SparseSettings.positions`: "fixed" (InfLLM: every
memory token at one position), "block" (every block at one distance, its tokens in
their own order) or "ordered" (the selected blocks in corpus order, packed just
before the question).
Decoding reuses the selection, or refreshes it every `refresh_every` steps from
the newest token's queries. The attention mass each memory block receives from
the last prompt token on is accumulated as evidence.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from engine.backends.torch.kv_cache import DenseKVCache
from engine.backends.torch.layers import Rotary, apply_rope, attend
from engine.backends.torch.models.llama import DecoderModel
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

# Keys per matmul in the scan of a retrieval head (the score tile stays ~ 8 MB per 32 queries).
SCAN_CHUNK = 65_536


def decode_keys(stored: torch.Tensor, low: torch.Tensor, high: torch.Tensor, levels: int | None) -> torch.Tensor:
    """engine/corpus/store.py's decode_keys in torch, op for op (the same float32
    bits): stored (..., block_size, D or D/2), low/high (..., D) f16 → float32."""
    if levels is None:
        return stored.float()
    if levels == 15:
        stored = torch.stack((stored & 0x0F, stored >> 4), dim=-1).flatten(-2)
    decoded = stored.float()
    low32 = low.float().unsqueeze(-2)
    decoded *= (high.float().unsqueeze(-2) - low32) / levels
    decoded += low32
    return decoded


def cover_scores(rows: torch.Tensor, threshold: float) -> torch.Tensor:
    """rows (J, n_blocks): each query's best match per block. Each row standardised
    over the blocks; a block's score is the sum over the rows of how far it stands
    above `threshold` standard deviations (SparseSettings.scan_score "cover")."""
    standard = (rows - rows.mean(dim=1, keepdim=True)) / rows.std(dim=1, keepdim=True).clamp(min=1e-6)
    return (standard - threshold).clamp(min=0).sum(dim=0)


# --- build ---------------------------------------------------------------------


class CaptureCache(DenseKVCache):
    """A dense cache that also keeps the pre-RoPE keys and the values of the tokens
    from `capture_from` on, for the layers in `layers`."""

    def __init__(self, model: DecoderModel, capacity: int, layers: Sequence[int]) -> None:
        c = model.config
        super().__init__(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, capacity, model.dtype, model.device)
        self.layers = set(layers)
        self.capture_from = 0  # index within the next forward pass's tokens
        self.captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend_layer(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
        if layer in self.layers:
            start = self.capture_from
            # (1, T, H, D) → (H, T', D): the segment's own tokens, before rotation.
            self.captured[layer] = (k[0, start:].transpose(0, 1).float(), v[0, start:].transpose(0, 1).float())
        return super().attend_layer(layer, q, k, v, **kwargs)


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
        keys = torch.stack([self.cache.captured[i][0] for i in self.layers])  # (L, H, T, D)
        values = torch.stack([self.cache.captured[i][1] for i in self.layers])
        self.cache.captured = {}
        return keys.cpu().numpy(), values.cpu().numpy()


def append_stored(model: DecoderModel, cache: DenseKVCache, layers: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    """Append T tokens read from the corpus cache to a dense cache, as if they had been
    prefilled there: for every layer, keys (before RoPE) and values (Hkv, T, D)
    float32, the keys rotated to the cache's next T positions (RoPE is relative, so a
    passage's keys read the same wherever it is placed)."""
    start, T = cache.length, layers[0][0].shape[1]
    if start + T > cache.capacity:
        raise ValueError(f"KV cache full: {start + T} tokens > capacity {cache.capacity}")
    for layer, (keys, values) in enumerate(layers):
        target = cache.keys[layer]
        k = torch.from_numpy(keys).to(target.device).transpose(0, 1).unsqueeze(0)  # (1, T, Hkv, D)
        rotated = apply_rope(k, model.rotary_for(layer).rotations(start, T).to(target.device))
        target[:, :, start : start + T] = rotated.transpose(1, 2).to(target.dtype)
        cache.values[layer][:, :, start : start + T] = torch.from_numpy(values).to(target.device, target.dtype).unsqueeze(0)
    cache.advance(T)


# --- ask -----------------------------------------------------------------------


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
        self.device = model.device
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
        self.real = DenseKVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, capacity, model.dtype, self.device)
        # layer → keys (1, Hkv, M, D) rotated, values (1, Hkv, M, D), cited, valid (Hkv, M), block ids (Hkv, M)
        self.memory: dict[int, tuple[torch.Tensor, ...]] = {}
        self.evidence = torch.zeros(scope.n_blocks, dtype=torch.float64, device=self.device)
        self.votes = torch.zeros(scope.n_blocks, dtype=torch.float64, device=self.device)  # cross-layer vote (carry_blocks)
        self.scan_votes = torch.zeros_like(self.votes)  # the retrieval heads' own tally (scan_carry)
        self.evidence_from = capacity  # query index from which attention counts as evidence
        self.stats = SelectionStats()
        self.decode_steps = 0
        # (layer, query head) pairs whose queries score every block exactly (retrieval
        # heads, engine/corpus/retrieval.py); `probe` sees each one's scores (calibration).
        self.scan_heads = {(int(layer), int(head)) for layer, head in scan_heads}
        self.probe = probe
        # Ranking passes over the whole scope (the bound pass, the retrieval heads'
        # scans) multiply in bfloat16 where the model runs in it, i.e. where this
        # machine multiplies bf16 fast (a GPU, a CPU with AVX512-BF16 or AMX): 4-5x
        # faster than fp32 here, scores within ~1% (they only rank blocks; the
        # budget and attention stay in fp32).
        self.rank_dtype = torch.bfloat16 if model.dtype == torch.bfloat16 else torch.float32

    @property
    def length(self) -> int:
        return self.real.length

    def evidence_weights(self) -> np.ndarray:
        """Attention mass per scope block so far, (n_blocks,) float64."""
        return self.evidence.cpu().numpy()

    def scan_tally(self) -> np.ndarray:
        """The retrieval heads' tally so far (the sum of their standardised scores per
        scope block), (n_blocks,) float64: what `layer_hits` singles blocks out by."""
        return self.scan_votes.cpu().numpy()

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        """A numpy array as a tensor on the model's device (no copy on the CPU)."""
        return torch.from_numpy(array).to(self.device)

    def _resident(self, key: tuple, make: Callable[[], np.ndarray]) -> torch.Tensor:
        """An array of the scope's index as a tensor on the model's device, copied
        there once while the scope stays open (on the CPU, a view of the array)."""
        if self.device.type == "cpu":
            return torch.from_numpy(make())
        resident = self.scope.resident
        if key not in resident:
            resident[key] = torch.from_numpy(make()).to(self.device)
        return resident[key]

    def advance(self, tokens: int) -> None:
        self.real.advance(tokens)
        if tokens == 1:
            self.decode_steps += 1

    def truncate(self, length: int) -> None:
        self.real.truncate(length)

    def positions(self, start: int, count: int) -> torch.Tensor:
        index = torch.arange(start, start + count, device=self.device)
        return torch.where(index < self.prefix_len, index, index - self.prefix_len + self.question_start)

    def attend_layer(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        rotary: Rotary,
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        past, T = self.real.length, q.shape[1]
        positions = self.positions(past, T)
        rotations = rotary.rotations_at(positions)
        q_rot = apply_rope(q, rotations).transpose(1, 2)  # (1, Hq, T, D)
        k_rot = apply_rope(k, rotations).transpose(1, 2)  # (1, Hkv, T, D)
        keys, values = self.real.append(layer, k_rot, v.transpose(1, 2))
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
        return max(1, min(self.settings.selection_queries, int((positions >= self.question_start).sum())))

    def _selection_queries(self, q: torch.Tensor, positions: torch.Tensor, rotary: Rotary, scale: float) -> torch.Tensor:
        """The last question queries, rotated as if every memory key sat
        `memory_distance` before the question: (Hkv, G·n, D) fp32, scaled."""
        n = self._query_count(positions)
        anchor = self.question_start - self.settings.memory_distance
        return self._grouped(q[:, -n:], rotary.rotations_at(positions[-n:] - anchor), scale)

    def _grouped(self, q: torch.Tensor, rotations: torch.Tensor, scale: float) -> torch.Tensor:
        """Queries (1, n, Hq, D) rotated and gathered per KV head: (Hkv, G·n, D) fp32, scaled."""
        n = q.shape[1]
        rotated = apply_rope(q.float(), rotations)[0]  # (n, Hq, D)
        grouped = rotated.view(n, self.kv_heads, self.group, self.head_dim).permute(1, 2, 0, 3)
        return grouped.reshape(self.kv_heads, self.group * n, self.head_dim) * scale

    def _select(self, layer: int, q: torch.Tensor, positions: torch.Tensor, rotary: Rotary, scale: float) -> None:
        if self.read_blocks is not None:
            self._read_decided(layer, self.read_blocks, rotary)
            return
        s = self.settings
        queries = self._selection_queries(q, positions, rotary, scale)  # (Hkv, J, D)
        n_blocks = self.scope.n_blocks
        shortlist = min(n_blocks, s.shortlist_factor * s.max_blocks)
        layer_votes = torch.zeros_like(self.votes)
        scanned: dict[int, torch.Tensor] = {}
        n = queries.shape[1] // self.group  # rows per query head (head-in-group major)
        for head in range(self.kv_heads):
            members = [g for g in range(self.group) if (layer, head * self.group + g) in self.scan_heads]
            if not members:
                continue
            if self.probe is not None:  # calibration: each query head on its own
                each = [self._scan(layer, head, queries[head, g * n : (g + 1) * n]) for g in members]
                for g, best in zip(members, each):
                    self.probe(layer, head * self.group + g, best.cpu().numpy())
                best = torch.stack(each).amax(dim=0)
            else:
                best = self._scan_score(self._scan_rows(layer, head, torch.cat([queries[head, g * n : (g + 1) * n] for g in members])))
            scanned[head] = best
            # Standardised over the whole scope, a retrieval head's scores add up in a
            # tally of their own: a block that several scans rate high is carried
            # (scan_carry) whatever the shortlist heads' vote says.
            standard = (best - best.mean()) / best.std().clamp(min=1e-6)
            self.scan_votes += standard.clamp(min=0).double()
            if s.carry_blocks:
                layer_votes += (standard - s.carry_threshold).clamp(min=0).double()
        hits = layer_hits(self.scan_votes.cpu().numpy(), s)
        decided = decided_blocks(hits, s, n_blocks)
        if decided is not None:
            self._read_decided(layer, decided, rotary)
            self.votes += layer_votes
            return
        if shortlist < n_blocks:
            first = torch.empty(self.kv_heads, n_blocks, device=self.device)  # (Hkv, NB): the scans, else the bound
            for head, best in scanned.items():
                first[head] = best
            bounded = [h for h in range(self.kv_heads) if h not in scanned]
            if bounded:
                pairs = self._bound_pairs(layer, bounded)  # (h, NB, 2D): [max | min]
                # max over the block of q·k ≤ Σ_c max(q_c·min_c, q_c·max_c) = q⁺·max + q⁻·min
                signed = torch.cat([queries[bounded].clamp(min=0), queries[bounded].clamp(max=0)], dim=2)  # (h, J, 2D)
                bound = torch.bmm(pairs.to(self.rank_dtype), signed.transpose(1, 2).to(self.rank_dtype))
                first[bounded] = bound.amax(dim=2).float()
            top = first.topk(max(1, shortlist // 2), dim=1).indices  # (Hkv, shortlist/2)
            # Each candidate brings the blocks after it: text runs across block edges.
            paired = torch.cat([top] + [(top + i).clamp(max=n_blocks - 1) for i in range(1, s.neighbours + 1)], dim=1)
            candidates = [torch.unique(paired[h]) for h in range(self.kv_heads)]
            self.stats.blocks_bounded += n_blocks * len(bounded)
        else:
            candidates = [torch.arange(n_blocks)] * self.kv_heads  # on the CPU: read as numpy below
        real_lse = self._real_logmass(layer, q, positions, rotary, scale) if s.budget_share == "total" else None
        carried = self._carried()
        per_head = []
        for head in range(self.kv_heads):
            blocks = candidates[head].cpu().numpy()
            if len(carried):
                blocks = np.union1d(blocks, carried)
            keys, values, owner = self.scope.gather(layer, head, blocks)
            self.stats.blocks_scored_exactly += len(blocks)
            self.stats.bytes_gathered += keys.nbytes + values.nbytes
            keys_t, values_t = self._tensor(keys), self._tensor(values)
            owner_t = self._tensor(owner)
            chosen = self._budget(
                queries[head],
                keys_t,
                owner_t,
                blocks,
                None if real_lse is None else real_lse[head],
                carried,
                None if head in scanned else layer_votes,
                hits,
            )
            keep = torch.isin(owner_t, self._tensor(chosen))
            per_head.append((keys_t[keep], values_t[keep], owner_t[keep]))
            self.stats.blocks_selected.append(len(chosen))
        self.stats.selected[layer] = [np.unique(o.cpu().numpy()) for _, _, o in per_head]
        self.memory[layer] = self._place(per_head, rotary)
        self.votes += layer_votes

    def _read_decided(self, layer: int, blocks: np.ndarray, rotary: Rotary) -> None:
        """Every head of `layer` attends to `blocks` (decided_blocks): only they are read."""
        per_head = []
        for head in range(self.kv_heads):
            keys, values, owner = self.scope.gather(layer, head, blocks)
            self.stats.bytes_gathered += keys.nbytes + values.nbytes
            per_head.append((self._tensor(keys), self._tensor(values), self._tensor(owner)))
            self.stats.blocks_selected.append(len(blocks))
        self.stats.selected[layer] = [blocks] * self.kv_heads
        self.memory[layer] = self._place(per_head, rotary)

    def _scan(self, layer: int, head: int, queries: torch.Tensor) -> torch.Tensor:
        """Every block's best single match (max over its tokens and the queries) in
        fp32: (n_blocks,) fp32."""
        return self._scan_rows(layer, head, queries).amax(dim=0)

    def _scan_rows(self, layer: int, head: int, queries: torch.Tensor) -> torch.Tensor:
        """Each query's best match in every block (max over the block's tokens), from
        the head's bfloat16 keys (block_size rows a block): (J, n_blocks) fp32."""
        queries = queries.to(self.device, self.rank_dtype)
        size = self.scope.block_size
        rows = torch.empty(queries.shape[0], self.scope.n_blocks, device=self.device)
        for first, keys in self._key_steps(layer, head):
            scores = queries @ keys.to(self.rank_dtype).T  # (J, rows)
            rows[:, first : first + scores.shape[1] // size] = scores.view(len(scores), -1, size).amax(dim=2).float()
        self.stats.tokens_scanned += self.scope.total_tokens  # padding rows are not tokens
        return rows

    def _key_steps(self, layer: int, head: int) -> Iterator[tuple[int, torch.Tensor]]:
        """A scanned head's keys in bfloat16, in steps: (first block, rows): the
        scope's `head_keys` (resident on the device once, elsewhere than the CPU); on
        the CPU, keys the scope has not loaded yet are decoded here from its stored
        codes (scope.code_steps) with the question's threads: the same bits."""
        if self.device.type == "cpu" and not self.scope.loaded(("keys", layer, head)):
            levels = self.scope.levels
            for first, stored, low, high in self.scope.code_steps(layer, head):
                keys = decode_keys(torch.from_numpy(stored), torch.from_numpy(low), torch.from_numpy(high), levels)
                yield first, keys.to(torch.bfloat16).view(-1, keys.shape[-1])
            return
        keys = self._resident(("keys", layer, head), lambda: self.scope.head_keys(layer, head))
        size = self.scope.block_size
        chunk = max(1, SCAN_CHUNK // size) * size
        for start in range(0, len(keys), chunk):
            yield start // size, keys[start : start + chunk].view(torch.bfloat16)

    def _bound_pairs(self, layer: int, heads: list[int]) -> torch.Tensor:
        """(len(heads), n_blocks, 2·D) bound pairs of `layer` (scope.bound_pairs). On
        the CPU the scope copies them from its index, or streams this layer's when
        the index is not loaded; elsewhere every layer's is resident on the device."""
        if self.device.type == "cpu":
            return torch.from_numpy(self.scope.layer_bound_pairs(layer, heads))
        return self._resident(("bounds", layer), lambda: self.scope.bound_pairs(layer))[heads]

    def _scan_score(self, rows: torch.Tensor) -> torch.Tensor:
        """A scanned block's score under `scan_score` (SparseSettings): (n_blocks,)."""
        s = self.settings
        if s.scan_score == "best":
            return rows.amax(dim=0)
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
                tops.append(torch.topk(tally, count).indices.cpu().numpy())
        if not tops:
            return np.zeros(0, dtype=np.int64)
        top = np.concatenate(tops)
        following = [np.minimum(top + i, self.scope.n_blocks - 1) for i in range(s.neighbours + 1)]
        return np.unique(np.concatenate(following))

    def _real_logmass(self, layer: int, q: torch.Tensor, positions: torch.Tensor, rotary: Rotary, scale: float) -> torch.Tensor:
        """log Σ exp(q·k) of the selection queries over the real tokens they see
        (sinks and the question so far), at their true positions: (Hkv, G·n)."""
        n = self._query_count(positions)
        grouped = self._grouped(q[:, -n:], rotary.rotations_at(positions[-n:]), scale)
        end = self.real.length + q.shape[1]
        keys = self.real.keys[layer][0, :, :end].float()  # (Hkv, S, D)
        scores = torch.bmm(grouped, keys.transpose(1, 2))  # (Hkv, G·n, S)
        query_index = torch.arange(end - n, end, device=self.device).repeat(self.group)
        allowed = torch.arange(end, device=self.device).unsqueeze(0) <= query_index.unsqueeze(1)
        return torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1)

    def _budget(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        owner: torch.Tensor,
        blocks: np.ndarray,
        real_lse: torch.Tensor | None,
        carried: np.ndarray | None = None,
        votes: torch.Tensor | None = None,
        hits: np.ndarray | None = None,
    ) -> np.ndarray:
        """Global block ids to attend, by the budget rule (SparseSettings): the
        question's `hits` first ("tally"), then the `carried` blocks, then this
        head's own ranking; adds this head's standardised scores to `votes`."""
        s = self.settings
        covered = s.budget == "fixed" or (s.budget == "mass" and s.mass >= 1.0)
        if len(blocks) <= s.min_blocks or (covered and len(blocks) <= s.max_blocks):
            return blocks
        scores = queries @ keys.T  # (J, N)
        _, local = torch.unique_consecutive(owner, return_inverse=True)
        # Rank by the best single match (max over the block's tokens and the queries):
        # a needle is one strong match; softmax mass favours blocks of many mild ones.
        best = torch.full((len(blocks),), float("-inf"), device=self.device).scatter_reduce_(0, local, scores.amax(dim=0), "amax")
        if votes is not None and s.carry_blocks:
            standard = (best - best.mean()) / best.std().clamp(min=1e-6)
            votes.index_add_(0, self._tensor(blocks), (standard - s.carry_threshold).clamp(min=0).double())
        order = torch.argsort(best, descending=True)
        if carried is not None and len(carried):
            # The vote's winners go first; the head's own ranking fills the rest.
            first = self._tensor(np.isin(blocks, carried))
            order = torch.cat([order[first[order]], order[~first[order]]])
        if s.budget != "mass":
            return rule_selection(blocks, order.cpu().numpy(), hits, s)
        top = scores.amax(dim=1, keepdim=True)  # (J, 1)
        if real_lse is not None:
            top = torch.maximum(top, real_lse.unsqueeze(1))
        weights = torch.exp(scores - top)
        per_block = torch.zeros(queries.shape[0], len(blocks), device=self.device).index_add_(1, local, weights)  # (J, B)
        if real_lse is None:
            # Share of the attention that goes to memory.
            shares = per_block / per_block.sum(dim=1, keepdim=True)
            reached = int(torch.searchsorted(torch.cumsum(shares.mean(dim=0)[order], 0), torch.tensor(s.mass * 0.99999, device=self.device))) + 1
        else:
            # Share of all attention (sinks and question included): stop once what
            # is left out weighs at most 1 − mass of it.
            shares = per_block / (per_block.sum(dim=1, keepdim=True) + torch.exp(real_lse - top[:, 0]).unsqueeze(1))
            left_out = (shares.sum(dim=1, keepdim=True) - torch.cumsum(shares[:, order], dim=1)).mean(dim=0)  # (B,)
            reached = int(torch.searchsorted(-left_out, torch.tensor(-(1 - s.mass), device=self.device))) + 1
        count = max(s.min_blocks, min(s.max_blocks, reached))
        return np.sort(with_successors(blocks, order.cpu().numpy(), count, s.neighbours))

    def _place(self, per_head: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], rotary: Rotary):
        """Rotate each head's selected keys to their positions and pad heads to one length."""
        M = max(1, max(len(k) for k, _, _ in per_head))
        D, dtype = self.head_dim, self.model.dtype
        on = self.device
        keys = torch.zeros(1, self.kv_heads, M, D, dtype=dtype, device=on)
        values = torch.zeros(1, self.kv_heads, M, D, dtype=dtype, device=on)
        valid = torch.zeros(self.kv_heads, M, dtype=torch.bool, device=on)
        cited = torch.zeros(self.kv_heads, M, dtype=torch.bool, device=on)
        owners = torch.zeros(self.kv_heads, M, dtype=torch.long, device=on)
        for head, (k, v, owner) in enumerate(per_head):
            n = len(k)
            if n == 0:
                continue
            if self.settings.positions == "ordered":
                positions = torch.arange(self.question_start - n, self.question_start, device=on)
            elif self.settings.positions == "block":
                # Each block at the same distance, its tokens in their own order.
                within = torch.arange(n, device=on) - torch.searchsorted(owner, owner, side="left")
                positions = self.question_start - self.settings.memory_distance - self.scope.block_size + within
            else:
                positions = torch.full((n,), self.question_start - self.settings.memory_distance, device=on)
            rotated = apply_rope(k.view(1, n, 1, D), rotary.rotations_at(positions))  # (1, n, 1, D)
            keys[0, head, :n] = rotated[0, :, 0].to(dtype)
            values[0, head, :n] = v.to(dtype)
            valid[head, :n] = True
            owners[head, :n] = owner
            # A segment's first tokens draw attention the way sinks do, whatever
            # they say: attend to them, but do not count them as evidence.
            within = torch.arange(n, device=on) - torch.searchsorted(owner, owner, side="left")
            starts = self._tensor(self.scope.local_block[owner.cpu().numpy()] == 0)
            cited[head, :n] = ~(starts & (within < SEGMENT_SINK_TOKENS))
        return keys, values, valid & cited, valid, owners

    # -- attention ---------------------------------------------------------------

    def _attend_with_memory(
        self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, past: int, scale: float
    ) -> torch.Tensor:
        """q (1, Hq, T, D) over real keys (1, Hkv, S, D) and this layer's memory."""
        memory_keys, memory_values, cited, valid, owners = self.memory[layer]
        T, S, M = q.shape[2], keys.shape[2], memory_keys.shape[2]
        Hkv, G, D = self.kv_heads, self.group, self.head_dim
        grouped = q[0].float().reshape(Hkv, G * T, D)  # rows: head-in-group major, token minor
        all_keys = torch.cat([keys[0], memory_keys[0]], dim=1).float()  # (Hkv, S+M, D)
        all_values = torch.cat([values[0], memory_values[0]], dim=1).float()
        scores = torch.bmm(grouped, all_keys.transpose(1, 2)) * scale  # (Hkv, G·T, S+M)
        query_index = torch.arange(past, past + T, device=self.device).repeat(G)  # (G·T,)
        real_ok = torch.arange(S, device=self.device).unsqueeze(0) <= query_index.unsqueeze(1)  # (G·T, S)
        memory_ok = valid.unsqueeze(1) & (query_index >= self.prefix_len).view(1, -1, 1)  # (Hkv, G·T, M)
        allowed = torch.cat([real_ok.expand(Hkv, -1, -1), memory_ok], dim=2)
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        out = torch.bmm(weights, all_values)  # (Hkv, G·T, D)
        counted = query_index >= self.evidence_from
        if bool(counted.any()):
            mass = weights[:, counted, S:].sum(dim=1).double()  # (Hkv, M)
            self.evidence.index_add_(0, owners[cited], mass[cited])
        return out.view(1, Hkv * G, T, D).to(q.dtype)
