"""ingest.normalize: ligatures, hyphenation, running lines, whitespace, and the
offset map back into the raw text."""

from __future__ import annotations

import pytest

from ingest.normalize import SUBSTITUTIONS, find_running_lines, inline_compounds, normalize


def assert_offsets_point_at_raw(raw: str, text: str, offsets: list[int] | None) -> None:
    if offsets is None:
        assert text == raw
        return
    assert len(offsets) == len(text)
    assert offsets == sorted(offsets), "offsets must not go backwards"
    for position, char in enumerate(text):
        source = raw[offsets[position]]
        assert source == char or char in SUBSTITUTIONS.get(source, ""), (position, char, source)


@pytest.mark.parametrize(
    "raw",
    [
        "The \ufb01rst \ufb02oor, e\ufb00ort, o\ufb03ce, ba\ufb04e, \ufb05op.",
        "hyphen-\nated words and well-\nknown ones, well-known twice.\n",
        "  lots   of\tspace \u00a0here  \n\n\n\n\nand  blank lines\r\n\r\nCRLF  \n",
        "soft\u00adhyphen and zero\u200bwidth\x00 and \ufeffBOM",
        "unchanged text",
        "",
    ],
)
def test_offsets_point_at_the_raw_character(raw: str) -> None:
    result = normalize(raw, join_hyphens=True, keep_compounds=inline_compounds(raw))
    assert_offsets_point_at_raw(raw, result.text, result.raw_offsets)


def test_ligatures_expand_and_point_at_the_ligature() -> None:
    raw = "e\ufb03cient \ufb01sh"
    result = normalize(raw)
    assert result.text == "efficient fish"
    assert result.raw_offsets is not None
    assert result.raw_offsets[1:4] == [1, 1, 1]  # f, f, i all come from the ligature
    assert raw[result.raw_offsets[result.text.index("cient")]] == "c"


def test_hyphenation_joins_only_before_lower_case() -> None:
    raw = "a hyphen-\nated word, the Anglo-\nSaxon era, 1990-\n1995"
    result = normalize(raw, join_hyphens=True)
    assert result.text == "a hyphenated word, the Anglo-\nSaxon era, 1990-\n1995"


def test_compound_seen_inline_keeps_its_hyphen() -> None:
    raw = "a well-\nknown fact; it is well-known."
    result = normalize(raw, join_hyphens=True, keep_compounds=inline_compounds(raw))
    assert result.text == "a well-known fact; it is well-known."
    assert result.raw_offsets is not None
    assert raw[result.raw_offsets[result.text.index("known")]] == "k"


def test_hyphenation_is_off_unless_asked() -> None:
    assert normalize("hyphen-\nated").text == "hyphen-\nated"


def test_whitespace_tidy() -> None:
    raw = "  Title  \r\n\r\n\r\n\r\nfirst\t line   here \n\n\n\nsecond\u00a0line\n"
    assert normalize(raw).text == "Title\n\nfirst line here\n\nsecond line"
    # Indentation kept when spaces are not collapsed (Markdown, plain text).
    assert normalize("text\n    code\n\n\n\nnext", collapse_spaces=False).text == "text\n    code\n\nnext"


def test_unchanged_text_has_no_offsets() -> None:
    result = normalize("already clean\n\ntext")
    assert result.text == "already clean\n\ntext"
    assert result.raw_offsets is None


def test_running_headers_and_page_numbers_are_found() -> None:
    pages = [
        f"The Book Title\nBody text {'abcdefgh'[n - 1] * n} with content.\nMore words {n * 'z'}.\n- {n} -\n"
        for n in range(1, 9)
    ]
    spans = find_running_lines(pages)
    for page, page_spans in zip(pages, spans):
        removed = [page[start:end] for start, end in page_spans]
        assert removed[0] == "The Book Title\n"
        assert removed[-1].startswith("- ") and removed[-1].endswith(" -\n")
        assert len(removed) == 2
    result = normalize(pages[2], drop_spans=spans[2])
    assert result.text == "Body text ccc with content.\nMore words zzz."
    assert_offsets_point_at_raw(pages[2], result.text, result.raw_offsets)


def test_a_line_on_two_pages_is_not_running() -> None:
    pages = ["Intro\nalpha", "Intro\nbeta", "Other\ngamma", "Other2\ndelta"]
    assert find_running_lines(pages) == [[], [], [], []]


def test_offset_map_on_random_text() -> None:
    import random

    alphabet = ["a", "b", "Z", "é", "1", "-", " ", "  ", "\t", "\n", "\n\n\n", "\r\n", "\r"]
    alphabet += ["\u00ad", "\u00a0", "\ufb01", "\ufb03"]
    generator = random.Random(7)
    for _ in range(400):
        raw = "".join(generator.choice(alphabet) for _ in range(generator.randint(0, 60)))
        for collapse in (True, False):
            result = normalize(raw, join_hyphens=True, collapse_spaces=collapse, keep_compounds=inline_compounds(raw))
            assert_offsets_point_at_raw(raw, result.text, result.raw_offsets)
            assert "\r" not in result.text and "\n\n\n" not in result.text
            assert result.text == result.text.strip()


def test_headers_carrying_the_page_label_are_running() -> None:
    topics = ["abs", "abs", "apply", "array", "array", "bitwAnd", "body", "bquote", "browser", "by"]
    labels = [str(970 + n) for n in range(len(topics))]
    pages = [
        (f"{label} {topic}\n" if n % 2 == 0 else f"{topic} {label}\n") + f"Body of {topic} number {'x' * n}.\n"
        for n, (label, topic) in enumerate(zip(labels, topics))
    ]
    spans = find_running_lines(pages, labels)
    for page, page_spans in zip(pages, spans):
        assert [page[start:end] for start, end in page_spans] == [page[: page.index("\n") + 1]]
    # Without labels the per-topic headers never repeat often enough.
    assert find_running_lines(pages) == [[] for _ in pages]
    # A label that happens to open the first line of one page alone is kept.
    few = ["12 Results\nText.", "Intro\nMore.", "Methods\nData."] + [f"Plain page {n}\nbody" for n in range(7)]
    assert find_running_lines(few, [str(12 + n) for n in range(10)])[0] == []
