"""The search panel: full-text search over every page of the library (Ctrl+K).

A field and a list of hits: each hit names its document and page and shows the FTS5
snippet with the matched words in bold. Typing searches after a short pause, Enter
at once; Down moves into the list, and Enter or a double-click on a hit opens its
page in the source viewer with the match highlighted.

The search is `Library.search` (SQLite FTS5: every word, anywhere on the page;
"quoted words" as a phrase; case and accents ignored), run through the window's `LibraryStore` connection on
the GUI thread: over 5,000 pages it takes a few milliseconds (`quire bench search`,
bench/ingest.py), far under the 100 ms a keystroke may cost, so a worker round
trip would only add latency.

The highlight: FTS5 reports which page matched, not where. `match_span` finds the
phrase in the page's text the way the unicode61 tokenizer sees it (runs of letters
and digits, case-folded, accents removed), so the span covers what FTS5 matched.
"""

from __future__ import annotations

import html
import logging
import re
import time
import unicodedata
from dataclasses import dataclass

from PySide6.QtCore import (
    QAbstractListModel,
    QEvent,
    QModelIndex,
    QObject,
    QPersistentModelIndex,
    QPoint,
    QRect,
    QSize,
    Qt,
    QTimer,
    Signal,
)
from PySide6.QtGui import QAbstractTextDocumentLayout, QKeyEvent, QPalette, QTextDocument
from PySide6.QtWidgets import (
    QAbstractItemView,
    QLabel,
    QLineEdit,
    QListView,
    QStyle,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QVBoxLayout,
    QWidget,
)

from app.gui.store import LibraryStore
from app.gui.viewer import Passage
from ingest.errors import LibraryError
from ingest.library import SearchHit

log = logging.getLogger(__name__)

# A person reads a screenful of hits, then refines the words; more rows cost time.
RESULT_LIMIT = 100
# Long enough to pause between words, short enough to feel live.
DEBOUNCE_MS = 250
SNIPPET_TOKENS = 24
# FTS5 wraps each matched word in these; they never occur in extracted text.
MARK = ("\x02", "\x03")
ELLIPSIS = "…"  # what Library.search puts where a snippet cuts the page
# Title line plus three lines of snippet: a hit on an index page (all dot leaders
# and numbers) must not fill the list.
ROW_LINES = 4
HINT = 'Type words to find the pages that contain them all ("quotes" for an exact phrase; case and accents are ignored).'

Index = QModelIndex | QPersistentModelIndex

# unicode61 splits on everything that is not a letter or a digit (underscore too).
_TOKEN = re.compile(r"[^\W_]+")
# A table of contents' or an index's dot leaders: ". . . ." or "......".
_LEADER = re.compile(r"(?:\s*\.){4,}\s*")


def _fold(text: str) -> tuple[str, list[int]]:
    """`text` case-folded with accents removed, as the unicode61 tokenizer with
    remove_diacritics compares it, and the index in `text` each character came from."""
    folded: list[str] = []
    origin: list[int] = []
    for index, char in enumerate(text):
        if char.isascii():
            folded.append(char.lower())
            origin.append(index)
            continue
        for part in unicodedata.normalize("NFKD", char).casefold():
            if not unicodedata.combining(part):
                folded.append(part)
                origin.append(index)
    return "".join(folded), origin


def match_span(page_text: str, query: str) -> tuple[int, int] | None:
    """[start, end) of the first occurrence of `query`'s words, in order, as whole
    words, in `page_text`; failing that, of its first word; None if neither occurs."""
    words = _TOKEN.findall(_fold(query)[0])
    if not words:
        return None
    folded, origin = _fold(page_text)
    for run in (words, words[:1]):
        pattern = r"(?<![^\W_])" + r"[\W_]+".join(re.escape(word) for word in run) + r"(?![^\W_])"
        found = re.search(pattern, folded)
        if found:
            return origin[found.start()], origin[found.end() - 1] + 1
    return None


def hit_span(page_text: str, snippet: str, query: str) -> tuple[int, int] | None:
    """Where to highlight a hit: `query`'s words in the part of the page its snippet
    shows (the occurrence the person chose), else their first occurrence."""
    excerpt = snippet.replace(MARK[0], "").replace(MARK[1], "")
    excerpt = excerpt.removeprefix(ELLIPSIS).removesuffix(ELLIPSIS)
    where = page_text.find(excerpt) if excerpt.strip() else -1
    if where >= 0:
        span = match_span(page_text[where : where + len(excerpt)], query)
        if span is not None:
            return where + span[0], where + span[1]
    return match_span(page_text, query)


def snippet_html(snippet: str) -> str:
    """An FTS5 snippet (matches between `MARK`s) as HTML on one line, matches bold."""
    text = html.escape(_LEADER.sub(" … ", " ".join(snippet.split())))
    return text.replace(MARK[0], "<b>").replace(MARK[1], "</b>")


@dataclass
class SearchRow:
    hit: SearchHit
    where: str  # "page 12", "section 3", or a section's title


class SearchResultsModel(QAbstractListModel):
    """One row per matching page, best first. DisplayRole is plain text; HTML_ROLE
    is what the delegate draws (title, page, snippet with the matches bold)."""

    HTML_ROLE = Qt.ItemDataRole.UserRole + 10

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.rows: list[SearchRow] = []

    def set_rows(self, rows: list[SearchRow]) -> None:
        self.beginResetModel()
        self.rows = rows
        self.endResetModel()

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self.rows)

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> object:
        if not index.isValid() or not 0 <= index.row() < len(self.rows):
            return None
        row = self.rows[index.row()]
        if role == Qt.ItemDataRole.DisplayRole:
            plain = " ".join(row.hit.snippet.replace(MARK[0], "").replace(MARK[1], "").split())
            return f"{row.hit.title} — {row.where}: {plain}"
        if role == self.HTML_ROLE:
            return f"<b>{html.escape(row.hit.title)}</b> — {html.escape(row.where)}<br>{snippet_html(row.hit.snippet)}"
        if role == Qt.ItemDataRole.ToolTipRole:
            return f"{row.hit.title}, {row.where}\n{row.hit.path}"
        return None


class SnippetDelegate(QStyledItemDelegate):
    """Draws a row's HTML wrapped to the list's width."""

    PADDING = 4

    def __init__(self, view: QListView) -> None:
        super().__init__(view)
        self.view = view
        self._heights: dict[tuple[str, int, str], int] = {}  # (row HTML, width, font) -> text height

    def _document(self, index: Index, width: int) -> QTextDocument:
        document = QTextDocument()
        document.setDocumentMargin(0)
        document.setDefaultFont(self.view.font())
        document.setHtml(str(index.data(SearchResultsModel.HTML_ROLE) or ""))
        document.setTextWidth(max(40, width - 2 * self.PADDING))
        return document

    def sizeHint(self, option: QStyleOptionViewItem, index: Index) -> QSize:  # noqa: N802
        width = self.view.viewport().width()
        key = (str(index.data(SearchResultsModel.HTML_ROLE) or ""), width, self.view.font().key())
        height = self._heights.get(key)
        if height is None:
            # The list asks for every row's size at each layout; laying out 100
            # snippets each time was a third of a search's cost.
            if len(self._heights) > 4 * RESULT_LIMIT:
                self._heights.clear()
            document = self._document(index, width)
            height = int(min(document.size().height(), ROW_LINES * self.view.fontMetrics().lineSpacing()))
            self._heights[key] = height
        return QSize(width, height + 2 * self.PADDING)

    def paint(self, painter, option: QStyleOptionViewItem, index: Index) -> None:
        item = QStyleOptionViewItem(option)
        self.initStyleOption(item, index)
        item.text = ""
        style = item.widget.style() if item.widget is not None else self.view.style()
        style.drawControl(QStyle.ControlElement.CE_ItemViewItem, item, painter, item.widget)
        document = self._document(index, item.rect.width())
        selected = bool(item.state & QStyle.StateFlag.State_Selected)
        context = QAbstractTextDocumentLayout.PaintContext()
        role = QPalette.ColorRole.HighlightedText if selected else QPalette.ColorRole.Text
        context.palette.setColor(QPalette.ColorRole.Text, item.palette.color(role))
        painter.save()
        painter.translate(item.rect.topLeft() + QPoint(self.PADDING, self.PADDING))
        context.clip = QRect(0, 0, item.rect.width() - 2 * self.PADDING, item.rect.height() - 2 * self.PADDING).toRectF()
        painter.setClipRect(context.clip)
        document.documentLayout().draw(painter, context)
        painter.restore()


class SearchPanel(QWidget):
    """The search field, a one-line message, and the hits."""

    open_passage = Signal(object)  # Passage: a hit's page with the match highlighted

    def __init__(self, store: LibraryStore, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.store = store
        self.query = ""  # the text the shown hits (or message) answer
        self.last_search_ms = 0.0
        self.field = QLineEdit()
        self.field.setPlaceholderText("Search the library (Ctrl+K)")
        self.field.setClearButtonEnabled(True)
        self.field.textChanged.connect(self._typed)
        self.field.returnPressed.connect(self.search_now)
        self.field.installEventFilter(self)
        self.message = QLabel(HINT)
        self.message.setTextFormat(Qt.TextFormat.PlainText)
        self.message.setWordWrap(True)
        self.model = SearchResultsModel(self)
        self.results = QListView()
        self.results.setModel(self.model)
        self.results.setItemDelegate(SnippetDelegate(self.results))
        self.results.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.results.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.results.setAlternatingRowColors(True)
        self.results.setVerticalScrollMode(QAbstractItemView.ScrollMode.ScrollPerPixel)
        # Adjust: a new width lays the rows out again, so the snippets rewrap.
        self.results.setResizeMode(QListView.ResizeMode.Adjust)
        # activated: Enter, and a double-click (or the platform's single click).
        self.results.activated.connect(self.open_hit)
        self._timer = QTimer(self, singleShot=True, interval=DEBOUNCE_MS)
        self._timer.timeout.connect(self.search_now)
        self.setFocusProxy(self.field)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addWidget(self.field)
        layout.addWidget(self.message)
        layout.addWidget(self.results, 1)

    # -- searching ---------------------------------------------------------------

    def _typed(self, _text: str) -> None:
        self._timer.start()

    def library_changed(self) -> None:
        """Documents came or went: the hits shown are searched again (after the usual
        pause, so a burst of changes while files are added costs one search)."""
        if self.query.strip():
            self._timer.start()

    def search_now(self) -> None:
        """Search for the field's text now (Enter, or the pause after typing)."""
        self._timer.stop()
        self.search(self.field.text())

    def search(self, query: str) -> None:
        self.query = query
        if not query.strip():
            self._show([], HINT)
            return
        started = time.perf_counter()
        try:
            hits = self.store.library.search(query, RESULT_LIMIT, mark=MARK, context_tokens=SNIPPET_TOKENS)
        except LibraryError as error:
            log.info("search for %r failed: %s", query, error)
            self._show([], f"Cannot search for “{query}”: {error}")
            return
        self.last_search_ms = (time.perf_counter() - started) * 1000
        log.debug("search for %r: %d hits in %.1f ms", query, len(hits), self.last_search_ms)
        if hits:
            more = " (the best first; refine the words to see others)" if len(hits) >= RESULT_LIMIT else ""
            self._show(self._rows(hits), f"{len(hits)} matching page{'s' if len(hits) != 1 else ''}{more}.")
        elif not self.store.library.documents(status="ready"):
            self._show([], "The library is empty: add documents to search them.")
        elif not _TOKEN.search(query):
            self._show([], "Type letters or digits: punctuation alone is not searched.")
        else:
            self._show([], f"No pages contain “{query.strip()}”.")

    def _rows(self, hits: list[SearchHit]) -> list[SearchRow]:
        formats: dict[int, str] = {}
        rows = []
        for hit in hits:
            if hit.document_id not in formats:
                record = self.store.document(hit.document_id)
                formats[hit.document_id] = (record.format or "") if record is not None else ""
            label = hit.page_label or str(hit.page_index + 1)
            if formats[hit.document_id] == "pdf":
                where = f"page {label}"
            else:
                # Other formats have sections, often labelled with their title.
                where = f"section {label}" if label.isdigit() else label
            rows.append(SearchRow(hit, where))
        return rows

    def _show(self, rows: list[SearchRow], message: str) -> None:
        self.model.set_rows(rows)
        self.message.setText(message)
        if rows:
            self.results.setCurrentIndex(self.model.index(0, 0))

    # -- opening -----------------------------------------------------------------

    def open_hit(self, index: QModelIndex) -> None:
        if not index.isValid() or not 0 <= index.row() < len(self.model.rows):
            return
        hit = self.model.rows[index.row()].hit
        passage = self.passage(hit)
        if passage is None:
            self.message.setText(f"“{hit.title}” is no longer in the library; search again.")
            return
        self.open_passage.emit(passage)

    def passage(self, hit: SearchHit) -> Passage | None:
        """What the viewer needs to show `hit`: its page, the match as the span."""
        record = self.store.document(hit.document_id)
        if record is None:
            return None
        page = next((p for p in self.store.library.pages(record.id) if p.index == hit.page_index), None)
        if page is None:
            return None
        start, end = hit_span(page.text, hit.snippet, self.query) or (0, 0)
        return self.store.page_passage(record, page, start, end)

    # -- keys --------------------------------------------------------------------

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802
        # Down in the field walks into the hits, as in a browser's address bar.
        if watched is self.field and event.type() == QEvent.Type.KeyPress and isinstance(event, QKeyEvent):
            if event.key() == Qt.Key.Key_Down and self.model.rows:
                self.results.setFocus()
                if not self.results.currentIndex().isValid():
                    self.results.setCurrentIndex(self.model.index(0, 0))
                return True
        return super().eventFilter(watched, event)
