"""Document readers, one module per format, behind `read_document`.

The format is decided by the file's content, not its name: a PDF starts with
`%PDF-` (ISO 32000 §7.5.2 allows up to 1,024 bytes of junk before it); EPUB and
DOCX are zip archives told apart by their members (EPUB's `mimetype` /
META-INF/container.xml, DOCX's word/document.xml); a password-protected DOCX is an
OLE compound file. Known binary formats (images, archives, executables) are refused
whatever their extension. Text formats have no magic number, so for content that is
text the extension decides among TXT, Markdown and HTML.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

from ingest.document import Document
from ingest.errors import CorruptDocumentError, EncryptedDocumentError, UnsupportedFormatError
from ingest.readers.common import Progress

log = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS: frozenset[str] = frozenset(
    {".pdf", ".epub", ".txt", ".text", ".md", ".markdown", ".html", ".htm", ".xhtml", ".docx"}
)
_MARKDOWN = {".md", ".markdown"}
_HTML = {".html", ".htm", ".xhtml"}

_PDF_MAGIC = b"%PDF-"
_ZIP_MAGIC = b"PK\x03\x04"
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
# Formats people drop by mistake, named so the error says what the file really is.
_BINARY_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"\x7fELF", "an executable"),
    (b"AT&TFORM", "a DjVu document"),
)
_HEAD_BYTES = 8192
# A password-protected OOXML file is an OLE compound file holding a stream of this
# name (MS-OFFCRYPTO §2.3.4.4); directory entries store names in UTF-16LE.
_ENCRYPTED_PACKAGE = "EncryptedPackage".encode("utf-16-le")


def detect_format(path: str | Path) -> str:
    """"pdf", "epub", "docx", "md", "html" or "txt", from the file's content.

    Raises CorruptDocumentError for an empty file, EncryptedDocumentError for a
    password-protected Word file, UnsupportedFormatError for anything else."""
    path = Path(path)
    suffix = path.suffix.lower()
    with path.open("rb") as stream:
        head = stream.read(_HEAD_BYTES)
    if not head:
        raise CorruptDocumentError(f"{path.name} is empty (0 bytes)")
    if _PDF_MAGIC in head[:1024 + len(_PDF_MAGIC)]:
        return "pdf"
    if suffix == ".pdf" and _PDF_MAGIC.startswith(head[: len(_PDF_MAGIC)]):
        raise CorruptDocumentError(f"{path.name} is truncated: it ends inside the PDF header")
    if head.startswith(_ZIP_MAGIC) or (head.startswith(b"PK") and suffix in (".epub", ".docx")):
        return _zip_format(path, suffix)
    if head.startswith(_OLE_MAGIC):
        if _ole_encrypted(path):
            raise EncryptedDocumentError(
                f"{path.name} is a password-protected Office document; save an unprotected copy to import it"
            )
        raise UnsupportedFormatError(f"{path.name} is an old binary Office file (.doc/.xls); save it as .docx or PDF")
    for magic, what in _BINARY_MAGIC:
        if head.startswith(magic):
            raise UnsupportedFormatError(f"{path.name} is {what}, not a document Quire reads")
    if suffix in _MARKDOWN:
        return "md"
    if suffix in _HTML:
        return "html"
    if suffix in (".txt", ".text", ""):
        stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
        return "html" if stripped.startswith((b"<!doctype html", b"<html")) else "txt"
    if suffix in (".pdf", ".epub", ".docx"):
        # The name promises a format the bytes do not hold (a renamed or damaged file).
        raise CorruptDocumentError(f"{path.name} is not a {suffix[1:].upper()} file: its content is not in that format")
    readable = ", ".join(sorted(SUPPORTED_EXTENSIONS))
    raise UnsupportedFormatError(f"{path.name}: unsupported file type {suffix!r} (Quire reads {readable})")


def _ole_encrypted(path: Path) -> bool:
    # The directory naming the stream may sit anywhere; small files are read whole.
    with path.open("rb") as stream:
        return _ENCRYPTED_PACKAGE in stream.read(1 << 20)


def _zip_format(path: Path, suffix: str) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            mimetype = archive.read("mimetype").strip() if "mimetype" in names else b""
    except zipfile.BadZipFile as error:
        raise CorruptDocumentError(f"{path.name} is a damaged zip archive ({error}); the file may be truncated") from error
    if mimetype == b"application/epub+zip" or "META-INF/container.xml" in names:
        return "epub"
    if "word/document.xml" in names:
        return "docx"
    if suffix == ".epub" or any(name.lower().endswith(".opf") for name in names):
        return "epub"  # a broken EPUB: its reader says what is missing
    raise UnsupportedFormatError(f"{path.name} is a zip archive that is neither an EPUB nor a Word document")


def read_document(path: str | Path, *, password: str | None = None, progress: Progress | None = None) -> Document:
    """Read any supported document into a `Document`.

    `password` opens an encrypted PDF. `progress(done, total)` is called after each
    page or section; raising `ingest.errors.Cancelled` from it stops the read.
    Raises UnsupportedFormatError, CorruptDocumentError or EncryptedDocumentError
    with a one-line message; FileNotFoundError/PermissionError pass through."""
    path = Path(path)
    kind = detect_format(path)
    log.debug("reading %s as %s", path, kind)
    if kind == "pdf":
        from ingest.readers.pdf import read_pdf

        return read_pdf(path, password=password, progress=progress)
    if kind == "epub":
        from ingest.readers.epub import read_epub

        return read_epub(path, progress=progress)
    if kind == "docx":
        from ingest.readers.docx import read_docx

        return read_docx(path, progress=progress)
    if kind == "html":
        from ingest.readers.html import read_html

        return read_html(path, progress=progress)
    from ingest.readers.text import read_text

    return read_text(path, markdown=kind == "md", progress=progress)


__all__ = ["SUPPORTED_EXTENSIONS", "detect_format", "read_document"]
