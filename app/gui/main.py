"""A minimal Quire window until the desktop-app issue lands: ask the default model a
question and watch the answer stream in.

Engine work runs on one worker thread (the GUI thread never touches the engine);
tokens come back to the window as queued signals; Stop sets the cancel flag the
generation loop checks before every step.
"""

from __future__ import annotations

import html
import sys
import threading

from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QApplication,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QPlainTextEdit,
    QPushButton,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)


class EngineWorker(QObject):
    """Owns the model; lives on its own QThread; every slot runs there."""

    loaded = Signal(str)
    token = Signal(str)
    finished = Signal(str)
    failed = Signal(str)

    def __init__(self, model_spec: str | None) -> None:
        super().__init__()
        self.model_spec = model_spec
        self.model = None
        self.cancel = threading.Event()

    @Slot()
    def load(self) -> None:
        from engine.errors import QuireEngineError
        from engine.runtime import DEFAULT_MODEL, load_model

        try:
            self.model = load_model(self.model_spec or DEFAULT_MODEL)
        except QuireEngineError as error:
            self.failed.emit(str(error))
            return
        except Exception as error:  # the window must survive any engine failure
            self.failed.emit(f"the model could not be loaded: {error}")
            return
        self.loaded.emit(self.model.folder.name)

    @Slot(str)
    def ask(self, question: str) -> None:
        from engine.generate import GenerationStats, SamplingParams

        if self.model is None:
            self.failed.emit("no model is loaded")
            return
        self.cancel.clear()
        stats = GenerationStats()
        try:
            for piece in self.model.chat(
                [{"role": "user", "content": question}],
                SamplingParams(max_new_tokens=512),
                cancel=self.cancel.is_set,
                stats=stats,
            ):
                self.token.emit(piece.text)
        except Exception as error:
            self.failed.emit(f"generation failed: {error}")
            return
        self.finished.emit(
            f"{stats.generated_tokens} tokens, first after {stats.time_to_first_token:.2f} s, "
            f"{stats.decode_tokens_per_second:.1f} tok/s ({stats.finish_reason})"
        )


class MainWindow(QMainWindow):
    ask_requested = Signal(str)

    def __init__(self, model_spec: str | None = None) -> None:
        super().__init__()
        self.setWindowTitle("Quire")
        self.resize(900, 640)
        self.answer = QTextBrowser()
        self.answer.setPlaceholderText("Answers appear here.")
        self.question = QPlainTextEdit()
        self.question.setPlaceholderText("Ask a question… (Ctrl+Enter to send)")
        self.question.setMaximumHeight(110)
        self.send = QPushButton("Ask")
        self.stop = QPushButton("Stop")
        self.stop.setEnabled(False)
        self.send.setEnabled(False)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.stop)
        buttons.addWidget(self.send)
        layout = QVBoxLayout()
        title = QLabel("<b>Quire</b> — ask the model; the library and evidence panels arrive with the app issue.")
        title.setTextFormat(Qt.RichText)
        layout.addWidget(title)
        layout.addWidget(self.answer, 1)
        layout.addWidget(self.question)
        layout.addLayout(buttons)
        central = QWidget()
        central.setLayout(layout)
        self.setCentralWidget(central)
        self.statusBar().showMessage("Loading model…")

        self.thread = QThread(self)
        self.worker = EngineWorker(model_spec)
        self.worker.moveToThread(self.thread)
        self.thread.started.connect(self.worker.load)
        self.ask_requested.connect(self.worker.ask)
        self.worker.loaded.connect(self.on_loaded)
        self.worker.token.connect(self.on_token)
        self.worker.finished.connect(self.on_finished)
        self.worker.failed.connect(self.on_failed)
        self.send.clicked.connect(self.on_send)
        self.stop.clicked.connect(lambda: self.worker.cancel.set())
        QShortcut(QKeySequence("Ctrl+Return"), self, activated=self.on_send)
        QShortcut(QKeySequence("Escape"), self, activated=lambda: self.worker.cancel.set())
        self.thread.start()

    @Slot(str)
    def on_loaded(self, name: str) -> None:
        self.statusBar().showMessage(f"Model: {name}")
        self.send.setEnabled(True)

    @Slot()
    def on_send(self) -> None:
        question = self.question.toPlainText().strip()
        if not question or not self.send.isEnabled():
            return
        self.answer.append(f"<p><b>You:</b> {html.escape(question)}</p><p><b>Quire:</b> ")
        self.question.clear()
        self.send.setEnabled(False)
        self.stop.setEnabled(True)
        self.ask_requested.emit(question)

    @Slot(str)
    def on_token(self, text: str) -> None:
        self.answer.moveCursor(self.answer.textCursor().MoveOperation.End)
        self.answer.insertPlainText(text)

    @Slot(str)
    def on_finished(self, summary: str) -> None:
        self.send.setEnabled(True)
        self.stop.setEnabled(False)
        self.statusBar().showMessage(summary)

    @Slot(str)
    def on_failed(self, message: str) -> None:
        self.send.setEnabled(self.worker.model is not None)
        self.stop.setEnabled(False)
        self.statusBar().showMessage(f"Error: {message}")

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        self.worker.cancel.set()
        self.thread.quit()
        self.thread.wait(5000)
        super().closeEvent(event)


def run_app(argv: list[str], model_spec: str | None = None) -> int:
    app = QApplication.instance() or QApplication(argv)
    app.setApplicationName("Quire")
    window = MainWindow(model_spec)
    window.show()
    return app.exec()


if __name__ == "__main__":
    sys.exit(run_app(sys.argv))
