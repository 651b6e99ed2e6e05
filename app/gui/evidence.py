"""The evidence panel: the passages an answer drew on (document, page, weight,
quote) and, above them, one strip per book showing where in the book the evidence
sits — a mark per passage at its position, darker for more weight. Clicking a mark
or activating a row opens the passage in the source viewer.
"""

from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtCore import QRectF, Qt, Signal
from PySide6.QtGui import QColor, QPainter, QPalette
from PySide6.QtWidgets import QAbstractItemView, QHeaderView, QLabel, QTableView, QVBoxLayout, QWidget

from app.gui.models import EvidenceModel
from ingest.conversations import Citation


@dataclass
class StripBook:
    title: str
    length: int  # characters in the book
    marks: list[tuple[int, int, float, int]]  # (start, end, weight, citation row)


class EvidenceStrip(QWidget):
    """Horizontal bars, one per book; each passage a mark at its place in the book."""

    mark_clicked = Signal(int)  # citation row
    ROW = 22
    LABEL = 16

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.books: list[StripBook] = []
        self.setMouseTracking(True)

    def set_books(self, books: list[StripBook]) -> None:
        self.books = books
        self.setFixedHeight(len(books) * (self.ROW + self.LABEL) + 4 if books else 0)
        self.update()

    def _bar(self, number: int) -> QRectF:
        top = number * (self.ROW + self.LABEL) + self.LABEL
        return QRectF(4, top, max(10, self.width() - 8), self.ROW - 6)

    def mark_rects(self, number: int) -> list[tuple[QRectF, int]]:
        book = self.books[number]
        bar = self._bar(number)
        rects = []
        for start, end, _weight, row in book.marks:
            left = bar.left() + bar.width() * start / max(1, book.length)
            width = max(3.0, bar.width() * (end - start) / max(1, book.length))
            rects.append((QRectF(left, bar.top(), width, bar.height()), row))
        return rects

    def paintEvent(self, event) -> None:  # noqa: N802
        painter = QPainter(self)
        palette = self.palette()
        highlight = palette.color(QPalette.ColorRole.Highlight)
        for number, book in enumerate(self.books):
            bar = self._bar(number)
            painter.setPen(palette.color(QPalette.ColorRole.WindowText))
            painter.drawText(QRectF(4, bar.top() - self.LABEL, bar.width(), self.LABEL), Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter, book.title)
            painter.fillRect(bar, palette.color(QPalette.ColorRole.AlternateBase))
            painter.setPen(palette.color(QPalette.ColorRole.Mid))
            painter.drawRect(bar)
            strongest = max((w for _, _, w, _ in book.marks), default=1.0) or 1.0
            for (rect, _row), (_s, _e, weight, _r) in zip(self.mark_rects(number), book.marks):
                colour = QColor(highlight)
                colour.setAlphaF(0.35 + 0.65 * weight / strongest)
                painter.fillRect(rect, colour)
        painter.end()

    def mousePressEvent(self, event) -> None:  # noqa: N802
        point = event.position()
        for number in range(len(self.books)):
            for rect, row in self.mark_rects(number):
                if rect.adjusted(-2, -2, 2, 2).contains(point):
                    self.mark_clicked.emit(row)
                    return


class EvidencePanel(QWidget):
    open_citation = Signal(object)  # Citation

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.model = EvidenceModel(self)
        self.summary = QLabel("Ask a question: the passages the answer drew on appear here.")
        self.summary.setWordWrap(True)
        self.strip = EvidenceStrip()
        self.strip.mark_clicked.connect(self._open_row)
        self.table = QTableView()
        self.table.setModel(self.model)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setWordWrap(False)
        self.table.verticalHeader().hide()
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        # Long titles must not push the passage out of sight: the title column is
        # sized by hand (and elided), the passage takes the rest.
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Interactive)
        header.resizeSection(1, 150)
        header.setSectionResizeMode(3, QHeaderView.ResizeMode.Stretch)
        self.table.activated.connect(lambda index: self._open_row(index.row()))
        self.table.doubleClicked.connect(lambda index: self._open_row(index.row()))
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addWidget(self.summary)
        layout.addWidget(self.strip)
        layout.addWidget(self.table, 1)

    def set_citations(self, citations: list[Citation], lengths: dict[int, int], *, answered: bool = True) -> None:
        """Show these passages; `lengths` gives each document's length in characters."""
        self.model.set_citations(citations)
        books: dict[object, StripBook] = {}
        for row, citation in enumerate(self.model.citations):
            key = citation.document_id if citation.document_id is not None else citation.title
            length = lengths.get(citation.document_id or -1) or max(citation.end, 1)
            book = books.setdefault(key, StripBook(citation.title, length, []))
            book.marks.append((citation.start, citation.end, citation.weight, row))
        self.strip.set_books(list(books.values()))
        if citations:
            self.summary.setText(f"{len(citations)} passage(s) from {len(books)} document(s). Double-click or press Enter to open one.")
        elif answered:
            self.summary.setText("This answer has no evidence (no documents were in scope).")
        else:
            self.summary.setText("Ask a question: the passages the answer drew on appear here.")

    def focus_passages(self) -> None:
        """Put the keyboard in the passage list (View › Show Evidence), on the first
        passage where none is current, so that arrows and Enter open them."""
        self.table.setFocus()
        if not self.table.currentIndex().isValid() and self.model.rowCount():
            self.table.setCurrentIndex(self.model.index(0, 0))

    def _open_row(self, row: int) -> None:
        if 0 <= row < len(self.model.citations):
            self.table.selectRow(row)
            self.open_citation.emit(self.model.citations[row])
