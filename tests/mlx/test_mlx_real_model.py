"""The MLX backend against the torch backend on the real SmolLM2-135M-Instruct:
the same logits and greedy tokens for a chat prompt, a cache that torch built and MLX
reuses without rebuilding a segment (one cache format, shared by both backends), and
the same answer and evidence from the Answerer.

Both run fp32: the corpus cache's fingerprint holds the dtype, so backends share
a cache when they run the same one. torch runs on one thread, as in
tests/corpus/test_cache.py (two torch threads contend with a neighbour process on
a two-core box).
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

from engine.corpus.build import CorpusDocument  # noqa: E402
from bench.niah import collect_answer  # noqa: E402
from engine.corpus.answerer import Answerer  # noqa: E402
from engine.corpus.settings import CacheSettings  # noqa: E402
from engine.generate import GenerationStats, SamplingParams  # noqa: E402
from tests.corpus.test_cache import FACT, MODEL, QUESTION, island_document  # noqa: E402

pytestmark = [pytest.mark.mlx, pytest.mark.slow]

# 465 tokens in three segments of up to 224 (7 blocks of 32): several segments to reuse.
SEGMENTS = CacheSettings(segment_tokens=224, block_size=32)


@pytest.fixture(scope="module")
def models():
    from engine.paths import models_dir
    from engine.runtime import load_model

    if not (models_dir() / MODEL).is_dir():
        pytest.skip(f"{MODEL} is not installed (quire models install)")
    threads = torch.get_num_threads()
    yield {
        "torch": load_model(MODEL, backend="torch", dtype="float32", threads=1),
        "mlx": load_model(MODEL, backend="mlx", dtype="float32"),
    }
    torch.set_num_threads(threads)


def test_logits_and_greedy_tokens_match_torch(models):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = models["torch"].encode_chat(messages)
    assert models["mlx"].encode_chat(messages) == prompt
    logits = {}
    for backend, lm in models.items():
        assert lm.backend == backend
        logits[backend] = np.asarray(lm.model.forward(prompt, lm.model.new_cache(len(prompt)), last_only=False))
    # fp32 through 30 layers: the backends differ by summation order only (~1e-4 seen).
    assert logits["mlx"].shape == logits["torch"].shape == (len(prompt), models["torch"].config.vocab_size)
    assert np.abs(logits["mlx"] - logits["torch"]).max() < 2e-3
    assert (logits["mlx"].argmax(-1) == logits["torch"].argmax(-1)).all()
    tokens = {}
    for backend, lm in models.items():
        stats = GenerationStats()
        text = "".join(t.text for t in lm.stream(prompt, SamplingParams(max_new_tokens=12), stats=stats))
        tokens[backend] = (stats.token_ids, text)
    assert tokens["mlx"] == tokens["torch"] and tokens["mlx"][0]


def ask(answerer: Answerer, document: CorpusDocument):
    return collect_answer(answerer.ask(QUESTION, [document], SamplingParams(max_new_tokens=24)))


def test_mlx_answers_over_the_cache_torch_built(models, tmp_path):
    document = island_document()
    by_torch = Answerer(models["torch"], cache_root=tmp_path, cache_settings=SEGMENTS)
    built = by_torch.cache.build([document])
    assert built.segments_built == 3 and built.segments_reused == 0

    by_mlx = Answerer(models["mlx"], cache_root=tmp_path, cache_settings=SEGMENTS)
    assert by_mlx.cache.fingerprint == by_torch.cache.fingerprint and by_mlx.cache.root == by_torch.cache.root
    assert by_mlx.cache.memory.__name__ == "engine.backends.mlx.memory"
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.qkv")}
    reused = by_mlx.cache.build([document])
    assert (reused.segments_built, reused.segments_reused, reused.bytes_written) == (0, 3, 0)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.qkv")} == files

    # The answer path prefills the passages BM25 chose: the same prompt on both backends.
    answers = {name: ask(answerer, document) for name, answerer in (("torch", by_torch), ("mlx", by_mlx))}
    (text_t, evidence_t, stats_t), (text_m, evidence_m, stats_m) = answers["torch"], answers["mlx"]
    assert text_m == text_t, (text_t, text_m)
    assert evidence_m and [(e.char_start, e.char_end, e.weight) for e in evidence_m] == [
        (e.char_start, e.char_end, e.weight) for e in evidence_t
    ]
    assert any(FACT in e.text for e in evidence_m)
    assert stats_m.context_tokens == stats_t.context_tokens and stats_m.passages_read == stats_t.passages_read
