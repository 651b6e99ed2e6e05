"""The "tally" budget's parts (engine/corpus/selection.py) on numbers worked by hand,
and the rule in a real question: what the retrieval heads single out is read by
every later layer, and a question with one clear hit reads fewer blocks than the
fixed budget."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.backends.torch import memory
from engine.corpus.engine import Engine
from engine.corpus.scope import CorpusScope
from engine.corpus.selection import decided_blocks, hits_first, question_hits, rule_selection, tally_budget, with_successors
from engine.corpus.settings import SparseSettings
from engine.generate import SamplingParams
from tests.corpus.test_engine import QUESTION, island_document, model  # noqa: F401  (fixture)


def test_hits_are_the_blocks_near_the_best_tally() -> None:
    tally = np.array([0.0, 5.0, 1.0, 4.9, 3.4, 0.0, 3.6])
    assert question_hits(tally, 0.7, 8).tolist() == [1, 3, 6]  # 3.5 is the bar: 3.4 misses it
    assert question_hits(tally, 0.7, 3).tolist() == [1, 3, 6]
    assert question_hits(tally, 0.7, 2).tolist() == []  # more than the limit qualify: nothing stands out
    assert question_hits(tally, 1.0, 8).tolist() == [1]
    assert question_hits(tally, 0.0, 8).tolist() == [1, 3, 6, 4, 2, 0, 5]
    assert question_hits(np.zeros(7), 0.7, 8).tolist() == []  # no scan yet


def test_the_budget_follows_the_hits() -> None:
    assert tally_budget(np.zeros(0, dtype=np.int64), 4, 16, 2) == 16  # nothing singled out: the whole budget
    assert tally_budget(np.array([7]), 4, 16, 2) == 4  # one hit and its two successors, at least the minimum
    assert tally_budget(np.array([7, 20, 40]), 4, 16, 2) == 9
    assert tally_budget(np.array([7, 8]), 4, 16, 2) == 4  # 7, 8, 9, 10: neighbours share successors
    assert tally_budget(np.array([7, 8]), 1, 16, 2) == 4
    assert tally_budget(np.arange(0, 90, 10), 4, 16, 2) == 16


def test_hits_go_first_and_missing_hits_are_skipped() -> None:
    blocks = np.array([2, 5, 7, 9])
    order = np.array([3, 2, 1, 0])  # the head's own ranking: 9, 7, 5, 2
    assert blocks[hits_first(order, blocks, np.array([7, 100, 2]))].tolist() == [7, 2, 9, 5]
    assert hits_first(order, blocks, np.zeros(0, dtype=np.int64)).tolist() == order.tolist()
    # With successors, a count of 4 reads the hit, what follows it, then the next.
    chosen = with_successors(np.arange(10), hits_first(np.arange(10)[::-1], np.arange(10), np.array([4])), 4, 2)
    assert chosen.tolist() == [4, 5, 6, 9]


@pytest.mark.slow
def test_hits_that_fill_the_budget_decide_for_every_head() -> None:
    settings = SparseSettings(min_blocks=4, max_blocks=16, neighbours=2)
    assert decided_blocks(np.array([9, 5]), settings, 100).tolist() == [5, 6, 7, 9, 10, 11]
    assert decided_blocks(np.array([5, 6]), settings, 100).tolist() == [5, 6, 7, 8]  # shared successors
    # A lone hit covers 3 blocks: the block before it tops it up to min_blocks.
    assert decided_blocks(np.array([5]), settings, 100).tolist() == [4, 5, 6, 7]
    assert decided_blocks(np.array([0]), settings, 100) is None  # nothing before the scope's first block
    wide = SparseSettings(min_blocks=6, max_blocks=16, neighbours=2)
    assert decided_blocks(np.array([5]), wide, 100).tolist() == [2, 3, 4, 5, 6, 7]
    assert decided_blocks(np.array([9, 5]), wide, 100).tolist() == [5, 6, 7, 9, 10, 11]
    assert decided_blocks(np.array([40, 98]), settings, 100) is None  # 98 + 2 runs past the scope
    assert decided_blocks(np.zeros(0, np.int64), settings, 100) is None and decided_blocks(None, settings, 100) is None
    # The same blocks a head chooses by the rule from any candidates that hold them.
    rng = np.random.default_rng(0)
    for hits in ([9, 5], [5, 6], [30, 2, 70]):
        candidates = np.union1d(rng.choice(100, 40, replace=False), decided_blocks(np.array(hits), settings, 100))
        order = rng.permutation(len(candidates))
        chosen = rule_selection(candidates, order, np.array(hits), settings)
        assert np.array_equal(chosen, decided_blocks(np.array(hits), settings, 100))


def test_a_question_reads_what_the_scans_single_out(model, tmp_path, monkeypatch):  # noqa: F811
    document = island_document(40)
    engine = Engine(model, cache_root=tmp_path)
    engine.build([document])
    blocks = math.ceil(len(model.tokenizer.encode(document.text)) / 32)
    caches = []
    made = memory.MemoryAttentionCache.__init__

    def keep(self, *args, **kwargs):
        made(self, *args, **kwargs)
        caches.append(self)

    monkeypatch.setattr(memory.MemoryAttentionCache, "__init__", keep)
    reads = []
    gather = CorpusScope.gather

    def record(self, layer, head, blocks):
        reads.append((layer, head, np.asarray(blocks).copy()))
        return gather(self, layer, head, blocks)

    monkeypatch.setattr(CorpusScope, "gather", record)
    engine._retrieval_heads = [(2, 0), (5, 4)]  # scans in layers 2 and 5
    params = SamplingParams(max_new_tokens=4)
    common = dict(min_blocks=2, max_blocks=6, shortlist_factor=1, scan_heads=2)
    mean = {}
    for budget in ("fixed", "tally"):
        reads.clear()
        settings = SparseSettings(budget=budget, hit_ratio=1.0, **common)
        assert blocks > settings.shortlist_factor * settings.max_blocks  # the heads scan
        stats = [e for e in engine.ask_sparse(QUESTION, [document], params, sparse=settings) if type(e).__name__ == "AskStats"][0]
        mean[budget] = stats.mean_blocks_selected
    assert mean["fixed"] == 6.0
    cache = caches[-1]
    best = int(np.argmax(cache.scan_votes.cpu().numpy()))
    layers = sorted(cache.stats.selected)
    per_layer = {layer: [len(s) for s in cache.stats.selected[layer]] for layer in layers}
    # Before the first scan nothing is singled out: the whole budget.
    assert all(per_layer[layer] == [6] * len(per_layer[layer]) for layer in layers if layer < 2), per_layer
    # From the scan on, one hit (hit_ratio 1.0) and its two successors; the hit of the
    # final tally is read by every head of every layer after the last scan.
    assert all(n == 3 for layer in layers if layer >= 2 for n in per_layer[layer]), per_layer
    assert all(best in chosen for layer in layers if layer > 5 for chosen in cache.stats.selected[layer])
    assert mean["tally"] < mean["fixed"]
    # The hit and its successors fill the budget (3 ≥ min_blocks 2), so from the first
    # scan on each head reads just them: no shortlist is gathered to be ranked.
    prefill = reads[: cache.kv_heads * len(layers)]  # the question's reads, before any decoding
    assert sorted({layer for layer, _, _ in prefill}) == layers
    for layer, head, blocks in prefill:
        if layer >= 2:
            assert np.array_equal(blocks, cache.stats.selected[layer][head]), (layer, blocks)
        else:  # before the scan: the shortlist is read and ranked
            assert set(cache.stats.selected[layer][head]) <= set(blocks.tolist())


def test_a_block_that_matches_more_of_the_question_covers_more():
    """cover_scores by hand: three queries over eight blocks. Block 5 holds the one
    strongest match (query 0); block 2 matches queries 1 and 2, each less strongly.
    The best single match ranks block 5 first; cover ranks block 2 first, and counts
    nothing under the threshold. A lone outlier of a row stands (n-1)/sqrt(n)
    standard deviations (ddof=1) above the mean whatever its size: here 7/sqrt(8)."""
    torch = pytest.importorskip("torch")
    rows = torch.zeros(3, 8)
    rows[0, 5], rows[1, 2], rows[2, 2] = 10.0, 5.0, 5.0
    assert int(rows.amax(dim=0).argmax()) == 5
    lone = 7 / math.sqrt(8)
    cover = memory.cover_scores(rows, 2.0).numpy()
    expected = np.zeros(8)
    expected[5], expected[2] = lone - 2.0, 2 * (lone - 2.0)
    np.testing.assert_allclose(cover, expected, rtol=1e-5, atol=1e-6)
    assert int(cover.argmax()) == 2
    assert not memory.cover_scores(rows, 2.5).numpy().any()  # 2.475 < 2.5: nothing counts
    # A flat row (all blocks alike) adds nothing.
    flat = torch.cat([rows, torch.ones(1, 8)])
    np.testing.assert_allclose(memory.cover_scores(flat, 2.0).numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="scan score"):
        SparseSettings(scan_score="mean")
