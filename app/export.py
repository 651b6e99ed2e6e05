"""Export a conversation as a transcript: Markdown, HTML, JSON or PDF.

A `Transcript` is a stored conversation (`ingest.conversations`) plus what is needed
to reproduce it: the model, the settings (model, reader, device, cache precision, max
tokens: `settings_summary()`) and a
hash naming the documents in scope. Each answer's citations become numbered notes,
numbered once across the whole transcript so that every format agrees on them:
Markdown footnotes (`[^N]`, the GitHub/Pandoc extension), an HTML list with
anchors `#cite-N`, and the same list in the PDF, which is the HTML laid out by Qt's
QTextDocument and printed with QPdfWriter.

JSON (`"format": "quire-transcript"`, `"version": 1`) holds every field unshortened
and is the one format meant to be read back by a program. Files are written
atomically: a temporary file beside the target, renamed over it when complete.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import jinja2
from markupsafe import Markup, escape

from engine.paths import write_atomic
from ingest.conversations import Citation, Conversations, Message

FORMAT_NAME = "quire-transcript"
FORMAT_VERSION = 1
EXPORT_SUFFIXES = (".md", ".markdown", ".html", ".htm", ".json", ".pdf")
QUOTE_LIMIT = 300  # characters of a quote shown in Markdown, HTML and PDF notes

# Ours, kept alive for the process: Qt needs a QGuiApplication to lay out text, and
# one made for an export from the CLI must outlive the QTextDocument using it.
_application: object | None = None


class UnsupportedExportFormatError(ValueError):
    """The file name's suffix is not one of the formats a transcript exports to."""


@dataclass
class Transcript:
    title: str
    exported_at: str  # ISO 8601 UTC
    model: str | None
    settings: dict  # the engine's settings_summary(): model, reader, device, precision, max tokens
    corpus_hash: str | None  # identifies the documents in scope
    scope: dict | None
    messages: list[Message]


@dataclass
class _Note:
    """A citation as every format shows it, numbered across the transcript."""

    number: int
    citation: Citation
    title: str
    page: str | None
    weight: str
    quote: str  # whitespace collapsed, shortened to about QUOTE_LIMIT


def transcript_from(
    conversations: Conversations,
    conversation_id: int,
    *,
    model: str | None = None,
    settings: dict | None = None,
    corpus_hash: str | None = None,
) -> Transcript:
    """The stored conversation as a transcript, stamped now.

    What is not given comes from the statistics of the latest answer that recorded
    it (keys "settings" and "corpus_hash") and that answer's model: the transcript
    then describes the run that produced the last answer.
    """
    conversation = conversations.get(conversation_id)
    messages = conversations.messages(conversation_id)
    for message in reversed(messages):
        if message.role != "assistant":
            continue
        stats = message.stats or {}
        if model is None:
            model = message.model
        if settings is None and isinstance(stats.get("settings"), dict):
            settings = stats["settings"]
        if corpus_hash is None and isinstance(stats.get("corpus_hash"), str):
            corpus_hash = stats["corpus_hash"]
    return Transcript(
        title=conversation.title,
        exported_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=model,
        settings=dict(settings or {}),
        corpus_hash=corpus_hash,
        scope=conversation.scope,
        messages=messages,
    )


# -- shared ---------------------------------------------------------------------


def shorten(text: str, limit: int = QUOTE_LIMIT) -> str:
    """`text` on one line, cut at a word boundary near `limit` with an ellipsis."""
    collapsed = " ".join(text.split())
    if len(collapsed) <= limit:
        return collapsed
    cut = collapsed[:limit]
    space = cut.rfind(" ")
    if space > limit * 2 // 3:
        cut = cut[:space]
    return cut.rstrip(" ,;:.-–—") + "…"


def _weight(weight: float) -> str:
    if 0 < weight < 0.005:
        return "<1%"
    return f"{weight:.0%}"


def _notes(t: Transcript) -> dict[int, list[_Note]]:
    """Each answer's notes, keyed by message id, numbered 1.. in transcript order."""
    notes: dict[int, list[_Note]] = {}
    number = 0
    for message in t.messages:
        for citation in message.citations:
            number += 1
            page = citation.page_label or (str(citation.page_index + 1) if citation.page_index is not None else None)
            notes.setdefault(message.id, []).append(_Note(
                number=number,
                citation=citation,
                title=" ".join(citation.title.split()) or "Untitled document",
                page=page,
                weight=_weight(citation.weight),
                quote=shorten(citation.quote),
            ))
    return notes


def _metadata(t: Transcript) -> list[tuple[str, str]]:
    rows = [("Exported", t.exported_at)]
    if t.model:
        rows.append(("Model", t.model))
    if t.settings:
        rows.append(("Settings", ", ".join(f"{key}: {_plain(value)}" for key, value in t.settings.items())))
    if t.corpus_hash:
        rows.append(("Corpus", t.corpus_hash))
    if t.scope:
        rows.append(("Scope", _plain(t.scope)))
    return rows


def _plain(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


# -- Markdown -------------------------------------------------------------------

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>&#|])")


def _escape_markdown(text: str) -> str:
    # Titles and quotes are book text, not Markdown: a quoted "<script>" or "*" must
    # come out as written in any renderer, not as markup.
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def to_markdown(t: Transcript) -> str:
    notes = _notes(t)
    lines = [f"# {' '.join(t.title.split())}", ""]
    lines += [f"- {name}: {_escape_markdown(value)}" for name, value in _metadata(t)]
    for message in t.messages:
        if message.role == "user":
            # A rule between turns; the blank line before it keeps it a rule (right
            # after text it would turn that text into a heading).
            lines += ["", "---", "", f"**You:** {message.content.strip()}", ""]
            continue
        # Answers are Markdown already; the markers go on their own line so that an
        # answer ending in a list or a code block stays intact.
        if lines[-1]:
            lines.append("")
        lines.append(message.content.strip())
        if message.id in notes:
            lines += ["", "Sources: " + " ".join(f"[^{note.number}]" for note in notes[message.id])]
    definitions = [note for message_notes in notes.values() for note in message_notes]
    if definitions:
        lines.append("")
        for note in definitions:
            page = f", p. {_escape_markdown(note.page)}" if note.page else ""
            lines.append(
                f"[^{note.number}]: *{_escape_markdown(note.title)}*{page} "
                f"(weight {note.weight}): “{_escape_markdown(note.quote)}”"
            )
    return "\n".join(lines) + "\n"


# -- HTML -----------------------------------------------------------------------

# Kept to the CSS subset QTextDocument understands, since the PDF is this page.
_HTML_TEMPLATE = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="generator" content="Quire">
<title>{{ title }}</title>
<style>
body { font-family: sans-serif; line-height: 1.45; color: #222; max-width: 48em; margin: 2em auto; padding: 0 1em; }
table.meta { color: #555; font-size: small; border-collapse: collapse; }
table.meta th { text-align: left; padding-right: 1em; font-weight: normal; color: #777; }
.speaker { font-weight: bold; margin-top: 1.2em; margin-bottom: 0.2em; }
.user .speaker { color: #2a5db0; }
.assistant .speaker { color: #2e7d32; }
.cites { font-size: small; color: #555; }
ol.sources { font-size: small; }
pre, code { font-family: monospace; background-color: #f4f4f4; }
blockquote { color: #444; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<table class="meta">
{% for name, value in metadata %}<tr><th>{{ name }}</th><td>{{ value }}</td></tr>
{% endfor %}</table>
{% for turn in turns %}
<div class="message {{ turn.role }}">
<p class="speaker">{{ "You" if turn.role == "user" else "Quire" }}</p>
{{ turn.body }}
{% if turn.notes %}<p class="cites">Sources: {% for note in turn.notes %}<a href="#cite-{{ note.number }}">[{{ note.number }}]</a> {% endfor %}</p>{% endif %}
</div>
{% endfor %}
{% if notes %}
<h2>Sources</h2>
<ol class="sources">
{% for note in notes %}<li id="cite-{{ note.number }}"><a name="cite-{{ note.number }}"></a><i>{{ note.title }}</i>{% if note.page %}, p. {{ note.page }}{% endif %} (weight {{ note.weight }}): “{{ note.quote }}”</li>
{% endfor %}</ol>
{% endif %}
</body>
</html>
"""

_environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _plain_paragraphs(text: str) -> Markup:
    """Text as escaped HTML paragraphs, its line breaks kept."""
    paragraphs = [part for part in re.split(r"\n\s*\n", text.strip()) if part.strip()]
    return Markup("\n").join(
        Markup("<p>{}</p>").format(Markup("<br>\n").join(escape(line) for line in part.splitlines()))
        for part in paragraphs
    )


def _markdown_renderer() -> Callable[[str], Markup]:
    """Markdown to HTML with markdown-it-py where installed, else escaped paragraphs.

    Raw HTML in an answer is escaped, never passed through: a model can repeat a
    book's `<script>`, and the export must not run it.
    """
    try:
        from markdown_it import MarkdownIt
    except ImportError:
        return _plain_paragraphs
    parser = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])
    return lambda text: Markup(parser.render(text))


def to_html(t: Transcript) -> str:
    notes = _notes(t)
    render_markdown = _markdown_renderer()
    turns = [
        {
            "role": message.role,
            "body": _plain_paragraphs(message.content) if message.role == "user" else render_markdown(message.content),
            "notes": notes.get(message.id, []),
        }
        for message in t.messages
    ]
    return _environment.from_string(_HTML_TEMPLATE).render(
        title=" ".join(t.title.split()),
        metadata=_metadata(t),
        turns=turns,
        notes=[note for message_notes in notes.values() for note in message_notes],
    )


# -- JSON -----------------------------------------------------------------------


def to_json(t: Transcript) -> str:
    document = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "title": t.title,
        "exported_at": t.exported_at,
        "model": t.model,
        "settings": t.settings,
        "corpus_hash": t.corpus_hash,
        "scope": t.scope,
        "messages": [
            {
                "role": message.role,
                "content": message.content,
                "created_at": message.created_at,
                "model": message.model,
                "stats": message.stats,
                "citations": [asdict(citation) for citation in message.citations],
            }
            for message in t.messages
        ],
    }
    return json.dumps(document, ensure_ascii=False, indent=2) + "\n"


# -- PDF ------------------------------------------------------------------------


def _ensure_gui_application() -> None:
    global _application
    from PySide6.QtGui import QGuiApplication

    existing = QGuiApplication.instance()
    if existing is not None:
        if not isinstance(existing, QGuiApplication):
            raise RuntimeError("PDF export needs a QGuiApplication, but a non-GUI QCoreApplication is running")
        return
    # No window is shown, so no display is needed: without a platform chosen by the
    # user, lay out offscreen (works headless, over SSH and in the CLI).
    # A QApplication, not a bare QGuiApplication: widgets made later in the same
    # process (the app, its tests) abort on a QGuiApplication.
    from PySide6.QtWidgets import QApplication

    arguments = ["quire-export"]
    if not os.environ.get("QT_QPA_PLATFORM"):
        arguments += ["-platform", "offscreen"]
    _application = QApplication(arguments)


def to_pdf(t: Transcript, path: Path) -> None:
    """The HTML transcript laid out by QTextDocument on A4 pages, written to `path`."""
    from PySide6.QtCore import QMarginsF
    from PySide6.QtGui import QPageLayout, QPageSize, QPdfWriter, QTextDocument

    _ensure_gui_application()
    path = Path(path)
    writer = QPdfWriter(str(path))
    writer.setPageSize(QPageSize(QPageSize.PageSizeId.A4))
    writer.setResolution(300)
    # No margins of our own: print_() gives a document without a page size 2 cm
    # margins and numbers its pages in the bottom one.
    writer.setPageMargins(QMarginsF(0, 0, 0, 0), QPageLayout.Unit.Millimeter)
    writer.setTitle(t.title)
    writer.setCreator("Quire")
    document = QTextDocument()
    document.setHtml(to_html(t))
    document.print_(writer)
    # The file is complete only once the writer is gone.
    del writer
    if not path.is_file() or path.stat().st_size == 0:
        raise OSError(f"Qt could not write the PDF {path}")


# -- files ----------------------------------------------------------------------

_TEXT_FORMATS: dict[str, Callable[[Transcript], str]] = {
    ".md": to_markdown,
    ".markdown": to_markdown,
    ".html": to_html,
    ".htm": to_html,
    ".json": to_json,
}


def export(t: Transcript, path: Path) -> None:
    """Write the transcript to `path` in the format its suffix names, atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        write_atomic(path, lambda temporary: to_pdf(t, temporary))
        _readable(path)
        return
    if suffix not in _TEXT_FORMATS:
        raise UnsupportedExportFormatError(
            f"cannot export to {path.name}: unknown file type {suffix or '(no suffix)'}; "
            f"choose one of {', '.join(EXPORT_SUFFIXES)}"
        )
    content = _TEXT_FORMATS[suffix](t).encode("utf-8")
    write_atomic(path, lambda temporary: temporary.write_bytes(content))
    _readable(path)


def _readable(path: Path) -> None:
    # The atomic write's temp file is private (0600); an exported transcript is a
    # document to share, so it gets the permissions a newly created file would.
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
