"""PDF reader on pypdf: text per physical page, printed page labels, the outline,
document metadata, and a report of pages that need OCR or look too thin.

A page that pypdf cannot read (a content stream with syntax errors makes it raise)
or reads as empty is read again by PDFium (pypdfium2: the engine behind Chrome's
and QtPdf's viewers, far more forgiving of broken streams). A page still empty
that shows a picture is a scan: an OCR engine reads it where one is installed
(`ingest.ocr`), and it is listed as needing OCR where none is. The report names
every page that pypdf did not read, and each OCR'd page's confidence. pypdf stays
the first reader because the normalisation and its tests were built on its text.

Two passes keep memory bounded on a book of thousands of pages: the first extracts
each page's raw text and lets go of the page's decoded content at once (only
strings are kept); the second finds running headers/footers across all pages and normalises
each page (`ingest.normalize`), releasing its raw text as it goes.

pypdf reports recoverable damage through the `logging` module (logger "pypdf").
Its records do not propagate to the application's handlers: a real PDF can raise
hundreds of them (a missing-fontTools warning per font, say), which flooded the
terminal of `quire gui`. While a document is read they are collected into the
document's report instead (per thread, so parallel imports do not mix them).

References: ISO 32000-2:2020 (PDF 2.0) §12.4.2 "Page labels", §12.3.3 "Document
outline", §7.6 "Encryption"; pypdf documentation, https://pypdf.readthedocs.io/
"""

from __future__ import annotations

import logging
import math
import statistics
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from pypdf import PageObject, PasswordType, PdfReader
from pypdf.errors import DependencyError
from pypdf.generic import ArrayObject, Destination, EncodedStreamObject

from ingest.document import Document, OutlineEntry, Page
from ingest.errors import Cancelled, CorruptDocumentError, EncryptedDocumentError
from ingest.normalize import find_running_lines, inline_compounds, normalize
from ingest.ocr import HOW_TO_ENABLE, OcrEngine, OcrError, OcrResult, best_engine, render
from ingest.readers.common import Progress, accepts_keyword, finish

log = logging.getLogger(__name__)
logging.getLogger("pypdf").addHandler(logging.NullHandler())
logging.getLogger("pypdf").propagate = False

SPARSE_FRACTION = 0.1  # a page with under 10% of the median page's characters is sparse …
SPARSE_MIN_MEDIAN = 200  # … when the median page holds real prose
MAX_REPORTED_WARNINGS = 20
PLACEHOLDER_TITLES = {"untitled", "untitled document", "(anonymous)", "anonymous"}
OCR_WORKERS = os.cpu_count() or 1  # Tesseract processes at once, each on one thread


class _ThreadWarnings(logging.Handler):
    """Collects pypdf's warnings raised on one thread."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextmanager
def _collect_pypdf_warnings() -> Iterator[list[str]]:
    handler = _ThreadWarnings()
    logger = logging.getLogger("pypdf")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def _open(path: Path, stream: object, password: str | None) -> PdfReader:
    try:
        reader = PdfReader(stream)  # type: ignore[arg-type]
    except OSError:
        raise
    except Exception as error:  # pypdf raises many kinds on damaged files; all mean the same here
        raise CorruptDocumentError(f"{path.name} is a damaged PDF: {error}") from error
    if reader.is_encrypted:
        try:
            result = reader.decrypt(password if password is not None else "")
        except DependencyError as error:
            raise EncryptedDocumentError(f"{path.name} uses an encryption this installation cannot open: {error}") from error
        if result == PasswordType.NOT_DECRYPTED:
            if password is None:
                raise EncryptedDocumentError(f"{path.name} is password-protected: give its password to open it")
            raise EncryptedDocumentError(f"wrong password for {path.name}")
    return reader


def _date(value: object) -> str | None:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value) if value else None


def _metadata(reader: PdfReader, document: Document) -> None:
    try:
        info = reader.metadata
    except Exception as error:
        document.report.warnings.append(f"document information unreadable: {error}")
        return
    if info is None:
        return
    title = (info.title or "").strip()
    # Writers that were given no title fill in a placeholder (reportlab: "untitled").
    document.title = None if title.lower() in PLACEHOLDER_TITLES else title or None
    document.author = (info.author or "").strip() or None
    try:
        document.date = _date(info.creation_date)
    except ValueError:
        document.date = _date(info.get("/CreationDate"))


def _outline(reader: PdfReader, document: Document) -> None:
    try:
        tree = reader.outline
    except Exception as error:
        document.report.warnings.append(f"outline unreadable: {error}")
        return

    def walk(items: list[object], level: int) -> None:
        for item in items:
            if isinstance(item, list):
                walk(item, level + 1)
            elif isinstance(item, Destination):
                try:
                    index = reader.get_destination_page_number(item)
                except Exception:
                    index = None
                title = " ".join(str(item.title or "").split())
                if title:
                    document.outline.append(OutlineEntry(title, index if index is not None and index >= 0 else None, level))

    walk(list(tree), 0)


def _looks_scanned(page: PageObject) -> bool:
    """Whether a page without text shows an image (a scan) rather than nothing."""
    resources = page.get("/Resources")
    resources = resources.get_object() if resources is not None else None
    xobjects = resources.get("/XObject") if resources is not None else None
    if xobjects:
        return True
    contents = page.get_contents()
    data = contents.get_data() if contents is not None else b""
    return b"BI" in data  # inline image


def _release_contents(page: PageObject) -> None:
    """Drop the decoded copy of the page's content streams that pypdf keeps on the
    stream objects in its reader-wide cache; without this every page's decoded
    content stays in memory until the reader is gone (the compressed bytes stay)."""
    contents = page.get("/Contents")
    if contents is None:
        return
    contents = contents.get_object()
    for stream in contents if isinstance(contents, ArrayObject) else [contents]:
        stream = stream.get_object()
        if isinstance(stream, EncodedStreamObject):
            stream.decoded_self = None


def _labels(reader: PdfReader, count: int, document: Document) -> list[str]:
    try:
        labels = reader.page_labels
        if len(labels) == count:
            return labels
    except Exception as error:
        document.report.warnings.append(f"page labels unreadable: {error}")
    return [str(index + 1) for index in range(count)]


class _Pdfium:
    """The same PDF opened in PDFium on first use, for the pages pypdf misses and
    the pictures OCR reads."""

    def __init__(self, path: Path, password: str | None) -> None:
        self.path = path
        self.password = password
        self._document: object | None = None
        self.failed: str | None = None

    def _open(self):  # noqa: ANN202 - pypdfium2.PdfDocument, imported lazily
        if self._document is None and self.failed is None:
            try:
                import pypdfium2

                self._document = pypdfium2.PdfDocument(str(self.path), password=self.password)
            except Exception as error:  # PDFium cannot open it either: pypdf's text stands
                self.failed = str(error)
        return self._document

    def text(self, index: int) -> tuple[str, bool]:
        """Page `index`'s text, and whether the page shows a picture."""
        document = self._open()
        if document is None:
            return "", False
        import pypdfium2.raw as pdfium_c

        page = document[index]  # type: ignore[index]
        try:
            textpage = page.get_textpage()
            text = textpage.get_text_range().replace("\r\n", "\n").replace("\r", "\n")
            textpage.close()
            picture = any(True for _ in page.get_objects(filter=[pdfium_c.FPDF_PAGEOBJ_IMAGE], max_depth=2))
        finally:
            page.close()
        return text, picture

    def picture(self, index: int):  # noqa: ANN201 - a PIL image
        """Page `index` rendered for OCR, from the document already open."""
        document = self._open()
        if document is None:
            raise OcrError(f"PDFium cannot open the file to render it ({self.failed})")
        page = document[index]  # type: ignore[index]
        try:
            return render(page)
        finally:
            page.close()

    def close(self) -> None:
        if self._document is not None:
            self._document.close()  # type: ignore[attr-defined]
            self._document = None


_AUTO_ENGINE: list[OcrEngine | None] = []


def _auto_ocr() -> OcrEngine | None:
    """The best installed OCR engine, looked for once per process."""
    if not _AUTO_ENGINE:
        _AUTO_ENGINE.append(best_engine())
    return _AUTO_ENGINE[0]


# A line of text that pypdf ends where the next one starts on the same baseline, to
# its right, is one row: the cells of a table that its writer drew one by one
# (reportlab draws each cell as a text object of its own, and pypdf ends each with a
# line break). Further right than this many ems past the line's estimated end it is
# a column (a tab, which normalisation makes a space), nearer a word of the same line.
ROW_GAP_EMS = 1.5
# A baseline within this share of an em of the line's is the same baseline.
BASELINE_EMS = 0.2
# The estimated width of a character, in ems (the line's end is estimated from it).
CHARACTER_EMS = 0.5


def _origin(cm: list[float], tm: list[float]) -> tuple[float, float]:
    """Where a text object starts on the page: the text matrix's origin through the
    current transformation (PDF's row-vector convention, ISO 32000-2 §8.3.3)."""
    x, y = tm[4], tm[5]
    return x * cm[0] + y * cm[2] + cm[4], x * cm[1] + y * cm[3] + cm[5]


def _em(cm: list[float], tm: list[float], size: float) -> float:
    """The font size on the page: `size` through the text and page matrices' vertical scale."""
    b, d = tm[2] * cm[0] + tm[3] * cm[2], tm[2] * cm[1] + tm[3] * cm[3]
    return abs(size) * math.hypot(b, d) or abs(size) or 1.0


def page_text(page: PageObject) -> str:
    """pypdf's text of the page, with a table's rows kept on one line each.

    pypdf ends a text object's line with a line break; where a writer drew each cell
    of a table as an object of its own, a row came out one cell a line ("multiline /
    for multiline text widget / 1<<12"), and a reader could not tell which value was
    whose (docs/lab/answers-bench-qa.md, session 27). Here a line break between two
    lines on the same baseline, the second to the right, becomes a tab (or a space, for
    a word of the same line). Only those breaks change, one character for one, so the
    text keeps pypdf's order and length; where pypdf's pieces do not add up to its
    text, its text is kept as it is."""
    pieces: list[tuple[str, tuple[float, float], float]] = []

    def visit(text: str, cm: list[float], tm: list[float], font: object, size: float) -> None:
        if text:
            pieces.append((text, _origin(cm, tm), _em(cm, tm, size)))

    plain = page.extract_text(visitor_text=visit)
    if "".join(piece[0] for piece in pieces) != plain:
        return plain
    out = [piece[0] for piece in pieces]
    for i in range(1, len(pieces)):
        line, (x, y), em = pieces[i - 1]
        after, (next_x, next_y), _ = pieces[i]
        one_line = line.endswith("\n") and "\n" not in line[:-1] and line.strip()
        if not one_line or after.startswith("\n") or abs(next_y - y) > BASELINE_EMS * em or next_x <= x:
            continue
        gap = next_x - (x + CHARACTER_EMS * em * len(line.rstrip()))
        out[i - 1] = line[:-1] + ("\t" if gap > ROW_GAP_EMS * em else " ")
    return "".join(out)


def _read_page(reader: PdfReader, index: int, pdfium: _Pdfium, report, label: str) -> str:  # noqa: ANN001
    """One page's raw text: pypdf's, else PDFium's; a picture without text is
    listed in `report.needs_ocr`."""
    failure: Exception | None = None
    scanned = False
    text = ""
    try:
        page = reader.pages[index]
        text = page_text(page)
        scanned = not text.strip() and _looks_scanned(page)
        _release_contents(page)
        del page
    except (Cancelled, MemoryError):
        raise
    except Exception as error:  # one unreadable page must not lose the book
        failure = error
    if not text.strip():
        try:
            fallback, picture = pdfium.text(index)
        except Exception as error:  # PDFium failing on a page is as recoverable as pypdf failing
            fallback, picture = "", False
            report.warnings.append(f"page {label}: PDFium could not read it either ({error})")
        if fallback.strip():
            report.pdfium_pages.append(index)
            return fallback
        if failure is not None:
            report.warnings.append(f"page {label}: text could not be extracted ({failure})")
        if scanned or picture:
            report.needs_ocr.append(index)
        elif failure is None:
            report.blank_pages.append(index)
        else:
            report.unread_pages.append(index)
    return text


def _ocr_pages(pdfium: _Pdfium, engine: OcrEngine, raw_pages: list[str | None], report,  # noqa: ANN001
               labels: list[str], progress: Progress | None) -> dict[int, list]:
    """Read the pages in `report.needs_ocr` with `engine`. Pages are rendered here
    (PDFium is not thread-safe) and read on one thread per core where the engine
    allows it; results are taken in page order, and progress counts them on after
    the pages already read, so a cancel from `progress` stops within a page or two.
    Returns each OCR'd page's word boxes."""
    pages = list(report.needs_ocr)
    boxes: dict[int, list] = {}
    report.ocr_engine = engine.name
    workers = OCR_WORKERS if getattr(engine, "parallel", False) else 1
    done = len(raw_pages)
    pending: deque[tuple[int, Future[OcrResult]]] = deque()
    finished = 0
    describe = progress is not None and accepts_keyword(progress, "what")

    def take() -> None:
        nonlocal finished
        index, future = pending.popleft()
        try:
            result = future.result()
        except OcrError as error:
            report.warnings.append(f"page {labels[index]}: OCR failed ({error})")
        else:
            raw_pages[index] = result.text
            boxes[index] = result.words
            report.needs_ocr.remove(index)
            report.ocr_pages.append(index)
            report.ocr_confidence.append(round(result.confidence if result.text.strip() else 0.0, 3))
        finished += 1
        if progress is not None:
            if describe:
                progress(done + finished, done + len(pages), what=f"OCR page {finished} of {len(pages)}")
            else:
                progress(done + finished, done + len(pages))

    with ThreadPoolExecutor(workers, thread_name_prefix="ocr") as pool:
        try:
            for index in pages:
                pending.append((index, pool.submit(engine.read, pdfium.picture(index))))
                while len(pending) >= workers:
                    take()
            while pending:
                take()
        except BaseException:
            for _, future in pending:
                future.cancel()
            raise
    return boxes


def page_accounting(report) -> dict[str, int]:  # noqa: ANN001 - an ExtractionReport
    """How each page of a PDF came by its text, or why it has none; "unaccounted"
    counts pages with no text that no list explains (0 unless the reader is wrong)."""
    ocr_empty = sum(1 for confidence in report.ocr_confidence if confidence == 0)
    empty = {index for index, length in enumerate(report.chars_per_page) if not length}
    explained = set(report.needs_ocr) | set(report.blank_pages) | set(report.unread_pages) | set(report.ocr_pages)
    return {
        "pages": report.pages,
        "text": report.pages - len(empty | set(report.pdfium_pages) | set(report.ocr_pages)),
        "pdfium": len(report.pdfium_pages),
        "ocr": len(report.ocr_pages) - ocr_empty,
        "ocr_found_nothing": ocr_empty,
        "needs_ocr": len(report.needs_ocr),
        "blank": len(report.blank_pages),
        "unread": len(report.unread_pages),
        "unaccounted": len(empty - explained),
    }


def read_pdf(path: str | Path, *, password: str | None = None, progress: Progress | None = None,
             ocr: OcrEngine | None | str = "auto") -> Document:
    """`ocr`: an engine for pages without a text layer, None for none, or "auto"
    for the best one installed (`ingest.ocr.best_engine`)."""
    path = Path(path)
    document = Document(path=str(path), format="pdf", pages=[])
    report = document.report
    with _collect_pypdf_warnings() as pypdf_warnings, path.open("rb") as stream:
        reader = _open(path, stream, password)
        report.encrypted = reader.is_encrypted
        try:
            count = len(reader.pages)
        except Exception as error:
            raise CorruptDocumentError(f"{path.name} is a damaged PDF: its page tree is unreadable ({error})") from error
        if count == 0:
            raise CorruptDocumentError(f"{path.name} has no pages")
        labels = _labels(reader, count, document)
        _metadata(reader, document)
        _outline(reader, document)

        raw_pages: list[str | None] = []
        pdfium = _Pdfium(path, password)  # open once, for the pages pypdf misses and for OCR's pictures
        ocr_words: dict[int, list] = {}
        try:
            for index in range(count):
                text = _read_page(reader, index, pdfium, report, labels[index])
                raw_pages.append(text)
                if progress is not None:
                    progress(index + 1, count + len(report.needs_ocr))
            engine = _auto_ocr() if ocr == "auto" else ocr
            if report.needs_ocr and engine is not None and not isinstance(engine, str):
                ocr_words = _ocr_pages(pdfium, engine, raw_pages, report, labels, progress)
        finally:
            pdfium.close()
        compounds: set[str] = set()
        for text in raw_pages:
            compounds |= inline_compounds(text or "")

    running = find_running_lines([text or "" for text in raw_pages], labels)
    chapter: str | None = None
    starts: dict[int, str] = {}
    for entry in document.outline:
        if entry.page_index is not None:
            starts[entry.page_index] = entry.title  # the last entry on a page names what follows
    for index in range(count):
        raw = raw_pages[index] or ""
        raw_pages[index] = None  # raw text is not kept past normalisation
        normalized = normalize(raw, join_hyphens=True, drop_spans=running[index], keep_compounds=compounds)
        chapter = starts.get(index, chapter)
        document.pages.append(
            Page(index=index, text=normalized.text, label=labels[index], title=chapter, raw_offsets=normalized.raw_offsets,
                 ocr_words=ocr_words.get(index))
        )
        if raw.strip() and not normalized.text:
            report.blank_pages.append(index)  # nothing but a running header or page number
    report.blank_pages.sort()

    finish(document, drop_empty=False)
    non_empty = [length for length in report.chars_per_page if length]
    median = statistics.median(non_empty) if non_empty else 0
    if median >= SPARSE_MIN_MEDIAN:
        report.sparse_pages = [
            index for index, length in enumerate(report.chars_per_page) if 0 < length < SPARSE_FRACTION * median
        ]
    if not any(report.chars_per_page):
        if report.needs_ocr:
            report.warnings.append(f"no text: {len(report.needs_ocr)} pages are pictures without a text layer; "
                                   f"to read them, {HOW_TO_ENABLE}")
        elif report.ocr_pages:
            report.warnings.append(f"no text: OCR ({report.ocr_engine}) found none on {len(report.ocr_pages)} pages")
        else:
            report.warnings.append("no text: the pages carry no text layer or picture that could be read")
    if pypdf_warnings:
        unique = list(dict.fromkeys(pypdf_warnings))
        report.warnings.extend(f"pypdf: {message}" for message in unique[:MAX_REPORTED_WARNINGS])
        if len(unique) > MAX_REPORTED_WARNINGS:
            report.warnings.append(f"pypdf: {len(unique) - MAX_REPORTED_WARNINGS} more warnings")
    return document
