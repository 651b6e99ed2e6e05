"""Item models behind the window's lists: the library's documents (with the live
progress of reading and caching them), the saved conversations, and the evidence
passages of an answer. Each is a plain `QAbstractItemModel` over a Python list that
the window refreshes from the library store; pytest-qt's `qtmodeltester` checks them.
"""

from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtCore import QAbstractListModel, QAbstractTableModel, QModelIndex, QPersistentModelIndex, QSortFilterProxyModel, Qt

from ingest.conversations import Citation, Conversation
from ingest.library import DocumentRecord

ID_ROLE = Qt.ItemDataRole.UserRole
PROGRESS_ROLE = Qt.ItemDataRole.UserRole + 1  # float 0..1 while work is under way, else None
SORT_ROLE = Qt.ItemDataRole.UserRole + 2

Index = QModelIndex | QPersistentModelIndex


@dataclass
class DocumentRow:
    record: DocumentRecord
    reading: float | None = None  # ingest progress of this file
    caching: float | None = None  # cache build progress of this document
    cached: bool | None = None  # None: not known yet (no engine loaded)
    notice: str = ""  # what the extraction report says about the text ("3 pages need OCR")


def _notice(record: DocumentRecord, previous: DocumentRow | None) -> str:
    """A row's notice; the previous row's where the record's status and report are
    the same, since the list is set again on every file added and parsing a report
    (a number per page) costs more than comparing its text."""
    old = previous.record if previous is not None else None
    if old is not None and (old.status, old.missing_since, old.report_json) == (
        record.status, record.missing_since, record.report_json
    ):
        return previous.notice
    if record.missing_since:
        return "file missing"
    if record.status == "ready" and record.report_json:
        return record.report.notice()
    return ""


def _notice_help(record: DocumentRecord) -> str:
    """The tooltip of a document whose text is incomplete: why, and what to do."""
    from ingest.ocr import HOW_TO_ENABLE, engine_names

    report = record.report
    if report.needs_ocr and not engine_names():
        return f"Pages without a text layer stay empty: no OCR engine is installed. To read them, {HOW_TO_ENABLE}."
    if report.needs_ocr:
        return "OCR failed on some pages: see the extraction report (quire show) for each page's reason."
    return "; ".join(report.warnings[:3]) or "No text was found in this document."


def _count(value: int | None) -> str:
    return f"{value:,}" if value else "—"


@dataclass
class _Column:
    title: str
    align: Qt.AlignmentFlag = Qt.AlignmentFlag.AlignLeft


class LibraryModel(QAbstractTableModel):
    """One row per library document: title, status, pages, tokens, cache."""

    COLUMNS = [
        _Column("Title"),
        _Column("Status"),
        _Column("Pages", Qt.AlignmentFlag.AlignRight),
        _Column("Tokens", Qt.AlignmentFlag.AlignRight),
        _Column("Cache"),
    ]
    TITLE, STATUS, PAGES, TOKENS, CACHE = range(5)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.rows: list[DocumentRow] = []

    # -- refresh -----------------------------------------------------------------

    def set_documents(self, records: list[DocumentRecord]) -> None:
        """Replace the rows, keeping live progress and cache states by document id."""
        old = {row.record.id: row for row in self.rows}
        rows = []
        for record in records:
            previous = old.get(record.id)
            row = DocumentRow(record, *(previous.reading, previous.caching, previous.cached) if previous else ())
            row.notice = _notice(record, previous)
            rows.append(row)
        old_ids = [r.record.id for r in self.rows]
        new_ids = [r.record.id for r in rows]
        if new_ids[: len(old_ids)] == old_ids:
            # The usual case while files are added: the same rows, maybe new ones at
            # the end. Inserting (not resetting) spares the view a full relayout.
            count = len(old_ids)
            self.rows[:count] = rows[:count]
            if count:
                self.dataChanged.emit(self.index(0, 0), self.index(count - 1, len(self.COLUMNS) - 1))
            if len(rows) > count:
                self.beginInsertRows(QModelIndex(), count, len(rows) - 1)
                self.rows.extend(rows[count:])
                self.endInsertRows()
            return
        self.beginResetModel()
        self.rows = rows
        self.endResetModel()

    def row_of(self, document_id: int) -> int | None:
        for number, row in enumerate(self.rows):
            if row.record.id == document_id:
                return number
        return None

    def row_of_path(self, path: str) -> int | None:
        for number, row in enumerate(self.rows):
            if row.record.path == path:
                return number
        return None

    def clear_reading(self) -> None:
        for number, row in enumerate(self.rows):
            if row.reading is not None:
                row.reading = None
                self._changed(number)

    def _changed(self, number: int) -> None:
        self.dataChanged.emit(self.index(number, 0), self.index(number, len(self.COLUMNS) - 1))

    def set_reading(self, path: str, fraction: float | None) -> None:
        for number, row in enumerate(self.rows):
            if row.record.path == path and row.reading != fraction:
                row.reading = fraction
                self._changed(number)

    def set_caching(self, document_id: int | None, fraction: float | None) -> None:
        for number, row in enumerate(self.rows):
            value = fraction if row.record.id == document_id else None
            if row.caching != value:
                row.caching = value
                self._changed(number)

    def set_cache_states(self, states: dict[int, bool]) -> None:
        for number, row in enumerate(self.rows):
            state = states.get(row.record.id)
            if state is not None and state != row.cached:
                row.cached = state
                row.caching = None
                self._changed(number)

    def document_ids(self) -> list[int]:
        return [row.record.id for row in self.rows]

    # -- Qt model ----------------------------------------------------------------

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self.COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole):  # noqa: N802
        if orientation == Qt.Orientation.Horizontal and 0 <= section < len(self.COLUMNS):
            if role == Qt.ItemDataRole.DisplayRole:
                return self.COLUMNS[section].title
            if role == Qt.ItemDataRole.TextAlignmentRole:
                return int(self.COLUMNS[section].align | Qt.AlignmentFlag.AlignVCenter)
        return None

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole):
        if not index.isValid() or not (0 <= index.row() < len(self.rows)):
            return None
        row = self.rows[index.row()]
        record = row.record
        column = index.column()
        if role == ID_ROLE:
            return record.id
        if role == Qt.ItemDataRole.DisplayRole:
            return self._display(row, column)
        if role == SORT_ROLE:
            return {
                self.TITLE: record.display_title.lower(),
                self.STATUS: record.status,
                self.PAGES: record.pages,
                self.TOKENS: record.tokens or 0,
                self.CACHE: 1 if row.cached else 0,
            }[column]
        if role == PROGRESS_ROLE:
            if column == self.STATUS:
                return row.reading
            if column == self.CACHE:
                return row.caching
            return None
        if role == Qt.ItemDataRole.ToolTipRole:
            if column == self.STATUS and record.locked:
                return f"{record.error}. Right-click › Enter Password… to open it."
            if column == self.STATUS and record.error:
                return record.error
            if column == self.STATUS and record.missing_since:
                return (f"{record.path} was not found in its watched folder (since {record.missing_since}). "
                        "Its text stays in the library until you remove it.")
            if column == self.STATUS and row.notice:
                return _notice_help(record)
            return record.path
        if role == Qt.ItemDataRole.TextAlignmentRole:
            return int(self.COLUMNS[column].align | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ForegroundRole and column == self.STATUS and record.status == "failed":
            from PySide6.QtGui import QColor

            return QColor("#c62828")
        if role == Qt.ItemDataRole.ForegroundRole and column == self.STATUS and row.notice and row.reading is None:
            from PySide6.QtGui import QColor

            return QColor("#b26a00")
        return None

    def _display(self, row: DocumentRow, column: int) -> str:
        record = row.record
        if column == self.TITLE:
            return record.display_title
        if column == self.STATUS:
            if row.reading is not None:
                return f"reading {row.reading:.0%}"
            if record.locked:
                return "locked" if "wrong" not in (record.error or "") else "wrong password"
            if record.status == "failed":
                return f"failed: {record.error or 'unknown error'}"
            return row.notice or record.status  # a ready document's notice says more than "ready"
        if column == self.PAGES:
            return _count(record.pages)
        if column == self.TOKENS:
            return _count(record.tokens)
        if row.caching is not None:
            return f"caching {row.caching:.0%}"
        if record.status != "ready" or row.cached is None:
            return ""
        return "cached" if row.cached else "not cached"


class DocumentFilter(QSortFilterProxyModel):
    """Shows the documents of one collection (or all) whose title matches a filter."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.allowed: set[int] | None = None
        self.setSortRole(SORT_ROLE)
        self.setFilterCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.setFilterKeyColumn(LibraryModel.TITLE)

    def set_allowed(self, ids: set[int] | None) -> None:
        self.beginFilterChange()
        self.allowed = ids
        self.endFilterChange()

    def filterAcceptsRow(self, source_row: int, source_parent: Index) -> bool:  # noqa: N802
        if self.allowed is not None:
            index = self.sourceModel().index(source_row, 0, source_parent)
            if self.sourceModel().data(index, ID_ROLE) not in self.allowed:
                return False
        return super().filterAcceptsRow(source_row, source_parent)


class ConversationListModel(QAbstractListModel):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.conversations: list[Conversation] = []

    def set_conversations(self, conversations: list[Conversation]) -> None:
        self.beginResetModel()
        self.conversations = list(conversations)
        self.endResetModel()

    def row_of(self, conversation_id: int) -> int | None:
        for number, conversation in enumerate(self.conversations):
            if conversation.id == conversation_id:
                return number
        return None

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self.conversations)

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole):
        if not index.isValid() or not (0 <= index.row() < len(self.conversations)):
            return None
        conversation = self.conversations[index.row()]
        if role == Qt.ItemDataRole.DisplayRole:
            return conversation.title
        if role == Qt.ItemDataRole.ToolTipRole:
            return f"{conversation.title}\nupdated {conversation.updated_at[:16].replace('T', ' ')}"
        if role == ID_ROLE:
            return conversation.id
        return None


class EvidenceModel(QAbstractTableModel):
    """The passages one answer drew on, heaviest first."""

    COLUMNS = ["Weight", "Document", "Page", "Passage"]

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.citations: list[Citation] = []

    def set_citations(self, citations: list[Citation]) -> None:
        self.beginResetModel()
        self.citations = sorted(citations, key=lambda c: -c.weight)
        self.endResetModel()

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self.citations)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self.COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole):  # noqa: N802
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole and 0 <= section < len(self.COLUMNS):
            return self.COLUMNS[section]
        return None

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole):
        if not index.isValid() or not (0 <= index.row() < len(self.citations)):
            return None
        citation = self.citations[index.row()]
        column = index.column()
        quote = " ".join(citation.quote.split())
        if role == Qt.ItemDataRole.DisplayRole:
            return [f"{citation.weight:.0%}", citation.title, citation.page_label or "—", quote[:200]][column]
        if role == Qt.ItemDataRole.ToolTipRole:
            return quote
        if role == ID_ROLE:
            return index.row()
        if role == Qt.ItemDataRole.TextAlignmentRole and column in (0, 2):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None
