"""TXT, Markdown, HTML and DOCX readers on generated files."""

from __future__ import annotations

import datetime
from pathlib import Path

import docx
import pytest

from ingest.document import Document
from ingest.errors import Cancelled, CorruptDocumentError, EncryptedDocumentError, UnsupportedFormatError
from ingest.readers import SUPPORTED_EXTENSIONS, detect_format, read_document
from ingest.readers.common import SECTION_MAX_CHARS, SECTION_MIN_CHARS

FRENCH = "Le garçon mangea une crème brûlée à Noël; c'était déjà très naïf.\n"


def assert_offsets(document: Document) -> None:
    for page in document.pages:
        assert document.text[page.start : page.end] == page.text


def test_latin1_text(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes((FRENCH * 3).encode("latin-1"))
    document = read_document(path)
    assert document.format == "txt"
    assert document.text == (FRENCH * 3).strip()
    assert document.report.warnings == ["decoded as cp1252"]


def test_utf8_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "First line – ok\r\nsecond line\r\n\r\nNew paragraph\r\n".encode())
    document = read_document(path)
    assert document.text == "First line – ok\nsecond line\n\nNew paragraph"
    assert "\ufeff" not in document.text and "\r" not in document.text


def test_long_plain_text_splits_at_paragraphs(tmp_path: Path) -> None:
    paragraphs = [f"Paragraph {n}. " + "Words follow words in a steady line. " * 12 for n in range(60)]
    path = tmp_path / "long.txt"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    document = read_document(path)
    assert len(document.pages) > 1
    for page in document.pages[:-1]:
        assert SECTION_MIN_CHARS - 2 <= len(page.text) <= SECTION_MAX_CHARS
        assert page.text.startswith("Paragraph ") and page.text.endswith("steady line.")
    # No text lost or reordered: the sections rejoin into the paragraphs.
    assert document.text == "\n\n".join(paragraph.strip() for paragraph in paragraphs)
    assert_offsets(document)


def test_markdown_sections_at_headings(tmp_path: Path) -> None:
    path = tmp_path / "notes.md"
    path.write_text(
        "Intro before any heading.\n\n# Guide\n\nSome text.\n\n```\n# not a heading\n```\n\n"
        "## Install ##\n\n    pip install quire\n",
        encoding="utf-8",
    )
    document = read_document(path)
    assert document.format == "md"
    assert [page.title for page in document.pages] == [None, "Guide", "Install"]
    assert document.pages[1].text == "# Guide\n\nSome text.\n\n```\n# not a heading\n```"
    assert document.pages[2].text == "## Install ##\n\n    pip install quire"
    assert document.title == "Guide"
    assert [(entry.title, entry.page_index, entry.level) for entry in document.outline] == [("Guide", 1, 0), ("Install", 2, 1)]
    assert_offsets(document)


def test_html_sections_and_title(tmp_path: Path) -> None:
    path = tmp_path / "page.html"
    path.write_text(
        "<!DOCTYPE html><html><head><title>Field Notes</title><meta name='author' content='M. Curie'>"
        "<script>var hidden = 1;</script><style>h1 { color: red }</style></head><body>"
        "<p>Lead   paragraph.</p><h1>Radium</h1><p>It <em>glows</em>.<br>Softly.</p>"
        "<h2>Polonium</h2><ul><li>rare</li><li>toxic</li></ul><h4>Detail</h4><p>Deep.</p></body></html>",
        encoding="utf-8",
    )
    document = read_document(path)
    assert document.format == "html"
    assert document.title == "Field Notes"
    assert document.author == "M. Curie"
    assert [page.title for page in document.pages] == [None, "Radium", "Polonium"]
    assert [page.text for page in document.pages] == [
        "Lead paragraph.",
        "Radium\n\nIt glows.\nSoftly.",
        "Polonium\n\nrare\ntoxic\n\nDetail\n\nDeep.",
    ]
    assert "hidden" not in document.text and "color" not in document.text
    assert_offsets(document)


def test_docx_sections_and_properties(tmp_path: Path) -> None:
    word = docx.Document()
    word.add_paragraph("Opening remarks.")
    word.add_heading("Methods", level=1)
    word.add_paragraph("We measured things.")
    table = word.add_table(rows=2, cols=2)
    for row, values in zip(table.rows, (("a", "b"), ("c", "d"))):
        for cell, value in zip(row.cells, values):
            cell.text = value
    word.add_heading("Details", level=4)
    word.add_paragraph("Fine print.")
    word.add_heading("Results", level=2)
    word.add_paragraph("It worked.")
    word.core_properties.title = "Lab Report"
    word.core_properties.author = "R. Franklin"
    word.core_properties.created = datetime.datetime(2024, 5, 6, 7, 8, 9)
    path = tmp_path / "report.docx"
    word.save(str(path))

    document = read_document(path)
    assert document.format == "docx"
    assert (document.title, document.author, document.date) == ("Lab Report", "R. Franklin", "2024-05-06T07:08:09+00:00")
    assert [page.title for page in document.pages] == [None, "Methods", "Results"]
    assert [page.text for page in document.pages] == [
        "Opening remarks.",
        "Methods\n\nWe measured things.\n\na b\nc d\n\nDetails\n\nFine print.",
        "Results\n\nIt worked.",
    ]
    assert [(entry.title, entry.page_index, entry.level) for entry in document.outline] == [
        ("Methods", 1, 0),
        ("Details", 1, 3),
        ("Results", 2, 1),
    ]
    assert_offsets(document)


def test_binary_with_text_extension_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_bytes(b"abc\x00\x01\x02" * 10)
    with pytest.raises(UnsupportedFormatError, match=r"^data\.txt is binary data, not text$"):
        read_document(path)


def test_unknown_extension_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "script.py"
    path.write_text("print('hi')\n", encoding="utf-8")
    with pytest.raises(UnsupportedFormatError, match=r"^script\.py: unsupported file type '\.py'"):
        read_document(path)


def test_empty_text_file_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "empty.md"
    path.write_bytes(b"")
    with pytest.raises(CorruptDocumentError, match=r"^empty\.md is empty \(0 bytes\)$"):
        read_document(path)


def test_detection_by_content(tmp_path: Path) -> None:
    html = tmp_path / "page.txt"
    html.write_text("<!doctype html><html><body><p>x</p></body></html>", encoding="utf-8")
    assert detect_format(html) == "html"
    assert {".pdf", ".epub", ".txt", ".md", ".html", ".docx"} <= SUPPORTED_EXTENSIONS


def test_password_protected_office_file_is_encrypted(tmp_path: Path) -> None:
    # The OLE compound-file signature, then a directory entry naming the stream.
    path = tmp_path / "locked.docx"
    path.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 504 + "EncryptedPackage".encode("utf-16-le") + b"\x00" * 64)
    with pytest.raises(EncryptedDocumentError, match=r"^locked\.docx is a password-protected Office document"):
        read_document(path)


def test_progress_is_reported_and_can_cancel(tmp_path: Path) -> None:
    path = tmp_path / "long.md"
    path.write_text("".join(f"# Part {n}\n\nText of part {n}.\n\n" for n in range(5)), encoding="utf-8")
    calls: list[tuple[int, int]] = []
    read_document(path, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(n, 5) for n in range(1, 6)]

    def cancel_at_three(done: int, total: int) -> None:
        if done == 3:
            raise Cancelled("stopped by the user")

    with pytest.raises(Cancelled):
        read_document(path, progress=cancel_at_three)


def test_whitespace_only_text_keeps_one_empty_page(tmp_path: Path) -> None:
    path = tmp_path / "blank.txt"
    path.write_text("  \n\n \t \n", encoding="utf-8")
    document = read_document(path)
    assert [page.text for page in document.pages] == [""]
    assert document.report.warnings == ["the file holds no text"]
