"""The library side of the main window: adding documents (and resuming what a quit
or a crash left unfinished), their progress and outcome, watched folders, locked
documents, extraction reports, removing, collections and scopes.

A mixin of `MainWindow` (app/gui/main.py), kept apart by concern: its methods run
on the window and use its panels (`self.library`, `self.search`, `self.conversation`),
its store and its signals to the ingest worker.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from PySide6.QtCore import Qt, QTimer, Slot
from PySide6.QtWidgets import QFileDialog, QInputDialog, QLineEdit, QMessageBox

from app.gui.store import Scope
from ingest.jobs import IngestProgress, IngestSummary

log = logging.getLogger(__name__)

WATCH_SETTLE_MS = 2000
WATCH_RESCAN_MS = 5 * 60 * 1000
# Beside library.db: {"ingest": [paths being added], "cache": a build asked for and not finished}
UNFINISHED_FILE = "unfinished-work.json"


class LibraryActions:
    def refresh_library(self) -> None:
        records = self.store.documents()
        self.library.set_documents(records)
        self.library.model.set_cache_states(self.cache_states)
        self.library.set_collections(self.store.collections())
        ready = [r for r in records if r.status == "ready"]
        tokens = sum(r.tokens or 0 for r in ready)
        self.corpus_label.setText(f"Corpus: {len(ready)} document(s), {tokens:,} tokens")
        self.conversation.set_library_size(len(ready))
        self.refresh_scopes()
        self.search.library_changed()

    def refresh_scopes(self, current: Scope | None = None) -> None:
        """Rebuild the scope choices, keeping `current` (else the one shown) selected."""
        scopes = [Scope()]
        for collection in self.store.collections():
            scopes.append(Scope("collection", collection.id, (), f"Collection: {collection.name}"))
        selected = tuple(self.library.selected_ids())
        if selected:
            scopes.append(Scope("documents", None, selected, f"Selected documents ({len(selected)})"))
        self.conversation.set_scopes(scopes, current)

    def choose_files(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(
            self, "Add to the library", "", "Documents (*.pdf *.epub *.txt *.md *.markdown *.html *.htm *.docx);;All files (*)"
        )
        if paths:
            self.add_paths(paths)

    def choose_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Add a folder to the library")
        if path:
            self.add_paths([path])

    def add_paths(self, paths: list[str]) -> None:
        self.library.show_notice(f"Adding {len(paths)} item(s)…")
        self._show(self.library_dock, self.left_tabs, 0)
        self._ingest_jobs.append(list(paths))
        self._save_unfinished_ingest()
        self.ingest_requested.emit(list(paths))

    # Unfinished work is noted in a file beside the library (it belongs to that
    # library, not to the user's Qt settings, which every library shares).

    @property
    def _unfinished_file(self) -> Path:
        return self.library_path.with_name(UNFINISHED_FILE)

    def _unfinished(self) -> dict:
        try:
            noted = json.loads(self._unfinished_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return noted if isinstance(noted, dict) else {}

    def _note_unfinished(self, **changes: object) -> None:
        from engine.paths import write_atomic

        noted = {**self._unfinished(), **changes}
        text = json.dumps(noted)
        try:
            write_atomic(self._unfinished_file, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        except OSError as error:  # losing the note costs a re-add after a crash, nothing more
            log.warning("could not note unfinished work in %s: %s", self._unfinished_file, error)

    def _save_unfinished_ingest(self) -> None:
        self._note_unfinished(ingest=list(dict.fromkeys(path for job in self._ingest_jobs for path in job)))

    def _resume_ingest(self) -> None:
        """Re-add what was being added when the app last closed or crashed, and the
        documents left half-read in the library: files done already come back as
        unchanged at once, so only the unfinished ones are read."""
        paths = [p for p in self._unfinished().get("ingest", []) if isinstance(p, str)]
        paths += [r.path for r in self.store.documents() if r.status in ("pending", "ingesting")]
        paths = [p for p in dict.fromkeys(paths) if Path(p).exists()]
        if paths:
            self.add_paths(paths)
            self.library.show_notice(f"Resuming: adding {len(paths)} item(s) left unfinished…")

    @Slot(object)
    def _ingest_progress(self, progress: IngestProgress) -> None:
        path = str(Path(progress.file).resolve())
        if self.library.model.row_of_path(path) is None:
            self.refresh_library()  # the file got its row when reading began
        self.library.model.set_reading(path, None if progress.file_done else progress.file_fraction)
        self._show_progress(progress.fraction, progress.message)

    @Slot(object)
    def _ingest_finished(self, summary: IngestSummary) -> None:
        if self._ingest_jobs and not self._closing:
            self._ingest_jobs.pop(0)
            self._save_unfinished_ingest()
        self.library.model.clear_reading()
        self.refresh_library()
        notes = [summary.describe()]
        if summary.duplicates:
            names = ", ".join(Path(o.path).name for o in summary.duplicates[:3])
            notes.append(f"Already in the library, not added again: {names}{'…' if len(summary.duplicates) > 3 else ''}")
        if summary.failed:
            notes.append("Could not be read: " + "; ".join(f"{Path(o.path).name} ({o.message})" for o in summary.failed[:3]))
        notes.extend(self._text_notices(summary))
        self.library.show_notice("\n".join(notes))
        self.statusBar().showMessage(summary.describe(), 8000)
        self._cache_new(summary.added + summary.updated)

    def _cache_new(self, outcomes: list) -> None:
        """With "build the cache as documents come in", cache those just added."""
        new_ids = [o.document_id for o in outcomes if o.document_id is not None]
        if new_ids and self.settings.auto_cache and self.engine_ready:
            self.request_cache(new_ids)

    def _text_notices(self, summary: IngestSummary) -> list[str]:
        """A line per document just added whose text is incomplete, and how to
        enable OCR where that is why."""
        from ingest.ocr import HOW_TO_ENABLE, engine_names

        lines, need_ocr = [], False
        for outcome in summary.added + summary.updated:
            record = self.store.document(outcome.document_id) if outcome.document_id is not None else None
            notice = record.report.notice() if record is not None and record.report_json else ""
            if notice:
                lines.append(f"{record.display_title}: {notice}")
                need_ocr = need_ocr or bool(record.report.needs_ocr)
        if need_ocr and not engine_names():
            lines.append(f"No OCR engine is installed. To read pages that are pictures, {HOW_TO_ENABLE}.")
        return lines

    # -- watched folders (ingest/watch.py) -------------------------------------------

    def _start_watching(self) -> None:
        """A pass when a watched folder changes (after WATCH_SETTLE_MS, so a file
        being copied is read once, whole) and every WATCH_RESCAN_MS (the file-system
        watcher does not see into subfolders, nor files that change in place on
        every platform)."""
        from PySide6.QtCore import QFileSystemWatcher

        self._folder_watcher = QFileSystemWatcher(self)
        self._watch_settle = QTimer(self, singleShot=True, interval=WATCH_SETTLE_MS)
        self._watch_settle.timeout.connect(self.watch_scan_requested.emit)
        self._folder_watcher.directoryChanged.connect(lambda _path: self._watch_settle.start())
        self._watch_timer = QTimer(self, interval=WATCH_RESCAN_MS)
        self._watch_timer.timeout.connect(self.watch_scan_requested.emit)
        self._watch_timer.start()
        self._follow_watched()
        self.watch_scan_requested.emit()  # what changed while the app was closed

    def _follow_watched(self) -> None:
        folders = [str(f) for f in self.store.library.watched() if f.is_dir()]
        current = self._folder_watcher.directories()
        if current:
            self._folder_watcher.removePaths(current)
        if folders:
            self._folder_watcher.addPaths(folders)

    def choose_watched_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Watch a folder")
        if folder:
            self.watch_folder(folder)

    def watch_folder(self, folder: str) -> None:
        try:
            path = self.store.library.watch(folder)
        except Exception as error:  # noqa: BLE001 — e.g. not a folder
            self.show_error(str(error))
            return
        self._follow_watched()
        self.library.show_notice(f"Watching {path}: its files come in now, and new or changed ones as they appear.")
        self.watch_scan_requested.emit()

    def stop_watching_folder(self) -> None:
        folders = [str(f) for f in self.store.library.watched()]
        if not folders:
            self.library.show_notice("No folder is watched. Library › Watch Folder… adds one.")
            return
        folder, ok = QInputDialog.getItem(self, "Stop watching", "Folder (its documents stay in the library):",
                                          folders, 0, False)
        if ok and folder:
            self.store.library.unwatch(folder)
            self._follow_watched()
            self.library.show_notice(f"Stopped watching {folder}; its documents stay in the library.")

    @Slot(object)
    def _watched(self, summary) -> None:  # noqa: ANN001 - ingest.watch.WatchSummary
        self.library.model.clear_reading()
        self.refresh_library()
        if summary.to_read or summary.missing or summary.returned or summary.unreachable:
            self.library.show_notice(f"Watched folders: {summary.describe()}")
        self._follow_watched()
        self._cache_new(summary.ingest.added + summary.ingest.updated if summary.ingest is not None else [])

    def show_report(self, document_id: int) -> None:
        """How a document's pages were read (pypdf, PDFium, OCR and its confidence)
        and what is missing: the same lines as `quire show`."""
        from app.extraction import report_lines

        record = self.store.document(document_id)
        if record is None:
            return
        box = QMessageBox(QMessageBox.Icon.Information, "Extraction Report", record.display_title, parent=self)
        box.setInformativeText("\n".join(report_lines(record)))
        box.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self._report_box = box  # kept for tests and for the box to stay open
        box.open()

    def _enter_selected_password(self) -> None:
        locked = [i for i in self.library.selected_ids() if (r := self.store.document(i)) is not None and r.locked]
        if not locked:
            self.library.show_notice("Select a document marked “locked” to enter its password.")
            return
        self.enter_password(locked[0])

    def enter_password(self, document_id: int) -> None:
        """Ask for a locked document's password and read it again with it. The
        password goes to that one read and is kept nowhere."""
        record = self.store.document(document_id)
        if record is None or not record.locked:
            return
        password, ok = QInputDialog.getText(
            self, "Enter Password", f"Password for {Path(record.path).name}:", QLineEdit.EchoMode.Password
        )
        if ok and password:
            self.library.show_notice(f"Opening {Path(record.path).name}…")
            self.ingest_locked_requested.emit([record.path], password)

    def remove_documents(self, ids: list[int]) -> None:
        if not ids:
            return
        titles = [self.store.document(i) for i in ids]
        names = ", ".join(r.display_title for r in titles[:3] if r is not None)
        answer = QMessageBox.question(
            self, "Remove from library", f"Remove {len(ids)} document(s) ({names}) and free their cache?\nThe files on disk are not touched."
        )
        if answer == QMessageBox.StandardButton.Yes:
            self.remove_requested.emit(ids, str(self.settings.cache_root()))

    @Slot(list, int)
    def _removed(self, ids: list[int], freed: int) -> None:
        self.refresh_library()
        self.library.show_notice(f"Removed {len(ids)} document(s); {freed / 2**20:.1f} MiB of cache freed.")
        self.states_requested.emit()

    def new_collection(self, ids: list[int]) -> None:
        name, ok = QInputDialog.getText(self, "New collection", "Name:")
        if ok and name.strip():
            try:
                collection_id = self.store.create_collection(name.strip())
                if ids:
                    self.store.add_to_collection(collection_id, ids)
            except Exception as error:  # noqa: BLE001 — e.g. the name exists
                self.show_error(f"the collection could not be created: {error}")
            self.refresh_library()

    def _add_to_collection(self, collection_id: int, ids: list[int]) -> None:
        self.store.add_to_collection(collection_id, ids)
        self.refresh_library()

    def ask_about(self, ids: list[int]) -> None:
        self.refresh_scopes()
        index = self.conversation.scope.findText(f"Selected documents ({len(ids)})")
        if index >= 0:
            self.conversation.scope.setCurrentIndex(index)
        self.conversation.question.setFocus()
