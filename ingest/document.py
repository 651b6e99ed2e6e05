"""The plain types every reader produces and the library stores.

A `Document` is its text as ordered `Page`s (PDF pages) or sections (EPUB chapters,
headings of TXT/MD/HTML/DOCX). Each page knows its character span in the
document's full text (`Document.text`, the pages joined by PAGE_SEPARATOR), so an
evidence span found by the engine maps back to a page and to characters inside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Pages are joined with this separator into Document.text; offsets count it.
PAGE_SEPARATOR = "\n\n"


@dataclass
class Page:
    index: int  # 0-based physical order in the document
    text: str  # normalised text of this page or section
    start: int = 0  # character offset of `text` in Document.text
    label: str | None = None  # printed page label ("iv", "12") or section title
    title: str | None = None  # chapter/heading title where the format has one
    # Offsets into the reader's raw extracted text for this page, one per character
    # of `text`, when normalisation changed it (ligatures, hyphenation); None when
    # the text is the raw text unchanged. Not stored in the library.
    raw_offsets: list[int] | None = None
    # Where OCR found each word on the page, in reading order (ingest.ocr.OcrWord);
    # None for a page with a text layer.
    ocr_words: list[tuple[str, float, float, float, float]] | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.text)


@dataclass
class OutlineEntry:
    title: str
    page_index: int | None  # the page/section it points to, if resolvable
    level: int = 0


@dataclass
class ExtractionReport:
    """What went right and wrong while reading, shown to the user per document."""

    pages: int = 0
    characters: int = 0
    encrypted: bool = False
    needs_ocr: list[int] = field(default_factory=list)  # pictures without a text layer, not OCR'd
    blank_pages: list[int] = field(default_factory=list)  # no text and no picture: nothing to read
    unread_pages: list[int] = field(default_factory=list)  # both PDF readers failed (reason in warnings)
    sparse_pages: list[int] = field(default_factory=list)  # suspiciously little text
    warnings: list[str] = field(default_factory=list)
    chars_per_page: list[int] = field(default_factory=list)
    # Who read which page: every page not listed here was read by the format's
    # reader (pypdf for a PDF).
    pdfium_pages: list[int] = field(default_factory=list)  # pypdf failed or found nothing; PDFium read it
    ocr_pages: list[int] = field(default_factory=list)  # read by OCR
    ocr_confidence: list[float] = field(default_factory=list)  # 0..1, one per entry of ocr_pages
    ocr_engine: str | None = None  # "tesseract 5.3.0"

    def engine_of(self, index: int, reader: str = "pypdf") -> str:
        if index in self.ocr_pages:
            return f"OCR ({self.ocr_engine})"
        if index in self.pdfium_pages:
            return "PDFium"
        return reader

    def notice(self) -> str:
        """What a library row says about this document's text, or "" when all is well."""
        if self.needs_ocr:
            count = len(self.needs_ocr)
            return f"{count} page{'s' if count != 1 else ''} need{'s' if count == 1 else ''} OCR"
        if self.pages and not any(self.chars_per_page):
            return "no text found"
        return ""


@dataclass
class Document:
    path: str
    format: str  # "pdf", "epub", "txt", "md", "html", "docx"
    pages: list[Page]
    title: str | None = None
    author: str | None = None
    date: str | None = None
    outline: list[OutlineEntry] = field(default_factory=list)
    report: ExtractionReport = field(default_factory=ExtractionReport)

    @property
    def text(self) -> str:
        return PAGE_SEPARATOR.join(page.text for page in self.pages)

    def page_at(self, offset: int) -> Page:
        """The page holding character `offset` of Document.text."""
        for page in self.pages:
            if offset < page.end + len(PAGE_SEPARATOR):
                return page
        return self.pages[-1]


def assign_offsets(pages: list[Page]) -> list[Page]:
    """Set each page's `start` from the page texts and PAGE_SEPARATOR."""
    position = 0
    for index, page in enumerate(pages):
        page.index = index
        page.start = position
        position += len(page.text) + len(PAGE_SEPARATOR)
    return pages
