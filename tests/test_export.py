"""Transcript export: a real conversation in a temporary library, written as
Markdown, HTML, JSON and PDF, and each file read back with an independent parser
(json, html.parser, markdown-it, pypdf)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from app.export import (
    QUOTE_LIMIT,
    Transcript,
    UnsupportedExportFormatError,
    export,
    shorten,
    to_html,
    to_markdown,
    transcript_from,
)
from ingest.conversations import Citation, Conversations
from ingest.document import Document, Page, assign_offsets
from ingest.errors import ConversationNotFound
from ingest.library import Library

QUESTION_1 = "Where did the narrator stay in Zürich?"
ANSWER_1 = "He stayed at the **Hotel Storchen** — a naïve choice.\n\n- close to the river\n- cheap"
QUESTION_2 = "What did the note say?"
ANSWER_2 = "It warned about the \"fish & chips\" <b>vendor</b>."
SCRIPT_QUOTE = 'He wrote <script>alert("x")</script> & said “don’t”   \n\n  twice.'
LONG_QUOTE = "word " * 120
STATS = {"ttft_s": 0.35, "tokens_per_second": 28.4, "settings": {"cache": "int8", "budget": 4096}, "corpus_hash": "c0ffee42"}


@pytest.fixture
def library(tmp_path):
    with Library(tmp_path / "library.db") as opened:
        yield opened


@pytest.fixture
def transcript(library) -> Transcript:
    pages = assign_offsets([Page(index=0, text="Zürich — naïve travels.", label="xii"), Page(index=1, text=SCRIPT_QUOTE, label="47")])
    book = library.begin_document(path="travels.txt", content_hash="h-travels", format="txt")
    library.store_document(book, Document(path="travels.txt", format="txt", pages=pages, title="Travels in Zürich"))
    conversations = Conversations(library)
    chat = conversations.create("Zürich — naïve questions", scope={"document_ids": [book]})
    conversations.add_message(chat.id, "user", QUESTION_1)
    conversations.add_message(
        chat.id, "assistant", ANSWER_1, model="SmolLM2-135M", stats=STATS,
        citations=[
            Citation(book, "Travels in Zürich", 0, "xii", 0, 23, 0.125, "Zürich — naïve travels."),
            Citation(book, "Travels in Zürich", 1, None, 25, 525, 0.6, LONG_QUOTE),
        ],
    )
    conversations.add_message(chat.id, "user", QUESTION_2)
    conversations.add_message(
        chat.id, "assistant", ANSWER_2, model="SmolLM2-135M", stats=STATS,
        citations=[Citation(book, "Travels in Zürich", 1, "47", 25, 25 + len(SCRIPT_QUOTE), 0.83, SCRIPT_QUOTE)],
    )
    return transcript_from(conversations, chat.id)


def test_transcript_from_takes_model_settings_and_hash_from_the_last_answer(transcript, library):
    assert transcript.title == "Zürich — naïve questions"
    assert (transcript.model, transcript.settings, transcript.corpus_hash) == ("SmolLM2-135M", STATS["settings"], "c0ffee42")
    assert transcript.scope == {"document_ids": [1]}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", transcript.exported_at)
    assert [m.content for m in transcript.messages] == [QUESTION_1, ANSWER_1, QUESTION_2, ANSWER_2]
    conversations = Conversations(library)
    explicit = transcript_from(conversations, 1, model="other", settings={"max_tokens": 64}, corpus_hash="feed")
    assert (explicit.model, explicit.settings, explicit.corpus_hash) == ("other", {"max_tokens": 64}, "feed")
    with pytest.raises(ConversationNotFound):
        transcript_from(conversations, 999)


def test_shorten_collapses_whitespace_and_cuts_at_a_word():
    assert shorten("  a \n\n b\tc  ") == "a b c"
    short = shorten(LONG_QUOTE)
    assert short.endswith("word…") and len(short) <= QUOTE_LIMIT + 1 and "  " not in short
    assert shorten("x" * 400).endswith("…") and len(shorten("x" * 400)) == QUOTE_LIMIT + 1


def test_json_round_trips_every_field(transcript, tmp_path):
    path = tmp_path / "chat.json"
    export(transcript, path)
    loaded = json.loads(path.read_text(encoding="utf-8"))
    assert "Zürich — naïve" in path.read_text(encoding="utf-8")  # UTF-8, not \u escapes
    assert {key: loaded[key] for key in ("format", "version", "title", "exported_at", "model", "settings", "corpus_hash", "scope")} == {
        "format": "quire-transcript", "version": 1, "title": transcript.title, "exported_at": transcript.exported_at,
        "model": "SmolLM2-135M", "settings": STATS["settings"], "corpus_hash": "c0ffee42", "scope": transcript.scope,
    }
    assert len(loaded["messages"]) == 4
    for exported, message in zip(loaded["messages"], transcript.messages):
        assert exported == {
            "role": message.role, "content": message.content, "created_at": message.created_at,
            "model": message.model, "stats": message.stats,
            "citations": [
                {"document_id": c.document_id, "title": c.title, "page_index": c.page_index, "page_label": c.page_label,
                 "start": c.start, "end": c.end, "weight": c.weight, "quote": c.quote}
                for c in message.citations
            ],
        }
        assert [Citation(**c) for c in exported["citations"]] == message.citations
    assert loaded["messages"][3]["citations"][0]["quote"] == SCRIPT_QUOTE  # unshortened, unescaped


def test_markdown_has_footnotes_numbered_across_the_transcript(transcript, tmp_path):
    path = tmp_path / "chat.MD"
    export(transcript, path)
    text = path.read_text(encoding="utf-8")
    assert text == to_markdown(transcript)
    assert text.startswith("# Zürich — naïve questions\n")
    assert f"**You:** {QUESTION_1}" in text and f"**You:** {QUESTION_2}" in text
    assert ANSWER_1 in text and ANSWER_2 in text  # answers kept as Markdown
    # Citations come heaviest first within an answer; numbers continue across answers.
    assert text.index(ANSWER_1) < text.index("Sources: [^1] [^2]") < text.index(ANSWER_2) < text.index("Sources: [^3]")
    definitions = re.findall(r"^\[\^(\d+)\]: (.*)$", text, flags=re.M)
    assert [number for number, _ in definitions] == ["1", "2", "3"]
    first, second, third = (body for _, body in definitions)
    assert first == f"*Travels in Zürich*, p. 2 (weight 60%): “{shorten(LONG_QUOTE)}”"  # no label: physical page
    assert second == "*Travels in Zürich*, p. xii (weight 12%): “Zürich — naïve travels.”"
    assert third == (
        '*Travels in Zürich*, p. 47 (weight 83%): '
        '“He wrote \\<script\\>alert("x")\\</script\\> \\& said “don’t” twice.”'
    )


def test_markdown_renders_quotes_as_text_not_markup(transcript):
    markdown_it = pytest.importorskip("markdown_it")
    rendered = markdown_it.MarkdownIt("commonmark").render(to_markdown(transcript))  # raw HTML allowed
    assert "<script" not in rendered
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; said" in rendered


class _Page(HTMLParser):
    """Tags, ids, hrefs and text of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.ids: list[str] = []
        self.hrefs: list[str] = []
        self.text: list[str] = []
        self.items: list[str] = []
        self._in_item = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attributes = dict(attrs)
        if "id" in attributes:
            self.ids.append(attributes["id"])
        if "href" in attributes:
            self.hrefs.append(attributes["href"])
        if tag == "li" and "id" in attributes:
            self._in_item = True
            self.items.append("")

    def handle_endtag(self, tag):
        if tag == "li":
            self._in_item = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_item:
            self.items[-1] += data


def parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.close()
    return page


def test_html_escapes_book_text_and_links_citations(transcript, tmp_path):
    path = tmp_path / "chat.html"
    export(transcript, path)
    html = path.read_text(encoding="utf-8")
    assert html == to_html(transcript)
    page = parse(html)
    assert "script" not in page.tags
    assert page.tags.count("b") == 0  # the answer's raw <b> is shown, not applied
    text = "".join(page.text)
    assert QUESTION_1 in text and QUESTION_2 in text
    assert "He stayed at the Hotel Storchen — a naïve choice." in text
    assert 'It warned about the "fish & chips" <b>vendor</b>.' in text
    assert page.tags.count("strong") == 1 and page.tags.count("li") == 2 + 3  # answer's list + 3 sources
    assert [i for i in page.ids if i.startswith("cite-")] == ["cite-1", "cite-2", "cite-3"]
    assert page.hrefs == ["#cite-1", "#cite-2", "#cite-3"]
    assert page.items == [
        f"Travels in Zürich, p. 2 (weight 60%): “{shorten(LONG_QUOTE)}”",
        "Travels in Zürich, p. xii (weight 12%): “Zürich — naïve travels.”",
        'Travels in Zürich, p. 47 (weight 83%): “He wrote <script>alert("x")</script> & said “don’t” twice.”',
    ]
    for value in ("SmolLM2-135M", "c0ffee42", "int8"):
        assert value in text


def test_html_without_markdown_it_keeps_paragraphs_escaped(transcript, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "markdown_it", None)  # import fails as if absent
    page = parse(to_html(transcript))
    text = "".join(page.text)
    assert "script" not in page.tags and "strong" not in page.tags
    assert "He stayed at the **Hotel Storchen** — a naïve choice." in text
    assert page.tags.count("p") >= 4


def test_pdf_contains_question_answer_and_page_label(transcript, tmp_path):
    pypdf = pytest.importorskip("pypdf")
    path = tmp_path / "chat.pdf"
    export(transcript, path)
    assert path.read_bytes().startswith(b"%PDF-")
    reader = pypdf.PdfReader(path)
    text = " ".join(" ".join(page.extract_text().split()) for page in reader.pages)
    assert QUESTION_1 in text
    assert "He stayed at the Hotel Storchen" in text
    assert "p. xii" in text and "p. 47" in text
    width, height = (float(v) for v in reader.pages[0].mediabox.upper_right)
    assert (round(width / 72 * 25.4), round(height / 72 * 25.4)) == (210, 297)  # A4 in mm
    assert reader.metadata.title == "Zürich — naïve questions"


def test_unknown_suffix_is_a_value_error_and_writes_nothing(transcript, tmp_path):
    for name in ("chat.docx", "chat"):
        with pytest.raises(ValueError, match=r"unknown file type .*\.md, \.markdown, \.html, \.htm, \.json, \.pdf"):
            export(transcript, tmp_path / name)
    assert issubclass(UnsupportedExportFormatError, ValueError)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith("library.db")] == []


def test_export_replaces_an_existing_file_without_leaving_temporaries(transcript, tmp_path):
    path = tmp_path / "out" / "chat.json"
    path.parent.mkdir()
    path.write_text("old", encoding="utf-8")
    export(transcript, path)
    export(transcript, path.with_suffix(".pdf"))
    assert json.loads(path.read_text(encoding="utf-8"))["title"] == transcript.title
    assert sorted(p.name for p in path.parent.iterdir()) == ["chat.json", "chat.pdf"]
    with pytest.raises(FileNotFoundError):
        export(transcript, tmp_path / "missing" / "chat.md")


def test_pdf_export_needs_no_display(tmp_path):
    # The CLI's path: no Qt application yet, no platform chosen, no display.
    import os
    import subprocess
    import sys

    script = (
        "import sys; from pathlib import Path; from app.export import Transcript, export; "
        "export(Transcript('Headless', '2024-01-01T00:00:00+00:00', None, {}, None, None, []), Path(sys.argv[1]))"
    )
    environment = {key: value for key, value in os.environ.items() if key not in ("QT_QPA_PLATFORM", "DISPLAY", "WAYLAND_DISPLAY")}
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "headless.pdf")],
        cwd=Path(__file__).resolve().parents[1], env=environment, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "headless.pdf").read_bytes().startswith(b"%PDF-")
