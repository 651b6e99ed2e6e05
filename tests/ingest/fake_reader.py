"""A tiny stand-in for `ingest.readers.read_document`, so the library and job tests
do not depend on the real readers: .txt files only, pages split at form feeds,
`progress(done, total)` called after each page like the real readers.

The first line may be `Title: …`; a file whose first line is `ENCRYPTED: secret`
needs the password `secret`; an empty file is corrupt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ingest.document import Document, ExtractionReport, Page, assign_offsets
from ingest.errors import CorruptDocumentError, EncryptedDocumentError, UnsupportedFormatError

EXTENSIONS = frozenset({".txt"})


class FakeReader:
    """Callable like read_document; remembers which files it read."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[Path] = []

    def __call__(
        self, path: Path, *, password: str | None = None, progress: Callable[[int, int], None] | None = None
    ) -> Document:
        path = Path(path)
        self.calls.append(path)
        if self.delay:
            time.sleep(self.delay)
        if path.suffix.lower() != ".txt":
            raise UnsupportedFormatError(f"{path.name}: not a format Quire reads")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise CorruptDocumentError(f"{path.name}: the file is empty")
        title = None
        first, _, rest = text.partition("\n")
        if first.startswith("ENCRYPTED: "):
            if password != first.removeprefix("ENCRYPTED: "):
                raise EncryptedDocumentError(f"{path.name} is password-protected: give the password")
            text = rest
            first, _, rest = text.partition("\n")
        if first.startswith("Title: "):
            title = first.removeprefix("Title: ").strip()
            text = rest
        chunks = text.split("\f")
        pages = []
        for number, chunk in enumerate(chunks):
            pages.append(Page(index=number, text=chunk.strip(), label=str(number + 1)))
            if progress is not None:
                progress(number + 1, len(chunks))
        report = ExtractionReport(
            pages=len(pages),
            characters=sum(len(page.text) for page in pages),
            sparse_pages=[page_number for page_number, page in enumerate(pages) if len(page.text) < 5],
            chars_per_page=[len(page.text) for page in pages],
        )
        return Document(path=str(path), format="txt", pages=assign_offsets(pages), title=title, report=report)
