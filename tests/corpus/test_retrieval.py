"""Retrieval heads with a real model (SmolLM2-135M-Instruct): the calibration measures
every (layer, query head), keeps the result beside the cache, and a scope larger
than the shortlist is scanned by the best heads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from engine.corpus import retrieval
from engine.corpus.engine import Engine
from engine.corpus.settings import SparseSettings
from engine.errors import Cancelled
from engine.generate import SamplingParams
from tests.corpus.test_engine import QUESTION, island_document, model  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def test_calibration_ranks_every_head_and_is_kept(model, tmp_path, monkeypatch):  # noqa: F811
    engine = Engine(model, cache_root=tmp_path)
    heads = retrieval.retrieval_heads(engine)
    config = model.model.config
    assert sorted(heads) == [(layer, head) for layer in range(config.num_hidden_layers)
                             for head in range(config.num_attention_heads)]
    saved = json.loads((engine.root / retrieval.FILE_NAME).read_text())
    assert saved["version"] == retrieval.CALIBRATION_VERSION
    standing = [z for _, _, z in saved["heads"]]
    assert standing == sorted(standing, reverse=True)
    # The best heads single out the fact's block clearly; most heads do not.
    assert standing[0] > 3.0 and float(np.median(standing)) < standing[0] / 2, standing[:5]
    assert [(layer, head) for layer, head, _ in saved["heads"]] == heads

    # Read back, not measured again; a file of another version is measured again.
    monkeypatch.setattr(retrieval, "measure_heads", lambda engine, **_: pytest.fail("measured twice"))
    assert retrieval.retrieval_heads(engine) == heads
    saved["version"] = -1
    (engine.root / retrieval.FILE_NAME).write_text(json.dumps(saved))
    monkeypatch.setattr(retrieval, "measure_heads", lambda engine, **_: [(0, 1, 9.0)])
    assert retrieval.retrieval_heads(engine) == [(0, 1)]


def test_a_cancelled_measurement_keeps_nothing(model, tmp_path):  # noqa: F811
    engine = Engine(model, cache_root=tmp_path)
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 30  # partway: after some segments or layers

    with pytest.raises(Cancelled):
        engine.retrieval_heads(cancel)
    assert not (engine.root / retrieval.FILE_NAME).exists() and engine._retrieval_heads is None
    assert not retrieval.retrieval_heads_known(engine)


def test_a_scope_beyond_the_shortlist_is_scanned_by_the_retrieval_heads(model, tmp_path):  # noqa: F811
    document = island_document(40)
    engine = Engine(model, cache_root=tmp_path)
    engine.build([document])
    ids = model.tokenizer.encode(document.text)
    blocks = math.ceil(len(ids) / 32)
    params = SamplingParams(max_new_tokens=12)
    small = SparseSettings(min_blocks=2, max_blocks=4, shortlist_factor=2, scan_heads=3)
    assert blocks > small.shortlist_factor * small.max_blocks
    engine._retrieval_heads = [(2, 0), (2, 1), (5, 4), (7, 1)]
    stats = [e for e in engine.ask_sparse(QUESTION, [document], params, sparse=small) if type(e).__name__ == "AskStats"][0]
    # (2, 0) and (2, 1) share KV head 0 of layer 2 (3 query heads per KV head): one
    # scan; (5, 4) another; the fourth head is beyond scan_heads.
    assert stats.tokens_scanned == 2 * len(ids)
    off = SparseSettings(min_blocks=2, max_blocks=4, shortlist_factor=2, scan_heads=0)
    stats = [e for e in engine.ask_sparse(QUESTION, [document], params, sparse=off) if type(e).__name__ == "AskStats"][0]
    assert stats.tokens_scanned == 0
    # A scope within the shortlist needs no scan (and no calibration).
    engine._retrieval_heads = None
    stats = [e for e in engine.ask_sparse(QUESTION, [document], params) if type(e).__name__ == "AskStats"][0]
    assert stats.tokens_scanned == 0 and engine._retrieval_heads is None


def test_a_question_before_the_warm_up_streams_and_answers_as_after_it(model, tmp_path, monkeypatch):  # noqa: F811
    """On the CPU a question does not wait for the scope's index: asked with nothing
    loaded (the warm-up held off) it streams the scanned heads' keys and each layer's
    bounds from the segments, keeps none of them, and answers token for token, with
    the same evidence, as over the warmed scope."""
    from engine.corpus.scope import CorpusScope

    document = island_document(40)
    small = SparseSettings(min_blocks=2, max_blocks=4, shortlist_factor=2, scan_heads=3)
    engine = Engine(model, cache_root=tmp_path, sparse=small)
    engine.build([document])
    engine._retrieval_heads = [(2, 0), (5, 4), (7, 1)]
    params = SamplingParams(max_new_tokens=12)

    def asked():
        events = list(engine.ask_sparse(QUESTION, [document], params))
        tokens = [e.text for e in events if type(e).__name__ == "Token"]
        evidence = [(e.char_start, e.char_end, round(e.weight, 6)) for e in events if type(e).__name__ == "Evidence"]
        return tokens, evidence, events[-1]

    with monkeypatch.context() as patch:
        patch.setattr(CorpusScope, "warm", lambda self, *args, **kwargs: None)
        streamed, evidence, stats = asked()
    assert stats.tokens_scanned == 3 * len(model.tokenizer.encode(document.text)) and stats.index_bytes == 0
    engine._close_scope()
    engine.open_scope([document]).wait_warm()
    warmed, warmed_evidence, warmed_stats = asked()
    assert warmed_stats.index_bytes > 0 and warmed_stats.tokens_scanned == stats.tokens_scanned
    assert warmed == streamed and warmed_evidence == evidence and evidence
