"""How work reaches the main window from outside the GUI thread and the widgets:
the relay that lands worker signals in the GUI thread, and the filter that lets
files be dropped on any part of the window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtCore import QEvent, QObject, Signal

if TYPE_CHECKING:
    from app.gui.main import MainWindow


def local_files(mime) -> list[str]:
    if not mime.hasUrls():
        return []
    return [url.toLocalFile() for url in mime.urls() if url.isLocalFile()]


class DropCatcher(QObject):
    """Lets files be dropped on any part of the window, text boxes included."""

    def __init__(self, window: MainWindow) -> None:
        super().__init__(window)
        self.window = window

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802
        if event.type() in (QEvent.Type.DragEnter, QEvent.Type.DragMove, QEvent.Type.Drop):
            widget = watched if hasattr(watched, "window") else None
            if widget is None or widget.window() is not self.window:
                return False
            paths = local_files(event.mimeData())
            if not paths:
                return False
            if event.type() == QEvent.Type.Drop:
                self.window.add_paths(paths)
            event.acceptProposedAction()
            return True
        return False


class Inbox(QObject):
    """Where the workers' signals land in the GUI thread.

    Each worker signal is connected to the same-named signal here: a plain QObject
    made in the GUI thread, so Qt queues the call across threads. (Measured with
    PySide6 6.12: connecting worker signals straight to the main window's methods,
    even with QueuedConnection, ran them in the worker thread.)"""

    loading = Signal(str)
    installing = Signal(str, int, int)
    ready = Signal(object)
    cache_progress = Signal(object)
    cache_finished = Signal(str)
    cache_states = Signal(object)
    cache_bytes = Signal(object)  # an int over 2 GiB: Signal(int) is a C++ int and overflows
    token = Signal(str)
    evidence = Signal(list)
    answer_finished = Signal(object)
    failed = Signal(str, str)
    service_busy = Signal(str)
    ingest_progress = Signal(object)
    ingest_finished = Signal(object)
    ingest_removed = Signal(list, int)
    ingest_failed = Signal(str)
    ingest_busy = Signal(str)
    ingest_watched = Signal(object)
