"""The conversation panel: the answers so far (rendered from Markdown, each with its
numbered sources), the answer streaming in, the question box with Ask, Stop and
Regenerate, and the scope the question is asked over.

Tokens arrive one signal each; the view re-renders at most every 50 ms so a fast
model never floods the event loop, and it stays pinned to the bottom only when the
reader has not scrolled up.
"""

from __future__ import annotations

import html

from markdown_it import MarkdownIt
from PySide6.QtCore import QEvent, Qt, QTimer, QUrl, Signal, Slot
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from app.gui.store import Scope
from ingest.conversations import Citation, Message

_markdown = MarkdownIt("commonmark", {"html": False}).enable("table")


def render_markdown(text: str) -> str:
    """An answer's Markdown as HTML; raw HTML in model output is shown, never run."""
    return _markdown.render(text)


def citation_links(message_key: str, citations: list[Citation]) -> str:
    if not citations:
        return ""
    links = []
    for number, citation in enumerate(citations, 1):
        page = f", p. {html.escape(citation.page_label)}" if citation.page_label else ""
        title = citation.title if len(citation.title) <= 32 else citation.title[:30] + "…"
        links.append(
            f'<a href="cite:{message_key}:{number - 1}">[{number}] {html.escape(title)}{page}</a>'
            f' <span style="color:gray">{citation.weight:.0%}</span>'
        )
    return '<p style="margin-top:4px"><small>Sources: ' + " · ".join(links) + "</small></p>"


class QuestionBox(QPlainTextEdit):
    submitted = Signal()

    def keyPressEvent(self, event) -> None:  # noqa: N802
        # Enter asks, Shift+Enter breaks the line (as in chat apps); Ctrl+Enter also asks.
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and not event.modifiers() & Qt.KeyboardModifier.ShiftModifier:
            self.submitted.emit()
            return
        super().keyPressEvent(event)


class ConversationPanel(QWidget):
    ask_clicked = Signal(str)
    stop_clicked = Signal()
    regenerate_clicked = Signal()
    citation_clicked = Signal(str, int)  # message key ("<id>" or "live"), citation number
    scope_changed = Signal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.messages: list[Message] = []
        self.live = False  # an answer is streaming in below the saved messages
        self.live_answer: str = ""
        self.live_citations: list[Citation] = []
        self.title = QLabel("New conversation")
        self.title.setObjectName("conversationTitle")
        self.view = QTextBrowser()
        self.view.setOpenLinks(False)
        self.view.anchorClicked.connect(self._on_anchor)
        self.set_library_size(0)
        self.question = QuestionBox()
        self.question.setPlaceholderText("Ask about your library…  (Enter to ask, Shift+Enter for a new line)")
        self.question.setMaximumHeight(96)
        self.question.submitted.connect(self._on_submit)
        self.scope = QComboBox()
        self.scope.setToolTip("What the question is asked over")
        self.scope.setMinimumContentsLength(18)
        self.scope.currentIndexChanged.connect(lambda _: self.scope_changed.emit())
        self.ask = QPushButton("Ask")
        self.ask.setDefault(True)
        self.stop = QPushButton("Stop")
        self.regenerate = QPushButton("Regenerate")
        self.ask.clicked.connect(self._on_submit)
        self.stop.clicked.connect(self.stop_clicked)
        self.regenerate.clicked.connect(self.regenerate_clicked)
        controls = QHBoxLayout()
        controls.addWidget(QLabel("Scope:"))
        controls.addWidget(self.scope, 1)
        controls.addStretch(1)
        controls.addWidget(self.regenerate)
        controls.addWidget(self.stop)
        controls.addWidget(self.ask)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 6, 6, 6)
        layout.addWidget(self.title)
        layout.addWidget(self.view, 1)
        layout.addWidget(self.question)
        layout.addLayout(controls)
        self._render_timer = QTimer(self, singleShot=True, interval=50)
        self._render_timer.timeout.connect(self.render)
        self.set_state(answering=False, can_ask=False, can_regenerate=False)

    def set_library_size(self, ready: int) -> None:
        """What the empty conversation tells a person to do next: add documents while
        there are none ready, then ask about them."""
        if ready:
            hint = f"Ask a question about the {'document' if ready == 1 else f'{ready:,} documents'} in your library."
        else:
            hint = "Drop books and PDFs on this window, then ask a question about them."
        self.view.setPlaceholderText(hint)

    # -- scope -------------------------------------------------------------------

    def set_scopes(self, scopes: list[Scope], current: Scope | None = None) -> None:
        selected = current or self.current_scope()
        self.scope.blockSignals(True)
        self.scope.clear()
        for scope in scopes:
            self.scope.addItem(scope.label, scope)
        match = next((i for i, s in enumerate(scopes) if s.kind == selected.kind and s.collection_id == selected.collection_id), 0)
        self.scope.setCurrentIndex(match)
        self.scope.blockSignals(False)

    def current_scope(self) -> Scope:
        scope = self.scope.currentData()
        return scope if isinstance(scope, Scope) else Scope()

    # -- state -------------------------------------------------------------------

    def set_state(self, *, answering: bool, can_ask: bool, can_regenerate: bool) -> None:
        self.ask.setEnabled(can_ask and not answering)
        self.stop.setEnabled(answering)
        self.regenerate.setEnabled(can_regenerate and can_ask and not answering)

    def _on_submit(self) -> None:
        question = self.question.toPlainText().strip()
        if question and self.ask.isEnabled():
            self.ask_clicked.emit(question)

    def _on_anchor(self, url: QUrl) -> None:
        text = url.toString()
        if text.startswith("cite:"):
            _, key, number = text.split(":")
            self.citation_clicked.emit(key, int(number))

    def changeEvent(self, event) -> None:  # noqa: N802
        # A theme switch re-renders the answers with the new link colour.
        if event.type() == QEvent.Type.PaletteChange:
            self.render()
        super().changeEvent(event)

    # -- content -----------------------------------------------------------------

    def show_conversation(self, title: str, messages: list[Message]) -> None:
        self.title.setText(title)
        self.messages = messages
        self.live = False
        self.live_answer = ""
        self.live_citations = []
        self.render(scroll_to_end=True)

    def begin_answer(self) -> None:
        self.live = True
        self.live_answer = ""
        self.live_citations = []
        self.render(scroll_to_end=True)

    @Slot(str)
    def append_token(self, text: str) -> None:
        self.live_answer += text
        if not self._render_timer.isActive():
            self._render_timer.start()

    def set_live_citations(self, citations: list[Citation]) -> None:
        self.live_citations = citations
        self.render()

    def citations_for(self, key: str) -> list[Citation]:
        if key == "live":
            return self.live_citations
        for message in self.messages:
            if str(message.id) == key:
                return message.citations
        return []

    def render(self, scroll_to_end: bool = False) -> None:
        bar = self.view.verticalScrollBar()
        at_end = scroll_to_end or bar.value() >= bar.maximum() - 4
        keep = bar.value()
        parts = []
        for message in self.messages:
            if message.role == "user":
                parts.append(f'<p style="margin-top:14px"><b>You</b><br>{html.escape(message.content)}</p>')
            else:
                parts.append(self._answer_html(message.content, str(message.id), message.citations, message.stats))
        if self.live:
            parts.append(self._answer_html(self.live_answer + " ▍", "live", self.live_citations, None))
        # Links follow the palette (the HTML default blue is unreadable on dark).
        link = self.palette().color(QPalette.ColorRole.Link).name()
        self.view.document().setDefaultStyleSheet(f"a {{ color: {link}; text-decoration: none; }}")
        self.view.setHtml("".join(parts))
        bar.setValue(bar.maximum() if at_end else keep)

    @staticmethod
    def _answer_html(text: str, key: str, citations: list[Citation], stats: dict | None) -> str:
        note = ""
        if stats:
            if stats.get("cancelled"):
                note = " <small style='color:gray'>(stopped)</small>"
            elif stats.get("error"):
                note = f" <small style='color:#c62828'>(failed: {html.escape(str(stats['error']))})</small>"
            if stats.get("not_in_yet"):
                names = ", ".join(stats["not_in_yet"][:3]) + (" …" if len(stats["not_in_yet"]) > 3 else "")
                note += (f" <small style='color:#b26a00'>(not in yet, still being read: {html.escape(names)};"
                         " ask again when they are ready)</small>")
        return f"<p style='margin-top:8px'><b>Quire</b>{note}</p>{render_markdown(text)}{citation_links(key, citations)}"
