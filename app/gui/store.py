"""The GUI thread's view of library.db: the quick reads and small writes the window
needs (document list, collections, conversations, the text around a passage).
Widgets go through this object, never SQLite; slow work (reading files, removing
a document's cache) belongs to the workers. SQLite's WAL lets this connection read
while a worker writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.gui.viewer import Passage
from engine.corpus.answer import Turn

from ingest.conversations import Citation, Conversation, Conversations, Message
from ingest.document import Page
from ingest.library import Collection, DocumentRecord, Library


@dataclass(frozen=True)
class Scope:
    """What a question is asked over: every ready document, a collection, or a list."""

    kind: str = "all"  # "all" | "collection" | "documents"
    collection_id: int | None = None
    document_ids: tuple[int, ...] = ()
    label: str = "All documents"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "collection_id": self.collection_id, "document_ids": list(self.document_ids), "label": self.label}

    @classmethod
    def from_dict(cls, value: dict | None) -> Scope:
        if not value:
            return cls()
        return cls(
            str(value.get("kind", "all")),
            value.get("collection_id"),
            tuple(int(i) for i in value.get("document_ids") or ()),
            str(value.get("label", "All documents")),
        )


def turns(messages: list[Message]) -> list[Turn]:
    """A conversation's saved messages as the engine's turns: each question with the
    answer that followed it (a question left unanswered, by an error, is dropped)."""
    found = []
    for message, after in zip(messages, messages[1:]):
        if message.role == "user" and after.role == "assistant" and after.content.strip():
            found.append(Turn(message.content, after.content))
    return found


class LibraryStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.library = Library(path)
        self.conversations = Conversations(self.library)

    def close(self) -> None:
        self.library.close()

    # -- documents ---------------------------------------------------------------

    def documents(self) -> list[DocumentRecord]:
        return self.library.documents()

    def document(self, document_id: int) -> DocumentRecord | None:
        try:
            return self.library.get(document_id)
        except Exception:  # noqa: BLE001 — removed meanwhile
            return None

    def collections(self) -> list[Collection]:
        return self.library.collections()

    def create_collection(self, name: str) -> int:
        return self.library.create_collection(name)

    def add_to_collection(self, collection_id: int, document_ids: list[int]) -> None:
        self.library.add_to_collection(collection_id, document_ids)

    def delete_collection(self, collection_id: int) -> None:
        self.library.delete_collection(collection_id)

    def scope_document_ids(self, scope: Scope) -> list[int] | None:
        """The document ids a scope means now (None = every ready document)."""
        if scope.kind == "collection":
            for collection in self.collections():
                if collection.id == scope.collection_id:
                    return list(collection.document_ids)
            return []
        if scope.kind == "documents":
            return list(scope.document_ids)
        return None

    def passage(self, citation: Citation) -> Passage | None:
        """What the source viewer needs to show a citation: file, page, offsets in the page."""
        if citation.document_id is None:
            return None
        record = self.document(citation.document_id)
        if record is None:
            return None
        pages = self.library.pages(record.id)
        if not pages:
            return None
        # The page the answer cited, where the passage spans several (engine:
        # the page holding most of the question's words); else where it starts.
        by_index = {p.index: p for p in pages}
        page = by_index.get(citation.page_index) if citation.page_index is not None else None
        if page is None:
            page = pages[0]
            for candidate in pages:
                if candidate.start <= citation.start:
                    page = candidate
        start = max(0, citation.start - page.start)
        end = max(start, min(len(page.text), citation.end - page.start))
        return self.page_passage(record, page, start, end)

    def page_passage(self, record: DocumentRecord, page: Page, start: int, end: int) -> Passage:
        """What the viewer shows of `page`: the span [start, end) of its text, and a
        scanned page's OCR word boxes to highlight it with."""
        return Passage(
            path=record.path,
            format=record.format or "txt",
            title=record.display_title,
            page_index=page.index,
            page_label=page.label or str(page.index + 1),
            page_text=page.text,
            start=start,
            end=end,
            ocr_words=tuple(self.library.ocr_words(record.id, page.index)),
        )

    # -- conversations -----------------------------------------------------------

    def conversation_list(self, query: str | None = None) -> list[Conversation]:
        return self.conversations.list(query or None)

    def new_conversation(self, title: str, scope: Scope) -> Conversation:
        return self.conversations.create(title, scope.to_dict())

    def messages(self, conversation_id: int) -> list[Message]:
        return self.conversations.messages(conversation_id)
