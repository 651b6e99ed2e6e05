"""The model-independent parts of the needle-in-a-haystack benchmark: haystack fitting,
needle placement, scoring, the BM25 baseline and the heatmap/table reports."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import niah_data as niah


@pytest.fixture(scope="module")
def essays(haystack_dir: Path) -> str:
    return niah.load_haystack(haystack_dir)


class WordTokenizer:
    """A whitespace "tokenizer" with a growing vocabulary: enough to check the arithmetic."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, text: str) -> list[int]:
        out = []
        for word in text.split():
            if word not in self.ids:
                self.ids[word] = len(self.words)
                self.words.append(word)
            out.append(self.ids[word])
        return out

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)


def test_load_haystack_joins_txt_files_in_name_order(tmp_path: Path, haystack_dir: Path):
    (tmp_path / "b.txt").write_text("\n  Second essay.  \n\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("First essay.\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not part of it", encoding="utf-8")
    assert niah.load_haystack(tmp_path) == "First essay.\n\nSecond essay."

    real = niah.load_haystack(haystack_dir)
    first = sorted(haystack_dir.glob("*.txt"))[0].read_text(encoding="utf-8").strip()
    assert real.startswith(first + "\n\n")
    assert 500_000 < len(real) < 800_000  # 49 essays, about 640K characters

    with pytest.raises(FileNotFoundError):
        niah.load_haystack(tmp_path / "missing")


def test_fit_haystack_cuts_and_repeats_to_the_word_count(essays: str):
    source = essays[:20_000]
    tok = WordTokenizer()
    source_words = len(tok.encode(source))

    cut = niah.fit_haystack(source, 1000, tok.encode, tok.decode)
    assert abs(len(tok.encode(cut)) - 1000) <= 8
    assert cut.split() == source.split()[: len(cut.split())]

    long = niah.fit_haystack(source, 3 * source_words + 500, tok.encode, tok.decode)
    assert abs(len(tok.encode(long)) - (3 * source_words + 500)) <= 8
    opening = " ".join(source.split()[:30])
    assert " ".join(long.split()).count(opening) == 4  # three full copies and part of a fourth


def test_fit_haystack_with_a_byte_level_bpe(essays: str):
    # A real byte-level BPE (trained here in a fraction of a second), whose merges cross
    # the blank lines between copies and whose prefixes need not re-encode the same.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([essays[:100_000]], trainer)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text).ids

    source = essays[:20_000]
    for target in (1234, 3 * len(encode(source)) + 77):
        assert abs(len(encode(niah.fit_haystack(source, target, encode, tokenizer.decode))) - target) <= 8


def test_single_needle_lands_at_sentence_boundaries_at_its_depth(essays: str):
    haystack = essays[:200_000]
    for depth in (0.0, 0.5, 1.0):
        case = niah.make_case("single", 32768, depth, random.Random(7))
        (needle,) = case.needles
        assert needle.sentence == f"The special magic number for {needle.key} is: {needle.value}."
        assert re.fullmatch(r"[1-9]\d{6}", needle.value) and needle.key in niah.KEYS
        assert case.expected == [needle.value]
        assert case.question == f"What is the special magic number for {needle.key} mentioned in the provided text?"

        text = niah.insert_needles(haystack, case)
        (span,) = niah.needle_spans(text, case)
        assert text[span[0] : span[1]] == needle.sentence
        if depth == 0.0:
            assert span[0] == 0 and text.startswith(needle.sentence + " " + haystack[:50])
        elif depth == 1.0:
            assert span[1] == len(text) and text == haystack + " " + needle.sentence
        else:
            assert abs(span[0] / len(text) - 0.5) < 0.02
            assert text[span[0] - 2 : span[0]] in (". ", "? ", "! ") or text[span[0] - 1] == "\n"
            # Taking the needle out again gives back the haystack untouched.
            assert text[: span[0]] + text[span[1] :].removeprefix(" ") == haystack


def test_multikey_distractors_are_spread_and_do_not_overlap(essays: str):
    haystack = essays[:200_000]
    case = niah.make_case("multikey", 131072, 0.5, random.Random(3))
    keys = [n.key for n in case.needles]
    values = [n.value for n in case.needles]
    assert len(set(keys)) == 4 and len(set(values)) == 4
    assert case.expected == [values[0]] and keys[0] in case.question
    assert niah.needle_depths(case) == [0.5, 0.125, 0.375, 0.875]

    text = niah.insert_needles(haystack, case)
    spans = niah.needle_spans(text, case)
    for needle, (start, end) in zip(case.needles, spans):
        assert text[start:end] == needle.sentence and text.count(needle.sentence) == 1
    ordered = sorted(spans)
    assert all(a[1] < b[0] for a, b in zip(ordered, ordered[1:]))
    positions = [start / len(text) for start, _ in spans]
    assert abs(positions[0] - 0.5) < 0.02
    assert all(abs(p - 0.5) > 0.1 for p in positions[1:])
    # Only the needles were added: without them the words of the haystack are unchanged.
    without = text
    for needle in case.needles:
        without = without.replace(needle.sentence, "")
    assert without.split() == haystack.split()


def test_multivalue_asks_for_every_value_of_one_key(essays: str):
    case = niah.make_case("multivalue", 8192, 0.9, random.Random(11))
    assert len({n.key for n in case.needles}) == 1
    assert len({n.value for n in case.needles}) == 4
    assert case.expected == [n.value for n in case.needles]
    assert case.question.startswith("What are all the special magic numbers for " + case.needles[0].key)
    text = niah.insert_needles(essays[:50_000], case)
    spans = niah.needle_spans(text, case)
    assert [text[s:e] for s, e in spans] == [n.sentence for n in case.needles]
    assert abs(spans[0][0] / len(text) - 0.9) < 0.02


def test_cases_are_reproducible_and_validated():
    first = niah.make_case("multikey", 8192, 0.25, random.Random(5))
    assert first == niah.make_case("multikey", 8192, 0.25, random.Random(5))
    assert first != niah.make_case("multikey", 8192, 0.25, random.Random(6))
    assert 150 <= len(set(niah.KEYS)) == len(niah.KEYS)
    with pytest.raises(ValueError):
        niah.make_case("haystack", 8192, 0.5, random.Random(0))
    with pytest.raises(ValueError):
        niah.make_case("single", 8192, 1.5, random.Random(0))


def test_score_answer_matches_whole_numbers_only():
    assert niah.score_answer("The special magic number is 1234567.", ["1234567"]) == 1.0
    assert niah.score_answer("It is 12345678.", ["1234567"]) == 0.0
    assert niah.score_answer("It is 91234567 or 1234567x", ["1234567"]) == 1.0
    assert niah.score_answer("It is 1,234,567.", ["1234567"]) == 1.0
    assert niah.score_answer("I could not find it.", ["1234567"]) == 0.0
    four = ["1111111", "2222222", "3333333", "4444444"]
    assert niah.score_answer("They are 2222222 and 4444444, and 55555555.", four) == 0.5
    assert niah.score_answer("1111111, 2222222, 3333333, 4444444", four) == 1.0


def test_chunk_text_overlaps_by_words():
    text = " ".join(f"w{i}" for i in range(450))
    spans = niah.chunk_text(text, chunk_words=200, overlap_words=20)
    chunks = [text[s:e].split() for s, e in spans]
    assert [c[0] for c in chunks] == ["w0", "w180", "w360"]
    assert [len(c) for c in chunks] == [200, 200, 90]
    assert chunks[1][:20] == chunks[0][-20:]
    assert niah.chunk_text("") == []
    assert niah.chunk_text("one two", 200, 20) == [(0, 7)]


def test_bm25_puts_the_planted_chunk_first(essays: str):
    haystack = essays[:80_000]
    middle = niah.sentence_boundary(haystack, 0.6)
    planted = "The lighthouse keeper fed seventeen marmalade pelicans every Tuesday. "
    text = haystack[:middle] + planted + haystack[middle:]
    spans = niah.chunk_text(text)
    assert len(spans) > 50
    retriever = niah.BM25Retriever([text[s:e] for s, e in spans])
    best = retriever.top_chunks("How many marmalade pelicans did the lighthouse keeper feed?", k=3)
    assert len(best) == 3 and "marmalade pelicans" in text[spans[best[0]][0] : spans[best[0]][1]]

    prompt = niah.rag_prompt_text(text, spans, [best[0], 0])
    assert prompt.startswith(text[spans[0][0] : spans[0][1]] + "\n\n")
    assert prompt.endswith(text[spans[best[0]][0] : spans[best[0]][1]])


def test_bm25_finds_a_needle_from_its_question(essays: str):
    case = niah.make_case("multikey", 32768, 0.3, random.Random(2))
    text = niah.insert_needles(essays[:80_000], case)
    spans = niah.chunk_text(text)
    retriever = niah.BM25Retriever([text[s:e] for s, e in spans])
    (top,) = retriever.top_chunks(case.question, k=1)
    assert case.needles[0].sentence in text[spans[top][0] : spans[top][1]]


def test_format_length():
    assert [niah.format_length(n) for n in (8192, 32768, 131072, 1048576, 1_000_000, 1536, 500)] == [
        "8K", "32K", "128K", "1M", "1M", "1.5K", "500"
    ]


def _grid() -> dict[tuple[int, float], float]:
    grid = {(n, d): 0.5 for n in (8192, 32768, 1048576) for d in (0.0, 0.5, 1.0)}
    grid[8192, 0.0] = 1.0
    grid[1048576, 1.0] = 0.0
    del grid[32768, 1.0]
    return grid


def test_heatmap_colours_cells_by_score(tmp_path: Path):
    path = tmp_path / "out" / "niah.png"
    niah.render_heatmap(_grid(), path, title="Needle recall, single needle")
    assert path.stat().st_size > 2000
    image = Image.open(path).convert("RGB")
    assert image.width >= niah.heatmap_cell_box(0, 2)[2] and image.height >= niah.heatmap_cell_box(2, 0)[3] + 30

    def cell(row: int, column: int) -> tuple[tuple[int, int, int], int]:
        pixels = [tuple(p) for p in np.asarray(image.crop(niah.heatmap_cell_box(row, column))).reshape(-1, 3).tolist()]
        dark = sum(1 for p in pixels if sum(p) < 200)  # the printed percentage
        return Counter(pixels).most_common(1)[0][0], dark

    (r, g, b), dark = cell(0, 0)  # 8K at 0%: 1.0
    assert g > r + 60 and g > b + 40 and dark > 10
    (r, g, b), dark = cell(2, 2)  # 1M at 100%: 0.0
    assert r > g + 100 and r > b + 100 and dark > 10
    (r, g, b), _ = cell(1, 1)  # 0.5: yellow
    assert r > 200 and g > 180 and b < 150
    (r, g, b), _ = cell(2, 1)  # missing: grey
    assert r == g == b


def test_grid_table_has_a_row_per_depth_and_a_column_per_length():
    lines = niah.render_grid_table(_grid()).strip().splitlines()
    assert lines[0] == "| Depth | 8K | 32K | 1M |"
    assert lines[1] == "|---|---:|---:|---:|"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[0] for row in rows] == ["0%", "50%", "100%"]
    assert all(len(row) == 4 for row in rows)
    assert rows[0][1:] == ["100%", "50%", "50%"] and rows[2][1:] == ["50%", "–", "0%"]


@pytest.mark.parametrize("gguf", ["qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"])
def test_an_answer_listing_every_value_fits_its_token_allowance(real_gguf, gguf: str) -> None:
    """A multi-value answer in the form the default model writes (a preamble, then a
    numbered list) must fit the tokens it is allowed, or the benchmark scores the
    limit instead of the recall: at 40 tokens Qwen's answers were cut after the
    second of four values."""
    from engine.tokenizer import load_tokenizer_from_gguf

    tokenizer = load_tokenizer_from_gguf(real_gguf(gguf))
    case = niah.make_case("multivalue", 32768, 0.5, random.Random(3))
    key = case.needles[0].key
    listing = "".join(f"{i}. {value}\n" for i, value in enumerate(case.expected, 1))
    answer = f"The special magic numbers for {key} mentioned in the provided text are:\n\n{listing}"
    needed = len(tokenizer.encode(answer))
    assert needed > 40  # what the old limit cut
    assert needed <= niah.ANSWER_TOKENS["multivalue"] * 0.75  # room for a longer preamble
    single = f"The special magic number for {key} mentioned in the provided text is: {case.expected[0]}."
    assert len(tokenizer.encode(single)) <= niah.ANSWER_TOKENS["single"] * 0.75
