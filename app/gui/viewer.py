"""The source viewer: clicking an evidence passage opens its book at the passage,
highlighted.

The viewer never touches SQLite or the engine; the caller hands it a `Passage` with
everything it needs (path, format, page, the library's text of that page and the
passage's offsets into it).

PDF: the file itself is shown in a `QPdfView` (MultiPage mode, so the reader can
scroll across the page break into the surrounding context without pressing "next").
The passage is located in the PDF's own text layer (`QPdfDocument.getAllText`),
which differs from the library's extracted text in whitespace, hyphenation
(PDFium reports a line-end hyphen as U+FFFE and drops the line break), ligatures,
accents and quotes; `locate_passage` therefore matches on a letters-and-digits
stream and falls back to runs of words. The matched character range gives line
rectangles (`getSelectionAtIndex`), which `_PdfPageView` paints itself as a
highlighter-style overlay.

Why not `QPdfView.setSearchModel` + `QPdfSearchModel`: it matches only the text
layer's exact form, searches the whole book on the GUI thread page by page (a
300-page PDF had not finished after 5 s), its fill colour is a faint blue-grey, and
framing the current result needs its global index, which forces a synchronous search
of every earlier page. The overlay is immediate and its colour is ours.

Other formats, and PDFs that are missing or unreadable, show the library's text of
the page/section with the passage highlighted.
"""

from __future__ import annotations

import logging
import math
import os
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PySide6.QtCore import QPointF, QRectF, Qt, QTimer, QUrl
from PySide6.QtGui import (
    QAction,
    QCloseEvent,
    QColor,
    QDesktopServices,
    QGuiApplication,
    QIcon,
    QKeySequence,
    QPainter,
    QPaintEvent,
    QShowEvent,
    QTextCharFormat,
    QTextCursor,
)
from PySide6.QtPdf import QPdfDocument
from PySide6.QtPdfWidgets import QPdfView
from PySide6.QtWidgets import (
    QLabel,
    QPlainTextEdit,
    QStackedWidget,
    QStyle,
    QTextEdit,
    QToolBar,
    QVBoxLayout,
    QWidget,
)

log = logging.getLogger(__name__)

# A window of this many letters/digits rarely occurs twice on one page by chance.
MIN_ANCHOR_CHARS = 12
# A passage shorter than this (a searched word) is found inside its surroundings
# first: such a word often recurs on the page, and the position hint is only a
# proportion, too coarse to tell neighbouring occurrences apart.
CONTEXT_CHARS = 80
ZOOM_STEP = 1.25
ZOOM_RANGE = (0.25, 6.0)
# Multiplied onto the page, like a highlighter pen: white paper turns yellow and
# black ink stays black, so the passage stays readable at any zoom.
PDF_HIGHLIGHT = QColor(255, 221, 64)
# Text mode sets both colours, so the range reads the same in light and dark palettes.
TEXT_HIGHLIGHT_BACKGROUND = QColor(255, 221, 64)
TEXT_HIGHLIGHT_FOREGROUND = QColor(20, 20, 20)


@dataclass
class Passage:
    """Everything the viewer needs to show one evidence passage."""

    path: str  # the source file on disk; it may have been moved or deleted since ingest
    format: str  # "pdf", "epub", "txt", "md", "html", "docx"
    title: str
    page_index: int | None  # 0-based page (PDF) or section (EPUB and others)
    page_label: str | None  # the printed label, e.g. "iv" or "12"
    page_text: str  # the library's extracted, normalised text of that page/section
    start: int  # the passage as offsets into page_text; clamped if out of range
    end: int
    # A scanned page's words with their boxes in points (ingest.ocr.OcrWord): the
    # highlight where the PDF has no text layer to find the passage in.
    ocr_words: tuple[tuple[str, float, float, float, float], ...] = ()


@dataclass(frozen=True)
class TextMatch:
    """Where a passage lies in another rendering of the same text: [start, end)."""

    start: int
    end: int
    complete: bool  # False: only part of the passage matched


def _normalise(text: str) -> tuple[str, list[int]]:
    """Letters and digits only, case-folded, accents and ligatures decomposed,
    with the index in `text` that each kept character came from."""
    kept: list[str] = []
    origin: list[int] = []
    for index, char in enumerate(text):
        if char.isascii():
            if char.isalnum():
                kept.append(char.lower())
                origin.append(index)
            continue
        # NFKD splits "ﬁ" into "fi" and "é" into "e" + a combining accent (dropped).
        for part in unicodedata.normalize("NFKD", char).casefold():
            if part.isalnum():
                kept.append(part)
                origin.append(index)
    return "".join(kept), origin


def _find_nearest(haystack: str, needle: str, target: int) -> int:
    """The occurrence of `needle` starting nearest `target`, or -1."""
    best = -1
    position = haystack.find(needle)
    while position >= 0:
        if best < 0 or abs(position - target) < abs(best - target):
            best = position
        position = haystack.find(needle, position + 1)
    return best


def locate_passage(layer_text: str, passage_text: str, position_hint: float = 0.0) -> TextMatch | None:
    """Find `passage_text` in `layer_text` (e.g. a PDF page's own text layer).

    Whitespace, punctuation, hyphenation, case, accents and ligatures are ignored.
    If the whole passage does not match, runs of 6 (then 3) words are tried and the
    span from the first matching run to the last consistent one is returned, marked
    incomplete unless it reaches both ends of the passage. `position_hint` (0..1) is
    where the passage starts in its page; it picks among repeated occurrences.
    """
    page_norm, origin = _normalise(layer_text)
    needle, _ = _normalise(passage_text)
    if not needle or not page_norm:
        return None
    target = int(min(max(position_hint, 0.0), 1.0) * len(page_norm))
    position = _find_nearest(page_norm, needle, target)
    if position >= 0:
        return TextMatch(origin[position], origin[position + len(needle) - 1] + 1, True)

    words = [_normalise(word)[0] for word in passage_text.split()]
    offsets = [0]  # offsets[i]: where word i starts in `needle`
    for word in words:
        offsets.append(offsets[-1] + len(word))
    for size in (6, 3):
        if len(words) <= size:
            continue  # the run would be the whole passage, which did not match
        hits: list[tuple[int, int, int]] = []  # (first word, start, end) in page_norm
        for first in range(max(1, len(words) - size + 1)):
            run = "".join(words[first : first + size])
            if len(run) < MIN_ANCHOR_CHARS:
                continue
            found = _find_nearest(page_norm, run, target + offsets[first])
            if found >= 0:
                hits.append((first, found, found + len(run)))
        if not hits:
            continue
        # The run that most later runs agree with anchors the passage; a run that
        # happens to recur elsewhere on the page finds no agreement.
        best: tuple[int, tuple[int, int, int], tuple[int, int, int]] | None = None
        for index, head in enumerate(hits):
            last, support = head, 1
            for hit in hits[index + 1 :]:
                expected = offsets[hit[0]] - offsets[head[0]]
                actual = hit[1] - head[1]
                if 0.5 * expected - 40 <= actual <= 1.5 * expected + 40:
                    last, support = hit, support + 1
            if best is None or support > best[0]:
                best = (support, head, last)
        assert best is not None
        _, head, last = best
        complete = head[0] == 0 and last[0] + size >= len(words)
        return TextMatch(origin[head[1]], origin[last[2] - 1] + 1, complete)
    return None


def locate_span(layer_text: str, page_text: str, start: int, end: int) -> TextMatch | None:
    """Find `page_text[start:end]` in `layer_text`. A short span is located by its
    surrounding text first and then at its exact place inside that, so of a word
    that recurs on the page the intended occurrence is found."""
    passage = page_text[start:end]
    if len(passage) < CONTEXT_CHARS:
        left, right = max(0, start - CONTEXT_CHARS), min(len(page_text), end + CONTEXT_CHARS)
        around = locate_passage(layer_text, page_text[left:right], left / max(len(page_text), 1))
        if around is not None and around.complete:
            # The layer's slice normalises to the context's letters, so the span's
            # offset among them is exact.
            before, context = _normalise(page_text[left:start])[0], _normalise(page_text[left:right])[0]
            inside = locate_passage(layer_text[around.start : around.end], passage, len(before) / max(len(context), 1))
            if inside is not None:
                return TextMatch(around.start + inside.start, around.start + inside.end, inside.complete)
    return locate_passage(layer_text, passage, start / max(len(page_text), 1))


def ocr_rects(words: Sequence[tuple[str, float, float, float, float]], page_text: str, start: int,
              end: int) -> tuple[list[QRectF], bool] | None:
    """The boxes of the OCR'd words that `page_text[start:end]` was read from, one
    rectangle per line (words side by side on a line joined), and whether all of the
    passage matched; None where it is not found among the words."""
    layer, spans = "", []
    for word, *_ in words:
        spans.append((len(layer), len(layer) + len(word)))
        layer += word + " "
    match = locate_span(layer, page_text, start, end)
    if match is None:
        return None
    rects: list[QRectF] = []
    for (first, last), (_, left, top, right, bottom) in zip(spans, words):
        if last <= match.start or first >= match.end:
            continue
        box = QRectF(left, top, right - left, bottom - top)
        previous = rects[-1] if rects else None
        if previous is not None and abs(previous.center().y() - box.center().y()) < box.height() / 2:
            rects[-1] = previous.united(box)
        else:
            rects.append(box)
    return rects, match.complete


def _utf16_offset(text: str, index: int) -> int:
    """QTextDocument positions count UTF-16 units; Python counts code points."""
    return len(text[:index].encode("utf-16-le")) // 2


def _key_sequences(*keys: QKeySequence.StandardKey | str) -> list[QKeySequence]:
    """The platform's bindings plus ours, without duplicates (Qt reports a duplicate
    as an ambiguous shortcut and then fires neither)."""
    sequences: list[QKeySequence] = []
    for key in keys:
        found = QKeySequence.keyBindings(key) if isinstance(key, QKeySequence.StandardKey) else [QKeySequence(key)]
        sequences += [sequence for sequence in found if sequence not in sequences]
    return sequences


def _qround(value: float) -> int:
    """qRound for the non-negative sizes QPdfView rounds."""
    return math.floor(value + 0.5)


class _PdfPageView(QPdfView):
    """A QPdfView that paints the passage's rectangles over its page.

    QPdfView (Qt 6.12) exposes no page-to-viewport mapping and ignores the location
    given to `pageNavigator().jump()` in MultiPage mode, so `page_to_viewport`
    reproduces its document layout (QPdfViewPrivate::calculateDocumentLayout: pages
    stacked with `pageSpacing` between them inside `documentMargins`, centred
    horizontally, sizes rounded to whole pixels). tests/gui/test_viewer.py checks the
    painted highlight against the ink QPdfView renders, so a change in Qt's layout
    shows up there.
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        # QPdfViewPrivate reads the primary screen's resolution once, at construction.
        self._screen_resolution = QGuiApplication.primaryScreen().logicalDotsPerInch() / 72.0
        self._highlight_page = -1
        self._highlight_rects: list[QRectF] = []
        self._layout_key: tuple[object, ...] | None = None
        self._layout: list[tuple[int, int, int, float]] = []  # per page: (y, width, height, scale)
        self._layout_width = 0

    def set_highlight(self, page: int, rects: list[QRectF]) -> None:
        self._highlight_page = page
        self._highlight_rects = list(rects)
        self.viewport().update()

    def _page_layout(self) -> tuple[list[tuple[int, int, int, float]], int]:
        document = self.document()
        if document is None or self.pageMode() != QPdfView.PageMode.MultiPage:
            return [], 0
        margins = self.documentMargins()
        viewport_width = self.viewport().width()
        key = (id(document), document.pageCount(), self.zoomMode(), self.zoomFactor(), viewport_width,
               margins.left(), margins.top(), margins.right(), self.pageSpacing())
        if key == self._layout_key:
            return self._layout, self._layout_width
        layout: list[tuple[int, int, int, float]] = []
        widest = 0
        y = margins.top()
        for page in range(document.pageCount()):
            points = document.pagePointSize(page)
            if self.zoomMode() == QPdfView.ZoomMode.FitToWidth:
                base_w = _qround(points.width() * self._screen_resolution)
                base_h = _qround(points.height() * self._screen_resolution)
                scale = (viewport_width - margins.left() - margins.right()) / max(base_w, 1)
                width, height = _qround(base_w * scale), _qround(base_h * scale)
            else:
                scale = self.zoomFactor()
                width = _qround(points.width() * self._screen_resolution * scale)
                height = _qround(points.height() * self._screen_resolution * scale)
            layout.append((y, width, height, scale))
            widest = max(widest, width)
            y += height + self.pageSpacing()
        self._layout_key = key
        self._layout = layout
        self._layout_width = widest + margins.left() + margins.right()
        return layout, self._layout_width

    def page_scale(self, page: int) -> float:
        """The effective zoom of `page`, as `zoomFactor` counts it."""
        layout, _ = self._page_layout()
        return layout[page][3] if 0 <= page < len(layout) else self.zoomFactor()

    def pixels_per_point(self, page: int) -> float:
        return self.page_scale(page) * self._screen_resolution

    def page_top(self, page: int) -> int:
        """Where `page` starts in document pixels (the vertical scroll position)."""
        layout, _ = self._page_layout()
        return layout[page][0] if 0 <= page < len(layout) else 0

    def page_to_viewport(self, page: int, rect: QRectF) -> QRectF:
        """`rect` in page points (origin top-left) as viewport pixels; empty if unknown."""
        layout, total_width = self._page_layout()
        if not 0 <= page < len(layout):
            return QRectF()
        y, width, _, scale = layout[page]
        x = (max(total_width, self.viewport().width()) - width) // 2
        pixels = scale * self._screen_resolution
        return QRectF(
            x + rect.x() * pixels - self.horizontalScrollBar().value(),
            y + rect.y() * pixels - self.verticalScrollBar().value(),
            rect.width() * pixels,
            rect.height() * pixels,
        )

    def paintEvent(self, event: QPaintEvent) -> None:
        super().paintEvent(event)
        if not self._highlight_rects:
            return
        painter = QPainter(self.viewport())
        painter.setCompositionMode(QPainter.CompositionMode.CompositionMode_Multiply)
        for rect in self._highlight_rects:
            # A little padding: glyph boxes hug the ink and look cramped when filled.
            area = self.page_to_viewport(self._highlight_page, rect).adjusted(-2, -2, 2, 2)
            if area.intersects(QRectF(event.rect())):
                painter.fillRect(area, PDF_HIGHLIGHT)
        painter.end()


class SourceViewer(QWidget):
    """Shows a passage in its source: the PDF itself, or the library's text."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._passage: Passage | None = None
        self._mode = "empty"
        self._message = ""
        self._document: QPdfDocument | None = None
        self._document_key: tuple[str, int] | None = None
        self._pdf_page = -1
        self._pdf_rects: list[QRectF] = []
        self._pdf_highlight_text = ""
        self._text_anchor = 0  # UTF-16 position the text view scrolls to
        self._reveal_pending = False

        self.header = QLabel()
        self.header.setTextFormat(Qt.TextFormat.PlainText)
        self.header.setWordWrap(True)
        font = self.header.font()
        font.setBold(True)
        self.header.setFont(font)
        self.note = QLabel()
        self.note.setTextFormat(Qt.TextFormat.PlainText)
        self.note.setWordWrap(True)
        self.note.hide()

        self.pdf_view = _PdfPageView()
        # Shown instead of None when nothing is open: QPdfView.setDocument(None) makes
        # its link model warn about connecting to a null document.
        self._blank_document = QPdfDocument(self)
        self.pdf_view.setDocument(self._blank_document)
        self.pdf_view.setPageMode(QPdfView.PageMode.MultiPage)
        self.pdf_view.setZoomMode(QPdfView.ZoomMode.FitToWidth)
        # A scroll bar that appears after layout would narrow a fit-to-width page and
        # move the passage away from where it was scrolled to.
        self.pdf_view.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOn)
        self.pdf_view.pageNavigator().currentPageChanged.connect(self._update_page_controls)
        self.text_view = QPlainTextEdit()
        self.text_view.setReadOnly(True)
        # Read-only editors drop keyboard selection by default; readers copy quotes.
        self.text_view.setTextInteractionFlags(
            Qt.TextInteractionFlag.TextSelectableByMouse | Qt.TextInteractionFlag.TextSelectableByKeyboard
        )
        self.stack = QStackedWidget()
        self.stack.addWidget(self.pdf_view)
        self.stack.addWidget(self.text_view)

        self.toolbar = QToolBar()
        self.page_indicator = QLabel()
        style = self.style()
        self.previous_page_action = self._action(
            "Previous page", [QKeySequence(Qt.Key.Key_PageUp)], self.previous_page,
            style.standardIcon(QStyle.StandardPixmap.SP_ArrowUp))
        self.next_page_action = self._action(
            "Next page", [QKeySequence(Qt.Key.Key_PageDown)], self.next_page,
            style.standardIcon(QStyle.StandardPixmap.SP_ArrowDown))
        self.toolbar.addWidget(self.page_indicator)
        self.toolbar.addSeparator()
        # Ctrl+= as well: on most layouts "+" needs Shift.
        self.zoom_out_action = self._action("Zoom out", _key_sequences(QKeySequence.StandardKey.ZoomOut, "Ctrl+-"),
                                            self.zoom_out)
        self.zoom_in_action = self._action("Zoom in", _key_sequences(QKeySequence.StandardKey.ZoomIn, "Ctrl++", "Ctrl+="),
                                           self.zoom_in)
        self.fit_width_action = self._action("Fit width", [QKeySequence("Ctrl+0")], self.fit_width)
        self.toolbar.addSeparator()
        self.open_external_action = self._action(
            "Open in system viewer", [], self.open_in_system_viewer,
            style.standardIcon(QStyle.StandardPixmap.SP_DialogOpenButton))

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.header)
        layout.addWidget(self.toolbar)
        layout.addWidget(self.note)
        layout.addWidget(self.stack, 1)
        self._update_page_controls()

    def _action(
        self, text: str, keys: list[QKeySequence], slot: Callable[[], None], icon: QIcon | None = None
    ) -> QAction:
        action = QAction(text, self)
        if icon is not None:
            action.setIcon(icon)
        if keys:
            action.setShortcuts(keys)
            action.setToolTip(f"{text} ({keys[0].toString(QKeySequence.SequenceFormat.NativeText)})")
        # Scoped to the viewer: in a dock, PageDown elsewhere must not turn these pages.
        action.setShortcutContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
        action.triggered.connect(slot)
        self.addAction(action)
        self.toolbar.addAction(action)
        return action

    # -- public API ---------------------------------------------------------------

    def open_passage(self, passage: Passage) -> None:
        """Show `passage` in its source, highlighted and scrolled into view."""
        self._passage = passage
        self._pdf_rects = []
        self.pdf_view.set_highlight(-1, [])
        note = ""
        if passage.format.lower() == "pdf":
            if not os.path.isfile(passage.path):
                note = "The file was moved or deleted: showing the library's text."
            else:
                error = self._load_pdf(passage.path)
                if error is None:
                    self._show_pdf(passage)
                    return
                note = f"Could not open the PDF ({error}): showing the library's text."
        elif passage.path and not os.path.isfile(passage.path):
            note = "The file was moved or deleted: showing the library's text."
        self._release_document()
        self._show_text(passage, note)

    def current_page(self) -> int:
        """The page the PDF view is on (0-based); the section index in text mode."""
        if self._mode == "pdf":
            return self.pdf_view.pageNavigator().currentPage()
        if self._passage is not None and self._passage.page_index is not None:
            return self._passage.page_index
        return -1

    def highlight_rects(self) -> list[QRectF]:
        """The highlighted lines in page points (origin top-left); empty if none."""
        return [QRectF(rect) for rect in self._pdf_rects] if self._mode == "pdf" else []

    def highlighted_text(self) -> str:
        """The text under the highlight, as displayed (line breaks as "\\n")."""
        if self._mode == "pdf":
            # PDFium marks a line-end hyphen with U+FFFE and drops the line break.
            return self._pdf_highlight_text.replace("\r\n", "\n").replace("\ufffe", "-\n")
        selections = self.text_view.extraSelections()
        if self._mode != "text" or not selections:
            return ""
        return selections[0].cursor.selectedText().replace("\u2029", "\n")

    def focus_source(self) -> None:
        """Put the keyboard on the page or text shown (View › Show Source), where the
        arrows and Page Up/Down scroll it."""
        self.stack.currentWidget().setFocus()

    def mode(self) -> str:
        """"pdf", "text", or "empty" before the first passage and after `clear`."""
        return self._mode

    def message(self) -> str:
        """The note shown above the source ("" when there is nothing to note)."""
        return self._message

    def document(self) -> QPdfDocument | None:
        """The open PDF, or None."""
        return self._document

    def page_to_viewport(self, page: int, rect: QRectF) -> QRectF:
        """A rectangle in page points as PDF viewport pixels (where it is painted)."""
        return self.pdf_view.page_to_viewport(page, rect)

    def clear(self) -> None:
        """Show nothing and release the PDF."""
        self._passage = None
        self._pdf_rects = []
        self.pdf_view.set_highlight(-1, [])
        self._release_document()
        self.text_view.setExtraSelections([])
        self.text_view.clear()
        self.header.clear()
        self._set_message("")
        self._mode = "empty"
        self._update_page_controls()

    def previous_page(self) -> None:
        self._go_to_page(self.pdf_view.pageNavigator().currentPage() - 1)

    def next_page(self) -> None:
        self._go_to_page(self.pdf_view.pageNavigator().currentPage() + 1)

    def zoom_in(self) -> None:
        self._zoom_by(ZOOM_STEP)

    def zoom_out(self) -> None:
        self._zoom_by(1 / ZOOM_STEP)

    def fit_width(self) -> None:
        if self._mode == "pdf":
            self._keeping_centre(lambda: self.pdf_view.setZoomMode(QPdfView.ZoomMode.FitToWidth))

    def open_in_system_viewer(self) -> None:
        if self._passage is not None and os.path.isfile(self._passage.path):
            QDesktopServices.openUrl(QUrl.fromLocalFile(os.path.abspath(self._passage.path)))

    # -- PDF ----------------------------------------------------------------------

    def _load_pdf(self, path: str) -> str | None:
        """Open `path` unless it is already open and unchanged; the error, or None."""
        try:
            key = (os.path.abspath(path), os.stat(path).st_mtime_ns)
        except OSError as error:
            return error.strerror or "unreadable"
        if self._document is not None and key == self._document_key:
            return None  # evidence often cites one book many times: keep it open
        document = QPdfDocument(self)
        error = document.load(path)
        if error != QPdfDocument.Error.None_ or document.pageCount() == 0:
            log.info("could not open %s: %s", path, error.name)
            document.close()
            document.deleteLater()
            if error == QPdfDocument.Error.None_:
                return "it has no pages"
            # "InvalidFileFormat" -> "invalid file format"
            return "".join(f" {c.lower()}" if c.isupper() else c for c in error.name).strip()
        self._release_document()
        self._document = document
        self._document_key = key
        self.pdf_view.setDocument(document)
        return None

    def _release_document(self) -> None:
        if self._document is None:
            return
        document, self._document, self._document_key = self._document, None, None
        self.pdf_view.setDocument(self._blank_document)
        document.close()
        document.deleteLater()

    def _show_pdf(self, passage: Passage) -> None:
        assert self._document is not None
        self._mode = "pdf"
        self.stack.setCurrentWidget(self.pdf_view)
        count = self._document.pageCount()
        notes: list[str] = []
        page = passage.page_index if passage.page_index is not None else 0
        if passage.page_index is None:
            notes.append("No page was recorded for this passage.")
        elif not 0 <= page < count:
            notes.append(f"Page {page + 1} is beyond the end of this PDF ({count} pages).")
            page = min(max(page, 0), count - 1)
        self._pdf_page = page
        self._pdf_highlight_text = ""
        self.header.setText(self._header_text(passage, "page", page))

        start, end = self._clamped(passage)
        layer = self._document.getAllText(page).text() if count else ""
        match = None
        if end > start:
            match = locate_span(layer, passage.page_text, start, end)
        shown = self._document.pageLabel(page) or str(page + 1)
        scanned = ocr_rects(passage.ocr_words, passage.page_text, start, end) if match is None and end > start else None
        if scanned is not None:
            self._pdf_rects, complete = scanned
            self._pdf_highlight_text = passage.page_text[start:end]
            notes.append("This page is a scan: the highlight is placed from OCR."
                         + ("" if complete else " Only part of the passage matched the OCR'd words."))
        elif match is None:
            why = "" if layer.strip() else " (this page has no text layer; it may be a scan)"
            notes.append(f"Passage not found in the PDF's text layer{why}; showing page {shown}.")
        else:
            # Indices into getAllText are PDFium character indices, which is what
            # getSelectionAtIndex takes.
            selection = self._document.getSelectionAtIndex(page, match.start, match.end - match.start)
            self._pdf_rects = [polygon.boundingRect() for polygon in selection.bounds()]
            self._pdf_highlight_text = layer[match.start : match.end]
            if not match.complete:
                notes.append("Only part of the passage matched the PDF's text layer; the highlight may be incomplete.")
        self.pdf_view.set_highlight(page, self._pdf_rects)
        self._set_message(" ".join(notes))
        self.pdf_view.pageNavigator().jump(
            page, self._pdf_rects[0].topLeft() if self._pdf_rects else QPointF(), self.pdf_view.zoomFactor())
        self._request_reveal()
        self._update_page_controls()

    def _reveal_pdf(self) -> None:
        """Scroll so the passage's first line sits 40% down the view.

        QPdfView takes the page crossing that 40% line as the current page, so the
        passage's page stays current even when the passage ends a page.
        """
        page = self._pdf_page
        offset = 0.0
        if self._pdf_rects:
            scale = self.pdf_view.pixels_per_point(page)
            offset = min(rect.top() for rect in self._pdf_rects) * scale
            offset -= math.floor(self.pdf_view.viewport().height() * 0.4) - 1
        self.pdf_view.verticalScrollBar().setValue(int(self.pdf_view.page_top(page) + offset))
        if self._pdf_rects:
            area = self.pdf_view.page_to_viewport(page, self._pdf_rects[0])
            bar = self.pdf_view.horizontalScrollBar()
            if area.left() < 0 or area.left() > self.pdf_view.viewport().width() * 0.5:
                bar.setValue(int(bar.value() + area.left() - 20))

    def _go_to_page(self, page: int) -> None:
        if self._mode == "pdf" and self._document is not None and 0 <= page < self._document.pageCount():
            self.pdf_view.pageNavigator().jump(page, QPointF(), self.pdf_view.zoomFactor())

    def _zoom_by(self, factor: float) -> None:
        if self._mode == "text":
            if factor > 1:
                self.text_view.zoomIn(1)
            else:
                self.text_view.zoomOut(1)
            return
        if self._mode != "pdf":
            return
        current = self.pdf_view.page_scale(self.pdf_view.pageNavigator().currentPage())
        zoom = min(max(current * factor, ZOOM_RANGE[0]), ZOOM_RANGE[1])

        def apply() -> None:
            self.pdf_view.setZoomMode(QPdfView.ZoomMode.Custom)
            self.pdf_view.setZoomFactor(zoom)

        self._keeping_centre(apply)

    def _keeping_centre(self, change: Callable[[], None]) -> None:
        """Apply a zoom change, keeping the point at the view's centre in place."""
        vertical = self.pdf_view.verticalScrollBar()
        height = vertical.maximum() + vertical.pageStep()
        fraction = (vertical.value() + vertical.pageStep() / 2) / max(height, 1)
        change()
        height = vertical.maximum() + vertical.pageStep()
        vertical.setValue(int(fraction * height - vertical.pageStep() / 2))
        self._update_page_controls()

    # -- text ---------------------------------------------------------------------

    def _show_text(self, passage: Passage, note: str) -> None:
        self._mode = "text"
        self.stack.setCurrentWidget(self.text_view)
        noun = "page" if passage.format.lower() == "pdf" else "section"
        self.header.setText(self._header_text(passage, noun, passage.page_index))
        # QTextDocument turns "\r\n" into one block break; normalise first so the
        # passage offsets stay aligned with what is displayed.
        text = passage.page_text.replace("\r\n", "\n").replace("\r", "\n")
        start, end = self._clamped(passage)
        removed_before = passage.page_text[:start].count("\r\n")
        removed_within = passage.page_text[start:end].count("\r\n")
        start -= removed_before
        end -= removed_before + removed_within
        self.text_view.setPlainText(text)
        selections: list[QTextEdit.ExtraSelection] = []
        if end > start:
            selection = QTextEdit.ExtraSelection()
            fmt = QTextCharFormat()
            fmt.setBackground(TEXT_HIGHLIGHT_BACKGROUND)
            fmt.setForeground(TEXT_HIGHLIGHT_FOREGROUND)
            selection.format = fmt
            cursor = QTextCursor(self.text_view.document())
            cursor.setPosition(_utf16_offset(text, start))
            cursor.setPosition(_utf16_offset(text, end), QTextCursor.MoveMode.KeepAnchor)
            selection.cursor = cursor
            selections.append(selection)
        elif not note:
            note = "The passage's position in this section is unknown; showing the whole section."
        self.text_view.setExtraSelections(selections)
        self._text_anchor = _utf16_offset(text, start) if end > start else 0
        self._set_message(note)
        self._request_reveal()
        self._update_page_controls()

    def _reveal_text(self) -> None:
        cursor = self.text_view.textCursor()
        cursor.setPosition(self._text_anchor)
        self.text_view.setTextCursor(cursor)
        self.text_view.centerCursor()

    # -- shared -------------------------------------------------------------------

    @staticmethod
    def _clamped(passage: Passage) -> tuple[int, int]:
        length = len(passage.page_text)
        start = min(max(passage.start, 0), length)
        return start, min(max(passage.end, start), length)

    @staticmethod
    def _header_text(passage: Passage, noun: str, index: int | None) -> str:
        if passage.page_label:
            return f"{passage.title} — {noun} {passage.page_label}"
        if index is not None:
            return f"{passage.title} — {noun} {index + 1}"
        return passage.title

    def _set_message(self, text: str) -> None:
        self._message = text
        self.note.setText(text)
        self.note.setVisible(bool(text))

    def _request_reveal(self) -> None:
        # Scroll positions depend on the final viewport size, known only once shown.
        self._reveal_pending = True
        if self.isVisible():
            self._reveal()
            QTimer.singleShot(0, self._reveal_if_pending)

    def _reveal_if_pending(self) -> None:
        if self._reveal_pending and self.isVisible():
            self._reveal()
            self._reveal_pending = False

    def _reveal(self) -> None:
        if self._mode == "pdf":
            self._reveal_pdf()
        elif self._mode == "text":
            self._reveal_text()

    def _update_page_controls(self, *_: object) -> None:
        pdf = self._mode == "pdf" and self._document is not None
        page = self.pdf_view.pageNavigator().currentPage() if pdf else -1
        count = self._document.pageCount() if pdf and self._document is not None else 0
        self.previous_page_action.setEnabled(pdf and page > 0)
        self.next_page_action.setEnabled(pdf and page + 1 < count)
        self.fit_width_action.setEnabled(pdf)
        self.zoom_in_action.setEnabled(self._mode != "empty")
        self.zoom_out_action.setEnabled(self._mode != "empty")
        self.open_external_action.setEnabled(
            self._passage is not None and os.path.isfile(self._passage.path))
        if pdf and self._document is not None:
            label = self._document.pageLabel(page)
            position = f"{page + 1} of {count}"
            self.page_indicator.setText(f"{label} ({position})" if label and label != str(page + 1) else position)
        else:
            self.page_indicator.setText("")

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        if self._reveal_pending:
            QTimer.singleShot(0, self._reveal_if_pending)

    def closeEvent(self, event: QCloseEvent) -> None:
        self.clear()
        super().closeEvent(event)
