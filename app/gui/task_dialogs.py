"""What a whole-document task needs from the user before it runs: which chapter or
pages to summarise, the topic to compare on, the term to find. Dialogs only; the
window (app/gui/main.py) runs the task into the conversation."""

from __future__ import annotations

from PySide6.QtWidgets import QInputDialog, QWidget

from app.service import chapters
from engine.corpus.tasks import parse_pages
from ingest.library import DocumentRecord


def ask_options(parent: QWidget, task: str, records: list[DocumentRecord]) -> tuple[dict, str] | None:
    """(the task's options, the label saved as the user's turn), or None where the
    user cancelled. A selection the task cannot run on raises ValueError with what it needs."""
    if task == "summarise":
        if len(records) != 1:
            raise ValueError("select one document in the library to summarise")
        return _summarise(parent, records[0])
    if task == "compare":
        if len(records) < 2:
            raise ValueError("select two or more documents in the library to compare")
        topic, ok = QInputDialog.getText(parent, "Compare", "Compare the selected documents on:")
        if not ok or not topic.strip():
            return None
        titles = " and ".join(f"“{r.display_title}”" for r in records)
        return {"topic": topic.strip()}, f"Compare {titles} on {topic.strip()}"
    term, ok = QInputDialog.getText(parent, "Find all", "Find every sentence that mentions:")
    if not ok or not term.strip():
        return None
    return {"term": term.strip()}, f"Find all mentions of “{term.strip()}”"


def _summarise(parent: QWidget, record: DocumentRecord) -> tuple[dict, str] | None:
    title = record.display_title
    parts = chapters(record)
    pages: str | None = None
    where = ""
    if parts:
        whole, by_pages = "The whole document", "Pages…"
        names = [name for name, _, _ in parts]  # printed page labels may differ from the file's pages
        choice, ok = QInputDialog.getItem(parent, "Summarise", f"Summarise “{title}”:", [whole, *names, by_pages], 0, False)
        if not ok:
            return None
        if choice in names:
            name, first, last = parts[names.index(choice)]
            pages, where = f"{first}-{last}", f", {name}"
        elif choice == whole:
            pages = ""
    if pages is None:
        pages, ok = QInputDialog.getText(parent, "Summarise", f"Pages of “{title}”, counted from the file's first page "
                                         "(e.g. 3-10; empty: the whole document):")
        if not ok:
            return None
        where = f", pages {pages.strip()}" if pages.strip() else ""
    first_page, last_page = parse_pages(pages)
    return {"first_page": first_page, "last_page": last_page}, f"Summarise “{title}”{where}"
