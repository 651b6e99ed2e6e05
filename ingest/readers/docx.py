"""Word (.docx, Office Open XML) reader on python-docx.

Body paragraphs and tables in document order (a table row becomes one line, cells
separated by a tab); a paragraph styled "Title" or "Heading 1"–"Heading 3" opens a
new section titled by it, deeper headings go into the outline only. Core properties
give title, author and creation date.
(A password-protected .docx is an OLE compound file, not a zip; `ingest.readers`
recognises it before this reader is called.)

References: ECMA-376 Part 1 §17 (WordprocessingML); python-docx documentation,
https://python-docx.readthedocs.io/
"""

from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path

import docx
from docx.opc.exceptions import PackageNotFoundError
from docx.table import Table
from docx.text.paragraph import Paragraph

from ingest.document import Document, OutlineEntry
from ingest.errors import CorruptDocumentError
from ingest.readers.common import Progress, Section, finish, page_from_raw, split_paragraphs

log = logging.getLogger(__name__)

SECTION_HEADING_LEVEL = 3
_HEADING_STYLE = re.compile(r"^Heading ([1-9])$")


def _heading_level(paragraph: Paragraph) -> int | None:
    try:
        name = paragraph.style.name if paragraph.style is not None else ""
    except (KeyError, ValueError):
        return None
    if name == "Title":
        return 1
    match = _HEADING_STYLE.match(name or "")
    return int(match.group(1)) if match else None


def _table_text(table: Table) -> str:
    rows = []
    for row in table.rows:
        cells: list[str] = []
        for cell in row.cells:
            text = " ".join(cell.text.split())
            # Merged cells repeat in python-docx's grid; show each once per row.
            if not cells or cells[-1] != text:
                cells.append(text)
        rows.append("\t".join(cells))
    return "\n".join(rows)


def read_docx(path: str | Path, *, progress: Progress | None = None) -> Document:
    path = Path(path)
    try:
        word = docx.Document(str(path))
    except (PackageNotFoundError, zipfile.BadZipFile, KeyError) as error:
        raise CorruptDocumentError(f"{path.name} is not a readable Word document ({error})") from error
    document = Document(path=str(path), format="docx", pages=[])
    sections: list[Section] = []
    blocks: list[str] = []
    title: str | None = None
    level: int | None = None

    def close_section() -> None:
        raw = "\n\n".join(blocks)
        for number, piece in enumerate(split_paragraphs(raw)):
            sections.append(Section(piece, title, title, level if number == 0 else None))

    for block in word.iter_inner_content():
        if isinstance(block, Table):
            blocks.append(_table_text(block))
            continue
        text = block.text
        heading = _heading_level(block)
        if heading is not None and text.strip():
            document.outline.append(OutlineEntry(" ".join(text.split()), None, heading - 1))
            if heading <= SECTION_HEADING_LEVEL:
                if blocks:
                    close_section()
                blocks = []
                title, level = " ".join(text.split()), heading
            document.outline[-1].page_index = len(sections)
        if text.strip():
            blocks.append(text)
    if blocks or not sections:
        close_section()

    for number, section in enumerate(sections):
        document.pages.append(page_from_raw(section))
        if progress is not None:
            progress(number + 1, len(sections))
    properties = word.core_properties
    document.title = properties.title or next((entry.title for entry in document.outline if entry.level == 0), None)
    document.author = properties.author or None
    document.date = properties.created.isoformat() if properties.created else None
    return finish(document)
