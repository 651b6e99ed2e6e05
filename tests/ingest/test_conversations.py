"""Conversations in library.db: create, search, rename, delete cascades, citations
that outlive their book, reopening the file, and the m002 upgrade of an old library."""

from __future__ import annotations

import pytest

from ingest.conversations import DEFAULT_TITLE, Citation, Conversations
from ingest.document import Document, Page, assign_offsets
from ingest.errors import ConversationNotFound, LibraryError, MessageNotFound
from ingest.library import Library
from ingest.schema import MIGRATIONS, applied_migrations, m001_initial


@pytest.fixture
def library(tmp_path):
    with Library(tmp_path / "library.db") as opened:
        yield opened


@pytest.fixture
def conversations(library):
    return Conversations(library)


def add_book(library: Library, path: str, title: str | None, texts: list[str], labels: list[str], content_hash: str) -> int:
    pages = assign_offsets([Page(index=0, text=text, label=label) for text, label in zip(texts, labels)])
    document_id = library.begin_document(path=path, content_hash=content_hash, format="txt")
    library.store_document(document_id, Document(path=path, format="txt", pages=pages, title=title))
    return document_id


def citation(document_id: int | None, weight: float, quote: str, *, label: str = "12", index: int = 1) -> Citation:
    return Citation(
        document_id=document_id, title="Moby-Dick", page_index=index, page_label=label,
        start=100, end=100 + len(quote), weight=weight, quote=quote,
    )


def count(library: Library, table: str) -> int:
    return library.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_create_get_and_defaults(conversations):
    first = conversations.create()
    second = conversations.create("  Whales   and ships ", scope={"collection_ids": [3], "document_ids": None})
    assert first.title == DEFAULT_TITLE == "New conversation"
    assert first.scope is None and first.created_at == first.updated_at
    assert second.title == "Whales and ships"
    assert second.scope == {"collection_ids": [3], "document_ids": None}
    assert conversations.get(second.id) == second
    assert [c.id for c in conversations.list()] == [second.id, first.id]
    with pytest.raises(ConversationNotFound, match="no conversation with id 999"):
        conversations.get(999)
    assert issubclass(ConversationNotFound, LibraryError)
    with pytest.raises(ValueError, match="empty"):
        conversations.create("   ")


def test_search_by_title_and_by_message_text(conversations):
    whales = conversations.create("Whales")
    travel = conversations.create("Travel notes")
    untitled = conversations.create()
    conversations.add_message(travel.id, "user", "What did they eat in Zürich?")
    conversations.add_message(travel.id, "assistant", "Fondue, 100% of the time — naïve answer.")
    conversations.add_message(untitled.id, "user", "Who is Ahab?")

    def found(query: str | None) -> list[int]:
        return [c.id for c in conversations.list(query)]

    assert found("whale") == [whales.id]
    assert found("WHALES") == [whales.id]
    assert found("zürich") == [travel.id]
    assert found("ZÜRICH") == [travel.id]  # beyond ASCII case folding
    assert found("NAÏVE") == [travel.id]
    assert found("100%") == [travel.id]  # no LIKE wildcards
    assert found("10_%") == []
    assert found("ahab") == [untitled.id]
    assert found("new conv") == [untitled.id]  # the default title of an untitled one
    assert found("a") == [untitled.id, travel.id, whales.id]
    assert found("submarine") == []
    assert found("  ") == found(None) == [untitled.id, travel.id, whales.id]


def test_rename_and_set_scope_do_not_reorder(conversations):
    older = conversations.create("Older")
    newer = conversations.create("Newer")
    conversations.rename(older.id, "  Renamed\n title ")
    conversations.set_scope(older.id, {"document_ids": [1, 2]})
    renamed = conversations.get(older.id)
    assert (renamed.title, renamed.scope, renamed.updated_at) == ("Renamed title", {"document_ids": [1, 2]}, older.updated_at)
    assert [c.id for c in conversations.list()] == [newer.id, older.id]
    conversations.set_scope(older.id, None)
    assert conversations.get(older.id).scope is None
    with pytest.raises(ValueError):
        conversations.rename(older.id, " \t")
    assert conversations.get(older.id).title == "Renamed title"
    with pytest.raises(ConversationNotFound):
        conversations.rename(999, "x")
    with pytest.raises(ConversationNotFound):
        conversations.set_scope(999, None)


def test_messages_in_order_with_citations_by_weight(conversations, library):
    book = add_book(library, "moby.txt", "Moby-Dick", ["Call me Ishmael.", "The whale."], ["i", "12"], "h-moby")
    older = conversations.create("Older")
    chat = conversations.create("Chat")
    question = conversations.add_message(chat.id, "user", "Who narrates?")
    stats = {"ttft_s": 0.42, "tokens_per_second": 31.5, "settings": {"cache": "int8"}, "corpus_hash": "abc123"}
    answer = conversations.add_message(
        chat.id, "assistant", "**Ishmael** narrates.", model="SmolLM2-135M", stats=stats,
        citations=[citation(book, 0.2, "The whale."), citation(book, 0.7, "Call me Ishmael.", label="i", index=0)],
    )
    assert question.role == "user" and question.model is None and question.stats is None and question.citations == []
    assert answer.model == "SmolLM2-135M" and answer.stats == stats
    assert [(c.weight, c.page_label, c.quote) for c in answer.citations] == [(0.7, "i", "Call me Ishmael."), (0.2, "12", "The whale.")]

    # Answering bumps the conversation to the top of the list.
    conversations.add_message(older.id, "user", "First")
    assert [c.id for c in conversations.list()] == [older.id, chat.id]
    conversations.add_message(chat.id, "user", "Second question")
    assert [c.id for c in conversations.list()] == [chat.id, older.id]
    assert conversations.get(chat.id).updated_at > chat.updated_at

    messages = conversations.messages(chat.id)
    assert [(m.role, m.content) for m in messages] == [
        ("user", "Who narrates?"), ("assistant", "**Ishmael** narrates."), ("user", "Second question"),
    ]
    assert messages[1] == answer
    assert messages[1].citations[0] == Citation(
        document_id=book, title="Moby-Dick", page_index=0, page_label="i",
        start=100, end=100 + len("Call me Ishmael."), weight=0.7, quote="Call me Ishmael.",
    )
    with pytest.raises(ConversationNotFound):
        conversations.messages(999)


def test_invalid_messages_write_nothing(conversations, library):
    chat = conversations.create("Chat")
    with pytest.raises(ValueError, match="role"):
        conversations.add_message(chat.id, "system", "You are a pirate.")
    with pytest.raises(TypeError):
        conversations.add_message(chat.id, "assistant", "answer", stats={"not json": object()})
    with pytest.raises(ConversationNotFound):
        conversations.add_message(999, "user", "hello")
    assert count(library, "messages") == 0
    assert conversations.get(chat.id).updated_at == chat.updated_at


def test_delete_cascades_to_messages_and_evidence(conversations, library):
    book = add_book(library, "moby.txt", "Moby-Dick", ["Call me Ishmael."], ["1"], "h-moby")
    doomed = conversations.create("Doomed")
    kept = conversations.create("Kept")
    for conversation in (doomed, kept):
        conversations.add_message(conversation.id, "user", "Who?")
        conversations.add_message(conversation.id, "assistant", "Ishmael.", citations=[citation(book, 0.5, "Call me Ishmael.")] * 2)
    assert (count(library, "messages"), count(library, "evidence")) == (4, 4)

    conversations.delete(doomed.id)
    assert [c.id for c in conversations.list()] == [kept.id]
    assert (count(library, "messages"), count(library, "evidence")) == (2, 2)
    assert library.db.execute("SELECT COUNT(*) FROM messages WHERE conversation_id = ?", [doomed.id]).fetchone()[0] == 0
    assert len(conversations.messages(kept.id)[1].citations) == 2
    with pytest.raises(ConversationNotFound):
        conversations.delete(doomed.id)
    assert library.check() == []


def test_delete_message_for_regenerate(conversations, library):
    chat = conversations.create("Chat")
    conversations.add_message(chat.id, "user", "Who?")
    answer = conversations.add_message(chat.id, "assistant", "Ahab.", citations=[citation(None, 0.9, "Ahab")])
    conversations.delete_message(answer.id)
    assert [m.content for m in conversations.messages(chat.id)] == ["Who?"]
    assert count(library, "evidence") == 0
    with pytest.raises(MessageNotFound):
        conversations.delete_message(answer.id)
    regenerated = conversations.add_message(chat.id, "assistant", "Ishmael.")
    assert [(m.id, m.content) for m in conversations.messages(chat.id)][-1] == (regenerated.id, "Ishmael.")


def test_citations_survive_removal_of_their_document(conversations, library):
    book = add_book(library, "moby.txt", "Moby-Dick", ["Call me Ishmael.", "Thar she blows!"], ["i", "12"], "h-moby")
    other = add_book(library, "other.txt", "Other", ["Unrelated."], ["1"], "h-other")
    chat = conversations.create("Chat")
    conversations.add_message(
        chat.id, "assistant", "She blows.",
        citations=[citation(book, 0.6, "Thar she blows!"), citation(other, 0.1, "Unrelated.", label="1", index=0)],
    )
    library.remove(book)
    # Removed before the answer was saved: stored unlinked rather than failing.
    conversations.add_message(chat.id, "assistant", "Again.", citations=[citation(book, 0.3, "Thar she blows!")])

    first, second = conversations.messages(chat.id)
    assert first.citations == [
        Citation(None, "Moby-Dick", 1, "12", 100, 115, 0.6, "Thar she blows!"),
        Citation(other, "Moby-Dick", 0, "1", 100, 110, 0.1, "Unrelated."),
    ]
    assert second.citations == [Citation(None, "Moby-Dick", 1, "12", 100, 115, 0.3, "Thar she blows!")]
    assert library.check() == []


def test_reopening_the_file_finds_everything(tmp_path):
    path = tmp_path / "library.db"
    with Library(path) as library:
        book = add_book(library, "moby.txt", "Moby-Dick", ["Call me Ishmael."], ["1"], "h-moby")
        conversations = Conversations(library)
        chat = conversations.create("Persisted", scope={"document_ids": [book]})
        conversations.add_message(chat.id, "user", "Who narrates?")
        conversations.add_message(chat.id, "assistant", "Ishmael.", model="m", stats={"tok_s": 12.5},
                                  citations=[citation(book, 0.75, "Call me Ishmael.", label="1", index=0)])
        before = (conversations.list(), conversations.messages(chat.id))
    with Library(path) as reopened:
        conversations = Conversations(reopened)
        assert (conversations.list(), conversations.messages(chat.id)) == before
        assert conversations.list("ishmael")[0].scope == {"document_ids": [book]}
        assert conversations.messages(chat.id)[1].citations[0].quote == "Call me Ishmael."


def test_m002_upgrades_a_library_created_with_m001_only(tmp_path):
    path = tmp_path / "library.db"
    with Library(path, migrations=[m001_initial]) as old:
        assert "title" not in old.db["evidence"].columns_dict
        book = add_book(old, "/books/moby-dick.txt", None, ["Call me Ishmael.", "The whale."], ["i", "12"], "h-moby")
        gone = add_book(old, "gone.txt", "Gone", ["Lost text."], ["7"], "h-gone")
        old.db["conversations"].insert({"id": 1, "title": "Old chat", "created_at": "2024-01-01T00:00:00+00:00",
                                        "updated_at": "2024-01-01T00:00:00+00:00", "scope_json": None})
        old.db["messages"].insert({"id": 1, "conversation_id": 1, "role": "assistant", "content": "Ishmael.",
                                   "created_at": "2024-01-01T00:00:00+00:00", "model": None, "stats_json": None})
        old.db["evidence"].insert_all([
            {"message_id": 1, "document_id": book, "page_index": 1, "start": 18, "end": 28, "weight": 0.8, "quote": "The whale."},
            {"message_id": 1, "document_id": gone, "page_index": 0, "start": 0, "end": 10, "weight": 0.1, "quote": "Lost text."},
        ])
        old.remove(gone)

    with Library(path) as upgraded:
        assert upgraded.applied_migrations == ["m002_evidence_citation", "m003_watched_folders", "m004_ocr_words"]
        assert applied_migrations(upgraded.db) == [m.__name__ for m in MIGRATIONS]
        assert {"title", "page_label"} <= set(upgraded.db["evidence"].columns_dict)
        conversations = Conversations(upgraded)
        assert [c.title for c in conversations.list()] == ["Old chat"]
        [message] = conversations.messages(1)
        # Backfilled from the document (untitled: its file name) and its page label;
        # the row whose book was removed before the upgrade has nothing to name it.
        assert message.citations == [
            Citation(book, "moby-dick.txt", 1, "12", 18, 28, 0.8, "The whale."),
            Citation(None, "", 0, None, 0, 10, 0.1, "Lost text."),
        ]
        upgraded.remove(book)
        assert conversations.messages(1)[0].citations[0] == Citation(None, "moby-dick.txt", 1, "12", 18, 28, 0.8, "The whale.")
        assert upgraded.check() == []
