"""The desktop app with a scripted service (tests/gui/fakes.py): item models checked
by qtmodeltester, drag and drop into the library with duplicates reported, asking
with streamed tokens, evidence and the source viewer, Stop, Regenerate, service
failures that leave the window alive, conversations persisted across windows,
export read back, settings, and the window layout remembered."""

from __future__ import annotations

import json
import os
from dataclasses import replace

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from PySide6.QtCore import QMimeData, QPoint, QPointF, QSettings, Qt, QUrl  # noqa: E402
from PySide6.QtGui import QAction, QDragEnterEvent, QDropEvent  # noqa: E402
from PySide6.QtWidgets import QApplication, QFileDialog, QMessageBox  # noqa: E402

from app.gui.main import MainWindow  # noqa: E402
from app.gui.models import ConversationListModel, EvidenceModel, LibraryModel  # noqa: E402
from app.settings import AppSettings, load_settings  # noqa: E402
from ingest.conversations import Citation, Conversations  # noqa: E402
from ingest.library import Library  # noqa: E402
from tests.gui.fakes import ScriptedService  # noqa: E402

SHIPS = (
    "Chapter One. The harbour of Valdmere kept a ledger of every ship that came in. "
    "The brig Osprey arrived on the ninth of March carrying forty barrels of tar. "
)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QUIRE_HOME", str(tmp_path / "home"))
    return tmp_path


def make_window(qtbot, home: Path, service: ScriptedService | None = None, **settings) -> MainWindow:
    service = service or ScriptedService()
    settings.setdefault("auto_cache", True)  # these tests drive the cache flows
    window = MainWindow(
        settings=AppSettings(**settings),
        settings_file=home / "settings.json",
        library_path=home / "library.db",
        service_factory=lambda _settings: service,
        qsettings=QSettings(str(home / "layout.ini"), QSettings.Format.IniFormat),
    )
    window.service = service
    qtbot.addWidget(window)
    window.show()
    qtbot.waitUntil(lambda: window.engine_ready, timeout=10000)
    return window


def close(window: MainWindow) -> None:
    window.close()


def drop_files(window: MainWindow, widget, paths: list[Path]) -> None:
    """What a person's drag does: enter (Qt delivers a drop only after it), then drop."""
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    buttons, modifiers = Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
    enter = QDragEnterEvent(QPoint(10, 10), Qt.DropAction.CopyAction, mime, buttons, modifiers)
    QApplication.sendEvent(widget, enter)
    assert enter.isAccepted()
    drop = QDropEvent(QPointF(10, 10), Qt.DropAction.CopyAction, mime, buttons, modifiers)
    QApplication.sendEvent(widget, drop)
    assert drop.isAccepted()


def write_book(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def ready_titles(window: MainWindow) -> list[str]:
    return [row.record.display_title for row in window.library.model.rows if row.record.status == "ready"]


# -- item models -------------------------------------------------------------------


def test_item_models_pass_the_model_tester(qtmodeltester, home):
    library = Library(home / "library.db")
    for name in ("a.txt", "b.txt"):
        path = write_book(home, name, SHIPS + name)
        document_id = library.begin_document(path=path, content_hash=name, format="txt", file_size=1, file_mtime=0.0)
        if name == "b.txt":
            library.mark_failed(document_id, "could not be read")
    model = LibraryModel()
    model.set_documents(library.documents())
    model.set_reading(library.documents()[0].path, 0.5)
    qtmodeltester.check(model)
    assert model.index(0, LibraryModel.STATUS).data() == "reading 50%"
    assert model.index(1, LibraryModel.STATUS).data().startswith("failed: could not be read")

    conversations = Conversations(library)
    conversations.create("First")
    conversations.create("Second")
    conversation_model = ConversationListModel()
    conversation_model.set_conversations(conversations.list())
    qtmodeltester.check(conversation_model)
    assert {conversation_model.index(r, 0).data() for r in range(2)} == {"First", "Second"}

    evidence = EvidenceModel()
    evidence.set_citations([
        Citation(1, "Book", 0, "3", 0, 10, 0.2, "light"),
        Citation(1, "Book", 1, "4", 20, 30, 0.7, "heavy"),
    ])
    qtmodeltester.check(evidence)
    assert evidence.index(0, 0).data() == "70%"  # heaviest first
    assert evidence.index(0, 2).data() == "4"
    library.close()


# -- library -----------------------------------------------------------------------


def test_documents_are_not_cached_unless_asked_by_default(qtbot, home):
    window = make_window(qtbot, home, auto_cache=AppSettings().auto_cache)
    drop_files(window, window.library.table.viewport(), [write_book(home, "ledger.txt", SHIPS)])
    qtbot.waitUntil(lambda: len(ready_titles(window)) == 1, timeout=15000)
    qtbot.wait(500)  # time for a build the window should not start (the scripted one takes ~0 s)
    assert not any(row.cached for row in window.library.model.rows)


def test_a_cache_over_2_gib_shows_its_size(qtbot, home):
    # Signal(int) is a C++ int: 3 GiB came out as a negative size, with an
    # OverflowError on the terminal.
    service = ScriptedService()
    service.bytes_per_document = 3 * 2**30 + 2**29
    service.cached.add("any")
    window = make_window(qtbot, home, service)
    qtbot.waitUntil(lambda: "GiB" in window.cache_label.text(), timeout=5000)
    assert window.cache_label.text() == "Cache: 3.50 GiB"
    close(window)


def test_dropping_files_anywhere_adds_them_and_reports_duplicates(qtbot, home):
    window = make_window(qtbot, home)
    first = write_book(home, "ledger.txt", SHIPS)
    second = write_book(home, "second.md", "# Second\n\nA different book about lighthouses.")
    # Dropped on the question box, a text field that would otherwise take the text.
    assert window.conversation.view.placeholderText().startswith("Drop books and PDFs")
    drop_files(window, window.conversation.question.viewport(), [first, second])
    qtbot.waitUntil(lambda: len(ready_titles(window)) == 2, timeout=15000)
    # The empty conversation now asks for a question about what is in.
    assert window.conversation.view.placeholderText().startswith("Ask a question about the 2 documents")
    assert window.conversation.question.toPlainText() == ""
    # Auto-cache: the service worker cached both once the files were read.
    qtbot.waitUntil(lambda: all(row.cached for row in window.library.model.rows), timeout=10000)
    assert window.library.model.index(0, LibraryModel.CACHE).data() == "cached"

    copy = write_book(home, "copy-of-ledger.txt", SHIPS)
    drop_files(window, window.library.table.viewport(), [copy])
    qtbot.waitUntil(lambda: "Already in the library" in window.library.notice.text(), timeout=15000)
    assert "copy-of-ledger.txt" in window.library.notice.text()
    assert len(window.library.model.rows) == 2
    close(window)


def test_a_file_that_cannot_be_read_shows_its_reason(qtbot, home):
    window = make_window(qtbot, home)
    broken = home / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4 this is not really a pdf")
    window.add_paths([str(broken)])
    qtbot.waitUntil(lambda: "Could not be read" in window.library.notice.text(), timeout=15000)
    row = window.library.model.rows[0]
    assert row.record.status == "failed"
    status = window.library.model.index(0, LibraryModel.STATUS).data()
    assert status.startswith("failed: ") and len(status) > len("failed: ")
    close(window)


def test_pages_needing_ocr_are_shown_with_how_to_enable_it(qtbot, home, monkeypatch):
    import ingest.ocr
    import ingest.readers.pdf
    from tests.ingest.builders import write_pdf

    monkeypatch.setattr(ingest.readers.pdf, "_AUTO_ENGINE", [None])  # as on a machine without Tesseract
    monkeypatch.setattr(ingest.ocr, "engine_names", lambda: [])
    scan = write_pdf(home / "scan.pdf", [["Typed words."], [], []], header=None, footer_numbers=False, scanned=[1, 2],
                     title="Harbour scans")
    window = make_window(qtbot, home)
    window.add_paths([str(scan)])
    qtbot.waitUntil(lambda: "need OCR" in window.library.notice.text(), timeout=15000)
    assert "Harbour scans: 2 pages need OCR" in window.library.notice.text()
    assert "No OCR engine is installed" in window.library.notice.text()
    assert "tesseract" in window.library.notice.text()
    status = window.library.model.index(0, LibraryModel.STATUS)
    assert status.data() == "2 pages need OCR"
    assert "no OCR engine is installed" in status.data(Qt.ItemDataRole.ToolTipRole)
    window.show_report(window.library.model.rows[0].record.id)
    report = window._report_box.informativeText()
    assert "pages needing OCR: 2, 3 (no OCR engine installed" in report and "read by pypdf:    3 pages" in report
    window._report_box.close()
    close(window)


def test_a_locked_pdf_opens_with_its_password_which_is_kept_nowhere(qtbot, home, monkeypatch):
    from PySide6.QtWidgets import QInputDialog

    from tests.ingest.builders import encrypt_pdf, write_pdf

    plain = write_pdf(home / "plain.pdf", [["The ledger of the brig Osprey."]], title="Ledger")
    locked = encrypt_pdf(plain, home / "locked.pdf", "harbour-7")
    window = make_window(qtbot, home)
    window.add_paths([str(locked)])
    status = lambda: window.library.model.index(0, LibraryModel.STATUS).data()  # noqa: E731
    qtbot.waitUntil(lambda: bool(window.library.model.rows) and status() == "locked", timeout=15000)
    document_id = window.library.model.rows[0].record.id
    assert "Enter Password" in window.library.model.index(0, LibraryModel.STATUS).data(Qt.ItemDataRole.ToolTipRole)

    typed = iter([("wrong-guess", True), ("harbour-7", True)])
    monkeypatch.setattr(QInputDialog, "getText", lambda *args, **kwargs: next(typed))
    window.enter_password(document_id)
    qtbot.waitUntil(lambda: status() == "wrong password", timeout=15000)
    assert "wrong password" in window.library.notice.text()
    window.enter_password(document_id)
    qtbot.waitUntil(lambda: status() == "ready", timeout=15000)
    record = window.store.document(document_id)
    assert record.pages == 1 and record.error is None
    close(window)
    stored = b"".join(path.read_bytes() for path in home.rglob("*") if path.is_file() and path.suffix != ".pdf")
    assert b"harbour-7" not in stored and b"wrong-guess" not in stored


def test_a_watched_folder_brings_files_in_and_marks_gone_ones_missing(qtbot, home):
    folder = home / "watched"
    folder.mkdir()
    first = write_book(folder, "ledger.txt", SHIPS)
    window = make_window(qtbot, home)
    window.watch_folder(str(folder))
    qtbot.waitUntil(lambda: ready_titles(window) == ["ledger.txt"], timeout=15000)
    assert str(folder.resolve()) in window._folder_watcher.directories()
    write_book(folder, "tides.txt", "Tide tables of Valdmere for the year.")
    qtbot.waitUntil(lambda: len(ready_titles(window)) == 2, timeout=15000)  # seen by the watcher, no rescan asked
    first.unlink()
    window.watch_scan_requested.emit()
    status = lambda: window.library.model.index(window.library.model.row_of_path(str(first.resolve())), LibraryModel.STATUS).data()  # noqa: E731
    qtbot.waitUntil(lambda: status() == "file missing", timeout=15000)
    assert "Watched folders:" in window.library.notice.text() and "1 missing: ledger.txt" in window.library.notice.text()
    close(window)


# -- asking ------------------------------------------------------------------------


def add_and_wait(qtbot, window: MainWindow, paths: list[Path]) -> None:
    window.add_paths([str(p) for p in paths])
    qtbot.waitUntil(lambda: len(ready_titles(window)) == len(paths), timeout=15000)


def ask_and_wait(qtbot, window: MainWindow, question: str) -> None:
    with qtbot.waitSignal(window._inbox.answer_finished, timeout=15000):
        window.conversation.question.setPlainText(question)
        qtbot.keyClick(window.conversation.question, Qt.Key.Key_Return)


def test_ask_streams_saves_and_opens_evidence(qtbot, home):
    window = make_window(qtbot, home)
    add_and_wait(qtbot, window, [write_book(home, "ledger.txt", SHIPS)])
    ask_and_wait(qtbot, window, "Which ship carried tar?")
    view = window.conversation.view.toPlainText()
    assert "Which ship carried tar?" in view
    assert "The answer is 42." in view  # the Markdown bold is rendered, not shown as asterisks
    assert "**" not in view
    assert "[1] ledger" in view
    # Saved: one conversation titled by the question, with the answer and its citation.
    conversations = window.store.conversation_list()
    assert [c.title for c in conversations] == ["Which ship carried tar?"]
    messages = window.store.messages(conversations[0].id)
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[1].citations[0].quote == SHIPS[:60]
    assert messages[1].stats["corpus_hash"]
    # Evidence panel and the viewer at the passage.
    assert window.evidence.model.rowCount() == 1
    assert window.evidence.strip.books and window.evidence.strip.books[0].marks[0][:2] == (0, 60)
    # By keyboard: View › Show Evidence puts the focus on the first passage; Enter opens it.
    next(a for a in window.findChildren(QAction) if a.text() == "Show &Evidence").trigger()
    assert window.evidence.table.hasFocus() and window.evidence.table.currentIndex().row() == 0
    qtbot.keyClick(window.evidence.table, Qt.Key.Key_Return)
    assert window.viewer.mode() == "text"
    assert window.viewer.highlighted_text() == SHIPS[:60]
    next(a for a in window.findChildren(QAction) if a.text() == "Show &Source").trigger()
    assert window.viewer.text_view.hasFocus()
    assert "first token 0.25 s" in window.speed_label.text()
    close(window)


def test_stop_keeps_the_partial_answer_and_regenerate_replaces_it(qtbot, home):
    service = ScriptedService(pieces=[f"word{i} " for i in range(200)], delay=0.02)
    window = make_window(qtbot, home, service)
    add_and_wait(qtbot, window, [write_book(home, "ledger.txt", SHIPS)])
    with qtbot.waitSignal(window._inbox.answer_finished, timeout=15000) as finished:
        window.ask("Tell me everything.")
        qtbot.waitUntil(lambda: "word3" in window.conversation.live_answer, timeout=10000)
        assert window.conversation.stop.isEnabled() and not window.conversation.ask.isEnabled()
        qtbot.keyClick(window, Qt.Key.Key_Escape)
    assert finished.args[0]["cancelled"] is True
    messages = window.store.messages(window.conversation_id)
    assert messages[-1].role == "assistant"
    assert "word3" in messages[-1].content and "word199" not in messages[-1].content
    assert "(stopped)" in window.conversation.view.toPlainText()

    service.pieces, service.delay = ["A fresh answer."], 0.0
    with qtbot.waitSignal(window._inbox.answer_finished, timeout=15000):
        window.conversation.regenerate.click()
    messages = window.store.messages(window.conversation_id)
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[-1].content == "A fresh answer."
    assert service.asked[-1][0] == "Tell me everything."
    close(window)


def test_follow_ups_carry_the_conversation_also_after_regenerate_and_reopen(qtbot, home):
    service = ScriptedService(pieces=["Irene ", "Adler."])
    window = make_window(qtbot, home, service)
    add_and_wait(qtbot, window, [write_book(home, "ledger.txt", SHIPS)])
    ask_and_wait(qtbot, window, "Who outwitted Holmes?")
    service.pieces = ["She ", "left."]
    ask_and_wait(qtbot, window, "What did she do next?")
    assert service.histories == [[], [("Who outwitted Holmes?", "Irene Adler.")]]
    # Regenerate asks the last question again with the same turns before it.
    service.pieces = ["She ", "married."]
    with qtbot.waitSignal(window._inbox.answer_finished, timeout=15000):
        window.regenerate()
    assert service.asked[-1][0] == "What did she do next?"
    assert service.histories[-1] == [("Who outwitted Holmes?", "Irene Adler.")]
    conversation = window.conversation_id
    close(window)
    # Reopened after a restart, the next question sees every earlier turn.
    window = make_window(qtbot, home, service)
    window.open_conversation(conversation)
    ask_and_wait(qtbot, window, "And then?")
    assert service.histories[-1] == [("Who outwitted Holmes?", "Irene Adler."), ("What did she do next?", "She married.")]
    window.new_conversation()
    ask_and_wait(qtbot, window, "A new topic")
    assert service.histories[-1] == []
    close(window)


def test_summarise_compare_and_find_all_run_into_the_conversation(qtbot, home, monkeypatch):
    service = ScriptedService(pieces=["A summary."])
    window = make_window(qtbot, home, service)
    add_and_wait(qtbot, window, [write_book(home, "ledger.txt", SHIPS), write_book(home, "log.txt", "The Tern carried tar. " * 5)])
    ids = sorted(window.store.scope_document_ids(window.conversation.current_scope()) or
                 [d.id for d in window.store.library.documents(status="ready")])
    answers = iter([("3-", True), ("tar", True), ("tar", True)])
    monkeypatch.setattr("app.gui.main.QInputDialog.getText", lambda *a, **k: next(answers))
    window.library.table.selectRow(0)
    selected = window.library.selected_ids()
    with qtbot.waitSignal(window._inbox.answer_finished, timeout=15000):
        window.request_task("summarise", selected)
    assert service.tasks[-1] == ("summarise", {"first_page": 3, "last_page": None}, selected)
    messages = window.store.messages(window.conversation_id)
    assert messages[0].content.startswith("Summarise “") and messages[0].content.endswith(", pages 3-")
    assert messages[1].content == "A summary."
    with qtbot.waitSignal(window._inbox.answer_finished, timeout=15000):
        window.request_task("compare", ids)
    assert service.tasks[-1] == ("compare", {"topic": "tar"}, ids)
    window.new_conversation()
    window.conversation.scope.setCurrentIndex(0)  # All documents
    assert window.conversation.current_scope().kind == "all"
    with qtbot.waitSignal(window._inbox.answer_finished, timeout=15000):
        window.request_task("find-all", None)  # the conversation's scope
    found = window.store.messages(window.conversation_id)[-1]
    assert "mention “tar”" in found.content and len(found.citations) == 6  # one sentence in SHIPS, five in the log
    assert "Find all mentions of “tar”" in window.conversation.view.toPlainText()
    # Regenerate runs the task again, not a question.
    with qtbot.waitSignal(window._inbox.answer_finished, timeout=15000):
        window.regenerate()
    assert service.tasks[-1][0] == "find-all" and len(service.asked) == 0
    # A task with nothing selected says what it needs.
    window.request_task("compare", ids[:1])
    assert "two or more" in window.last_error
    close(window)


def test_service_failures_leave_the_window_alive(qtbot, home):
    service = ScriptedService(pieces=["partial ", "text ", "never"], fail_after=2, error=MemoryError())
    window = make_window(qtbot, home, service)
    ask_and_wait(qtbot, window, "Will this break?")
    assert window.banner.isVisible()
    assert "out of memory" in window.banner.text()
    assert "Traceback" not in window.banner.text()
    assert window.conversation.ask.isEnabled()  # ready for the next question
    saved = window.store.messages(window.conversation_id)[-1]
    assert saved.content == "partial text " and saved.stats["error"]
    close(window)


def test_a_model_that_cannot_load_is_reported(qtbot, home):
    def factory(_settings):
        raise FileNotFoundError("no-such-model.gguf: file not found")

    window = MainWindow(
        settings=AppSettings(), settings_file=home / "s.json", library_path=home / "library.db",
        service_factory=factory, qsettings=QSettings(str(home / "layout.ini"), QSettings.Format.IniFormat),
    )
    qtbot.addWidget(window)
    window.show()
    qtbot.waitUntil(lambda: window.banner.isVisible(), timeout=10000)
    assert "no-such-model.gguf" in window.banner.text()
    assert window.model_label.text() == "Model: not loaded"
    assert not window.conversation.ask.isEnabled()
    close(window)


def test_a_question_pauses_caching_which_goes_on_after_the_answer(qtbot, home):
    service = ScriptedService()
    service.build_delay = 0.4
    window = make_window(qtbot, home, service, auto_cache=False)
    books = [write_book(home, f"book{n}.txt", SHIPS + f" Volume {n}.") for n in range(6)]
    add_and_wait(qtbot, window, books)
    window.build_cache()
    qtbot.waitUntil(lambda: len(service.cached) >= 1, timeout=10000)
    ask_and_wait(qtbot, window, "Which ship carried tar?")
    # The answer came while documents were still uncached: it did not wait for the build.
    assert len(service.cached) < 6
    assert "**42**" in window.conversation.view.toPlainText() or "42" in window.conversation.view.toPlainText()
    qtbot.waitUntil(lambda: len(service.cached) == 6, timeout=15000)
    assert len(service.builds) == 2  # stopped for the question, then resumed
    assert set(service.builds[1]) < set(service.builds[0])  # the resumed build skips what was cached
    close(window)


def test_unfinished_adding_and_caching_resume_at_the_next_start(qtbot, home):
    books = [write_book(home, f"book{n}.txt", SHIPS + f" Volume {n}.") for n in range(3)]
    window = make_window(qtbot, home, ScriptedService(), auto_cache=False)
    add_and_wait(qtbot, window, books[:2])
    close(window)
    # What a crash leaves: the third book being added, a cache build asked for.
    (home / "unfinished-work.json").write_text(json.dumps({"ingest": [str(books[2])], "cache": True}))
    service = ScriptedService()
    window = make_window(qtbot, home, service, auto_cache=False)
    qtbot.waitUntil(lambda: len(ready_titles(window)) == 3, timeout=15000)
    qtbot.waitUntil(lambda: len(service.cached) >= 2, timeout=15000)
    qtbot.waitUntil(lambda: not window._cache_running and not window._ingest_jobs, timeout=15000)
    close(window)
    assert json.loads((home / "unfinished-work.json").read_text()) == {"ingest": [], "cache": False}


def test_what_the_workers_said_before_closing_does_not_reach_the_closed_window(qtbot, home):
    from ingest.jobs import IngestSummary

    window = make_window(qtbot, home, ScriptedService(), auto_cache=False)
    add_and_wait(qtbot, window, [write_book(home, "ledger.txt", SHIPS)])
    close(window)
    # A worker's "finished" queued before the threads stopped, delivered after the
    # library closed (a fresh-clone CI run met it): it must not reach the window.
    window._inbox.ingest_finished.emit(IngestSummary())
    window._inbox.cache_finished.emit("")
    qtbot.wait(50)


def test_files_given_at_start_are_added_once_not_resumed(qtbot, home):
    book = write_book(home, "ledger.txt", SHIPS)
    added: list[list[str]] = []
    window = MainWindow(
        settings=AppSettings(), settings_file=home / "settings.json", library_path=home / "library.db",
        service_factory=lambda _settings: ScriptedService(),
        qsettings=QSettings(str(home / "layout.ini"), QSettings.Format.IniFormat),
    )
    qtbot.addWidget(window)
    window.ingest_requested.connect(added.append)
    window.show()
    window.add_paths([str(book)])  # as run_app does for `quire gui PATH`, before the event loop runs
    qtbot.waitUntil(lambda: ready_titles(window) == ["ledger.txt"], timeout=15000)
    qtbot.wait(200)
    assert added == [[str(book)]]  # once: not again as "left unfinished"
    assert "Resuming" not in window.library.notice.text()
    close(window)


def test_an_answer_says_which_documents_are_not_in_yet(qtbot, home):
    window = make_window(qtbot, home)
    add_and_wait(qtbot, window, [write_book(home, "ledger.txt", SHIPS)])
    with Library(home / "library.db") as library:  # a document whose reading has begun
        library.db.execute("INSERT INTO documents (path, title, status, added_at, updated_at) "
                           "VALUES (?, ?, 'ingesting', '2026-12-04', '2026-12-04')", [str(home / "atlas.pdf"), "Harbour Atlas"])
    ask_and_wait(qtbot, window, "Which ship carried tar?")
    view = window.conversation.view.toPlainText()
    assert "not in yet, still being read: Harbour Atlas" in view
    assert window.store.messages(window.conversation_id)[-1].stats["not_in_yet"] == ["Harbour Atlas"]
    close(window)


def test_scope_limits_the_documents_asked(qtbot, home):
    window = make_window(qtbot, home)
    add_and_wait(qtbot, window, [write_book(home, "a.txt", SHIPS), write_book(home, "b.txt", "Lighthouses of the coast.")])
    target = next(r.record.id for r in window.library.model.rows if r.record.path.endswith("b.txt"))
    collection = window.store.create_collection("Coast")
    window.store.add_to_collection(collection, [target])
    window.refresh_library()
    index = window.conversation.scope.findText("Collection: Coast")
    assert index > 0
    window.conversation.scope.setCurrentIndex(index)
    ask_and_wait(qtbot, window, "Where are the lighthouses?")
    assert window.service.asked[-1][1] == [target]
    # Reopening the conversation brings its scope back.
    asked_in = window.conversation_id
    window.new_conversation()
    window.conversation.scope.setCurrentIndex(0)
    window.open_conversation(asked_in)
    assert window.conversation.scope.currentText() == "Collection: Coast"
    close(window)


# -- persistence, export, settings, layout ----------------------------------------


def test_conversations_persist_and_can_be_searched_renamed_deleted(qtbot, home, monkeypatch):
    window = make_window(qtbot, home)
    ask_and_wait(qtbot, window, "First question about harbours")
    window.new_conversation()
    ask_and_wait(qtbot, window, "Second question about lanterns")
    close(window)

    window = make_window(qtbot, home)
    titles = [window.conversations.model.index(r, 0).data() for r in range(window.conversations.model.rowCount())]
    assert titles == ["Second question about lanterns", "First question about harbours"]
    window.conversations.search.setText("HARBOUR")
    assert window.conversations.model.rowCount() == 1
    first = window.conversations.model.conversations[0].id
    window.open_conversation(first)
    assert "First question about harbours" in window.conversation.view.toPlainText()
    monkeypatch.setattr("app.gui.main.QInputDialog.getText", lambda *a, **k: ("Harbours", True))
    window.rename_conversation(first)
    assert window.store.conversations.get(first).title == "Harbours"
    assert window.conversation.title.text() == "Harbours"
    monkeypatch.setattr("app.gui.main.QMessageBox.question", lambda *a, **k: QMessageBox.StandardButton.Yes)
    window.delete_conversation(first)
    window.conversations.search.setText("")
    assert [c.title for c in window.conversations.model.conversations] == ["Second question about lanterns"]
    assert window.conversation_id is None
    close(window)


@pytest.mark.parametrize("suffix", [".md", ".html", ".json", ".pdf"])
def test_export_from_the_window(qtbot, home, monkeypatch, suffix):
    window = make_window(qtbot, home)
    add_and_wait(qtbot, window, [write_book(home, "ledger.txt", SHIPS)])
    ask_and_wait(qtbot, window, "Which ship carried tar?")
    target = home / f"transcript{suffix}"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), ""))
    window.export_conversation()
    assert target.exists(), window.last_error
    if suffix == ".json":
        data = json.loads(target.read_text(encoding="utf-8"))
        assert data["model"] == "scripted-model"
        assert data["messages"][1]["citations"][0]["quote"] == SHIPS[:60]
        assert data["corpus_hash"] == window.store.messages(window.conversation_id)[-1].stats["corpus_hash"]
    elif suffix == ".pdf":
        from pypdf import PdfReader

        text = " ".join(" ".join(page.extract_text().split()) for page in PdfReader(target).pages)
        assert "Which ship carried tar?" in text and "42" in text
    else:
        text = target.read_text(encoding="utf-8")
        assert "Which ship carried tar?" in text and "Valdmere" in text
    close(window)


def test_settings_are_saved_and_reload_the_service(qtbot, home):
    made = []

    def factory(settings):
        made.append(settings)
        return ScriptedService(settings)

    window = MainWindow(
        settings=AppSettings(), settings_file=home / "settings.json", library_path=home / "library.db",
        service_factory=factory, qsettings=QSettings(str(home / "layout.ini"), QSettings.Format.IniFormat),
    )
    qtbot.addWidget(window)
    qtbot.waitUntil(lambda: window.engine_ready, timeout=10000)
    from app.gui.settings_dialog import SettingsDialog

    dialog = SettingsDialog(window.settings, window, models=["smollm2-135m-instruct"])
    dialog.model.setCurrentIndex(dialog.model.findData("smollm2-135m-instruct"))
    dialog.precision.setCurrentIndex(dialog.precision.findData("int4"))
    dialog.max_tokens.setValue(200)
    window.apply_settings(dialog.chosen())
    qtbot.waitUntil(lambda: len(made) == 2 and window.engine_ready, timeout=10000)
    assert made[-1].model == "smollm2-135m-instruct" and made[-1].precision == "int4"
    saved = load_settings(home / "settings.json")
    assert (saved.model, saved.precision, saved.max_answer_tokens) == ("smollm2-135m-instruct", "int4", 200)
    dialog._restore_defaults()
    chosen = dialog.chosen()
    assert (chosen.model, chosen.precision, chosen.max_answer_tokens) == ("", "int8", AppSettings().max_answer_tokens)
    # A new reader is a new service too (it writes every answer).
    window.apply_settings(replace(window.settings, reader="http://127.0.0.1:11434/v1/qwen2.5:7b", ocr_languages="eng+deu"))
    qtbot.waitUntil(lambda: len(made) == 3 and window.engine_ready, timeout=10000)
    assert made[-1].reader == "http://127.0.0.1:11434/v1/qwen2.5:7b"
    assert os.environ["QUIRE_OCR_LANGUAGES"] == "eng+deu"
    window.apply_settings(replace(window.settings, ocr_languages=""))
    assert "QUIRE_OCR_LANGUAGES" not in os.environ
    close(window)


def test_window_layout_is_remembered(qtbot, home):
    window = make_window(qtbot, home)
    # The offscreen screen is 800x800 and restoring clamps to the screen, so the
    # height (which fits) is the part of the geometry checked.
    window.resize(1111, 677)
    qtbot.waitUntil(lambda: window.height() == 677)
    window.evidence_dock.hide()
    close(window)
    window = make_window(qtbot, home)
    qtbot.waitExposed(window)
    assert window.height() == 677
    assert not window.evidence_dock.isVisible()
    close(window)


def test_first_run_model_install_shows_progress_then_closes(qtbot, home):
    stages = []

    def prepare(settings, progress, cancel):
        for done in range(0, 5):
            progress("convert", done, 4)
            stages.append(done)

    window = MainWindow(
        settings=AppSettings(), settings_file=home / "s.json", library_path=home / "library.db",
        service_factory=lambda _s: ScriptedService(), service_prepare=prepare,
        qsettings=QSettings(str(home / "layout.ini"), QSettings.Format.IniFormat),
    )
    qtbot.addWidget(window)
    seen = []
    window._inbox.installing.connect(lambda stage, done, total: seen.append(window._install_dialog is not None))
    qtbot.waitUntil(lambda: window.engine_ready, timeout=10000)
    assert stages == [0, 1, 2, 3, 4]
    assert seen == [True] * 5  # a progress dialog was up for every step
    assert window._install_dialog is None  # closed once the service is ready
    close(window)


def test_task_progress_says_which_parts_are_being_read():
    from app.gui.worker import _progress_text
    from engine.corpus.tasks import TaskProgress

    assert _progress_text(TaskProgress("reading", 8, 141, 250.0, working=8)) == "Reading parts 9–16 of 141, about 4 min left"
    assert _progress_text(TaskProgress("reading", 140, 141, 2.0, working=1)) == "Reading part 141 of 141, about 2 s left"
    assert _progress_text(TaskProgress("combining", 16, 18, None, working=8)) == "Combining notes 17–18 of 18"
    assert _progress_text(TaskProgress("finding", 0, 1)) == "Finding"
