"""The PDF reader on generated PDFs: text, labels, outline, metadata, running
headers, OCR detection, encryption and damaged files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ingest.document import PAGE_SEPARATOR, Document
from ingest.errors import CorruptDocumentError, EncryptedDocumentError, UnsupportedFormatError
from ingest.readers import read_document
from ingest.errors import Cancelled
from ingest.ocr import OcrResult, best_engine
from ingest.readers.pdf import page_accounting, read_pdf
from tests.ingest.builders import RUNNING_HEADER, encrypt_pdf, write_pdf, write_raw_pdf, write_scanned_pdf
from tests.ingest.conftest import BOOK_PAGES

ROOT = Path(__file__).resolve().parents[2]


def assert_offsets_consistent(document: Document) -> None:
    text = document.text
    for page in document.pages:
        assert text[page.start : page.end] == page.text
    assert document.report.characters == len(text)
    assert document.report.chars_per_page == [len(page.text) for page in document.pages]


def test_pages_labels_outline_metadata(book_pdf: Path) -> None:
    document = read_document(book_pdf)
    assert document.format == "pdf"
    assert len(document.pages) == 6
    assert [page.label for page in document.pages] == ["i", "ii", "1", "2", "3", "4"]
    assert document.pages[0].text == "Preface\nWhy this book was written."
    assert document.pages[3].text == "The sea was calm that morning and the boats went out early.\nNobody expected the storm."
    # Hyphen joined before a lower-case letter; a compound seen in-line keeps its hyphen.
    assert document.pages[2].text == (
        "Chapter One\nThe first chapter begins with a hyphenated word and a well-known phrase, well-known twice."
    )
    assert [(entry.title, entry.page_index, entry.level) for entry in document.outline] == [
        ("Preface", 0, 0),
        ("Chapter One", 2, 0),
        ("At sea", 3, 1),
        ("Chapter Two", 4, 0),
    ]
    titles = ["Preface", "Preface", "Chapter One", "At sea", "Chapter Two", "Chapter Two"]
    assert [page.title for page in document.pages] == titles
    assert document.title == "The Test Book"
    assert document.author == "Ada Lovelace"
    assert document.date and document.date[:2] == "20"
    assert_offsets_consistent(document)
    assert document.report.pages == 6
    assert document.report.needs_ocr == []
    assert document.report.encrypted is False


def test_running_header_and_page_numbers_are_dropped(book_pdf: Path) -> None:
    document = read_document(book_pdf)
    for number, page in enumerate(document.pages, start=1):
        assert RUNNING_HEADER not in page.text
        assert not page.text.endswith(str(number))


def test_raw_offsets_point_into_the_page_text(book_pdf: Path) -> None:
    from pypdf import PdfReader

    document = read_document(book_pdf)
    raw = PdfReader(book_pdf).pages[2].extract_text()
    page = document.pages[2]
    assert page.raw_offsets is not None and len(page.raw_offsets) == len(page.text)
    for position, char in enumerate(page.text):
        assert raw[page.raw_offsets[position]] == char
    # The joined word maps back across the removed hyphen and line break.
    where = page.text.index("hyphenated")
    assert raw[page.raw_offsets[where + 6] - 2 : page.raw_offsets[where + 6]] == "-\n"


def test_pages_without_text_need_ocr_where_no_engine_is_installed(tmp_path: Path) -> None:
    pages = [["Real text on the first page."], [], ["More real text on page three."], []]
    path = write_pdf(tmp_path / "scan.pdf", pages, header=None, footer_numbers=False, scanned=[1, 3])
    document = read_pdf(path, ocr=None)
    assert document.report.needs_ocr == [1, 3]
    assert document.report.notice() == "2 pages need OCR"
    assert [page.text for page in document.pages] == ["Real text on the first page.", "", "More real text on page three.", ""]
    assert_offsets_consistent(document)


def test_every_page_is_accounted_for(tmp_path: Path) -> None:
    path = write_pdf(tmp_path / "mixed.pdf", [["Typed text."], [], [], ["More text."]], header=None,
                     footer_numbers=False, scanned=[1])
    report = read_pdf(path, ocr=None).report
    assert (report.needs_ocr, report.blank_pages, report.unread_pages) == ([1], [2], [])
    assert page_accounting(report) == {"pages": 4, "text": 2, "pdfium": 0, "ocr": 0, "ocr_found_nothing": 0,
                                       "needs_ocr": 1, "blank": 1, "unread": 0, "unaccounted": 0}


def test_a_pdf_of_only_pictures_says_why_it_has_no_text(tmp_path: Path) -> None:
    path = write_pdf(tmp_path / "scan.pdf", [[], []], header=None, footer_numbers=False, scanned=[0, 1])
    report = read_pdf(path, ocr=None).report
    assert report.chars_per_page == [0, 0]
    assert report.notice() == "2 pages need OCR"
    assert any(w.startswith("no text: 2 pages are pictures") and "tesseract" in w for w in report.warnings)


class ScriptedOcr:
    """An OCR engine that reads every picture as the next of its texts."""

    name = "scripted 1.0"

    def __init__(self, texts: list[str], cancel_after: int | None = None) -> None:
        self.texts = list(texts)
        self.sizes: list[tuple[int, int]] = []

    def read(self, image) -> OcrResult:  # noqa: ANN001
        self.sizes.append(image.size)
        return OcrResult(self.texts.pop(0), 0.875)


def test_ocr_fills_the_pictured_pages_and_reports_them(tmp_path: Path) -> None:
    pages = [["Typed text on the first page."], [], ["Typed text on page three."], []]
    path = write_pdf(tmp_path / "scan.pdf", pages, header=None, footer_numbers=False, scanned=[1, 3])
    engine = ScriptedOcr(["Scanned words of page two.", ""])
    calls: list[tuple[int, int]] = []
    document = read_pdf(path, ocr=engine, progress=lambda done, total: calls.append((done, total)))
    steps: list[str | None] = []
    read_pdf(path, ocr=ScriptedOcr(["a", "b"]), progress=lambda done, total, what=None: steps.append(what))
    assert steps[-2:] == ["OCR page 1 of 2", "OCR page 2 of 2"] and steps[0] is None
    report = document.report
    assert [page.text for page in document.pages][1:3] == ["Scanned words of page two.", "Typed text on page three."]
    assert document.pages[3].text == ""
    assert report.ocr_pages == [1, 3] and report.ocr_confidence == [0.875, 0.0]  # nothing read is no confidence
    assert report.needs_ocr == [] and report.notice() == ""
    assert report.ocr_engine == "scripted 1.0" and report.engine_of(1) == "OCR (scripted 1.0)"
    assert report.engine_of(0) == "pypdf"
    assert engine.sizes[0] == (1749, 2481)  # A5 (5.83 x 8.27 in) rendered at 300 dpi
    assert calls[-2:] == [(5, 6), (6, 6)]  # the two OCR'd pages counted after the four read
    assert_offsets_consistent(document)


def test_cancel_during_ocr_stops_the_read(tmp_path: Path) -> None:
    path = write_pdf(tmp_path / "scan.pdf", [[], [], []], header=None, footer_numbers=False, scanned=[0, 1, 2])

    def progress(done: int, total: int) -> None:
        if done > 4:
            raise Cancelled("stop")

    engine = ScriptedOcr(["one", "two", "three"])
    with pytest.raises(Cancelled):
        read_pdf(path, ocr=engine, progress=progress)
    assert len(engine.sizes) == 2


@pytest.mark.skipif(best_engine() is None, reason="Tesseract is not installed")
def test_a_scanned_page_is_read_by_the_installed_ocr_engine(tmp_path: Path) -> None:
    lines = ["The harbour master kept a ledger of ships.", "The brig Osprey arrived on the ninth of March", "carrying forty barrels of tar."]
    path = write_scanned_pdf(tmp_path / "scanned.pdf", [lines])
    document = read_pdf(path)
    report = document.report
    assert report.ocr_pages == [0] and report.needs_ocr == []
    words = document.pages[0].text.split()
    expected = " ".join(lines).split()
    assert sum(word in words for word in expected) >= 0.9 * len(expected), document.pages[0].text
    assert 0.6 < report.ocr_confidence[0] <= 1.0


# Content streams with the syntax errors of real damaged files: pypdf raises on
# each, PDFium reads past the damage.
DAMAGED_STREAMS = {
    "bad hex string": b"BT /F1 12 Tf 20 200 Td <zz> Tj (Harbour ledger) Tj ET",
    "stray closing brackets": b"] } >> BT /F1 12 Tf 20 200 Td (Harbour ledger) Tj ET",
    "unbalanced parenthesis": b"BT /F1 12 Tf 20 200 Td (Harbour ledger) Tj ET BT (x Tj ET",
}


@pytest.mark.parametrize("damage", sorted(DAMAGED_STREAMS))
def test_a_page_pypdf_cannot_parse_is_read_by_pdfium(tmp_path: Path, damage: str) -> None:
    healthy = b"BT /F1 12 Tf 20 200 Td (A healthy first page) Tj ET"
    path = write_raw_pdf(tmp_path / "damaged.pdf", [healthy, DAMAGED_STREAMS[damage]])
    document = read_pdf(path, ocr=None)
    assert [page.text for page in document.pages] == ["A healthy first page", "Harbour ledger"]
    assert document.report.pdfium_pages == [1]
    assert document.report.engine_of(1) == "PDFium" and document.report.engine_of(0) == "pypdf"
    assert document.report.notice() == ""


def test_sparse_pages_are_reported(tmp_path: Path) -> None:
    prose = [f"Line {n} of a page that holds a good deal of ordinary prose text." for n in range(12)]
    pages = [prose, prose, ["Fig. 3"], prose, prose]
    document = read_document(write_pdf(tmp_path / "sparse.pdf", pages, header=None, footer_numbers=False))
    assert document.report.sparse_pages == [2]


def test_encrypted_pdf(book_pdf: Path, tmp_path: Path) -> None:
    locked = encrypt_pdf(book_pdf, tmp_path / "locked.pdf", "s3cret")
    document = read_document(locked, password="s3cret")
    assert document.report.encrypted is True
    assert document.pages[0].text == "Preface\nWhy this book was written."
    assert [page.label for page in document.pages][:3] == ["i", "ii", "1"]
    with pytest.raises(EncryptedDocumentError, match=r"^locked\.pdf is password-protected: give its password to open it$"):
        read_document(locked)
    with pytest.raises(EncryptedDocumentError, match=r"^wrong password for locked\.pdf$"):
        read_document(locked, password="guess")


@pytest.mark.parametrize("keep", [0.5, 0.8])
def test_truncated_pdf_is_corrupt(book_pdf: Path, tmp_path: Path, keep: float) -> None:
    data = book_pdf.read_bytes()
    truncated = tmp_path / "truncated.pdf"
    truncated.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CorruptDocumentError) as caught:
        read_document(truncated)
    message = str(caught.value)
    assert message.startswith("truncated.pdf ")
    assert "\n" not in message


def test_zero_byte_file_is_corrupt(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pdf"
    empty.write_bytes(b"")
    with pytest.raises(CorruptDocumentError, match=r"^empty\.pdf is empty \(0 bytes\)$"):
        read_document(empty)


def test_png_named_pdf_is_unsupported(tmp_path: Path) -> None:
    from PIL import Image

    fake = tmp_path / "photo.pdf"
    Image.new("RGB", (4, 4)).save(fake, format="PNG")
    with pytest.raises(UnsupportedFormatError, match=r"^photo\.pdf is a PNG image, not a document Quire reads$"):
        read_document(fake)


def test_pdf_with_a_text_extension_is_read_as_pdf(book_pdf: Path, tmp_path: Path) -> None:
    disguised = tmp_path / "notes.txt"
    disguised.write_bytes(book_pdf.read_bytes())
    assert read_document(disguised).format == "pdf"


def test_non_ascii_path(book_pdf: Path, tmp_path: Path) -> None:
    folder = tmp_path / "Bibliothèque – 書庫"
    folder.mkdir()
    target = folder / "Édition française ü.pdf"
    target.write_bytes(book_pdf.read_bytes())
    document = read_document(target)
    assert document.path == str(target)
    assert document.pages[2].label == "1"


def test_pypdf_warnings_go_to_the_report_not_stderr(book_pdf: Path, tmp_path: Path) -> None:
    # A wrong startxref offset: pypdf repairs it and warns through logging.
    data = book_pdf.read_bytes()
    position = data.rindex(b"startxref")
    damaged = tmp_path / "offset.pdf"
    damaged.write_bytes(data[:position] + b"startxref\n12\n%%EOF\n")
    document = read_document(damaged)
    assert document.pages[0].text == "Preface\nWhy this book was written."
    assert any(warning.startswith("pypdf: ") for warning in document.report.warnings)
    # In a fresh interpreter nothing reaches stderr, with no logging configured
    # and with logging configured as `quire` and `quire gui` configure it.
    for setup in ("", "import logging; logging.basicConfig(level=logging.WARNING); "):
        script = setup + "import sys; from ingest.readers import read_document; print(len(read_document(sys.argv[1]).pages))"
        result = subprocess.run([sys.executable, "-c", script, str(damaged)], capture_output=True, text=True, cwd=ROOT, check=True)
        assert result.stdout.strip() == "6"
        assert result.stderr == ""


def test_separator_between_pages(book_pdf: Path) -> None:
    document = read_document(book_pdf)
    assert document.text.count(PAGE_SEPARATOR) >= len(BOOK_PAGES) - 1
    assert document.page_at(document.pages[4].start + 3) is document.pages[4]


def test_bench_ingest_reports_both_runs(book_pdf: Path) -> None:
    import numpy as np

    from bench.ingest import bench_ingest

    # A parent this large (as when earlier tests loaded a model) must not leak into
    # the child's peak: Linux carries ru_maxrss across exec.
    ballast = np.ones(150_000_000)  # ~1.1 GiB, touched
    result = bench_ingest(book_pdf)
    del ballast
    assert result["format"] == "pdf" and result["pages"] == 6
    assert isinstance(result["ratio_to_bare"], float) and result["ratio_to_bare"] > 0
    assert isinstance(result["peak_rss_mib"], float) and 10 < result["peak_rss_mib"] < 1024
    assert isinstance(result["bare_peak_rss_mib"], float) and result["bare_peak_rss_mib"] > 10


def test_a_placeholder_title_is_no_title(tmp_path: Path) -> None:
    # reportlab writes "untitled" where it was given no title; the file name is better.
    assert read_pdf(write_pdf(tmp_path / "a.pdf", [["Text."]], title="Untitled"), ocr=None).title is None
    assert read_pdf(write_pdf(tmp_path / "b.pdf", [["Text."]], title="Harbour Ledger"), ocr=None).title == "Harbour Ledger"


def test_a_tables_rows_stay_on_one_line(tmp_path: Path) -> None:
    """reportlab draws each cell of a Table as a text object of its own, and pypdf
    ends each with a line break: a row read one cell a line. The reader keeps each
    row on one line, and the prose around it as it was."""
    from reportlab.lib.pagesizes import A5
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Table

    rows = [["Token", "Meaning", "Value"], ["multiline", "for multiline text widget", "1<<12"],
            ["password", "password textfield", "1<<13"], ["fileSelect", "file selection widget", "1<<20"]]
    path = tmp_path / "table.pdf"
    style = getSampleStyleSheet()["Normal"]
    prose = "Field flags are combined with the bitwise or of their values before a widget is drawn."
    SimpleDocTemplate(str(path), pagesize=A5).build([Paragraph(prose, style), Table(rows), Paragraph("After the table.", style)])
    from pypdf import PdfReader

    plain = PdfReader(path).pages[0].extract_text()
    assert "multiline\nfor multiline text widget\n1<<12" in plain  # what pypdf alone gives
    text = read_pdf(path).pages[0].text
    lines = text.split("\n")
    for row in rows:
        assert " ".join(row) in lines
    assert prose in text.replace("\n", " ")
    assert "After the table." in lines
    assert_offsets_consistent(read_pdf(path))


def test_lines_on_different_baselines_are_not_joined(tmp_path: Path) -> None:
    path = write_pdf(tmp_path / "lines.pdf", [["first line of prose", "second line of prose", "third line"]], header=None,
                     footer_numbers=False)
    assert read_pdf(path).pages[0].text == "first line of prose\nsecond line of prose\nthird line"
