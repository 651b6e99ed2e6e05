"""The library panel: every document with its status, pages, tokens and cache state,
a progress bar in the row while it is read or cached, the error reason where it
failed; a collection filter and a title filter; and the conversation list with its
search box (a second tab of the same dock).
"""

from __future__ import annotations

from PySide6.QtCore import QModelIndex, Qt, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListView,
    QMenu,
    QStyle,
    QStyledItemDelegate,
    QStyleOptionProgressBar,
    QTableView,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app.gui.models import ID_ROLE, PROGRESS_ROLE, ConversationListModel, DocumentFilter, LibraryModel
from ingest.library import Collection


class ProgressDelegate(QStyledItemDelegate):
    """Draws a progress bar in a cell whose PROGRESS_ROLE holds a fraction."""

    def paint(self, painter, option, index) -> None:
        fraction = index.data(PROGRESS_ROLE)
        if fraction is None:
            super().paint(painter, option, index)
            return
        bar = QStyleOptionProgressBar()
        bar.rect = option.rect.adjusted(2, 3, -2, -3)
        bar.minimum, bar.maximum = 0, 1000
        bar.progress = int(1000 * max(0.0, min(1.0, float(fraction))))
        bar.text = str(index.data(Qt.ItemDataRole.DisplayRole) or "")
        bar.textVisible = True
        bar.state = option.state
        style = option.widget.style() if option.widget else QApplication.style()
        style.drawControl(QStyle.ControlElement.CE_ProgressBar, bar, painter)


class LibraryPanel(QWidget):
    add_files = Signal()
    add_folder = Signal()
    remove_documents = Signal(list)
    build_cache = Signal()
    new_collection = Signal(list)  # document ids to put in it
    add_to_collection = Signal(int, list)
    ask_about = Signal(list)  # document ids: make them the scope
    task_requested = Signal(str, list)  # "summarise" | "compare" | "find-all", document ids
    open_document = Signal(int)
    password_requested = Signal(int)  # a locked document to open with a password
    report_requested = Signal(int)  # show a document's extraction report
    collection_filter_changed = Signal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.model = LibraryModel(self)
        self.proxy = DocumentFilter(self)
        self.proxy.setSourceModel(self.model)
        self.collections: list[Collection] = []

        self.notice = QLabel()
        self.notice.setWordWrap(True)
        self.notice.hide()
        self.collection = QComboBox()
        self.collection.setToolTip("Show one collection")
        self.collection.currentIndexChanged.connect(self._apply_collection)
        self.filter = QLineEdit()
        self.filter.setPlaceholderText("Filter by title")
        self.filter.setClearButtonEnabled(True)
        self.filter.textChanged.connect(self.proxy.setFilterFixedString)
        add = QToolButton()
        add.setText("Add…")
        add.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        menu = QMenu(add)
        menu.addAction("Files…", self.add_files.emit)
        menu.addAction("Folder…", self.add_folder.emit)
        add.setMenu(menu)
        build = QToolButton()
        build.setText("Build cache")
        build.setToolTip("Cache every document that is not cached yet (Ctrl+B)")
        build.clicked.connect(self.build_cache.emit)
        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(LibraryModel.TITLE, Qt.SortOrder.AscendingOrder)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.setItemDelegate(ProgressDelegate(self.table))
        self.table.verticalHeader().hide()
        self.table.setWordWrap(False)
        self.table.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.table.customContextMenuRequested.connect(self._context_menu)
        self.table.doubleClicked.connect(lambda index: self.open_document.emit(index.data(ID_ROLE)))
        # Fixed widths, not ResizeToContents: that mode measures every row again on
        # each progress update, which stalled the window during ingest.
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setSectionResizeMode(LibraryModel.TITLE, QHeaderView.ResizeMode.Stretch)
        metrics = self.fontMetrics()
        for column, sample in ((LibraryModel.STATUS, "9 pages need OCR"), (LibraryModel.PAGES, "9,999"),
                               (LibraryModel.TOKENS, "999,999"), (LibraryModel.CACHE, "caching 99%")):
            header.resizeSection(column, metrics.horizontalAdvance(sample) + 10)
        self.empty = QLabel("Drop books and PDFs anywhere on this window,\nor use Add… (PDF, EPUB, TXT, MD, HTML, DOCX).")
        self.empty.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.empty.setEnabled(False)

        top = QHBoxLayout()
        top.addWidget(add)
        top.addWidget(build)
        top.addWidget(self.collection, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addLayout(top)
        layout.addWidget(self.filter)
        layout.addWidget(self.notice)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.empty)
        self.set_collections([])

    # -- content -----------------------------------------------------------------

    def set_documents(self, records) -> None:
        self.model.set_documents(records)
        self.empty.setVisible(not records)

    def set_collections(self, collections: list[Collection]) -> None:
        if collections == self.collections and self.collection.count():
            return
        self.collections = collections
        current = self.collection.currentData()
        self.collection.blockSignals(True)
        self.collection.clear()
        self.collection.addItem("All documents", None)
        for collection in collections:
            self.collection.addItem(f"{collection.name} ({len(collection.document_ids)})", collection.id)
        index = self.collection.findData(current)
        self.collection.setCurrentIndex(index if index >= 0 else 0)
        self.collection.blockSignals(False)
        self._apply_collection()

    def _apply_collection(self) -> None:
        chosen = self.collection.currentData()
        allowed = None
        for collection in self.collections:
            if collection.id == chosen:
                allowed = set(collection.document_ids)
        self.proxy.set_allowed(allowed)
        self.collection_filter_changed.emit()

    def show_notice(self, text: str) -> None:
        self.notice.setText(text)
        self.notice.setVisible(bool(text))

    def selected_ids(self) -> list[int]:
        rows = self.table.selectionModel().selectedRows()
        return sorted({index.data(ID_ROLE) for index in rows})

    def _context_menu(self, position) -> None:
        ids = self.selected_ids()
        if not ids:
            return
        menu = QMenu(self)
        locked = [row.record.id for row in self.model.rows if row.record.id in ids and row.record.locked]
        if len(locked) == 1:
            menu.addAction("Enter Password…", lambda: self.password_requested.emit(locked[0]))
            menu.addSeparator()
        if len(locked) == len(ids):  # nothing to ask about or summarise until it opens
            menu.addAction("Remove from library", lambda: self.remove_documents.emit(ids))
            menu.exec(self.table.viewport().mapToGlobal(position))
            return
        menu.addAction(f"Ask about {'this document' if len(ids) == 1 else f'these {len(ids)} documents'}", lambda: self.ask_about.emit(ids))
        if len(ids) == 1:
            menu.addAction("Summarise…", lambda: self.task_requested.emit("summarise", ids))
        else:
            menu.addAction(f"Compare these {len(ids)} documents…", lambda: self.task_requested.emit("compare", ids))
        menu.addAction("Find all mentions…", lambda: self.task_requested.emit("find-all", ids))
        collections = menu.addMenu("Add to collection")
        for collection in self.collections:
            collections.addAction(collection.name, lambda c=collection.id: self.add_to_collection.emit(c, ids))
        collections.addSeparator()
        collections.addAction("New collection…", lambda: self.new_collection.emit(ids))
        menu.addSeparator()
        if len(ids) == 1:
            menu.addAction("Extraction Report…", lambda: self.report_requested.emit(ids[0]))
        menu.addAction("Remove from library", lambda: self.remove_documents.emit(ids))
        menu.exec(self.table.viewport().mapToGlobal(position))


class ConversationsPanel(QWidget):
    chosen = Signal(int)
    search_changed = Signal(str)
    rename_requested = Signal(int)
    delete_requested = Signal(int)
    new_requested = Signal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.model = ConversationListModel(self)
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search conversations")
        self.search.setClearButtonEnabled(True)
        self.search.textChanged.connect(self.search_changed)
        new = QToolButton()
        new.setText("New")
        new.clicked.connect(self.new_requested)
        self.list = QListView()
        self.list.setModel(self.model)
        self.list.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.list.activated.connect(self._activated)
        self.list.clicked.connect(self._activated)
        self.list.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.list.customContextMenuRequested.connect(self._context_menu)
        top = QHBoxLayout()
        top.addWidget(self.search, 1)
        top.addWidget(new)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addLayout(top)
        layout.addWidget(self.list, 1)

    def select(self, conversation_id: int | None) -> None:
        row = self.model.row_of(conversation_id) if conversation_id is not None else None
        if row is None:
            self.list.clearSelection()
        else:
            self.list.setCurrentIndex(self.model.index(row, 0))

    def _activated(self, index: QModelIndex) -> None:
        self.chosen.emit(index.data(ID_ROLE))

    def _context_menu(self, position) -> None:
        index = self.list.indexAt(position)
        if not index.isValid():
            return
        conversation_id = index.data(ID_ROLE)
        menu = QMenu(self)
        menu.addAction("Rename…", lambda: self.rename_requested.emit(conversation_id))
        menu.addAction("Delete", lambda: self.delete_requested.emit(conversation_id))
        menu.exec(self.list.viewport().mapToGlobal(position))
