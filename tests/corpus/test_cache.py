"""The corpus cache (engine/corpus/cache.py) end to end with a real model
(SmolLM2-135M-Instruct), through an Answerer: build the cache for small generated
documents, ask with the passages read from it, and check answers, evidence and
statistics; then what the cache promises on disk — reuse by a new Answerer, content
addressing, damaged and half-written segments, cancel, forget — and each precision.
(The answer path itself, prefilled, is tested in test_answer.py.)

Every test gets its own cache root. Documents stay under 1,000 tokens and answers
under 24 tokens. The model runs on one thread: on a two-core box shared with a
benchmark, two torch threads contend for the cores and run several times slower.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from engine.corpus.build import CorpusDocument, token_offsets
from engine.corpus.answerer import Answerer, AskStats, Evidence
from engine.corpus.settings import CacheSettings
from engine.corpus.store import SegmentStore
from engine.errors import Cancelled
from engine.generate import SamplingParams, Token

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parents[2]
QUESTION = "Who was the lighthouse keeper on Marrow Island?"
FACT = "The lighthouse keeper on Marrow Island was named Elspeth Varga."
MAX_NEW_TOKENS = 24
# Small segments so a document of a few hundred tokens spans several of them.
SMALL = CacheSettings(segment_tokens=256, block_size=32)

SUBJECTS = ["The old mill", "A quiet river", "The village baker", "Autumn rain", "The harbour master",
            "A flock of gulls", "The market square", "An iron bridge", "The schoolteacher", "A narrow lane"]
VERBS = ["stood beside", "drifted past", "looked over", "waited near", "rolled toward", "gleamed above",
         "stretched along", "leaned against"]
OBJECTS = ["the stone wall", "the green hills", "the fishing boats", "the church tower", "the wheat fields",
           "the empty station", "the wooden pier", "the cobbled road"]
ENDINGS = ["every morning.", "in the spring.", "before the storm.", "as the bells rang.", "long after dusk.",
           "without a sound."]


def island_document(sentences: int = 12, *, seed: int = 0, doc_id: int | str = "island") -> CorpusDocument:
    """Three pages of filler (`sentences` per page) with FACT in the middle of page 2."""
    rng = random.Random(seed)

    def filler(count: int) -> str:
        return " ".join(
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}"
            for _ in range(count)
        )

    pages = [filler(sentences), f"{filler(sentences // 2)} {FACT} {filler(sentences // 2)}", filler(sentences)]
    starts = [0, len(pages[0]) + 2, len(pages[0]) + 2 + len(pages[1]) + 2]
    return CorpusDocument(doc_id, "\n\n".join(pages), list(zip(starts, ["1", "2", "3"])), "Marrow Island")


@pytest.fixture(scope="module")
def model():
    import torch

    from engine.paths import models_dir
    from engine.runtime import load_model

    if not (models_dir() / MODEL).is_dir():
        pytest.skip(f"{MODEL} is not installed (quire models install)")
    threads = torch.get_num_threads()
    yield load_model(MODEL, threads=1)
    torch.set_num_threads(threads)


def cached(model, root: Path, settings: CacheSettings | None = None) -> Answerer:
    """An answerer whose answers read their passages from the corpus cache."""
    return Answerer(model, cache_root=root, cache_settings=settings, read_cached=True)


def ask(answerer: Answerer, documents: list[CorpusDocument], question: str = QUESTION):
    """(answer text, generated token ids, evidence, stats) of one greedy question."""
    tokens: list[Token] = []
    evidence: list[Evidence] = []
    stats: list[AskStats] = []
    order: list[type] = []
    for event in answerer.ask(question, documents, SamplingParams(max_new_tokens=MAX_NEW_TOKENS)):
        order.append(type(event))
        {Token: tokens, Evidence: evidence, AskStats: stats}[type(event)].append(event)
    # Tokens first, then evidence, then exactly one AskStats, last.
    assert order == sorted(order, key=[Token, Evidence, AskStats].index) and stats and order[-1] is AskStats
    return "".join(t.text for t in tokens), [t.token_id for t in tokens if t.token_id >= 0], evidence, stats[0]


def segment_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.qkv"))


# --- answer, evidence, statistics -------------------------------------------------------


def test_an_answer_reads_its_passages_from_the_cache(model, tmp_path):
    document = island_document()
    answerer = Answerer(model, cache_root=tmp_path)
    summary = answerer.cache.build([document])
    ids = model.tokenizer.encode(document.text)
    assert summary.tokens == len(ids) and summary.segments_built == 1 and summary.segments_reused == 0
    answer, _, prefilled, stats = ask(answerer, [document])  # read_cached is off by default
    assert "Elspeth" in answer and stats.passages_from_cache == 0, answer

    # From the cache: the same passages, their keys and values read, not prefilled. The
    # 135M model does not always answer as it does prefilled (Answerer._read_cached), so
    # the answer's words are not checked here; test_answer.py checks the logits.
    answerer.read_cached = True
    answer, generated, evidence, stats = ask(answerer, [document])
    assert answer.strip()
    assert [(e.char_start, e.char_end, e.weight) for e in evidence] == [
        (e.char_start, e.char_end, e.weight) for e in prefilled
    ]

    assert evidence, "no evidence"
    for e in evidence:
        assert document.text[e.char_start:e.char_end] == e.text
        assert 0 <= e.char_start < e.char_end <= len(document.text)
        assert 0.0 <= e.weight <= 1.0
        assert (e.doc_id, e.title) == ("island", "Marrow Island")
    assert abs(sum(e.weight for e in evidence) - 1.0) < 1e-9
    assert [e.number for e in evidence] == list(range(1, len(evidence) + 1))
    holding = [e for e in evidence[:3] if FACT in e.text]
    assert holding and holding[0].page_label == "2", [(e.page_label, e.char_start, e.char_end) for e in evidence]

    manifest = answerer.cache.manifests.load(document.content_key)
    assert stats.memory_tokens == len(ids) == manifest.tokens
    assert stats.passages_from_cache == stats.passages_read == len(evidence)
    assert stats.prompt_tokens == stats.context_tokens > 0
    assert stats.generated_tokens == len(generated)
    assert stats.finish_reason in {"stop", "length"}
    if stats.finish_reason == "length":
        assert stats.generated_tokens == MAX_NEW_TOKENS


def test_token_offsets_are_exact_for_byte_level_bpe(model):
    text = "Café crème — 日本語のテキスト, naïve résumé 🙂👍🏽 and 🇫🇷: ok.\nZürich, 東京!"
    ids = model.tokenizer.encode(text)
    pieces = [model.tokenizer.token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode("utf-8")  # byte-level BPE spells the text
    offsets = token_offsets(model.tokenizer.token_bytes, ids, text)
    assert offsets.shape == (len(ids) + 1,) and offsets[0] == 0 and offsets[-1] == len(text)
    assert np.all(np.diff(offsets) >= 0)
    assert "".join(text[offsets[i]:offsets[i + 1]] for i in range(len(ids))) == text

    # Independent reference: a character belongs to the token holding its first byte,
    # so a token starts after every character whose first byte lies before its own.
    char_first_bytes = list(itertools.accumulate((len(c.encode("utf-8")) for c in text[:-1]), initial=0))
    token_first_bytes = list(itertools.accumulate((len(p) for p in pieces[:-1]), initial=0))
    assert offsets[:-1].tolist() == [bisect.bisect_left(char_first_bytes, b) for b in token_first_bytes]
    # The text does split characters across tokens, so the hard case was exercised.
    assert any(not _decodes(piece) for piece in pieces)


def _decodes(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --- what the cache keeps ---------------------------------------------------------------


def test_a_new_answerer_reuses_the_cache_and_answers_identically(model, tmp_path):
    document = island_document(18)
    first = cached(model, tmp_path, SMALL)
    built = first.cache.build([document])
    assert built.segments_built == 3 and built.segments_reused == 0
    answer_first, ids_first, evidence_first, _ = ask(first, [document])

    second = cached(model, tmp_path, SMALL)
    assert second.cache.is_cached(document)
    files_before = {p: p.stat().st_mtime_ns for p in segment_files(tmp_path)}
    again = second.cache.build([document])
    assert (again.segments_built, again.segments_reused, again.bytes_written) == (0, 3, 0)
    assert {p: p.stat().st_mtime_ns for p in segment_files(tmp_path)} == files_before
    answer_second, ids_second, evidence_second, stats = ask(second, [document])
    assert stats.passages_from_cache == stats.passages_read > 0
    assert ids_second == ids_first and answer_second == answer_first
    assert [(e.char_start, e.char_end, e.weight) for e in evidence_second] == [
        (e.char_start, e.char_end, e.weight) for e in evidence_first
    ]


def test_segments_are_addressed_by_content(model, tmp_path):
    document = island_document(18)
    twin = CorpusDocument("twin", document.text, document.pages, "Same text, other id")
    answerer = Answerer(model, cache_root=tmp_path, cache_settings=SMALL)
    both = answerer.cache.build([document, twin])
    assert (both.segments_built, both.segments_reused) == (3, 3)
    assert len(segment_files(tmp_path)) == 3 and answerer.cache.is_cached(twin)

    # Another ending: only the last segment's tokens change.
    last = document.text.rindex(". ") + 2
    changed = CorpusDocument("changed", document.text[:last] + "A stranger rowed away at midnight.", document.pages)
    old_ids, new_ids = model.tokenizer.encode(document.text), model.tokenizer.encode(changed.text)
    assert old_ids[:512] == new_ids[:512] and old_ids[512:] != new_ids[512:] and 512 < len(new_ids) <= 768
    summary = answerer.cache.build([changed])
    assert (summary.segments_built, summary.segments_reused) == (1, 2)
    old_keys = [s.key for s in answerer.cache.manifests.load(document.content_key).segments]
    new_keys = [s.key for s in answerer.cache.manifests.load(changed.content_key).segments]
    assert new_keys[:2] == old_keys[:2] and new_keys[2] != old_keys[2]
    assert len(segment_files(tmp_path)) == 4


def test_a_damaged_segment_is_found_and_rebuilt_and_an_answer_falls_back_to_prefilling(model, tmp_path, caplog):
    document = island_document(18)
    answerer = Answerer(model, cache_root=tmp_path, cache_settings=SMALL)
    answerer.cache.build([document])
    answer, ids, _, stats = ask(answerer, [document])  # prefilled: read_cached is off
    assert stats.passages_from_cache == 0
    store = SegmentStore(answerer.cache.root)
    # The segment that holds the fact: a passage the answer reads lies in it.
    manifest = answerer.cache.manifests.load(document.content_key)
    fact_token = int(np.searchsorted(manifest.offsets, document.text.index(FACT), side="right")) - 1
    key = next(ref.key for ref in manifest.segments if ref.start <= fact_token < ref.start + ref.tokens)
    path = store.path_for(key)
    original = path.read_bytes()

    # One byte of the payload (the last value code, just before the 8-byte trailer):
    # the cheap checks pass, the payload checksum fails.
    damaged = bytearray(original)
    damaged[-9] ^= 0xFF
    path.write_bytes(bytes(damaged))
    assert answerer.cache.is_cached(document)
    with store.open(key) as segment:
        assert not segment.verify()

    # A truncated file fails the cheap checks: not cached, and only it is rebuilt,
    # byte for byte.
    path.write_bytes(original[: len(original) // 2])
    assert not answerer.cache.is_cached(document)
    summary = answerer.cache.build([document])
    assert (summary.segments_built, summary.segments_reused) == (1, 2)
    assert path.read_bytes() == original

    # Asked to read from the cache without a build: a truncated or a missing segment
    # is not read, and the answer prefills its passages instead.
    for damage in (lambda: path.write_bytes(original[: len(original) // 2]), path.unlink):
        damage()
        answerer = cached(model, tmp_path, SMALL)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="engine.corpus.answerer"):
            answer_again, ids_again, _, stats = ask(answerer, [document])
        assert any("prefilling them" in r.getMessage() for r in caplog.records if r.name == "engine.corpus.answerer")
        assert stats.passages_from_cache == 0 and ids_again == ids and answer_again == answer
        answerer.cache.build([document])
        assert path.read_bytes() == original


CRASHING_BUILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from engine.corpus.build import CorpusDocument
    from engine.corpus.answerer import Answerer
    from engine.corpus.settings import CacheSettings
    from engine.runtime import load_model

    root, dtype, text = Path(sys.argv[1]), sys.argv[2], sys.stdin.read()
    real_replace = os.replace
    renames = []

    def replace(source, target):
        # The second segment hangs between its fsync'd temp file and the rename,
        # where the parent kills the process.
        if str(target).endswith(".qkv"):
            renames.append(target)
            if len(renames) == 2:
                time.sleep(600)
        return real_replace(source, target)

    os.replace = replace
    answerer = Answerer(load_model("%s", dtype=dtype, threads=1), cache_root=root,
                    cache_settings=CacheSettings(segment_tokens=256, block_size=32))
    answerer.cache.build([CorpusDocument("island", text)])
    """
    % MODEL
)


def test_a_build_killed_mid_segment_leaves_reusable_segments(model, tmp_path):
    document = island_document(18)
    # The same fingerprint as this process: quantised weights come with dtype "auto"
    # (a dtype named reads the GGUF as floats), float ones with their dtype named.
    dtype = "auto" if getattr(model.model, "quantised", False) else str(model.model.dtype).removeprefix("torch.")
    process = subprocess.Popen(
        [sys.executable, "-c", CRASHING_BUILD, str(tmp_path), dtype],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    process.stdin.write(document.text)
    process.stdin.close()
    try:
        # Poll (not timed: the deadline only stops a hung test) for one finished
        # segment and the second one's temp file.
        deadline = time.monotonic() + 300
        while not (segment_files(tmp_path) and list(tmp_path.rglob("*.tmp"))):
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the build never reached its second segment"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert len(segment_files(tmp_path)) == 1 and not list(tmp_path.rglob("documents/*.json"))

    answerer = Answerer(model, cache_root=tmp_path, cache_settings=SMALL)
    assert not answerer.cache.is_cached(document)
    summary = answerer.cache.build([document])
    assert (summary.segments_built, summary.segments_reused) == (2, 1)
    assert answerer.cache.manifests.load(document.content_key) is not None and answerer.cache.is_cached(document)
    # The same cache, byte for byte, and the same answer from it as from a build never
    # interrupted.
    answerer.read_cached = True
    clean = cached(model, tmp_path / "clean", SMALL)
    clean.cache.build([document])
    assert [p.read_bytes() for p in segment_files(answerer.cache.root)] == [p.read_bytes() for p in segment_files(clean.cache.root)]
    assert ask(answerer, [document])[1] == ask(clean, [document])[1]

    assert list(answerer.cache.root.rglob("*.tmp"))  # the killed write's temp file, until forget
    kept = answerer.cache.total_bytes()
    answerer.cache.forget(keep=[document])
    assert not list(tmp_path.rglob("*.tmp"))
    assert answerer.cache.total_bytes() == kept and answerer.cache.is_cached(document)


def test_cancel_stops_the_build_without_a_manifest(model, tmp_path):
    short = island_document(4, seed=1, doc_id="short")
    document = island_document(18)
    answerer = Answerer(model, cache_root=tmp_path, cache_settings=SMALL)
    assert len(model.tokenizer.encode(short.text)) <= 256
    calls = []

    def cancel() -> bool:
        # True once the short document and the first segment of the long one are written.
        calls.append(1)
        return len(segment_files(tmp_path)) >= 2

    with pytest.raises(Cancelled):
        answerer.cache.build([short, document], cancel=cancel)
    assert len(calls) > 2
    assert answerer.cache.is_cached(short)
    assert not answerer.cache.is_cached(document) and answerer.cache.manifests.load(document.content_key) is None
    assert answerer.cache.manifests.all() == [short.content_key]
    assert len(segment_files(tmp_path)) == 2 and not list(tmp_path.rglob("*.tmp"))

    summary = answerer.cache.build([short, document])
    assert (summary.segments_built, summary.segments_reused) == (2, 2)
    assert answerer.cache.is_cached(document)


def test_forget_frees_what_no_kept_document_uses(model, tmp_path):
    document = island_document(18)
    last = document.text.rindex(". ") + 2
    other = CorpusDocument("other", document.text[:last] + "A stranger rowed away at midnight.")
    answerer = Answerer(model, cache_root=tmp_path, cache_settings=SMALL)
    answerer.cache.build([document, other])
    sizes = {p.stem: p.stat().st_size for p in segment_files(tmp_path)}
    assert len(sizes) == 4  # two shared segments, one ending each
    before = answerer.cache.total_bytes()
    assert before == sum(sizes.values())

    other_only = {s.key for s in answerer.cache.manifests.load(other.content_key).segments} - {
        s.key for s in answerer.cache.manifests.load(document.content_key).segments
    }
    freed = answerer.cache.forget(keep=[document])
    assert freed == sum(sizes[k] for k in other_only) == before - answerer.cache.total_bytes()
    assert answerer.cache.is_cached(document) and not answerer.cache.is_cached(other)

    remaining = answerer.cache.total_bytes()
    freed = answerer.cache.forget(keep=[])
    assert freed == remaining > 0
    assert answerer.cache.total_bytes() == 0 and segment_files(tmp_path) == [] and answerer.cache.manifests.all() == []
    assert not answerer.cache.is_cached(document)


@pytest.mark.parametrize("precision", ["int4", "fp16"])
def test_each_precision_builds_and_answers(model, tmp_path, precision):
    document = island_document()
    answerer = cached(model, tmp_path, CacheSettings(precision=precision))
    answerer.cache.build([document])
    key = answerer.cache.manifests.load(document.content_key).segments[0].key
    with SegmentStore(answerer.cache.root).open(key) as segment:
        assert segment.precision == precision and segment.verify()
    int8 = Answerer(model, cache_root=tmp_path / "int8")
    int8.cache.build([document])
    if precision == "int4":
        assert answerer.cache.total_bytes() < int8.cache.total_bytes()
    else:
        assert answerer.cache.total_bytes() > int8.cache.total_bytes()
    answer, _, evidence, stats = ask(answerer, [document])
    assert evidence and stats.memory_tokens == len(model.tokenizer.encode(document.text))
    assert stats.passages_from_cache == stats.passages_read > 0 and answer.strip()


def test_each_precision_reads_only_its_own_segments(model, tmp_path):
    """The same text cached in int8 and then asked in int4 under one cache folder:
    the int4 answerer must build int4 segments, not reuse the int8 manifest."""
    document = island_document()
    int8 = Answerer(model, cache_root=tmp_path)
    int8.cache.build([document])
    int4 = Answerer(model, cache_root=tmp_path, cache_settings=CacheSettings(precision="int4"))
    assert not int4.cache.is_cached(document)
    summary = int4.cache.build([document])
    assert summary.segments_built == len(int8.cache.manifests.load(document.content_key).segments)
    for answerer, precision in ((int8, "int8"), (int4, "int4")):
        for ref in answerer.cache.manifests.load(document.content_key).segments:
            with SegmentStore(answerer.cache.root).open(ref.key) as segment:
                assert segment.precision == precision
    # Forgetting the text drops both manifests and every segment.
    assert int8.cache.forget(keep=[]) > 0
    assert segment_files(tmp_path) == [] and int4.cache.manifests.all() == []
