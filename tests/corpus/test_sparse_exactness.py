"""Exactness guard: with the whole corpus in one segment that fits the window, a
budget that covers every block and ordered positions, sparse attention over the
stored cache must give the logits of the plain dense prompt (prefix + text +
question) — computed independently by transformers on the same weights.

Gemma 3 is left out on purpose: its sliding layers keep no long-range memory by
design, so they cannot see the text the way the dense prompt's sliding window does.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from engine.backends.torch.memory import MemoryAttentionCache, SegmentPrefiller  # noqa: E402
from engine.corpus.build import CorpusDocument, Manifest, SegmentRef  # noqa: E402
from engine.corpus import scope as scope_module  # noqa: E402
from engine.corpus.scope import CorpusScope, ScopeEntry  # noqa: E402
from engine.corpus.settings import SparseSettings  # noqa: E402
from engine.corpus.store import SegmentStore, decode_keys  # noqa: E402
from tests.test_torch_models import tiny_model_pair  # noqa: E402

FAMILIES = ["llama", "llama3-scaled", "qwen2", "qwen3"]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    return tiny_model_pair(request.param, tmp_path_factory.mktemp(request.param))


def cached_scope(model, tmp_path, prefix, texts, *, precision="fp16", block_size=16):
    """Prefill each token list as its own segment after `prefix` and open them as a scope."""
    store = SegmentStore(tmp_path)
    prefiller = SegmentPrefiller(model, prefix, max(len(t) for t in texts))
    entries = []
    for index, tokens in enumerate(texts):
        keys, values = prefiller.run([], tokens)
        key = f"{index:02d}" + "0" * 62
        store.write(key, keys, values, layers=prefiller.layers, precision=precision, block_size=block_size)
        manifest = Manifest(key, len(tokens), [SegmentRef(key, 0, len(tokens))], np.arange(len(tokens) + 1))
        entries.append(ScopeEntry(CorpusDocument(index, "x" * len(tokens)), manifest))
    return CorpusScope(store, entries, block_size)


def ids(n, seed):
    return torch.randint(0, 211, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_sparse_equals_dense_when_the_budget_covers_the_corpus(pair, tmp_path):
    reference, model = pair
    prefix, text, question = ids(5, 1), ids(90, 2), ids(7, 3)  # 90 tokens: a partial last block
    scope = cached_scope(model, tmp_path, prefix, [text])
    settings = SparseSettings(mass=1.0, min_blocks=1, max_blocks=64, positions="ordered")
    cache = MemoryAttentionCache(model, scope, settings, prefix_len=len(prefix), capacity=64)
    sparse = model.forward(prefix + question, cache, last_only=False)[len(prefix) :]
    with torch.no_grad():
        dense = reference(torch.tensor([prefix + text + question])).logits[0, -len(question) :].float()
    assert cache.stats.blocks_selected == [scope.n_blocks] * len(cache.stats.blocks_selected)
    # fp16 storage of fp32 keys and values is the only difference.
    assert torch.allclose(sparse, dense, atol=2e-3), float((sparse - dense).abs().max())
    # Decoding over the same selection keeps matching.
    follow = ids(3, 4)
    for step, token in enumerate(follow):
        got = model.forward([token], cache)[-1]
        with torch.no_grad():
            want = reference(torch.tensor([prefix + text + question + follow[: step + 1]])).logits[0, -1].float()
        assert torch.allclose(got, want, atol=2e-3), (step, float((got - want).abs().max()))


def test_quantised_cache_stays_close_and_a_small_budget_differs(pair, tmp_path):
    """int8 keeps the logits near dense; a budget of 1 block must change them (the
    selection is really restricting attention)."""
    reference, model = pair
    prefix, text, question = ids(5, 5), ids(96, 6), ids(6, 7)
    with torch.no_grad():
        dense = reference(torch.tensor([prefix + text + question])).logits[0, -1].float()
    results = {}
    for name, precision, settings in (
        ("int8", "int8", SparseSettings(mass=1.0, min_blocks=1, max_blocks=64, positions="ordered")),
        ("one", "fp16", SparseSettings(mass=0.01, min_blocks=1, max_blocks=1, shortlist_factor=1, positions="ordered")),
    ):
        scope = cached_scope(model, tmp_path / name, prefix, [text], precision=precision)
        cache = MemoryAttentionCache(model, scope, settings, prefix_len=len(prefix), capacity=32)
        results[name] = model.forward(prefix + question, cache)[-1]
        scope.close()
    assert float((results["int8"] - dense).abs().max()) < 0.05
    assert float((results["one"] - dense).abs().max()) > 0.05


def test_evidence_accumulates_on_the_selected_blocks_only(pair, tmp_path):
    _, model = pair
    prefix, question = ids(4, 8), ids(5, 9)
    scope = cached_scope(model, tmp_path, prefix, [ids(64, 10), ids(64, 11)])
    settings = SparseSettings(mass=0.01, min_blocks=2, max_blocks=2, positions="fixed")
    cache = MemoryAttentionCache(model, scope, settings, prefix_len=len(prefix), capacity=32)
    cache.evidence_from = len(prefix) + len(question) - 1
    model.forward(prefix + question, cache)
    model.forward([3], cache)
    selected = set()
    for per_head in cache.stats.selected.values():
        for blocks in per_head:
            assert len(blocks) == 2
            selected.update(blocks.tolist())
    touched = set(np.flatnonzero(cache.evidence_weights() > 0).tolist())
    assert touched and touched <= selected
    # Two query rows counted (last prompt token, one decode step), each row's
    # weights sum to at most 1 per query head and layer.
    layers = len(cache.stats.selected)
    heads = model.config.num_attention_heads
    assert float(cache.evidence.sum()) <= 2 * layers * heads + 1e-6


def test_refreshing_the_selection_while_decoding(pair, tmp_path):
    """A refresh every step re-selects from the newest token: with a budget that
    covers the corpus it must stay exact; with a one-block budget it must pick
    again (more selections recorded) and still decode."""
    reference, model = pair
    prefix, text, question, follow = ids(5, 12), ids(64, 13), ids(6, 14), ids(3, 15)
    scope = cached_scope(model, tmp_path, prefix, [text])
    covering = SparseSettings(mass=1.0, min_blocks=1, max_blocks=64, positions="ordered", refresh_every=1)
    cache = MemoryAttentionCache(model, scope, covering, prefix_len=len(prefix), capacity=32)
    model.forward(prefix + question, cache)
    for step, token in enumerate(follow):
        got = model.forward([token], cache)[-1]
        with torch.no_grad():
            want = reference(torch.tensor([prefix + text + question + follow[: step + 1]])).logits[0, -1].float()
        assert torch.allclose(got, want, atol=2e-3), step
    narrow = SparseSettings(mass=0.01, min_blocks=1, max_blocks=1, shortlist_factor=1, refresh_every=1)
    cache = MemoryAttentionCache(model, scope, narrow, prefix_len=len(prefix), capacity=32)
    model.forward(prefix + question, cache)
    first = len(cache.stats.blocks_selected)
    for token in follow:
        assert torch.isfinite(model.forward([token], cache)).all()
    # The first decode step reuses the question's selection; later ones refresh.
    assert len(cache.stats.blocks_selected) == first * len(follow)


@pytest.mark.parametrize("levels", [255, 15, None])
def test_the_scan_key_decoder_decodes_as_a_read_does_in_steps(levels):
    """decode_scan_keys, which works in cache-sized steps of blocks, against the
    whole array decoded at once and rounded to bfloat16, bit for bit, on random
    codes and bounds (wide and narrow spans, equal bounds, signs mixed)."""
    rng = np.random.default_rng(levels or 0)
    n_blocks, size, D = 3 * scope_module.DECODE_BLOCKS + 5, 16, 64
    if levels is None:
        stored = rng.normal(0, 3, (n_blocks, size, D)).astype(np.float16)
    else:
        stored = rng.integers(0, 256, (n_blocks, size, D // 2 if levels == 15 else D), dtype=np.uint8)
    low = rng.normal(0, 4, (n_blocks, D)).astype(np.float16)
    high = (low.astype(np.float32) + rng.exponential(2, (n_blocks, D)) * rng.integers(0, 2, (n_blocks, D))).astype(np.float16)
    got = scope_module.decode_scan_keys(stored, low, high, levels)
    want = scope_module.bfloat16_bits(decode_keys(stored, low, high, levels))
    assert got.dtype == np.uint16 and np.array_equal(got, want)


@pytest.mark.parametrize("precision", ["int8", "int4", "fp16"])
def test_the_scan_keys_are_the_read_keys_in_bfloat16_block_by_block(pair, tmp_path, precision):
    """head_keys row r holds block r // block_size: each real token's key as a read
    decodes it, rounded to bfloat16; a partial block's padding rows repeat its last
    token."""
    _, model = pair
    scope = cached_scope(model, tmp_path, ids(5, 1), [ids(40, 2), ids(23, 3)], precision=precision)
    layer, size = sorted(scope.layers)[-1], scope.block_size
    keys, _, owner = scope.gather(layer, 1, np.arange(scope.n_blocks))
    within = np.concatenate([np.arange(n) for n in np.bincount(owner)])
    rows = owner * size + within
    bits = scope.head_keys(layer, 1)
    assert bits.shape == (scope.n_blocks * size, model.config.head_dim) and scope.n_blocks == 3 + 2
    assert np.array_equal(bits[rows], scope_module.bfloat16_bits(keys))
    for block, real in ((2, 8), (4, 7)):  # 40 = 16 + 16 + 8 and 23 = 16 + 7 tokens
        padding = bits[block * size + real : (block + 1) * size]
        assert len(padding) == size - real and (padding == bits[block * size + real - 1]).all()


def test_the_retrieval_head_scan_is_the_exact_best_match_of_every_block(pair, tmp_path):
    """A scanned head's score of each block equals the best q·k over the block's
    stored keys (numpy, fp32), up to the bfloat16 the scope keeps them in; and a
    scanned head shortlists by those scores, not by the bounds."""
    _, model = pair
    prefix = ids(5, 8)
    scope = cached_scope(model, tmp_path, prefix, [ids(150, 9), ids(70, 10), ids(128, 11)], precision="int8")
    settings = SparseSettings(min_blocks=1, max_blocks=2, shortlist_factor=1, carry_blocks=2, carry_threshold=0.5)
    layer = sorted(MemoryAttentionCache(model, scope, settings, prefix_len=5, capacity=32).memory_layers)[0]
    seen = {}
    cache = MemoryAttentionCache(
        model, scope, settings, prefix_len=5, capacity=32, scan_heads=[(layer, 0)],
        probe=lambda layer, head, best: seen.__setitem__((layer, head), best),
    )
    queries = torch.randn(2, 6, model.config.head_dim)
    keys, _, owner = scope.gather(layer, 0, np.arange(scope.n_blocks))
    scores = (queries[0].numpy() @ keys.T).max(axis=0)
    expected = np.full(scope.n_blocks, -np.inf, dtype=np.float32)
    np.maximum.at(expected, owner, scores)
    assert np.isfinite(expected).all()
    # fp32 products (an fp32 model), and bf16 products (a bf16 model on a machine
    # that multiplies bf16 fast): both within the bf16 rounding of the kept keys.
    for rank_dtype in (torch.float32, torch.bfloat16):
        cache.rank_dtype = rank_dtype
        best = cache._scan(layer, 0, queries[0]).numpy()
        assert best.dtype == np.float32 and best.shape == expected.shape
        np.testing.assert_allclose(best, expected, rtol=2e-2, atol=2e-2 * np.abs(expected).max())
    cache.rank_dtype = torch.float32
    assert cache.stats.tokens_scanned == 2 * scope.total_tokens == 2 * 348
    # Asked for real: the probe sees the scan of query head 0 at that layer; the
    # block it rates best leads the scans' tally, so it is carried, and attended.
    model.forward(prefix + ids(9, 12), cache)
    assert list(seen) == [(layer, 0)]
    top = int(np.argmax(seen[(layer, 0)]))
    assert int(torch.argmax(cache.scan_votes)) == top and top in set(cache._carried().tolist())
    assert any(top in set(head.tolist()) for heads in cache.stats.selected.values() for head in heads)


def test_the_background_warm_up_loads_what_a_question_would(pair, tmp_path, monkeypatch):
    """`warm` fills the index on its own threads with the same arrays the accessors
    make, each once, checks segments of the older format whole and rewrites them in
    the current one; closing the scope while it warms waits for it and is clean."""
    import engine.corpus.store as store_module

    _, model = pair
    texts = [ids(70, 20 + i) for i in range(4)]
    direct = cached_scope(model, tmp_path / "a", ids(5, 1), texts, precision="int8")
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "FORMAT_VERSION", 1)
        warmed = cached_scope(model, tmp_path / "b", ids(5, 1), texts, precision="int8")
    assert {segment.version for segment in warmed.segments} == {1}
    layers = sorted(warmed.layers)
    heads = [(layers[-1], 0), (layers[0], 1)]
    warmed.warm(layers, heads, threads=3)
    warmed.wait_warm()
    verified = [key for key in warmed._loaded if key[0] == "verified"]
    assert warmed.index_bytes() > 0 and len(warmed._loaded) == 1 + len(heads) + len(verified)  # one load: every layer's bounds
    assert sorted(key[1] for key in verified) == sorted(segment.key for segment in warmed.segments)
    for segment in warmed.segments:  # rewritten on disk, byte for byte what a build writes now
        assert segment.path.read_bytes() == direct.store.path_for(segment.key).read_bytes()
    # A scope of current segments has nothing to check whole: its reads check blocks.
    current = CorpusScope(warmed.store, warmed.entries, 16)
    assert {segment.version for segment in current.segments} == {store_module.FORMAT_VERSION}
    current.warm(layers, heads, threads=1)
    current.wait_warm()
    assert all(job.done() for job in current._index_loads) and len(current._index_loads) == 1 + len(heads)
    assert sorted(current._loaded) == sorted(key for key in warmed._loaded if key[0] != "verified")
    current.close()
    for layer in layers:
        assert np.array_equal(warmed.bound_pairs(layer), direct.bound_pairs(layer))
    for layer, head in heads:
        assert np.array_equal(warmed.head_keys(layer, head), direct.head_keys(layer, head))
    assert warmed.index_bytes() == direct.index_bytes()  # the same arrays, loaded once each
    busy = cached_scope(model, tmp_path / "c", ids(5, 1), texts, precision="int8")
    busy.warm(layers, heads, threads=1)
    busy.close()  # must not fail while loads are queued or running
    with pytest.raises(ValueError, match="closed"):
        busy.bound_pairs(layers[0])


@pytest.mark.parametrize("precision", ["int8", "int4", "fp16"])
def test_a_question_streams_the_keys_and_bounds_the_scope_has_not_loaded(pair, tmp_path, monkeypatch, precision):
    """Streamed in steps that cross segment edges and decoded by the torch backend,
    the scanned heads' keys are `head_keys` bit for bit, and one layer's bounds are
    `bound_pairs`; nothing streamed is kept, and once loaded the scan reads views
    of the loaded arrays."""
    _, model = pair
    scope = cached_scope(model, tmp_path, ids(5, 1), [ids(40, 2), ids(23, 3), ids(70, 4)], precision=precision)
    monkeypatch.setattr(scope_module, "STREAM_BLOCKS", 2)  # segments of 3, 2 and 5 blocks
    cache = MemoryAttentionCache(model, scope, SparseSettings(), prefix_len=5, capacity=8)
    layer, size = sorted(scope.layers)[-1], scope.block_size
    codes = list(scope.code_steps(layer, 1))
    assert [step[0] for step in codes] == [0, 2, 4, 6, 8] and scope.n_blocks == 10
    streamed = [(first, keys.clone()) for first, keys in cache._key_steps(layer, 1)]
    pairs = scope.layer_bound_pairs(layer, [1, 0])
    assert scope.index_bytes() == 0 and not scope.loaded(("keys", layer, 1))  # nothing kept
    rows = torch.cat([keys for _, keys in streamed])
    assert rows.dtype == torch.bfloat16 and rows.shape == (10 * size, model.config.head_dim)
    assert np.array_equal(rows.view(torch.int16).numpy().view(np.uint16), scope.head_keys(layer, 1))
    assert np.array_equal(pairs, scope.bound_pairs(layer)[[1, 0]])
    assert scope.loaded(("keys", layer, 1)) and scope.loaded(("bounds",))
    loaded = list(cache._key_steps(layer, 1))
    assert [first for first, _ in loaded] == [0]  # the loaded array in scan chunks (SCAN_CHUNK rows)
    assert loaded[0][1].data_ptr() == scope.head_keys(layer, 1).ctypes.data  # a view
    assert torch.equal(torch.cat([keys for _, keys in loaded]), rows)
    assert np.array_equal(scope.layer_bound_pairs(layer, [0]), pairs[1:])


def test_the_warm_up_waits_while_a_question_runs(pair, tmp_path):
    """Inside `asking` the warm-up starts no load and pauses one under way between
    segments, unless the question itself asks for that array; it resumes after, and
    closing the scope stops a paused warm-up."""
    _, model = pair
    texts = [ids(40, 20 + i) for i in range(6)]
    scope = cached_scope(model, tmp_path, ids(5, 1), texts, precision="int8")
    layers = sorted(scope.layers)
    heads = [(layers[0], 0), (layers[-1], 1)]

    def as_warm_up(layer, head):  # a load on a warm-up thread, already under way
        scope._local.warming = True
        scope.head_keys(layer, head)

    with scope.asking():
        scope.warm(layers, heads, threads=2)
        under_way = threading.Thread(target=as_warm_up, args=heads[1])
        under_way.start()
        under_way.join(0.3)  # time for loads to start and finish, were they allowed to
        assert under_way.is_alive() and ("keys", *heads[1]) in scope._loaded
        assert scope.index_bytes() == 0 and not any(job.done() for job in scope._index_loads)
        # The question needs that head's keys now: the paused load goes on for it.
        assert scope.head_keys(*heads[1]).shape[0] == scope.n_blocks * scope.block_size
        under_way.join(30)
        assert not under_way.is_alive() and not scope.loaded(("bounds",))
    scope.wait_warm()
    assert all(scope.loaded(key) for key in [("bounds",), ("keys", *heads[0]), ("keys", *heads[1])])
    paused = cached_scope(model, tmp_path / "b", ids(5, 1), texts, precision="int8")
    with paused.asking():
        paused.warm(layers, heads, threads=2)
        paused.close()  # does not wait for the question to end
    assert not paused.loaded(("bounds",))
