"""Quire's main window: the library (left), the conversation (centre), the evidence
and the source viewer (right), a status bar with the model, the corpus and the last
answer's speed.

The window owns no slow work. Model loading, cache builds and answers go to the
`ServiceWorker` thread (app/gui/worker.py, over app/service.py's `Service`); reading
files and removing documents to the `IngestWorker` thread; both report through
queued signals. Reads of library.db for the lists go through `LibraryStore`. Any
failure arrives as one line in a banner and the status bar; the window stays usable.
The library side (adding, resuming, watched folders, passwords, reports,
collections) is app/gui/library_actions.py, a mixin of the window.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path

from PySide6.QtCore import QByteArray, QSettings, Qt, QThread, QTimer, Signal, Slot
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QDockWidget,
    QFileDialog,
    QInputDialog,
    QLabel,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QTabWidget,
    QToolButton,
)

from app.gui.bridge import DropCatcher, Inbox
from app.gui.conversation import ConversationPanel
from app.gui.evidence import EvidencePanel
from app.gui.library_actions import LibraryActions
from app.gui.library_panel import ConversationsPanel, LibraryPanel
from app.gui.search_panel import SearchPanel
from app.gui import task_dialogs
from app.gui.store import LibraryStore, Scope, turns
from app.gui.theme import apply_theme
from app.gui.viewer import SourceViewer
from app.gui.worker import AskRequest, IngestWorker, Prepare, ServiceFactory, ServiceWorker, default_token_counter
from app.settings import AppSettings, apply_ocr_languages, load_settings, save_settings
from engine.corpus.answer import Turn
from engine.corpus.build import BuildProgress
from ingest.conversations import Citation
from ingest.paths import library_path as default_library_path

log = logging.getLogger(__name__)

EXPORT_FILTERS = "Markdown (*.md);;HTML (*.html);;PDF (*.pdf);;JSON (*.json)"


class MainWindow(LibraryActions, QMainWindow):
    configure_requested = Signal(object)
    build_requested = Signal(object)
    ask_requested = Signal(object)
    states_requested = Signal()
    ingest_requested = Signal(list)
    ingest_locked_requested = Signal(list, str)  # paths, the password typed for them
    watch_scan_requested = Signal()
    warm_requested = Signal()
    remove_requested = Signal(list, str)

    def __init__(
        self,
        model_spec: str | None = None,
        *,
        settings: AppSettings | None = None,
        settings_file: Path | None = None,
        library_path: Path | None = None,
        service_factory: ServiceFactory | None = None,
        service_prepare: Prepare | None = None,
        qsettings: QSettings | None = None,
    ) -> None:
        super().__init__()
        self.settings_file = settings_file
        self.settings = settings or load_settings(settings_file)
        if model_spec:
            self.settings = replace(self.settings, model=model_spec)
        self.library_path = library_path or default_library_path()
        self.qsettings = qsettings or QSettings("Quire", "Quire")
        self.store = LibraryStore(self.library_path)
        self.conversation_id: int | None = None
        self.answering = False
        self.engine_ready = False
        self.engine_info: dict = {}
        self.cache_states: dict[int, bool] = {}
        self.last_error = ""
        self._install_dialog = None
        # Work that must survive a quit or a crash is noted beside the library while it
        # runs (library_actions.UNFINISHED_FILE) and resumed at the next start; a question pauses a cache
        # build, which goes on after the answer.
        self._ingest_jobs: list[list[str]] = []  # the paths of each ingest job sent, in order
        self._cache_running = False
        self._cache_resume = False
        self._cache_ids: list[int] | None = None
        self._closing = False
        self.setWindowTitle("Quire")
        self.resize(1280, 800)
        self.setAcceptDrops(True)

        self._build_panels()
        self._build_status_bar()
        self._build_actions()
        apply_ocr_languages(self.settings)
        self._start_workers(service_factory, service_prepare)
        self._resume_ingest()  # before anything else is added, so only what was left is resumed
        self._start_watching()
        self._restore_layout()
        QApplication.instance().installEventFilter(self._drop_catcher)
        self.refresh_library()
        self.refresh_conversations()
        self.new_conversation()
        self.configure_requested.emit(self.settings)
        self.warm_requested.emit()

    # -- construction ------------------------------------------------------------

    def _build_panels(self) -> None:
        self.conversation = ConversationPanel()
        self.setCentralWidget(self.conversation)
        self.library = LibraryPanel()
        self.conversations = ConversationsPanel()
        self.evidence = EvidencePanel()
        self.viewer = SourceViewer()
        self.search = SearchPanel(self.store)
        tabs = QTabWidget()
        tabs.addTab(self.library, "Library")
        tabs.addTab(self.conversations, "Conversations")
        tabs.addTab(self.search, "Search")
        self.left_tabs = tabs
        self.library_dock = self._dock("Library", tabs, Qt.DockWidgetArea.LeftDockWidgetArea, "libraryDock")
        self.evidence_dock = self._dock("Evidence", self.evidence, Qt.DockWidgetArea.RightDockWidgetArea, "evidenceDock")
        self.viewer_dock = self._dock("Source", self.viewer, Qt.DockWidgetArea.RightDockWidgetArea, "viewerDock")
        self.splitDockWidget(self.evidence_dock, self.viewer_dock, Qt.Orientation.Vertical)
        self.resizeDocks([self.library_dock, self.evidence_dock], [500, 430], Qt.Orientation.Horizontal)
        self.banner = QLabel()
        self.banner.setWordWrap(True)
        self.banner.setStyleSheet("QLabel { background: #fdecea; color: #8a1c12; padding: 6px; border-radius: 4px; }")
        self.banner.hide()
        self.conversation.layout().insertWidget(0, self.banner)
        self._drop_catcher = DropCatcher(self)

        self.conversation.ask_clicked.connect(self.ask)
        self.conversation.stop_clicked.connect(self.stop)
        self.conversation.regenerate_clicked.connect(self.regenerate)
        self.conversation.citation_clicked.connect(self._citation_link)
        self.conversation.scope_changed.connect(self._scope_changed)
        self.library.add_files.connect(self.choose_files)
        self.library.add_folder.connect(self.choose_folder)
        self.library.build_cache.connect(self.build_cache)
        self.library.remove_documents.connect(self.remove_documents)
        self.library.new_collection.connect(self.new_collection)
        self.library.add_to_collection.connect(self._add_to_collection)
        self.library.ask_about.connect(self.ask_about)
        self.library.task_requested.connect(self.request_task)
        self.library.password_requested.connect(self.enter_password)
        self.library.report_requested.connect(self.show_report)
        self.library.table.selectionModel().selectionChanged.connect(lambda *_: self.refresh_scopes())
        self.conversations.chosen.connect(self.open_conversation)
        self.conversations.search_changed.connect(lambda text: self.refresh_conversations(text))
        self.conversations.rename_requested.connect(self.rename_conversation)
        self.conversations.delete_requested.connect(self.delete_conversation)
        self.conversations.new_requested.connect(self.new_conversation)
        self.evidence.open_citation.connect(self.open_citation)
        self.search.open_passage.connect(self.viewer.open_passage)
        self.search.open_passage.connect(lambda _passage: self._show(self.viewer_dock))

    def _dock(self, title: str, widget, area: Qt.DockWidgetArea, name: str) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(name)
        dock.setWidget(widget)
        self.addDockWidget(area, dock)
        return dock

    def _build_status_bar(self) -> None:
        bar = self.statusBar()
        self.model_label = QLabel("Model: loading…")
        self.corpus_label = QLabel()
        self.cache_label = QLabel()
        self.speed_label = QLabel()
        self.task_progress = QProgressBar()
        self.task_progress.setMaximumWidth(180)
        self.task_progress.setRange(0, 1000)
        self.task_progress.hide()
        self.task_cancel = QToolButton()
        self.task_cancel.setText("Cancel")
        self.task_cancel.setToolTip("Cancel the running task (Esc)")
        self.task_cancel.clicked.connect(self.cancel_work)
        self.task_cancel.hide()
        for widget in (self.task_progress, self.task_cancel, self.model_label, self.corpus_label, self.cache_label, self.speed_label):
            bar.addPermanentWidget(widget)
        self._pending_progress: tuple[float, str] | None = None
        self._progress_timer = QTimer(self, singleShot=True, interval=100)
        self._progress_timer.timeout.connect(self._flush_progress)

    def _action(self, menu, text: str, slot, shortcut=None, tip: str = "") -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        if tip:
            action.setStatusTip(tip)
        action.triggered.connect(slot)
        menu.addAction(action)
        return action

    def _build_actions(self) -> None:
        menus = self.menuBar()
        file = menus.addMenu("&File")
        self._action(file, "Add &Files…", self.choose_files, QKeySequence.StandardKey.Open)
        self._action(file, "Add F&older…", self.choose_folder, "Ctrl+Shift+O")
        file.addSeparator()
        self.export_action = self._action(file, "&Export Conversation…", self.export_conversation, "Ctrl+E")
        file.addSeparator()
        self._action(file, "&Settings…", self.open_settings, QKeySequence.StandardKey.Preferences if sys.platform == "darwin" else "Ctrl+,")
        self._action(file, "&Quit", self.close, QKeySequence.StandardKey.Quit)
        talk = menus.addMenu("&Conversation")
        self._action(talk, "&New Conversation", self.new_conversation, QKeySequence.StandardKey.New)
        self._action(talk, "&Ask", lambda: self.conversation._on_submit(), "Ctrl+Return")
        self.stop_action = self._action(talk, "&Stop", self.stop, "Ctrl+.")
        self._action(talk, "&Regenerate", self.regenerate, "Ctrl+R")
        self._action(talk, "Re&name…", lambda: self.rename_conversation(self.conversation_id), "F2")
        self._action(talk, "&Delete", lambda: self.delete_conversation(self.conversation_id), "Ctrl+Shift+Backspace")
        self._action(talk, "Focus &Question", lambda: self.conversation.question.setFocus(), "Ctrl+L")
        talk.addSeparator()
        self._action(talk, "&Summarise Selected Document…", lambda: self.request_task("summarise", self.library.selected_ids()),
                     "Ctrl+Shift+S", "Summarise the document selected in the library, or a page range of it")
        self._action(talk, "&Compare Selected Documents…", lambda: self.request_task("compare", self.library.selected_ids()),
                     "Ctrl+Shift+C", "How the documents selected in the library differ on a topic")
        self._action(talk, "&Find All…", lambda: self.request_task("find-all", None), "Ctrl+Shift+F",
                     "Every sentence that mentions a term, in the conversation's scope")
        library = menus.addMenu("&Library")
        self._action(library, "&Build Cache", self.build_cache, "Ctrl+B")
        self._action(library, "&Remove Selected", lambda: self.remove_documents(self.library.selected_ids()), QKeySequence.StandardKey.Delete)
        self._action(library, "&Watch Folder…", self.choose_watched_folder, None,
                     "New and changed files in a folder come into the library by themselves")
        self._action(library, "Stop &Watching a Folder…", self.stop_watching_folder)
        self._action(library, "Enter &Password…", self._enter_selected_password, None,
                     "Open the selected password-protected document")
        self._action(library, "New &Collection from Selection…", lambda: self.new_collection(self.library.selected_ids()))
        self._action(library, "&Cancel Running Task", self.cancel_work, "Escape")
        self._action(library, "&Search Pages", self.focus_search, "Ctrl+K", "Find the pages that contain words or a phrase")
        view = menus.addMenu("&View")
        self._action(view, "Show &Library", lambda: self._show(self.library_dock, self.left_tabs, 0), "Ctrl+1")
        self._action(view, "Show C&onversations", lambda: self._show(self.library_dock, self.left_tabs, 1), "Ctrl+2")
        self._action(view, "Show &Evidence", lambda: (self._show(self.evidence_dock), self.evidence.focus_passages()), "Ctrl+3")
        self._action(view, "Show &Source", lambda: (self._show(self.viewer_dock), self.viewer.focus_source()), "Ctrl+4")
        view.addSeparator()
        for dock in (self.library_dock, self.evidence_dock, self.viewer_dock):
            view.addAction(dock.toggleViewAction())
        help_menu = menus.addMenu("&Help")
        self._action(help_menu, "&Keyboard Shortcuts", self.show_shortcuts, QKeySequence.StandardKey.HelpContents)
        self._action(help_menu, "&About Quire", self.show_about)

    def _show(self, dock: QDockWidget, tabs: QTabWidget | None = None, tab: int = 0) -> None:
        dock.show()
        dock.raise_()
        if tabs is not None:
            tabs.setCurrentIndex(tab)
            tabs.currentWidget().setFocus()

    def focus_search(self) -> None:
        self._show(self.library_dock, self.left_tabs, self.left_tabs.indexOf(self.search))
        self.search.field.selectAll()

    def _start_workers(self, service_factory: ServiceFactory | None, prepare: Prepare | None) -> None:
        if service_factory is None:
            from app.service import LocalService, ensure_model

            service_factory, prepare = LocalService, ensure_model
        self.service_thread = QThread(self)
        self.service_thread.setObjectName("quire-service")
        self.service_worker = ServiceWorker(self.library_path, service_factory, prepare)
        self.service_worker.moveToThread(self.service_thread)
        self.ingest_thread = QThread(self)
        self.ingest_thread.setObjectName("quire-ingest")
        self.ingest_worker = IngestWorker(self.library_path, default_token_counter(self.settings))
        self.ingest_worker.moveToThread(self.ingest_thread)
        self._inbox = Inbox(self)

        service, ingest, inbox = self.service_worker, self.ingest_worker, self._inbox
        self.configure_requested.connect(service.configure)
        self.build_requested.connect(service.build)
        self.ask_requested.connect(service.ask)
        self.states_requested.connect(service.refresh_cache_states)
        self.ingest_requested.connect(ingest.ingest)
        self.ingest_locked_requested.connect(ingest.ingest_locked)
        self.watch_scan_requested.connect(ingest.scan_watched)
        self.warm_requested.connect(ingest.warm)
        self.remove_requested.connect(ingest.remove)
        for name in ("loading", "installing", "ready", "cache_progress", "cache_finished", "cache_states", "cache_bytes",
                     "token", "evidence", "answer_finished", "failed"):
            getattr(service, name).connect(getattr(inbox, name))
        service.busy.connect(inbox.service_busy)
        for name in ("progress", "finished", "removed", "failed", "busy", "watched"):
            getattr(ingest, name).connect(getattr(inbox, f"ingest_{name}"))
        inbox.ingest_watched.connect(self._watched)
        inbox.loading.connect(self._engine_loading)
        inbox.installing.connect(self._installing)
        inbox.ready.connect(self._engine_ready)
        inbox.cache_progress.connect(self._cache_progress)
        inbox.cache_finished.connect(self._cache_finished)
        inbox.cache_states.connect(self._cache_states)
        inbox.cache_bytes.connect(self._cache_bytes)
        inbox.token.connect(self.conversation.append_token)
        inbox.evidence.connect(self._live_evidence)
        inbox.answer_finished.connect(self._answer_finished)
        inbox.failed.connect(self._engine_failed)
        inbox.service_busy.connect(lambda text: self._busy("service", text))
        inbox.ingest_progress.connect(self._ingest_progress)
        inbox.ingest_finished.connect(self._ingest_finished)
        inbox.ingest_removed.connect(self._removed)
        inbox.ingest_failed.connect(self.show_error)
        inbox.ingest_busy.connect(lambda text: self._busy("ingest", text))
        self._busy_tasks: dict[str, str] = {}
        self.service_thread.start()
        self.ingest_thread.start()

    # -- layout and theme --------------------------------------------------------

    def _restore_layout(self) -> None:
        geometry = self.qsettings.value("window/geometry")
        state = self.qsettings.value("window/state")
        if isinstance(geometry, QByteArray):
            self.restoreGeometry(geometry)
        if isinstance(state, QByteArray):
            self.restoreState(state)

    def _save_layout(self) -> None:
        self.qsettings.setValue("window/geometry", self.saveGeometry())
        self.qsettings.setValue("window/state", self.saveState())
        self.qsettings.sync()

    # -- cache -------------------------------------------------------------------

    def build_cache(self) -> None:
        if not self.engine_ready:
            self.show_error("the model is not loaded yet")
            return
        self._note_unfinished(cache=True)  # asked for: resumed at the next start until done
        self.request_cache(None)

    def request_cache(self, ids: list[int] | None) -> None:
        self._cache_running = True
        self._cache_ids = ids
        self.build_requested.emit(ids)

    @Slot(object)
    def _cache_progress(self, progress: BuildProgress) -> None:
        if isinstance(progress.document_id, int):
            self.library.model.set_caching(progress.document_id, progress.document_fraction)
        fraction = progress.tokens_done / progress.tokens_total if progress.tokens_total else 1.0
        eta = f", about {progress.eta_seconds:.0f} s left" if progress.eta_seconds is not None else ""
        self._show_progress(fraction, f"Caching: {progress.tokens_done:,} of {progress.tokens_total:,} tokens{eta}")

    @Slot(str)
    def _cache_finished(self, summary: str) -> None:
        self.library.model.set_caching(None, None)
        self._cache_running = False
        if self._cache_resume:
            self.statusBar().showMessage("Caching paused for the question; it goes on after the answer.", 8000)
            return
        if not self._closing:
            self._note_unfinished(cache=False)  # done, or cancelled by the user
        self.statusBar().showMessage(summary or "Cache build cancelled; it resumes where it stopped.", 8000)

    @Slot(object)
    def _cache_states(self, states: dict) -> None:
        self.cache_states = dict(states)
        self.library.model.set_cache_states(self.cache_states)

    # -- engine ------------------------------------------------------------------

    @Slot(str)
    def _engine_loading(self, name: str) -> None:
        self.model_label.setText(f"Model: loading {name}…")

    @Slot(str, int, int)
    def _installing(self, stage: str, done: int, total: int) -> None:
        """The default model is copied and converted once (about a minute): on the
        first run, and again when a new Quire changes the converted layout."""
        from PySide6.QtWidgets import QProgressDialog

        if self._install_dialog is None:
            self._install_dialog = QProgressDialog("Preparing the model (once)…", "Cancel", 0, 1000, self)
            self._install_dialog.setWindowTitle("Quire")
            self._install_dialog.setMinimumDuration(0)
            self._install_dialog.canceled.connect(lambda: self.service_worker.cancel())
        labels = {"download": "Downloading the model", "assemble": "Copying the model", "convert": "Converting the model for this machine"}
        self._install_dialog.setLabelText(f"{labels.get(stage, stage)} (once)…")
        self._install_dialog.setValue(int(1000 * done / total) if total else 0)

    def _close_install_dialog(self) -> None:
        if self._install_dialog is not None:
            self._install_dialog.close()
            self._install_dialog.deleteLater()
            self._install_dialog = None

    @Slot(object)
    def _cache_bytes(self, size: int) -> None:
        self.cache_label.setText(f"Cache: {cache_size(size)}")

    @Slot(object)
    def _engine_ready(self, info: dict) -> None:
        self._close_install_dialog()
        self.engine_ready = True
        self.engine_info = info
        self.model_label.setText(f"Model: {info.get('model')} · {str(info.get('device', '')).upper()}")
        self.hide_error()
        self._update_buttons()
        unfinished = self._unfinished().get("cache") is True
        if (self.settings.auto_cache or unfinished) and self.store.documents():
            self.request_cache(None)

    @Slot(str, str)
    def _engine_failed(self, task: str, message: str) -> None:
        if task == "load":
            self._close_install_dialog()
            self.engine_ready = False
            self.model_label.setText("Model: not loaded")
        if task == "cache":
            self._cache_running = False
        self.show_error(message)
        self._update_buttons()

    def _busy(self, owner: str, text: str) -> None:
        if text:
            self._busy_tasks[owner] = text
        else:
            self._busy_tasks.pop(owner, None)
        if self._busy_tasks:
            self.statusBar().showMessage(" · ".join(self._busy_tasks.values()))
            self.task_cancel.show()
        else:
            self._pending_progress = None
            self.statusBar().clearMessage()
            self.task_progress.hide()
            self.task_cancel.hide()

    def _show_progress(self, fraction: float, message: str) -> None:
        # Progress arrives per page and per segment; the status bar is redrawn at
        # most ten times a second (each redraw lays the bar out again: up to 37 ms
        # per call when it was done for every event, measured with quire bench gui).
        self._pending_progress = (fraction, message)
        if not self._progress_timer.isActive():
            self._progress_timer.start()

    def _flush_progress(self) -> None:
        if self._pending_progress is None:
            return
        fraction, message = self._pending_progress
        self._pending_progress = None
        if not self._busy_tasks:
            return  # the work ended meanwhile
        self.task_progress.show()
        self.task_cancel.show()
        self.task_progress.setValue(int(1000 * max(0.0, min(1.0, fraction))))
        self.task_progress.setFormat(f"{fraction:.0%}")
        self.statusBar().showMessage(message)

    def cancel_work(self) -> None:
        """Esc: stop the answer if one is streaming, else cancel builds and reading."""
        if self.answering:
            self.stop()
            return
        self.service_worker.cancel()
        self.ingest_worker.cancel()

    # -- conversations -----------------------------------------------------------

    def refresh_conversations(self, query: str | None = None) -> None:
        query = self.conversations.search.text() if query is None else query
        self.conversations.model.set_conversations(self.store.conversation_list(query))
        self.conversations.select(self.conversation_id)

    def new_conversation(self) -> None:
        if self.answering:
            return
        self.conversation_id = None
        self.conversation.show_conversation("New conversation", [])
        self.evidence.set_citations([], {}, answered=False)
        self.conversations.select(None)
        self._update_buttons()
        self.conversation.question.setFocus()

    def open_conversation(self, conversation_id: int) -> None:
        if self.answering or conversation_id is None:
            return
        try:
            conversation = self.store.conversations.get(conversation_id)
        except Exception as error:  # noqa: BLE001 — deleted meanwhile
            self.show_error(str(error))
            self.refresh_conversations()
            return
        self.conversation_id = conversation_id
        messages = self.store.messages(conversation_id)
        self.conversation.show_conversation(conversation.title, messages)
        self.refresh_scopes(Scope.from_dict(conversation.scope))
        answers = [m for m in messages if m.role == "assistant"]
        if answers:
            self._show_evidence(answers[-1].citations)
        else:
            self.evidence.set_citations([], {}, answered=False)
        self._update_buttons()

    def rename_conversation(self, conversation_id: int | None) -> None:
        if conversation_id is None:
            return
        current = self.store.conversations.get(conversation_id).title
        title, ok = QInputDialog.getText(self, "Rename conversation", "Title:", text=current)
        if ok and title.strip():
            self.store.conversations.rename(conversation_id, title.strip())
            if conversation_id == self.conversation_id:
                self.conversation.title.setText(title.strip())
            self.refresh_conversations()

    def delete_conversation(self, conversation_id: int | None) -> None:
        if conversation_id is None or self.answering:
            return
        title = self.store.conversations.get(conversation_id).title
        if QMessageBox.question(self, "Delete conversation", f"Delete “{title}” and its answers?") != QMessageBox.StandardButton.Yes:
            return
        self.store.conversations.delete(conversation_id)
        if conversation_id == self.conversation_id:
            self.new_conversation()
        self.refresh_conversations()

    # -- asking ------------------------------------------------------------------

    def ask(self, question: str) -> None:
        if self.answering or not self.engine_ready:
            return
        scope = self.conversation.current_scope()
        if self.conversation_id is None:
            title = " ".join(question.split())
            title = title if len(title) <= 60 else title[:57] + "…"
            self.conversation_id = self.store.new_conversation(title, scope).id
        else:
            self.store.conversations.set_scope(self.conversation_id, scope.to_dict())
        history = turns(self.store.messages(self.conversation_id))
        self.store.conversations.add_message(self.conversation_id, "user", question)
        self.conversation.question.clear()
        self._send(question, scope, history)

    def request_task(self, task: str, ids: list[int] | None) -> None:
        """Ask for what a whole-document task needs (app/gui/task_dialogs.py) and run it
        into the conversation. `ids`: the documents (None: the current scope)."""
        if self.answering or not self.engine_ready:
            return
        records = [r for r in (self.store.document(i) for i in ids or []) if r is not None]
        try:
            asked = task_dialogs.ask_options(self, task, records)
        except ValueError as error:
            self.show_error(str(error))
            return
        if asked is not None:
            options, label = asked
            self.run_task(task, options, label, [r.id for r in records] or None)

    def run_task(self, task: str, options: dict, label: str, ids: list[int] | None) -> None:
        """Run a task into the conversation: `label` is saved as the user's turn (with
        the task, so Regenerate runs it again), the result as the answer."""
        if self.answering or not self.engine_ready:
            return
        scope = Scope("documents", document_ids=tuple(ids), label=f"Selected documents ({len(ids)})") if ids else self.conversation.current_scope()
        if self.conversation_id is None:
            self.conversation_id = self.store.new_conversation(label if len(label) <= 60 else label[:57] + "…", scope).id
        spec = {"task": task, "options": options, "documents": ids}
        self.store.conversations.add_message(self.conversation_id, "user", label, stats=spec)
        self._send(label, scope, [], spec)

    def regenerate(self) -> None:
        if self.answering or self.conversation_id is None or not self.engine_ready:
            return
        messages = self.store.messages(self.conversation_id)
        if messages and messages[-1].role == "assistant":
            self.store.conversations.delete_message(messages[-1].id)
            messages = messages[:-1]
        last = max((n for n, m in enumerate(messages) if m.role == "user"), default=None)
        if last is not None:
            spec = messages[last].stats or {}
            if spec.get("task"):
                ids = spec.get("documents")
                scope = Scope("documents", document_ids=tuple(ids), label=f"Selected documents ({len(ids)})") if ids else self.conversation.current_scope()
                self._send(messages[last].content, scope, [], spec)
                return
            # The question again, with the turns before it, as when it was first asked.
            self._send(messages[last].content, self.conversation.current_scope(), turns(messages[:last]))

    def _send(self, question: str, scope: Scope, history: list[Turn], spec: dict | None = None) -> None:
        assert self.conversation_id is not None
        conversation = self.store.conversations.get(self.conversation_id)
        self.conversation.show_conversation(conversation.title, self.store.messages(self.conversation_id))
        self.conversation.begin_answer()
        self.evidence.set_citations([], {}, answered=False)
        self.answering = True
        self._update_buttons()
        self.hide_error()
        self.refresh_conversations()
        if self._cache_running:
            # One service thread: a question sent now would wait for the whole build.
            # The build stops at its next segment and goes on after the answer.
            self._cache_resume = True
            self.service_worker.cancel()
        self.ask_requested.emit(
            AskRequest(
                self.conversation_id, question, self.store.scope_document_ids(scope), self.settings.max_answer_tokens, history,
                task=(spec or {}).get("task", "ask"), options=(spec or {}).get("options", {}),
            )
        )

    def stop(self) -> None:
        if self.answering:
            self.service_worker.cancel()

    @Slot(list)
    def _live_evidence(self, citations: list[Citation]) -> None:
        self.conversation.set_live_citations(citations)
        self._show_evidence(citations)

    @Slot(object)
    def _answer_finished(self, info: dict) -> None:
        self.answering = False
        if self._cache_resume:
            self._cache_resume = False
            self.request_cache(self._cache_ids)
        stats = info.get("stats") or {}
        if stats.get("time_to_first_token"):
            self.speed_label.setText(
                f"Last answer: first token {stats['time_to_first_token']:.2f} s, {stats.get('decode_tokens_per_second', 0):.1f} tok/s"
            )
        if info.get("conversation_id") == self.conversation_id:
            self.open_conversation(self.conversation_id)
        self.refresh_conversations()
        self._update_buttons()

    def _show_evidence(self, citations: list[Citation]) -> None:
        lengths = {}
        for citation in citations:
            if citation.document_id is not None and citation.document_id not in lengths:
                record = self.store.document(citation.document_id)
                if record is not None:
                    lengths[citation.document_id] = record.characters
        self.evidence.set_citations(citations, lengths)

    def _citation_link(self, key: str, number: int) -> None:
        citations = self.conversation.citations_for(key)
        if 0 <= number < len(citations):
            self._show_evidence(citations)
            self.open_citation(citations[number])

    def open_citation(self, citation: Citation) -> None:
        passage = self.store.passage(citation)
        if passage is None:
            self.show_error(f"“{citation.title}” is no longer in the library; the quote is kept in the answer")
            return
        self.viewer.open_passage(passage)
        self._show(self.viewer_dock)

    def _scope_changed(self) -> None:
        if self.conversation_id is not None and not self.answering:
            self.store.conversations.set_scope(self.conversation_id, self.conversation.current_scope().to_dict())

    def _update_buttons(self) -> None:
        has_question = False
        if self.conversation_id is not None:
            has_question = any(m.role == "user" for m in self.conversation.messages)
        self.conversation.set_state(answering=self.answering, can_ask=self.engine_ready, can_regenerate=has_question)
        self.export_action.setEnabled(self.conversation_id is not None)

    # -- export, settings, help --------------------------------------------------

    def export_conversation(self) -> None:
        if self.conversation_id is None:
            return
        from app.export import export, transcript_from

        title = self.store.conversations.get(self.conversation_id).title
        safe = "".join(c if c.isalnum() or c in " -_" else "_" for c in title).strip() or "conversation"
        path, chosen = QFileDialog.getSaveFileName(self, "Export conversation", f"{safe}.md", EXPORT_FILTERS)
        if not path:
            return
        if not Path(path).suffix:
            path += "." + chosen.split("*.")[-1].rstrip(")")
        try:
            transcript = transcript_from(
                self.store.conversations,
                self.conversation_id,
                model=self.engine_info.get("model"),
                settings=self.engine_info,
                corpus_hash=self._last_corpus_hash(),
            )
            export(transcript, Path(path))
        except Exception as error:  # noqa: BLE001 — a full disk or a read-only folder
            self.show_error(f"the export failed: {error}")
            return
        self.statusBar().showMessage(f"Exported to {path}", 8000)

    def _last_corpus_hash(self) -> str | None:
        for message in reversed(self.store.messages(self.conversation_id)) if self.conversation_id else []:
            if message.stats and message.stats.get("corpus_hash"):
                return message.stats["corpus_hash"]
        return None

    def open_settings(self) -> None:
        from app.gui.settings_dialog import SettingsDialog

        dialog = SettingsDialog(self.settings, self)
        if dialog.exec() != SettingsDialog.DialogCode.Accepted:
            return
        self.apply_settings(dialog.chosen())

    def apply_settings(self, chosen: AppSettings) -> None:
        service_changed = any(
            getattr(chosen, name) != getattr(self.settings, name)
            for name in ("model", "device", "cache_dir", "precision", "reader", "reader_api_key")
        )
        self.settings = chosen
        apply_ocr_languages(chosen)
        try:
            save_settings(chosen, self.settings_file)
        except OSError as error:
            self.show_error(f"the settings could not be saved: {error}")
        apply_theme(QApplication.instance(), chosen.theme)
        if service_changed:
            self.engine_ready = False
            self._update_buttons()
            self.configure_requested.emit(chosen)

    def show_shortcuts(self) -> None:
        rows = []
        for action in self.findChildren(QAction):
            if action.shortcut().toString():
                rows.append(f"<tr><td>{action.text().replace('&', '')}</td><td><b>{action.shortcut().toString(QKeySequence.SequenceFormat.NativeText)}</b></td></tr>")
        QMessageBox.information(self, "Keyboard shortcuts", "<table>" + "".join(rows) + "<tr><td>Ask (in the question box)</td><td><b>Enter</b></td></tr></table>")

    def show_about(self) -> None:
        QMessageBox.about(self, "About Quire", "<b>Quire</b><br>Read a whole library with a language model, on your own machine.")

    # -- errors ------------------------------------------------------------------

    @Slot(str)
    def show_error(self, message: str) -> None:
        self.last_error = message
        self.banner.setText(f"⚠ {message}")
        self.banner.show()
        self.statusBar().showMessage(f"Error: {message}", 15000)

    def hide_error(self) -> None:
        self.banner.hide()

    # -- shutdown ----------------------------------------------------------------

    def closeEvent(self, event) -> None:  # noqa: N802
        self._closing = True  # unfinished work stays noted for the next start
        self._save_layout()
        QApplication.instance().removeEventFilter(self._drop_catcher)
        self.service_worker.cancel()
        self.ingest_worker.cancel()
        for thread in (self.service_thread, self.ingest_thread):
            thread.quit()
            thread.wait(30000)
        # What the workers said before they stopped is still queued for the inbox;
        # none of it may reach the window once its library is closed.
        self._inbox.blockSignals(True)
        self.store.close()
        super().closeEvent(event)


def cache_size(size: int) -> str:
    """A byte count as the status bar shows it: MiB below a GiB, GiB above."""
    if size >= 2**30:
        return f"{size / 2**30:,.2f} GiB"
    return f"{size / 2**20:,.1f} MiB"


def run_app(argv: list[str], model_spec: str | None = None, paths: list[str] | None = None) -> int:
    app = QApplication.instance() or QApplication(argv)
    app.setApplicationName("Quire")
    app.setOrganizationName("Quire")
    settings = load_settings()
    apply_theme(app, settings.theme)
    app.styleHints().colorSchemeChanged.connect(lambda _: apply_theme(app, load_settings().theme))
    window = MainWindow(model_spec, settings=settings)
    window.show()
    if paths:
        window.add_paths(paths)
    return app.exec()


if __name__ == "__main__":
    sys.exit(run_app(sys.argv))
