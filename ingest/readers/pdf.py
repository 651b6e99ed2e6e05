"""PDF reader on pypdf: text per physical page, printed page labels, the outline,
document metadata, and a report of pages that need OCR or look too thin.

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
import statistics
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from pypdf import PageObject, PasswordType, PdfReader
from pypdf.errors import DependencyError
from pypdf.generic import ArrayObject, Destination, EncodedStreamObject

from ingest.document import Document, OutlineEntry, Page
from ingest.errors import Cancelled, CorruptDocumentError, EncryptedDocumentError
from ingest.normalize import find_running_lines, inline_compounds, normalize
from ingest.readers.common import Progress, finish

log = logging.getLogger(__name__)
logging.getLogger("pypdf").addHandler(logging.NullHandler())
logging.getLogger("pypdf").propagate = False

SPARSE_FRACTION = 0.1  # a page with under 10% of the median page's characters is sparse …
SPARSE_MIN_MEDIAN = 200  # … when the median page holds real prose
MAX_REPORTED_WARNINGS = 20


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
    document.title = (info.title or "").strip() or None
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


def read_pdf(path: str | Path, *, password: str | None = None, progress: Progress | None = None) -> Document:
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
        compounds: set[str] = set()
        for index in range(count):
            try:
                page = reader.pages[index]
                text = page.extract_text()
                if not text.strip() and _looks_scanned(page):
                    report.needs_ocr.append(index)
                _release_contents(page)
                del page
            except (Cancelled, MemoryError):
                raise
            except Exception as error:  # one unreadable page must not lose the book
                report.warnings.append(f"page {labels[index]}: text could not be extracted ({error})")
                text = ""
            raw_pages.append(text)
            compounds |= inline_compounds(text)
            if progress is not None:
                progress(index + 1, count)

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
            Page(index=index, text=normalized.text, label=labels[index], title=chapter, raw_offsets=normalized.raw_offsets)
        )

    finish(document, drop_empty=False)
    non_empty = [length for length in report.chars_per_page if length]
    median = statistics.median(non_empty) if non_empty else 0
    if median >= SPARSE_MIN_MEDIAN:
        report.sparse_pages = [
            index for index, length in enumerate(report.chars_per_page) if 0 < length < SPARSE_FRACTION * median
        ]
    if pypdf_warnings:
        unique = list(dict.fromkeys(pypdf_warnings))
        report.warnings.extend(f"pypdf: {message}" for message in unique[:MAX_REPORTED_WARNINGS])
        if len(unique) > MAX_REPORTED_WARNINGS:
            report.warnings.append(f"pypdf: {len(unique) - MAX_REPORTED_WARNINGS} more warnings")
    return document
