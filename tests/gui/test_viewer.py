"""The source viewer: a PDF passage opens on its page with the highlight painted over
the very ink QtPdf renders for it; other formats, and PDFs that are gone or broken,
show the library's text with the passage range highlighted and scrolled into view.

PDFs are generated with reportlab, whose coordinates (points, origin bottom-left)
are an independent reference for where QtPdf (points, origin top-left) must put the
highlight.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import shiboken6  # noqa: E402
from PySide6.QtCore import QCoreApplication, QEvent, QRect, Qt, QUrl  # noqa: E402
from PySide6.QtGui import QDesktopServices, QImage  # noqa: E402
from PySide6.QtPdfWidgets import QPdfView  # noqa: E402
from reportlab.lib.pagesizes import letter  # noqa: E402
from reportlab.pdfgen import canvas  # noqa: E402

from app.gui.viewer import Passage, SourceViewer, locate_passage  # noqa: E402

PAGE_HEIGHT = letter[1]  # 792 points
LEFT = 72
TARGET = "The quartermaster counted seventeen lanterns beside the northern gate."
TARGET_Y = 180  # reportlab baseline, near the bottom: off screen unless scrolled to
PAGES = [
    [(700, "The harbour master logged three fishing boats before dawn."),
     (640, "Gulls circled over the morning catch on the eastern pier.")],
    [(700, "Nobody asked why the western tower had stayed dark all winter."),
     (TARGET_Y, TARGET)],
    [(700, "On the third day the caravan finally reached the salt flats."),
     (640, "The traders unloaded copper, indigo and dried figs.")],
]


def make_pdf(path: Path, pages: list[list[tuple[int, str]]] = PAGES) -> Path:
    pdf = canvas.Canvas(str(path), pagesize=letter)
    for lines in pages:
        for y, text in lines:
            pdf.setFont("Helvetica", 12)
            pdf.drawString(LEFT, y, text)
        pdf.showPage()
    pdf.save()
    return path


def library_text(page: int) -> str:
    """What the library extracted for a page: same words, its own line layout."""
    return "\n".join(text for _, text in PAGES[page]) + "\n"


def pdf_passage(path: Path, page: int, passage: str, title: str = "Harbour Book") -> Passage:
    text = library_text(page)
    start = text.find(passage)
    assert start >= 0
    return Passage(str(path), "pdf", title, page, None, text, start, start + len(passage))


@pytest.fixture
def viewer(qtbot) -> SourceViewer:
    widget = SourceViewer()
    qtbot.addWidget(widget)
    widget.resize(700, 800)
    widget.show()
    qtbot.waitExposed(widget)
    return widget


# -- locating a passage in a PDF's text layer -------------------------------------


def test_locate_ignores_hyphenation_ligatures_case_and_whitespace():
    # PDFium's form: a line-end hyphen becomes U+FFFE and the line break is dropped.
    layer = "Before.\r\nThe quarter\ufffemaster counted seventeen lan\ufffeterns\r\nbeside the   northern GATE.\r\nAfter."
    passage = "The quartermaster counted seventeen lanterns beside the northern gate."
    match = locate_passage(layer, passage)
    assert match is not None and match.complete
    assert layer[match.start : match.end] == (
        "The quarter\ufffemaster counted seventeen lan\ufffeterns\r\nbeside the   northern GATE"
    )
    layer = "An e\ufb03cient \ufb01nal o\ufb03ce, caf\u00e9 d\u00e9cor."
    ligatures = locate_passage(layer, "efficient final office, cafe decor")
    assert ligatures is not None and ligatures.complete
    assert layer[ligatures.start : ligatures.end] == "e\ufb03cient \ufb01nal o\ufb03ce, caf\u00e9 d\u00e9cor"


def test_locate_falls_back_to_runs_of_words_and_marks_the_match_partial():
    # A font without a Unicode map for "fi" leaves the text layer with a box instead.
    layer = "The quartermaster counted seventeen lanterns beside the northern gate. Efficient \u25a0nal of\u25a0ces."
    passage = "The quartermaster counted seventeen lanterns beside the northern gate. Efficient final offices."
    match = locate_passage(layer, passage)
    assert match is not None and not match.complete
    assert layer[match.start : match.end] == "The quartermaster counted seventeen lanterns beside the northern gate. Efficient"


def test_locate_picks_the_occurrence_nearest_the_hint_and_rejects_absent_text():
    sentence = "The bell rang twice across the silent valley."
    layer = f"{sentence} Then a long interval of unrelated prose followed here. {sentence}"
    early = locate_passage(layer, sentence, position_hint=0.0)
    late = locate_passage(layer, sentence, position_hint=0.9)
    assert early is not None and late is not None
    assert early.start == 0
    assert late.start == layer.rindex("The bell")
    assert locate_passage(layer, "Nothing of this sort appears anywhere on the page.") is None


# -- PDF mode ---------------------------------------------------------------------


def test_pdf_passage_opens_on_its_page_with_the_highlight_where_the_text_was_drawn(viewer, tmp_path, qtbot):
    path = make_pdf(tmp_path / "harbour.pdf")
    viewer.open_passage(pdf_passage(path, 1, TARGET))
    qtbot.waitUntil(lambda: viewer.highlight_rects() != [], timeout=5000)

    assert viewer.mode() == "pdf"
    assert viewer.current_page() == 1
    assert viewer.message() == ""
    assert viewer.highlighted_text() == TARGET.rstrip(".")
    rects = viewer.highlight_rects()
    assert len(rects) == 1  # one line of text
    line = rects[0]
    baseline = PAGE_HEIGHT - TARGET_Y  # 612 points from the top
    assert line.top() < baseline < line.bottom() + 4
    assert abs(line.center().y() - baseline) < 20
    assert abs(line.left() - LEFT) < 3
    assert 300 < line.width() < 450  # the sentence in 12-point Helvetica, not the page


def _is_ink(image: QImage, x: int, y: int) -> bool:
    colour = image.pixelColor(x, y)
    return max(colour.red(), colour.green(), colour.blue()) < 110


def _is_highlight(image: QImage, x: int, y: int) -> bool:
    colour = image.pixelColor(x, y)
    return colour.red() > 200 and colour.green() > 170 and colour.blue() < 140


def test_pdf_highlight_is_painted_over_the_rendered_sentence_and_scrolled_into_view(viewer, tmp_path, qtbot):
    path = make_pdf(tmp_path / "harbour.pdf")
    viewer.open_passage(pdf_passage(path, 1, TARGET))
    qtbot.waitUntil(lambda: viewer.highlight_rects() != [], timeout=5000)
    area = viewer.page_to_viewport(1, viewer.highlight_rects()[0]).toAlignedRect()
    view = viewer.pdf_view.viewport()
    # Near the bottom of the page: visible only because the viewer scrolled to it.
    assert viewer.pdf_view.verticalScrollBar().value() > viewer.pdf_view.page_top(1)
    assert QRect(0, 0, view.width(), view.height()).contains(area)

    search = area.adjusted(-40, -40, 40, 40)

    def grab() -> QImage:
        return view.grab().toImage()

    def ink_in(image: QImage) -> list[tuple[int, int]]:
        return [(x, y) for y in range(max(search.top(), 0), min(search.bottom(), image.height()))
                for x in range(max(search.left(), 0), min(search.right(), image.width()))
                if _is_ink(image, x, y)]

    # Pages render asynchronously; wait for QtPdf's own rendering of the sentence.
    qtbot.waitUntil(lambda: len(ink_in(grab())) > 50, timeout=10000)
    image = grab()
    ink = ink_in(image)
    xs = [x for x, _ in ink]
    ys = [y for _, y in ink]
    # The ink QPdfView drew lies inside the rectangle the viewer highlighted ...
    assert area.adjusted(-3, -3, 3, 3).contains(QRect(min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)))
    # ... the paper around the letters is highlighter yellow ...
    yellow = sum(_is_highlight(image, x, area.center().y()) for x in range(area.left(), area.right()))
    assert yellow > area.width() // 3
    # ... and the paper just above the line is not.
    above = area.top() - 8
    assert not any(_is_highlight(image, x, above) for x in range(area.left(), area.right()))


def test_passage_opened_before_the_viewer_is_shown_is_revealed_on_show(qtbot, tmp_path):
    widget = SourceViewer()
    qtbot.addWidget(widget)
    widget.open_passage(pdf_passage(make_pdf(tmp_path / "harbour.pdf"), 1, TARGET))
    widget.resize(600, 700)
    widget.show()
    qtbot.waitExposed(widget)
    view = widget.pdf_view.viewport()

    def passage_on_screen() -> bool:
        area = widget.page_to_viewport(1, widget.highlight_rects()[0]).toAlignedRect()
        return QRect(0, 0, view.width(), view.height()).contains(area)

    qtbot.waitUntil(passage_on_screen, timeout=2000)
    assert widget.current_page() == 1


def test_pdf_passage_missing_from_the_text_layer_still_shows_its_page(viewer, tmp_path, qtbot):
    path = make_pdf(tmp_path / "harbour.pdf")
    text = library_text(2) + "A sentence the PDF never printed, about pelicans and tar.\n"
    start = text.index("A sentence")
    viewer.open_passage(Passage(str(path), "pdf", "Harbour Book", 2, "iii", text, start, len(text) - 1))
    qtbot.wait(50)
    assert viewer.mode() == "pdf"
    assert viewer.current_page() == 2
    assert viewer.highlight_rects() == []
    assert "not found" in viewer.message()
    assert "page 3" in viewer.message()
    assert viewer.header.text() == "Harbour Book — page iii"


def test_reopening_the_same_pdf_keeps_it_and_another_file_replaces_it(viewer, tmp_path, qtbot):
    first = make_pdf(tmp_path / "harbour.pdf")
    viewer.open_passage(pdf_passage(first, 1, TARGET))
    document = viewer.document()
    assert document is not None and document.pageCount() == 3
    viewer.open_passage(pdf_passage(first, 0, PAGES[0][1][1]))
    assert viewer.document() is document
    assert viewer.current_page() == 0

    second = make_pdf(tmp_path / "other.pdf", [[(700, "A single page about winter roads and salt.")]])
    viewer.open_passage(Passage(str(second), "pdf", "Other", 0, None, "A single page about winter roads and salt.",
                                0, 20))
    assert viewer.document() is not document and viewer.document().pageCount() == 1
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    assert not shiboken6.isValid(document)

    replacement = viewer.document()
    viewer.close()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    assert viewer.document() is None and viewer.mode() == "empty"
    assert not shiboken6.isValid(replacement)


def test_toolbar_turns_pages_zooms_and_opens_the_file(viewer, tmp_path, qtbot, monkeypatch):
    path = make_pdf(tmp_path / "harbour.pdf")
    viewer.open_passage(pdf_passage(path, 1, TARGET))
    assert viewer.fit_width_action.isEnabled() and viewer.open_external_action.isEnabled()
    viewer.next_page_action.trigger()
    assert viewer.current_page() == 2
    assert not viewer.next_page_action.isEnabled()
    viewer.previous_page_action.trigger()
    viewer.previous_page_action.trigger()
    assert viewer.current_page() == 0
    assert not viewer.previous_page_action.isEnabled()

    fitted = viewer.pdf_view.page_scale(0)
    viewer.zoom_in_action.trigger()
    assert viewer.pdf_view.zoomMode() == QPdfView.ZoomMode.Custom
    assert viewer.pdf_view.zoomFactor() == pytest.approx(fitted * 1.25)
    viewer.zoom_out_action.trigger()
    viewer.zoom_out_action.trigger()
    assert viewer.pdf_view.zoomFactor() == pytest.approx(fitted / 1.25)
    viewer.fit_width_action.trigger()
    assert viewer.pdf_view.zoomMode() == QPdfView.ZoomMode.FitToWidth

    opened: list[QUrl] = []
    monkeypatch.setattr(QDesktopServices, "openUrl", lambda url: opened.append(url) or True)
    viewer.open_external_action.trigger()
    assert opened == [QUrl.fromLocalFile(str(path))]


def test_keyboard_shortcuts_act_while_the_viewer_has_focus(viewer, tmp_path, qtbot):
    path = make_pdf(tmp_path / "harbour.pdf")
    viewer.open_passage(pdf_passage(path, 0, PAGES[0][0][1]))
    viewer.activateWindow()
    viewer.pdf_view.setFocus()
    qtbot.waitUntil(lambda: viewer.pdf_view.hasFocus(), timeout=2000)
    qtbot.keyClick(viewer.pdf_view, Qt.Key.Key_PageDown)
    assert viewer.current_page() == 1
    qtbot.keyClick(viewer.pdf_view, Qt.Key.Key_PageUp)
    assert viewer.current_page() == 0
    fitted = viewer.pdf_view.page_scale(0)
    qtbot.keyClick(viewer.pdf_view, Qt.Key.Key_Equal, Qt.KeyboardModifier.ControlModifier)
    assert viewer.pdf_view.zoomFactor() == pytest.approx(fitted * 1.25)
    qtbot.keyClick(viewer.pdf_view, Qt.Key.Key_Minus, Qt.KeyboardModifier.ControlModifier)
    assert viewer.pdf_view.zoomFactor() == pytest.approx(fitted)


# -- text mode --------------------------------------------------------------------


def test_text_passage_is_highlighted_and_scrolled_into_view(viewer, qtbot):
    lines = [f"Line {i}: the river kept its slow course past the mill." for i in range(300)]
    text = "\n".join(lines)
    start = text.index("Line 287:")
    end = text.index("Line 289:") - 1
    viewer.open_passage(Passage("", "epub", "River Book", 4, None, text, start, end))
    assert viewer.mode() == "text"
    assert viewer.highlighted_text() == text[start:end]
    assert viewer.highlighted_text().startswith("Line 287:") and "Line 288:" in viewer.highlighted_text()
    assert viewer.header.text() == "River Book — section 5"
    qtbot.waitUntil(lambda: viewer.text_view.verticalScrollBar().value() > 0, timeout=2000)
    editor = viewer.text_view
    cursor = editor.textCursor()
    cursor.setPosition(start)
    assert editor.viewport().rect().contains(editor.cursorRect(cursor))


def test_text_offsets_count_code_points_and_are_clamped(viewer):
    # Astral characters are two UTF-16 units in Qt but one code point in Python.
    text = "Mathematical \U0001d504\U0001d505 letters come first. Then the passage itself. The end."
    start = text.index("Then")
    end = text.index(" The end")
    viewer.open_passage(Passage("", "md", "Notes", None, "xii", text, start, end))
    assert viewer.highlighted_text() == "Then the passage itself."
    assert viewer.header.text() == "Notes — section xii"
    viewer.open_passage(Passage("", "txt", "Notes", 0, None, text, -5, 10**6))
    assert viewer.highlighted_text() == text


def test_missing_pdf_falls_back_to_the_library_text(viewer, tmp_path):
    gone = tmp_path / "moved-away.pdf"
    passage = pdf_passage(gone, 1, TARGET)
    viewer.open_passage(passage)
    assert viewer.mode() == "text"
    assert "moved or deleted" in viewer.message()
    assert viewer.highlighted_text() == TARGET
    assert viewer.highlight_rects() == []
    assert not viewer.open_external_action.isEnabled()
    assert viewer.document() is None


def test_unreadable_pdf_falls_back_to_the_library_text(viewer, tmp_path):
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4\nthis is not really a PDF\n")
    viewer.open_passage(pdf_passage(broken, 1, TARGET))
    assert viewer.mode() == "text"
    assert viewer.message().startswith("Could not open the PDF (invalid file format)")
    assert viewer.highlighted_text() == TARGET
