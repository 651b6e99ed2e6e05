"""Build small real documents for the ingest tests: PDFs with reportlab (then page
labels and encryption with pypdf), PDFs byte by byte (damaged content streams),
scans (typed pages rendered by PDFium into picture-only PDFs) and EPUBs with zipfile.
DOCX files are built in the tests that read them, with python-docx."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from pypdf import PdfReader, PdfWriter
from reportlab.lib.pagesizes import A5
from reportlab.lib.utils import ImageReader
from reportlab.pdfgen import canvas

RUNNING_HEADER = "The Quire Test Book"


def write_pdf(
    path: Path,
    pages: Sequence[Sequence[str]],
    *,
    header: str | None = RUNNING_HEADER,
    footer_numbers: bool = True,
    outline: Sequence[tuple[str, int, int]] = (),
    scanned: Sequence[int] = (),
    title: str | None = None,
    author: str | None = None,
) -> Path:
    """One PDF page per entry of `pages` (its lines), a running header and page-number
    footer, outline entries (title, page index, level), and pages in `scanned`
    carrying only an image (no text layer)."""
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=A5)
    if title:
        pdf.setTitle(title)
    if author:
        pdf.setAuthor(author)
    width, height = A5
    image = Image.new("RGB", (60, 40), (200, 30, 30))
    for index, lines in enumerate(pages):
        pdf.bookmarkPage(f"p{index}")
        if index in scanned:
            pdf.drawImage(ImageReader(image), 40, 200, width=200, height=130)
        else:
            if header:
                pdf.setFont("Helvetica", 9)
                pdf.drawString(40, height - 30, header)
            pdf.setFont("Helvetica", 11)
            y = height - 60
            for line in lines:
                pdf.drawString(40, y, line)
                y -= 15
            if footer_numbers:
                pdf.setFont("Helvetica", 9)
                pdf.drawString(width / 2, 25, str(index + 1))
        for entry_title, page_index, level in outline:
            if page_index == index:
                pdf.addOutlineEntry(entry_title, f"p{index}", level=level)
        pdf.showPage()
    pdf.save()
    path.write_bytes(buffer.getvalue())
    return path


def add_page_labels(path: Path, front_matter: int) -> Path:
    """Label the first `front_matter` pages i, ii, … and the rest 1, 2, …"""
    writer = PdfWriter(clone_from=PdfReader(path))
    count = len(writer.pages)
    writer.set_page_label(0, front_matter - 1, style="/r")
    writer.set_page_label(front_matter, count - 1, style="/D", start=1)
    with path.open("wb") as stream:
        writer.write(stream)
    return path


def encrypt_pdf(source: Path, target: Path, password: str) -> Path:
    writer = PdfWriter(clone_from=PdfReader(source))
    writer.encrypt(user_password=password, owner_password=password + "-owner", algorithm="AES-256")
    with target.open("wb") as stream:
        writer.write(stream)
    return target


def write_raw_pdf(path: Path, contents: Sequence[bytes]) -> Path:
    """A PDF written byte by byte, one page per content stream, with Helvetica as
    /F1: the way to get content streams with the syntax errors real files have,
    which no PDF library writes."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{3 + 2 * n} 0 R" for n in range(len(contents))).encode()
    objects.append(b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, len(contents)))
    font = 3 + 2 * len(contents)
    for number, content in enumerate(contents):
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 300] /Contents %d 0 R "
                       b"/Resources << /Font << /F1 %d 0 R >> >> >>" % (4 + 2 * number, font))
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content))
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number + 1, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.write(b"".join(b"%010d 00000 n \n" % offset for offset in offsets))
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    path.write_bytes(out.getvalue())
    return path


def write_scanned_pdf(path: Path, pages: Sequence[Sequence[str]], *, dpi: int = 200) -> Path:
    """A scan of typed pages: each page is set in Helvetica with reportlab, rendered to
    a greyscale picture by PDFium, slightly rotated and blurred as a photocopier
    does, and placed as the only content of a page (no text layer)."""
    import pypdfium2
    from PIL import ImageFilter

    typed = write_pdf(path.with_suffix(".typed.pdf"), pages, header=None, footer_numbers=False)
    document = pypdfium2.PdfDocument(str(typed))
    pictures = []
    for page in document:
        picture = page.render(scale=dpi / 72, grayscale=True).to_pil()
        pictures.append(picture.rotate(0.5, fillcolor=255).filter(ImageFilter.GaussianBlur(0.6)))
        page.close()
    document.close()
    typed.unlink()
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=A5)
    width, height = A5
    for picture in pictures:
        pdf.drawImage(ImageReader(picture), 0, 0, width=width, height=height)
        pdf.showPage()
    pdf.save()
    path.write_bytes(buffer.getvalue())
    return path


CONTAINER_XML = """<?xml version="1.0" encoding="UTF-8"?>
<container version="1.0" xmlns="urn:oasis:names:tc:opendocument:xmlns:container">
  <rootfiles><rootfile full-path="OEBPS/content.opf" media-type="application/oebps-package+xml"/></rootfiles>
</container>"""


def _chapter(title: str, paragraphs: Sequence[str]) -> str:
    body = "".join(f"<p>{text}</p>\n" for text in paragraphs)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<html xmlns="http://www.w3.org/1999/xhtml" xmlns:epub="http://www.idpf.org/2007/ops">'
        f"<head><title>{title}</title><style>p {{ margin: 0 }}</style></head>"
        f"<body><h1>{title}</h1>\n{body}</body></html>"
    )


def write_epub(
    path: Path,
    chapters: Sequence[tuple[str, str, Sequence[str]]],
    *,
    toc: str = "ncx",
    with_container: bool = True,
    title: str = "A Test Book",
    creators: Sequence[str] = ("Ada Lovelace",),
    date: str = "1843-09-01",
    toc_titles: dict[str, str] | None = None,
) -> Path:
    """An EPUB whose spine follows `chapters` (file name, heading, paragraphs) while
    the archive stores the chapter files in reverse order. `toc` is "ncx" (EPUB 2)
    or "nav" (EPUB 3); `toc_titles` overrides a chapter's TOC title by file name."""
    toc_titles = toc_titles or {}
    manifest = "".join(
        f'<item id="c{number}" href="text/{name}" media-type="application/xhtml+xml"/>'
        for number, (name, _, _) in enumerate(chapters)
    )
    spine = "".join(f'<itemref idref="c{number}"/>' for number in range(len(chapters)))
    creator_xml = "".join(f"<dc:creator>{creator}</dc:creator>" for creator in creators)
    if toc == "ncx":
        manifest += '<item id="ncx" href="toc.ncx" media-type="application/x-dtbncx+xml"/>'
        spine_open = '<spine toc="ncx">'
    else:
        manifest += '<item id="nav" href="nav.xhtml" media-type="application/xhtml+xml" properties="nav"/>'
        spine_open = "<spine>"
    opf = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<package xmlns="http://www.idpf.org/2007/opf" version="3.0" unique-identifier="id">'
        '<metadata xmlns:dc="http://purl.org/dc/elements/1.1/">'
        f'<dc:identifier id="id">urn:test</dc:identifier><dc:title>{title}</dc:title>{creator_xml}<dc:date>{date}</dc:date>'
        f"</metadata><manifest>{manifest}</manifest>{spine_open}{spine}</spine></package>"
    )
    entries = [(name, toc_titles.get(name, heading)) for name, heading, _ in chapters]
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(zipfile.ZipInfo("mimetype"), "application/epub+zip", compress_type=zipfile.ZIP_STORED)
        if with_container:
            archive.writestr("META-INF/container.xml", CONTAINER_XML)
        archive.writestr("OEBPS/content.opf", opf)
        if toc == "ncx":
            points = "".join(
                f'<navPoint id="n{number}" playOrder="{number + 1}"><navLabel><text>{label}</text></navLabel>'
                f'<content src="text/{name}"/></navPoint>'
                for number, (name, label) in enumerate(entries)
            )
            archive.writestr(
                "OEBPS/toc.ncx",
                '<?xml version="1.0" encoding="UTF-8"?><ncx xmlns="http://www.daisy.org/z3986/2005/ncx/" version="2005-1">'
                f"<head/><docTitle><text>{title}</text></docTitle><navMap>{points}</navMap></ncx>",
            )
        else:
            items = "".join(f'<li><a href="text/{name}">{label}</a></li>' for name, label in entries)
            archive.writestr(
                "OEBPS/nav.xhtml",
                '<?xml version="1.0" encoding="UTF-8"?><html xmlns="http://www.w3.org/1999/xhtml" '
                'xmlns:epub="http://www.idpf.org/2007/ops"><head><title>Contents</title></head><body>'
                f'<nav epub:type="toc"><h1>Contents</h1><ol>{items}</ol></nav></body></html>',
            )
        for name, heading, paragraphs in reversed(chapters):
            archive.writestr(f"OEBPS/text/{name}", _chapter(heading, paragraphs))
    return path
