"""Plain text and Markdown reader.

Decoding: a byte-order mark decides (UTF-8/16/32); otherwise strict UTF-8; otherwise
charset-normalizer's ranking, preferring Windows-1252 among candidates that read
about as cleanly as the best one — on short Western text its top pick is often a
Baltic or Central-European code page that turns "ï" into "ļ"; last resort cp1252,
then latin-1 (which decodes any byte). Line endings become LF.

Sections: Markdown is cut at ATX headings (`#` … `######`, CommonMark §4.2) outside
fenced code blocks (§4.5), the heading text being the section title; plain text is
cut at paragraph breaks into sections of roughly 3,000–6,000 characters so a page
stays a sensible size for the viewer and for evidence. Markdown sections longer
than that are cut the same way and keep their title.

Reference: CommonMark spec 0.31, https://spec.commonmark.org/0.31.2/
"""

from __future__ import annotations

import codecs
import logging
import re
from pathlib import Path

import charset_normalizer

from ingest.document import Document, OutlineEntry, Page
from ingest.errors import CorruptDocumentError, UnsupportedFormatError
from ingest.readers.common import Progress, Section, finish, page_from_raw, split_paragraphs

log = logging.getLogger(__name__)

_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_WESTERN = ("cp1252", "latin_1", "iso8859_15")
_CHAOS_MARGIN = 0.1  # how much messier than the best guess cp1252 may read and still win

_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_LINE_ENDINGS = re.compile(r"\r\n?")


def decode_text(data: bytes) -> tuple[str, str]:
    """(text, encoding name) of text file bytes, line endings left as they are."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return data[len(bom):].decode(encoding, errors="replace"), encoding + " (BOM)"
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    matches = list(charset_normalizer.from_bytes(data))
    if matches:
        best = matches[0]
        for match in matches:
            if match.encoding in _WESTERN and match.chaos <= best.chaos + _CHAOS_MARGIN:
                best = match
                break
        return str(best), best.encoding
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"


def _read_text(path: Path) -> tuple[str, str]:
    data = path.read_bytes()
    if not data:
        raise CorruptDocumentError(f"{path.name} is empty (0 bytes)")
    if b"\x00" in data[:8192] and not data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UnsupportedFormatError(f"{path.name} is binary data, not text")
    text, encoding = decode_text(data)
    return _LINE_ENDINGS.sub("\n", text), encoding


def markdown_sections(text: str) -> list[Section]:
    """Sections of Markdown `text` at ATX headings outside fenced code."""
    sections: list[Section] = []
    current_start = 0
    current_title: str | None = None
    current_level: int | None = None
    fence: str | None = None
    position = 0
    for line in text.splitlines(keepends=True):
        fence_match = _FENCE.match(line)
        if fence is not None:
            if fence_match and fence_match.group(1)[0] == fence[0] and len(fence_match.group(1)) >= len(fence):
                fence = None
        elif fence_match:
            fence = fence_match.group(1)
        else:
            heading = _ATX_HEADING.match(line.rstrip("\n"))
            if heading:
                if position > current_start:
                    sections.append(Section(text[current_start:position], current_title, current_title, current_level))
                current_start = position
                current_title = (heading.group(2) or "").strip() or None
                current_level = len(heading.group(1))
        position += len(line)
    sections.append(Section(text[current_start:], current_title, current_title, current_level))
    return sections


def _split_long(sections: list[Section]) -> list[Section]:
    pieces: list[Section] = []
    for section in sections:
        for number, piece in enumerate(split_paragraphs(section.raw)):
            pieces.append(Section(piece, section.title, section.label, section.heading_level if number == 0 else None))
    return pieces


def read_text(path: str | Path, *, markdown: bool = False, progress: Progress | None = None) -> Document:
    """Read a TXT or Markdown file into sections."""
    path = Path(path)
    text, encoding = _read_text(path)
    document = Document(path=str(path), format="md" if markdown else "txt", pages=[])
    if encoding not in ("utf-8", "utf-8 (BOM)"):
        document.report.warnings.append(f"decoded as {encoding}")
    sections = _split_long(markdown_sections(text) if markdown else [Section(text)])
    pages: list[Page] = []
    for number, section in enumerate(sections):
        # Keep indentation: in Markdown it is syntax, in plain text it is layout.
        pages.append(page_from_raw(section, collapse_spaces=False))
        if section.heading_level is not None and section.title:
            document.outline.append(OutlineEntry(section.title, number, section.heading_level - 1))
        if progress is not None:
            progress(number + 1, len(sections))
    document.pages = pages
    if markdown:
        document.title = next((entry.title for entry in document.outline if entry.level == 0), None)
    if not any(page.text for page in pages):
        document.report.warnings.append("the file holds no text")
    return finish(document)
