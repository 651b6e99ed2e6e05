"""OCR benchmark: pages per second and character error rate of the installed OCR
engine, on a scanned PDF made from a real one.

The scan is made here, so that the truth is known: each page of the source PDF is
rendered by PDFium at 300 dpi in grey, turned 0.6 degrees, blurred and lightly
speckled (one pixel in 4,000 flipped), as a good office scanner does, and placed as the only content of a page. `read_pdf` then reads
the scan as it reads any PDF (PDFium finds no text, the engine reads every page),
and its text is compared with the source's own text layer, word by word and
counting the words not read in order (a word error rate) and the words read nowhere.

    quire bench ocr SOURCE.pdf [--pages 1000] [--first-page 1]
"""

from __future__ import annotations

import difflib
import io
import os
import platform
import random
import tempfile
import time
from pathlib import Path

SCAN_DPI = 300  # the scan's own resolution; OCR renders it again at ingest.ocr.RENDER_DPI
SPECKLE = 4000  # one pixel in SPECKLE flipped


def _photocopy(picture, seed: int):  # noqa: ANN001, ANN202 - PIL images
    from PIL import ImageFilter

    rng = random.Random(seed)
    picture = picture.rotate(0.6, fillcolor=255).filter(ImageFilter.GaussianBlur(0.7))
    pixels = picture.load()
    width, height = picture.size
    for _ in range(width * height // SPECKLE):
        x, y = rng.randrange(width), rng.randrange(height)
        pixels[x, y] = 0 if pixels[x, y] > 128 else 255
    return picture


def make_scan(source: Path, target: Path, pages: range) -> list[str]:
    """Write a picture-only PDF of `pages` of `source` to `target`; return the
    source's text of each page (the truth)."""
    import pypdfium2
    from reportlab.lib.utils import ImageReader
    from reportlab.pdfgen import canvas

    document = pypdfium2.PdfDocument(str(source))
    truth = []
    pdf = canvas.Canvas(str(target))
    try:
        for index in pages:
            page = document[index]
            width, height = page.get_size()
            truth.append(page.get_textpage().get_text_range())
            picture = _photocopy(page.render(scale=SCAN_DPI / 72, grayscale=True).to_pil(), index)
            page.close()
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            pdf.setPageSize((width, height))
            pdf.drawImage(ImageReader(io.BytesIO(buffer.getvalue())), 0, 0, width=width, height=height)
            pdf.showPage()
    finally:
        document.close()
    pdf.save()
    return truth


def error_rates(truth: str, read: str) -> tuple[float, float]:
    """(share of the truth's words not matched in order by what was read, share of
    the truth's words found nowhere in it). Word-level: a page-long character edit
    distance in Python costs seconds a page."""
    expected, got = truth.split(), read.split()
    matcher = difflib.SequenceMatcher(None, expected, got, autojunk=False)
    matched = sum(block.size for block in matcher.get_matching_blocks())
    found = set(got)
    total = max(1, len(expected))
    return 1 - matched / total, sum(word not in found for word in expected) / total


def bench_ocr(source: Path, *, pages: int = 1000, first: int = 0) -> dict[str, object]:
    import pypdfium2

    from ingest.ocr import HOW_TO_ENABLE, RENDER_DPI, best_engine
    from ingest.readers.pdf import OCR_WORKERS, read_pdf

    engine = best_engine()
    if engine is None:
        raise RuntimeError(f"no OCR engine installed: {HOW_TO_ENABLE}")
    count = len(pypdfium2.PdfDocument(str(source)))
    chosen = range(first, min(count, first + pages))
    with tempfile.TemporaryDirectory() as folder:
        scan = Path(folder) / "scan.pdf"
        started = time.perf_counter()
        truth = make_scan(source, scan, chosen)
        made = time.perf_counter() - started
        started = time.perf_counter()
        document = read_pdf(scan, ocr=engine)
        seconds = time.perf_counter() - started
    report = document.report
    rates = [error_rates(expected, page.text) for expected, page in zip(truth, document.pages)]
    scored = [rate for rate, expected in zip(rates, truth) if len(expected.split()) >= 20]  # skip near-empty pages
    return {
        "engine": engine.name,
        "source": source.name,
        "pages": len(chosen),
        "first_page": first + 1,
        "ocr_pages": len(report.ocr_pages),
        "still_need_ocr": len(report.needs_ocr),
        "seconds": round(seconds, 1),
        "pages_per_second": round(len(chosen) / seconds, 3),
        "scan_seconds": round(made, 1),
        "scan_dpi": SCAN_DPI,
        "render_dpi": RENDER_DPI,
        "workers": OCR_WORKERS,
        "scored_pages": len(scored),
        "word_error_rate": round(sum(wer for wer, _ in scored) / max(1, len(scored)), 4),
        "words_missed": round(sum(missed for _, missed in scored) / max(1, len(scored)), 4),
        "mean_confidence": round(sum(report.ocr_confidence) / max(1, len(report.ocr_confidence)), 3),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.system()}",
    }
