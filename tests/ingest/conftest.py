"""Fixtures that generate real documents in temporary folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ingest.builders import add_page_labels, write_epub, write_pdf

BOOK_PAGES = [
    ["Preface", "Why this book was written."],
    ["Contents", "One, Two."],
    ["Chapter One", "The first chapter begins with a hyphen-", "ated word and a well-", "known phrase, well-known twice."],
    ["The sea was calm that morning and the boats went out early.", "Nobody expected the storm."],
    ["Chapter Two", "A second chapter with more text than", "the others, so that it is not sparse at all."],
    ["The end of the story arrives at last, quietly."],
]
BOOK_OUTLINE = [("Preface", 0, 0), ("Chapter One", 2, 0), ("At sea", 3, 1), ("Chapter Two", 4, 0)]


@pytest.fixture
def book_pdf(tmp_path: Path) -> Path:
    """Six pages: two front-matter pages labelled i, ii, then 1–4; a running header
    and page-number footers; a two-level outline; title and author."""
    path = write_pdf(tmp_path / "book.pdf", BOOK_PAGES, outline=BOOK_OUTLINE, title="The Test Book", author="Ada Lovelace")
    return add_page_labels(path, front_matter=2)


@pytest.fixture
def epub_chapters() -> list[tuple[str, str, list[str]]]:
    return [
        ("zeta.xhtml", "Beginning", ["It was a dark and stormy night.", "The rain fell in torrents."]),
        ("alpha.xhtml", "Middle", ["Things happened &amp; people talked."]),
        ("mid.xhtml", "Ending", ["And they lived happily ever after."]),
    ]


@pytest.fixture
def book_epub(tmp_path: Path, epub_chapters: list[tuple[str, str, list[str]]]) -> Path:
    return write_epub(tmp_path / "book.epub", epub_chapters, toc_titles={"alpha.xhtml": "Chapter 2: The Middle"})
