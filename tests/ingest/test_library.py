"""The library database: location, schema migrations, pages and full-text search,
removal cascades, collections and the consistency check."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlite_utils

from ingest.document import Document, ExtractionReport, OutlineEntry, Page, assign_offsets
from ingest.errors import DocumentNotFoundError, LibraryError
from ingest.library import Library
from ingest.schema import MIGRATIONS, applied_migrations


@pytest.fixture
def library(tmp_path, monkeypatch):
    monkeypatch.setenv("QUIRE_HOME", str(tmp_path / "home"))
    with Library() as opened:
        yield opened


def make_document(path: str, *texts: str, title: str | None = None, labels: list[str] | None = None) -> Document:
    pages = [Page(index=0, text=text, label=(labels[number] if labels else None)) for number, text in enumerate(texts)]
    return Document(
        path=path, format="txt", pages=assign_offsets(pages), title=title, author="Herman Melville",
        outline=[OutlineEntry(title="Loomings", page_index=0)],
        report=ExtractionReport(pages=len(texts), characters=sum(map(len, texts)), needs_ocr=[1], warnings=["odd font"]),
    )


def add(library: Library, path: str, *texts: str, content_hash: str, **kwargs) -> int:
    document_id = library.begin_document(path=path, content_hash=content_hash, format="txt")
    library.store_document(document_id, make_document(path, *texts, **kwargs), tokens=123)
    return document_id


def test_default_location_wal_and_foreign_keys(library, tmp_path):
    assert library.path == tmp_path / "home" / "library.db"
    assert library.path.is_file()
    assert library.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert library.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    tables = set(library.db.table_names())
    assert {"documents", "pages", "pages_fts", "collections", "collection_documents",
            "conversations", "messages", "evidence", "migrations"} <= tables
    assert library.applied_migrations == [m.__name__ for m in MIGRATIONS]


def test_second_open_applies_nothing_and_appended_migration_runs_once(tmp_path):
    path = tmp_path / "library.db"
    with Library(path) as first:
        assert first.applied_migrations == [m.__name__ for m in MIGRATIONS]
        add(first, "a.txt", "kept across migrations", content_hash="h1")
    with Library(path) as second:
        assert second.applied_migrations == []

    calls: list[str] = []

    def m999_document_notes(db: sqlite_utils.Database) -> None:
        calls.append("ran")
        db.execute("ALTER TABLE documents ADD COLUMN notes TEXT")

    migrations = [*MIGRATIONS, m999_document_notes]
    with Library(path, migrations=migrations) as third:
        assert third.applied_migrations == ["m999_document_notes"]
        assert "notes" in third.db["documents"].columns_dict
        assert third.get(1).title is None and third.search("kept")[0].document_id == 1
    with Library(path, migrations=migrations) as fourth:
        assert fourth.applied_migrations == []
        assert applied_migrations(fourth.db) == [*(m.__name__ for m in MIGRATIONS), "m999_document_notes"]
    assert calls == ["ran"]

    # Older code opening a library a newer Quire migrated must refuse, not write.
    with pytest.raises(LibraryError, match="m999_document_notes"):
        Library(path)


def test_failing_migration_leaves_the_schema_as_it_was(tmp_path):
    path = tmp_path / "library.db"
    Library(path).close()

    def m002_broken(db: sqlite_utils.Database) -> None:
        db.execute("CREATE TABLE half_done (x)")
        db.execute("THIS IS NOT SQL")

    with pytest.raises(LibraryError):
        Library(path, migrations=[*MIGRATIONS, m002_broken])
    with Library(path) as reopened:
        assert "half_done" not in reopened.db.table_names()
        assert applied_migrations(reopened.db) == [m.__name__ for m in MIGRATIONS]


def test_not_a_database_is_a_library_error(tmp_path):
    bogus = tmp_path / "library.db"
    bogus.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LibraryError, match="not a usable library database"):
        Library(bogus)


def test_store_document_rows_and_metadata(library):
    document_id = add(
        library, "moby.txt", "Call me Ishmael.", "Some years ago, never mind how long.",
        content_hash="abc", title="Moby-Dick", labels=["i", "1"],
    )
    record = library.get(document_id)
    assert (record.status, record.title, record.author, record.pages, record.tokens) == ("ready", "Moby-Dick", "Herman Melville", 2, 123)
    assert record.characters == len("Call me Ishmael.") + len("Some years ago, never mind how long.")
    assert record.path == str(Path("moby.txt").resolve())
    assert record.report.needs_ocr == [1] and record.report.warnings == ["odd font"]
    assert record.outline == [OutlineEntry(title="Loomings", page_index=0, level=0)]
    pages = library.pages(document_id)
    assert [(p.index, p.label, p.start, p.end, p.text) for p in pages] == [
        (0, "i", 0, 16, "Call me Ishmael."),
        (1, "1", 18, 18 + 36, "Some years ago, never mind how long."),
    ]
    assert library.find_by_hash("abc").id == document_id
    assert library.find_by_path("moby.txt").id == document_id
    assert library.check() == []


def test_search_marks_the_phrase_and_finds_its_page(library):
    first = add(library, "a.txt", "nothing here", "the white whale swam past the Pequod", content_hash="h1", title="Moby")
    second = add(library, "b.txt", "A whale, white as snow; Café society.", content_hash="h2", title="Other", labels=["7"])

    hits = library.search('"white whale"')  # quoted: the words in this order
    assert [(hit.document_id, hit.title, hit.page_index, hit.page_label) for hit in hits] == [(first, "Moby", 1, None)]
    assert hits[0].snippet == "the [white whale] swam past the Pequod"
    # Unquoted: every word, anywhere on the page.
    assert {hit.document_id for hit in library.search("white whale")} == {first, second}
    assert [hit.document_id for hit in library.search("whale snow")] == [second]
    assert [hit.document_id for hit in library.search('snow "white whale"')] == []

    # Case and accents are ignored; marks are configurable.
    hits = library.search("CAFE", mark=("<b>", "</b>"))
    assert [(hit.document_id, hit.page_label, hit.snippet) for hit in hits] == [(second, "7", "A whale, white as snow; <b>Café</b> society.")]

    # Query syntax in user input is searched for, not parsed.
    assert library.search('whale" OR "nothing') == []
    assert [hit.document_id for hit in library.search("whale", limit=5)] and len(library.search("whale", limit=1)) == 1
    assert [hit.document_id for hit in library.search("whale", document_ids=[second])] == [second]
    with pytest.raises(LibraryError, match="empty"):
        library.search("   ")


def test_unfinished_documents_are_not_searchable(library):
    ready = add(library, "a.txt", "albatross", content_hash="h1")
    pending = library.begin_document(path="b.txt", content_hash="h2")
    assert library.get(pending).status == "ingesting"
    assert [record.id for record in library.unfinished()] == [pending]
    assert [hit.document_id for hit in library.search("albatross")] == [ready]


def test_remove_cascades_and_notifies(library):
    removed_calls: list[tuple[int, str | None]] = []
    library.on_remove(lambda document_id, content_hash: removed_calls.append((document_id, content_hash)))
    library.on_remove(lambda document_id, content_hash: 1 / 0)  # a failing listener must not stop the rest
    keep = add(library, "keep.txt", "harpoon in the other book", content_hash="keep")
    gone = add(library, "gone.txt", "harpoon page one", "harpoon page two", content_hash="gone")
    collection = library.create_collection("Whaling")
    library.add_to_collection(collection, [keep, gone])

    conversation = library.db["conversations"].insert(
        {"title": "q", "created_at": "t", "updated_at": "t", "scope_json": "{}"}).last_pk
    message = library.db["messages"].insert(
        {"conversation_id": conversation, "role": "assistant", "content": "a", "created_at": "t"}).last_pk
    library.db["evidence"].insert(
        {"message_id": message, "document_id": gone, "page_index": 1, "start": 0, "end": 7, "weight": 0.5, "quote": "harpoon"})

    assert {hit.document_id for hit in library.search("harpoon")} == {keep, gone}
    record = library.remove(gone)

    assert record.id == gone and removed_calls == [(gone, "gone")]
    assert [hit.document_id for hit in library.search("harpoon")] == [keep]
    assert library.db.execute("SELECT COUNT(*) FROM pages WHERE document_id = ?", [gone]).fetchone()[0] == 0
    # The FTS index itself lost the rows (not only the join): its docsize table counts them.
    assert library.db.execute("SELECT COUNT(*) FROM pages_fts_docsize").fetchone()[0] == 1
    assert library.collections()[0].document_ids == [keep]
    evidence = list(library.db.query("SELECT document_id, quote FROM evidence"))
    assert evidence == [{"document_id": None, "quote": "harpoon"}]
    assert library.check() == []
    with pytest.raises(DocumentNotFoundError, match=f"no document with id {gone}"):
        library.get(gone)
    with pytest.raises(DocumentNotFoundError):
        library.remove(gone)


def test_collections(library):
    first = add(library, "a.txt", "one", content_hash="h1")
    second = add(library, "b.txt", "two", content_hash="h2")
    whaling = library.create_collection("Whaling")
    library.create_collection("Empty")
    library.add_to_collection(whaling, [first, second, first])
    library.remove_from_collection(whaling, [first])
    assert [(c.name, c.document_ids) for c in library.collections()] == [("Empty", []), ("Whaling", [second])]
    with pytest.raises(LibraryError, match="already exists"):
        library.create_collection("Whaling")
    with pytest.raises(LibraryError, match="unknown collection or document"):
        library.add_to_collection(whaling, [999])
    library.delete_collection(whaling)
    assert [c.name for c in library.collections()] == ["Empty"]
    assert library.db.execute("SELECT COUNT(*) FROM collection_documents").fetchone()[0] == 0


def test_failed_and_pending_drop_pages(library):
    document_id = add(library, "a.txt", "text", content_hash="h1")
    library.mark_failed(document_id, "bad\nthing   happened")
    record = library.get(document_id)
    assert (record.status, record.error, record.pages) == ("failed", "bad thing happened", 0)
    assert library.pages(document_id) == [] and library.check() == []


def test_check_reports_a_broken_invariant(library):
    document_id = library.begin_document(path="a.txt", content_hash="h1")
    # Bypass the API: a page for a document that is not ready breaks the invariant.
    library.db["pages"].insert({"document_id": document_id, "page_index": 0, "start": 0, "end": 1, "text": "x"})
    assert library.check() == [f"document {document_id} is 'ingesting' but has 1 pages"]
    with pytest.raises(sqlite3.IntegrityError):
        library.db["pages"].insert({"document_id": 999, "page_index": 0, "start": 0, "end": 1, "text": "x"})
