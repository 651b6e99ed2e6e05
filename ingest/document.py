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
    # the text is the raw text unchanged. Lets the viewer highlight in the original.
    raw_offsets: list[int] | None = None

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
    needs_ocr: list[int] = field(default_factory=list)  # page indexes with no text layer
    sparse_pages: list[int] = field(default_factory=list)  # suspiciously little text
    warnings: list[str] = field(default_factory=list)
    chars_per_page: list[int] = field(default_factory=list)


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
