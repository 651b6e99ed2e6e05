"""Full-text search in the window (Ctrl+K): typing lists the matching pages with the
matched words bold, a hit opens its page in the source viewer with the match
highlighted, and an empty library, no hits or punctuation alone each give a plain
message. Documents are read by the real ingest worker: a generated PDF (reportlab)
and a Markdown file."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from PySide6.QtCore import QSettings, Qt  # noqa: E402

from app.gui.main import MainWindow  # noqa: E402
from app.gui.search_panel import SearchResultsModel, SearchRow, hit_span, match_span, snippet_html  # noqa: E402
from app.gui.viewer import locate_span  # noqa: E402
from app.settings import AppSettings  # noqa: E402
from ingest.library import SearchHit  # noqa: E402
from tests.gui.fakes import ScriptedService  # noqa: E402
from tests.ingest.builders import write_pdf  # noqa: E402

PDF_PAGES = [
    ["The harbour master logged three fishing boats before dawn."],
    ["Gulls circled over the morning catch on the eastern pier."],
    ["Nobody asked why the western tower had stayed dark all winter.",
     "The quartermaster counted Seventeen Lanterns beside the northern gate."],
]
NOTES = "# Field notes\n\nThe caravan reached the salt flats on the third day.\n\nIt carried copper and café beans.\n"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("QUIRE_HOME", str(tmp_path / "home"))
    return tmp_path


def make_window(qtbot, home: Path) -> MainWindow:
    service = ScriptedService()
    window = MainWindow(
        settings=AppSettings(auto_cache=False),
        settings_file=home / "settings.json",
        library_path=home / "library.db",
        service_factory=lambda _settings: service,
        qsettings=QSettings(str(home / "layout.ini"), QSettings.Format.IniFormat),
    )
    qtbot.addWidget(window)
    window.show()
    qtbot.waitExposed(window)
    return window


@pytest.fixture
def window(qtbot, home) -> MainWindow:
    """The window over a library holding a three-page PDF and a Markdown file."""
    window = make_window(qtbot, home)
    pdf = write_pdf(home / "harbour.pdf", PDF_PAGES, title="Harbour Book")
    notes = home / "notes.md"
    notes.write_text(NOTES, encoding="utf-8")
    window.add_paths([str(pdf), str(notes)])
    qtbot.waitUntil(lambda: sum(r.record.status == "ready" for r in window.library.model.rows) == 2, timeout=20000)
    yield window
    window.close()


def search_for(qtbot, window: MainWindow, text: str) -> None:
    """What a person does: Ctrl+K, type, and wait for the pause to run the search."""
    window.activateWindow()
    qtbot.waitUntil(window.isActiveWindow, timeout=2000)
    qtbot.keyClick(window, Qt.Key.Key_K, Qt.KeyboardModifier.ControlModifier)
    qtbot.waitUntil(window.search.field.hasFocus, timeout=2000)
    qtbot.keyClicks(window.search.field, text)
    qtbot.waitUntil(lambda: window.search.query == text, timeout=3000)


# -- finding the match in a page --------------------------------------------------


def test_match_span_finds_whole_words_ignoring_case_accents_and_line_breaks():
    text = "Cafeteria first. Then the CAFÉ\nbeans, and café beans again."
    start, end = match_span(text, "cafe beans")
    assert text[start:end] == "CAFÉ\nbeans"  # not "Cafeteria", which is not the word
    start, end = match_span(text, "the café")
    assert text[start:end] == "the CAFÉ"
    # The phrase absent: its first word, so the reader still lands on a match.
    start, end = match_span(text, "beans forever")
    assert text[start:end] == "beans"
    assert match_span(text, "harbour") is None
    assert match_span(text, '"') is None


def test_the_highlight_is_the_occurrence_the_snippet_showed():
    page = "A factor first. Then much else.\nIf there are k factor arguments, the result is a k-way array."
    start, end = hit_span(page, "…If there are k \x02factor\x03 arguments, the…", "factor")
    assert (start, end) == (page.index("k factor") + 2, page.index("k factor") + 8)
    # A snippet that is not in the page (the page changed): the first occurrence.
    assert hit_span(page, "…no such \x02factor\x03 text…", "factor") == (2, 8)


def test_a_searched_word_is_found_in_the_pdf_layer_where_it_was_meant():
    # The library's text and PDFium's layer of the same page (CRLF, a running head,
    # a hyphenated line end): "factor" recurs a few words apart, in "factors" too.
    page = "5.10 Frequency tables from factors\nRecall that a factor defines a partition into groups. A factor here.\n"
    layer = "Chapter 5: Arrays\r\n5.10 Frequency tables from factors\r\nRecall that a fac\ufffetor defines a partition into groups. A factor here."
    for occurrence in (page.index("a factor") + 2, page.index("A factor") + 2):
        start, end = match_span(page[occurrence:], "factor")
        match = locate_span(layer, page, occurrence + start, occurrence + end)
        assert match is not None and match.complete
        assert layer[match.start : match.end].replace("\ufffe", "") == "factor"
        words_before = page[:occurrence].count("factor")
        assert layer[: match.start].replace("\ufffe", "").count("factor") == words_before


def test_snippet_marks_become_bold_and_the_rest_is_escaped():
    assert snippet_html("a <b> & \x02tar\x03\n barrels") == "a &lt;b&gt; &amp; <b>tar</b> barrels"
    # An index page's dot leaders shrink to an ellipsis; a sentence's "..." stays.
    assert snippet_html("F \x02factor\x03. . . . . . 17\nfivenum ........ 37 and... so") == "F <b>factor</b> … 17 fivenum … 37 and... so"


def test_results_model_passes_the_model_tester(qtmodeltester):
    model = SearchResultsModel()
    hits = [SearchHit(1, "Harbour Book", "/x/harbour.pdf", 2, "3", "the \x02lanterns\x03 shone", -1.5),
            SearchHit(2, "Notes", "/x/notes.md", 0, None, "\x02lanterns\x03 again", -1.0)]
    model.set_rows([SearchRow(hits[0], "page 3"), SearchRow(hits[1], "section 1")])
    qtmodeltester.check(model)
    assert model.index(0, 0).data() == "Harbour Book — page 3: the lanterns shone"
    assert "<b>lanterns</b>" in model.index(1, 0).data(SearchResultsModel.HTML_ROLE)


# -- the panel in the window ------------------------------------------------------


def test_typing_lists_the_matching_pages_and_a_miss_says_so(qtbot, window):
    search_for(qtbot, window, "seventeen lanterns")
    panel = window.search
    assert window.left_tabs.currentWidget() is panel
    assert [(row.hit.title, row.hit.page_index, row.where) for row in panel.model.rows] == [("Harbour Book", 2, "page 3")]
    assert "counted <b>Seventeen Lanterns</b> beside" in panel.model.index(0, 0).data(SearchResultsModel.HTML_ROLE)
    assert panel.message.text() == "1 matching page."

    # Both documents: accents ignored ("cafe" finds "café").
    panel.field.clear()
    qtbot.keyClicks(panel.field, "the")
    qtbot.keyClick(panel.field, Qt.Key.Key_Return)  # Enter searches at once
    assert panel.query == "the"
    assert {row.hit.title for row in panel.model.rows} == {"Harbour Book", "Field notes"}
    panel.field.setText("cafe")
    panel.search_now()
    # A Markdown section is labelled with its heading.
    assert [(row.hit.title, row.where) for row in panel.model.rows] == [("Field notes", "Field notes")]

    panel.field.clear()
    qtbot.keyClicks(panel.field, "albatross")
    qtbot.waitUntil(lambda: panel.query == "albatross", timeout=3000)
    assert panel.model.rows == []
    assert panel.message.text() == "No pages contain “albatross”."


def test_activating_a_hit_opens_its_page_with_the_match_highlighted(qtbot, window):
    search_for(qtbot, window, "seventeen lanterns")
    panel = window.search
    # Down walks from the field into the hits; Enter opens the current one.
    qtbot.keyClick(panel.field, Qt.Key.Key_Down)
    assert panel.results.hasFocus()
    qtbot.keyClick(panel.results, Qt.Key.Key_Return)
    viewer = window.viewer
    qtbot.waitUntil(lambda: viewer.mode() == "pdf", timeout=3000)
    assert window.viewer_dock.isVisible()
    assert viewer.current_page() == 2
    assert viewer.header.text() == "Harbour Book — page 3"
    assert viewer.highlighted_text() == "Seventeen Lanterns"
    assert len(viewer.highlight_rects()) == 1
    assert viewer.message() == ""

    panel.field.setText("copper and café")
    panel.search_now()
    panel.open_hit(panel.model.index(0, 0))
    assert viewer.mode() == "text"
    assert viewer.header.text() == "Field notes — section Field notes"
    assert viewer.highlighted_text() == "copper and café"


def test_empty_library_and_punctuation_give_plain_messages(qtbot, home):
    window = make_window(qtbot, home)
    search_for(qtbot, window, "lanterns")
    panel = window.search
    assert panel.model.rows == []
    assert panel.message.text() == "The library is empty: add documents to search them."
    window.close()


def test_unsearchable_text_gives_a_plain_message(qtbot, window):
    panel = window.search
    for text in ('"', '"lanterns', "NEAR(", "*", "lanterns AND"):
        panel.field.setText(text)
        panel.search_now()
        assert "Traceback" not in panel.message.text()
        assert panel.message.text(), text
    panel.field.setText('"')
    panel.search_now()
    assert panel.message.text() == "Type letters or digits: punctuation alone is not searched."
    panel.field.setText('"seventeen lanterns"')  # quotes are searched for, not parsed
    panel.search_now()
    assert [row.hit.page_index for row in panel.model.rows] == [2]
    panel.field.clear()
    panel.search_now()
    assert panel.model.rows == [] and panel.message.text().startswith("Type words")


def test_hits_follow_the_library_as_documents_come_and_go(qtbot, window, home):
    search_for(qtbot, window, "caravan")
    assert [row.hit.title for row in window.search.model.rows] == ["Field notes"]
    more = home / "journey.md"
    more.write_text("# Journey\n\nA second caravan crossed the dunes at night.\n", encoding="utf-8")
    window.add_paths([str(more)])
    qtbot.waitUntil(lambda: len(window.search.model.rows) == 2, timeout=20000)
    assert {row.hit.title for row in window.search.model.rows} == {"Field notes", "Journey"}
