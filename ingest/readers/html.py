"""HTML reader: visible text cut into sections at <h1>–<h3>, the document title from
<title> (else the first <h1>), author and date from <meta>.

Text extraction lives in `ingest.readers.markup`, shared with the EPUB reader.
"""

from __future__ import annotations

from pathlib import Path

from ingest.document import Document, OutlineEntry
from ingest.errors import CorruptDocumentError
from ingest.readers.common import Progress, Section, finish, page_from_raw, split_paragraphs
from ingest.readers.markup import Heading, decode_markup, extract_markup

SECTION_HEADING_LEVEL = 3  # <h1>–<h3> open a section; deeper headings stay inside it

_AUTHOR_META = ("author", "dc.creator", "dcterms.creator", "article:author")
_DATE_META = ("date", "dc.date", "dcterms.date", "dcterms.created", "article:published_time")


def heading_sections(text: str, headings: list[Heading], max_level: int = SECTION_HEADING_LEVEL) -> list[Section]:
    """Cut extracted text at the headings of level ≤ `max_level`."""
    cuts = [heading for heading in headings if heading.level <= max_level]
    sections: list[Section] = []
    if not cuts or cuts[0].offset > 0:
        end = cuts[0].offset if cuts else len(text)
        sections.append(Section(text[:end]))
    for number, heading in enumerate(cuts):
        end = cuts[number + 1].offset if number + 1 < len(cuts) else len(text)
        sections.append(Section(text[heading.offset:end], heading.title, heading.title, heading.level))
    # Long stretches without headings are cut at paragraphs like plain text.
    pieces: list[Section] = []
    for section in sections:
        for number, piece in enumerate(split_paragraphs(section.raw)):
            pieces.append(Section(piece, section.title, section.label, section.heading_level if number == 0 else None))
    return pieces


def read_html(path: str | Path, *, progress: Progress | None = None) -> Document:
    path = Path(path)
    data = path.read_bytes()
    if not data.strip():
        raise CorruptDocumentError(f"{path.name} is empty")
    markup = extract_markup(decode_markup(data))
    document = Document(path=str(path), format="html", pages=[])
    sections = heading_sections(markup.text, markup.headings)
    for number, section in enumerate(sections):
        document.pages.append(page_from_raw(section))
        if section.heading_level is not None and section.title:
            document.outline.append(OutlineEntry(section.title, number, section.heading_level - 1))
        if progress is not None:
            progress(number + 1, len(sections))
    first_h1 = next((heading.title for heading in markup.headings if heading.level == 1), None)
    document.title = markup.title or first_h1
    document.author = next((markup.meta[name] for name in _AUTHOR_META if name in markup.meta), None)
    document.date = next((markup.meta[name] for name in _DATE_META if name in markup.meta), None)
    if not markup.text:
        document.report.warnings.append("the page has no visible text")
    return finish(document)
