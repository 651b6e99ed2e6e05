"""A document's extraction report as lines a person reads: how its pages were read
(pypdf, PDFium, OCR with each page's confidence), what is missing and why. `quire
show` prints them; the window shows them from the library's context menu."""

from __future__ import annotations

from ingest import ocr
from ingest.library import DocumentRecord

SHOWN_PAGES = 20


def pages_list(indexes: list[int]) -> str:
    """1-based page numbers, the first SHOWN_PAGES of them."""
    if not indexes:
        return "none"
    shown = ", ".join(str(index + 1) for index in indexes[:SHOWN_PAGES])
    return shown + (f" … ({len(indexes)} in all)" if len(indexes) > SHOWN_PAGES else "")


def report_lines(record: DocumentRecord) -> list[str]:
    report = record.report
    lines = [
        f"encrypted:        {'yes' if report.encrypted else 'no'}",
        f"pages needing OCR: {pages_list(report.needs_ocr)}"
        + (f" (no OCR engine installed: {ocr.HOW_TO_ENABLE})" if report.needs_ocr and not ocr.engine_names() else ""),
        f"sparse pages:     {pages_list(report.sparse_pages)}",
    ]
    if record.format == "pdf":
        lines.append(f"read by pypdf:    {report.pages - len(report.pdfium_pages) - len(report.ocr_pages)} pages")
        if report.blank_pages:
            lines.append(f"blank pages:      {pages_list(report.blank_pages)} (no text, no picture)")
        if report.unread_pages:
            lines.append(f"unreadable pages: {pages_list(report.unread_pages)} (see the warnings)")
        if report.pdfium_pages:
            lines.append(f"read by PDFium:   {pages_list(report.pdfium_pages)} (pypdf failed or found no text)")
        if report.ocr_pages:
            confidences = ", ".join(
                f"{index + 1} ({confidence:.0%})"
                for index, confidence in zip(report.ocr_pages[:SHOWN_PAGES], report.ocr_confidence)
            )
            more = f" … ({len(report.ocr_pages)} in all)" if len(report.ocr_pages) > SHOWN_PAGES else ""
            lines.append(f"OCR ({report.ocr_engine}): pages {confidences}{more}")
    lines.extend(f"warning: {warning}" for warning in report.warnings)
    return lines
