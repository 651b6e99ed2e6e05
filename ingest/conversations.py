"""Conversations with the library, kept in library.db: questions, answers, evidence.

`Conversations(library)` stores what the app's chat shows and reopens: each
conversation (title, the documents it was scoped to), its messages in order (an
assistant message carries the model that wrote it and its statistics: TTFT, tok/s,
settings, corpus hash) and, per answer, the passages it cited (`Citation`).

Tables `conversations`, `messages` and `evidence` come from `ingest.schema`. A
citation keeps its book title, page label and quote in its own row, so removing a
book from the library leaves past answers readable: only `document_id` becomes
NULL (ON DELETE SET NULL). Deleting a conversation takes its messages and their
evidence with it (ON DELETE CASCADE). Each write is one transaction.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from ingest.errors import ConversationNotFound, MessageNotFound
from ingest.library import Library

logger = logging.getLogger(__name__)

DEFAULT_TITLE = "New conversation"
ROLES = ("user", "assistant")


@dataclass
class Citation:
    """One evidence passage attached to an answer."""

    document_id: int | None  # None once the document has left the library
    title: str
    page_index: int | None
    page_label: str | None
    start: int  # character offsets in the document's full text (Document.text)
    end: int
    weight: float  # the passage's share of the chosen passages' BM25 scores
    quote: str


@dataclass
class Message:
    id: int
    conversation_id: int
    role: str  # "user" | "assistant"
    content: str
    created_at: str
    model: str | None
    stats: dict | None  # decoded stats_json: TTFT, tok/s, settings, corpus hash...
    citations: list[Citation]


@dataclass
class Conversation:
    id: int
    title: str
    created_at: str
    updated_at: str
    scope: dict | None  # which documents or collections the questions were asked over


def _now() -> str:
    # Microseconds, unlike ingest.schema.utc_now: the conversation list is ordered by
    # updated_at and two answers often land within the same second. ISO strings of
    # both precisions still sort correctly against each other.
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _fold(text: str | None) -> str | None:
    """`text` for case-insensitive matching of any script (SQLite's LIKE and lower()
    fold ASCII only, so "ZÜRICH" would not find "Zürich")."""
    return None if text is None else unicodedata.normalize("NFC", text).casefold()


def _clean_title(title: str) -> str:
    cleaned = " ".join(title.split())
    if not cleaned:
        raise ValueError("a conversation title cannot be empty")
    return cleaned


def _dumps(value: dict | None) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _loads(text: str | None) -> dict | None:
    return None if text is None else json.loads(text)


class Conversations:
    """The conversations stored in a library's database.

    Uses the library's connection, so it belongs to the same thread (the app's
    worker) as the `Library` it is given.
    """

    def __init__(self, library: Library) -> None:
        self.library = library
        self.db = library.db
        self.db.register_function(_fold, deterministic=True, name="quire_fold")

    # -- conversations ---------------------------------------------------------

    def create(self, title: str | None = None, scope: dict | None = None) -> Conversation:
        now = _now()
        row = {
            "title": DEFAULT_TITLE if title is None else _clean_title(title),
            "created_at": now,
            "updated_at": now,
            "scope_json": _dumps(scope),
        }
        return self.get(int(self.db["conversations"].insert(row).last_pk))

    def list(self, query: str | None = None) -> list[Conversation]:
        """Every conversation, the most recently active first; with `query`, only
        those whose title or any message contains it (case-insensitive)."""
        where, params = "", []
        if query is not None and query.strip():
            needle = _fold(query.strip())
            where = (
                "WHERE instr(quire_fold(COALESCE(c.title, ?)), ?) > 0 OR EXISTS ("
                "SELECT 1 FROM messages m WHERE m.conversation_id = c.id AND instr(quire_fold(m.content), ?) > 0)"
            )
            params = [DEFAULT_TITLE, needle, needle]
        rows = self.db.query(f"SELECT c.* FROM conversations c {where} ORDER BY c.updated_at DESC, c.id DESC", params)
        return [self._conversation(row) for row in rows]

    def get(self, conversation_id: int) -> Conversation:
        rows = list(self.db.query("SELECT * FROM conversations WHERE id = ?", [conversation_id]))
        if not rows:
            raise ConversationNotFound(f"no conversation with id {conversation_id} in the library")
        return self._conversation(rows[0])

    def rename(self, conversation_id: int, title: str) -> None:
        # Renaming is not activity: it leaves the conversation where it is in the list.
        self._update(conversation_id, {"title": _clean_title(title)})

    def set_scope(self, conversation_id: int, scope: dict | None) -> None:
        self._update(conversation_id, {"scope_json": _dumps(scope)})

    def delete(self, conversation_id: int) -> None:
        """Delete a conversation; its messages and their evidence go by ON DELETE CASCADE."""
        with self.db.atomic():
            self.get(conversation_id)
            self.db.execute("DELETE FROM conversations WHERE id = ?", [conversation_id])

    def _update(self, conversation_id: int, values: dict[str, object]) -> None:
        with self.db.atomic():
            self.get(conversation_id)
            self.db["conversations"].update(conversation_id, values)

    # -- messages --------------------------------------------------------------

    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        *,
        model: str | None = None,
        stats: dict | None = None,
        citations: Iterable[Citation] = (),
    ) -> Message:
        """Append a message with its citations in one transaction, and mark the
        conversation as just updated. `stats` must be JSON-serialisable."""
        if role not in ROLES:
            raise ValueError(f"a message's role is one of {', '.join(ROLES)}, not {role!r}")
        citations = list(citations)
        stats_json = _dumps(stats)  # a TypeError here, before anything is written
        now = _now()
        with self.db.atomic():
            self.get(conversation_id)
            message_id = int(self.db["messages"].insert({
                "conversation_id": conversation_id,
                "role": role,
                "content": content,
                "created_at": now,
                "model": model,
                "stats_json": stats_json,
            }).last_pk)
            present = self._existing_documents({c.document_id for c in citations if c.document_id is not None})
            self.db["evidence"].insert_all(
                (
                    {
                        "message_id": message_id,
                        # A book removed while the answer was generated: keep the
                        # citation (it names itself), drop only the dangling link.
                        "document_id": citation.document_id if citation.document_id in present else None,
                        "title": citation.title,
                        "page_index": citation.page_index,
                        "page_label": citation.page_label,
                        "start": citation.start,
                        "end": citation.end,
                        "weight": citation.weight,
                        "quote": citation.quote,
                    }
                    for citation in citations
                ),
                batch_size=200,
            )
            self.db["conversations"].update(conversation_id, {"updated_at": now})
        return self._messages("m.id = ?", [message_id])[0]

    def messages(self, conversation_id: int) -> list[Message]:
        """The conversation's messages in the order they were added, each with its
        citations, the heaviest first."""
        self.get(conversation_id)
        return self._messages("m.conversation_id = ?", [conversation_id])

    def delete_message(self, message_id: int) -> None:
        """Delete one message and its evidence (Regenerate drops the last answer)."""
        with self.db.atomic():
            if not list(self.db.query("SELECT id FROM messages WHERE id = ?", [message_id])):
                raise MessageNotFound(f"no message with id {message_id} in the library")
            self.db.execute("DELETE FROM messages WHERE id = ?", [message_id])

    # -- rows to dataclasses ---------------------------------------------------

    def _existing_documents(self, document_ids: set[int]) -> set[int]:
        if not document_ids:
            return set()
        ids = sorted(document_ids)
        rows = self.db.query(f"SELECT id FROM documents WHERE id IN ({', '.join('?' * len(ids))})", ids)
        found = {row["id"] for row in rows}
        if found != document_ids:
            logger.info("citations of removed documents %s are kept without a link", sorted(document_ids - found))
        return found

    def _messages(self, where: str, params: list[object]) -> list[Message]:
        messages = [
            Message(
                id=row["id"],
                conversation_id=row["conversation_id"],
                role=row["role"],
                content=row["content"],
                created_at=row["created_at"],
                model=row["model"],
                stats=_loads(row["stats_json"]),
                citations=[],
            )
            for row in self.db.query(f"SELECT m.* FROM messages m WHERE {where} ORDER BY m.id", params)
        ]
        by_id = {message.id: message for message in messages}
        evidence = self.db.query(
            f'SELECT e.* FROM evidence e JOIN messages m ON m.id = e.message_id WHERE {where} '
            "ORDER BY e.message_id, e.weight DESC, e.id",
            params,
        )
        for row in evidence:
            by_id[row["message_id"]].citations.append(Citation(
                document_id=row["document_id"],
                # Rows from before m002 whose book was already gone name nothing.
                title=row["title"] or "",
                page_index=row["page_index"],
                page_label=row["page_label"],
                start=row["start"] or 0,
                end=row["end"] or 0,
                weight=row["weight"] or 0.0,
                quote=row["quote"] or "",
            ))
        return messages

    @staticmethod
    def _conversation(row: dict) -> Conversation:
        return Conversation(
            id=row["id"],
            title=row["title"] or DEFAULT_TITLE,
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            scope=_loads(row["scope_json"]),
        )
