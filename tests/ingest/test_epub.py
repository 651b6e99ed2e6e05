"""The EPUB reader on generated EPUBs: spine order, TOC titles (NCX and nav),
metadata, broken containers and DRM."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from ingest.errors import CorruptDocumentError, EncryptedDocumentError
from ingest.readers import read_document
from tests.ingest.builders import write_epub


def test_spine_order_titles_and_metadata(book_epub: Path) -> None:
    with zipfile.ZipFile(book_epub) as archive:
        stored = [name for name in archive.namelist() if name.startswith("OEBPS/text/")]
    assert stored == ["OEBPS/text/mid.xhtml", "OEBPS/text/alpha.xhtml", "OEBPS/text/zeta.xhtml"]

    document = read_document(book_epub)
    assert document.format == "epub"
    assert [page.title for page in document.pages] == ["Beginning", "Chapter 2: The Middle", "Ending"]
    assert [page.label for page in document.pages] == ["Beginning", "Chapter 2: The Middle", "Ending"]
    assert document.pages[0].text == "Beginning\n\nIt was a dark and stormy night.\n\nThe rain fell in torrents."
    assert document.pages[1].text == "Middle\n\nThings happened & people talked."
    assert document.pages[2].text == "Ending\n\nAnd they lived happily ever after."
    assert [(entry.title, entry.page_index) for entry in document.outline] == [
        ("Beginning", 0),
        ("Chapter 2: The Middle", 1),
        ("Ending", 2),
    ]
    assert (document.title, document.author, document.date) == ("A Test Book", "Ada Lovelace", "1843-09-01")
    for page in document.pages:
        assert document.text[page.start : page.end] == page.text
    assert document.report.pages == 3


def test_epub3_nav_titles(tmp_path: Path, epub_chapters: list[tuple[str, str, list[str]]]) -> None:
    path = write_epub(
        tmp_path / "nav.epub", epub_chapters, toc="nav", creators=("A. Author", "B. Author"), toc_titles={"mid.xhtml": "The End"}
    )
    document = read_document(path)
    assert [page.title for page in document.pages] == ["Beginning", "Middle", "The End"]
    assert document.author == "A. Author, B. Author"


def test_missing_container_is_corrupt(tmp_path: Path, epub_chapters: list[tuple[str, str, list[str]]]) -> None:
    path = write_epub(tmp_path / "bare.epub", epub_chapters, with_container=False)
    with pytest.raises(CorruptDocumentError) as caught:
        read_document(path)
    assert str(caught.value) == (
        "not a standard EPUB: META-INF/container.xml is missing, so the book's package file cannot be found"
    )


def test_missing_package_file_is_corrupt(book_epub: Path, tmp_path: Path) -> None:
    broken = tmp_path / "no-opf.epub"
    with zipfile.ZipFile(book_epub) as source, zipfile.ZipFile(broken, "w") as target:
        for item in source.infolist():
            if not item.filename.endswith(".opf"):
                target.writestr(item, source.read(item))
    with pytest.raises(CorruptDocumentError) as caught:
        read_document(broken)
    assert str(caught.value) == "the EPUB's package file OEBPS/content.opf, named in META-INF/container.xml, is missing"


def test_truncated_epub_is_corrupt(book_epub: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.epub"
    cut.write_bytes(book_epub.read_bytes()[:300])
    with pytest.raises(CorruptDocumentError, match=r"^cut\.epub is a damaged zip archive"):
        read_document(cut)


def test_drm_is_reported_as_encrypted(book_epub: Path, tmp_path: Path) -> None:
    locked = tmp_path / "drm.epub"
    with zipfile.ZipFile(book_epub) as source, zipfile.ZipFile(locked, "w") as target:
        for item in source.infolist():
            target.writestr(item, source.read(item))
        target.writestr(
            "META-INF/encryption.xml",
            '<encryption xmlns="urn:oasis:names:tc:opendocument:xmlns:container" '
            'xmlns:enc="http://www.w3.org/2001/04/xmlenc#"><enc:EncryptedData>'
            '<enc:EncryptionMethod Algorithm="http://www.w3.org/2001/04/xmlenc#aes128-cbc"/>'
            '<enc:CipherData><enc:CipherReference URI="OEBPS/text/zeta.xhtml"/></enc:CipherData>'
            "</enc:EncryptedData></encryption>",
        )
    with pytest.raises(EncryptedDocumentError, match=r"DRM-protected"):
        read_document(locked)
