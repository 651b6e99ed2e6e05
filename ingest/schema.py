"""The library database schema as append-only migrations.

Each migration is a named function `mNNN_what(db)` appended to `MIGRATIONS`; it runs
once, in its own transaction together with its row in the `migrations` table, so a
crash mid-migration leaves the previous schema intact. Never edit or reorder a
migration that has shipped: a user's library.db records which ones it has, and the
schema it holds is the result of exactly that sequence. Change the schema by
appending a new function.

Page text is indexed with SQLite FTS5 (https://sqlite.org/fts5.html) as an
*external-content* table over `pages`: the text is stored once (a library of
millions of tokens would otherwise hold it twice) and triggers keep the index in
step with every insert, update and delete, including the deletes a foreign-key
cascade performs when a document is removed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import PurePath

import sqlite_utils

from ingest.errors import LibraryError

logger = logging.getLogger(__name__)

Migration = Callable[[sqlite_utils.Database], None]

DOCUMENT_STATUSES = ("pending", "ingesting", "ready", "failed")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _run(db: sqlite_utils.Database, statements: Sequence[str]) -> None:
    # One execute per statement: executescript() would commit the open transaction.
    for statement in statements:
        db.execute(statement)


def m001_initial(db: sqlite_utils.Database) -> None:
    statuses = ", ".join(f"'{status}'" for status in DOCUMENT_STATUSES)
    _run(db, [
        # content_hash is NULL only for a file that failed before it could be read.
        f"""CREATE TABLE documents (
            id INTEGER PRIMARY KEY,
            content_hash TEXT UNIQUE,
            path TEXT NOT NULL,
            format TEXT,
            title TEXT,
            author TEXT,
            date TEXT,
            pages INTEGER NOT NULL DEFAULT 0,
            characters INTEGER NOT NULL DEFAULT 0,
            tokens INTEGER,
            status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ({statuses})),
            error TEXT,
            added_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            file_size INTEGER,
            file_mtime REAL,
            report_json TEXT,
            outline_json TEXT
        )""",
        "CREATE INDEX documents_path ON documents(path)",
        "CREATE INDEX documents_status ON documents(status)",
        """CREATE TABLE pages (
            id INTEGER PRIMARY KEY,
            document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
            page_index INTEGER NOT NULL,
            label TEXT,
            title TEXT,
            start INTEGER NOT NULL,
            "end" INTEGER NOT NULL,
            text TEXT NOT NULL,
            UNIQUE (document_id, page_index)
        )""",
        """CREATE VIRTUAL TABLE pages_fts USING fts5(
            text, document_id UNINDEXED, page_index UNINDEXED,
            content='pages', content_rowid='id',
            tokenize='unicode61 remove_diacritics 2'
        )""",
        """CREATE TRIGGER pages_fts_insert AFTER INSERT ON pages BEGIN
            INSERT INTO pages_fts(rowid, text, document_id, page_index)
            VALUES (new.id, new.text, new.document_id, new.page_index);
        END""",
        """CREATE TRIGGER pages_fts_delete AFTER DELETE ON pages BEGIN
            INSERT INTO pages_fts(pages_fts, rowid, text, document_id, page_index)
            VALUES ('delete', old.id, old.text, old.document_id, old.page_index);
        END""",
        """CREATE TRIGGER pages_fts_update AFTER UPDATE ON pages BEGIN
            INSERT INTO pages_fts(pages_fts, rowid, text, document_id, page_index)
            VALUES ('delete', old.id, old.text, old.document_id, old.page_index);
            INSERT INTO pages_fts(rowid, text, document_id, page_index)
            VALUES (new.id, new.text, new.document_id, new.page_index);
        END""",
        """CREATE TABLE collections (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL
        )""",
        """CREATE TABLE collection_documents (
            collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
            document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
            added_at TEXT NOT NULL,
            PRIMARY KEY (collection_id, document_id)
        )""",
        "CREATE INDEX collection_documents_document ON collection_documents(document_id)",
        """CREATE TABLE conversations (
            id INTEGER PRIMARY KEY,
            title TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            scope_json TEXT
        )""",
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            created_at TEXT NOT NULL,
            model TEXT,
            stats_json TEXT
        )""",
        "CREATE INDEX messages_conversation ON messages(conversation_id)",
        # Removing a book must not erase what a past answer quoted from it: the
        # evidence row keeps its quote and loses only the link (SET NULL).
        """CREATE TABLE evidence (
            id INTEGER PRIMARY KEY,
            message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            document_id INTEGER REFERENCES documents(id) ON DELETE SET NULL,
            page_index INTEGER,
            start INTEGER,
            "end" INTEGER,
            weight REAL,
            quote TEXT
        )""",
        "CREATE INDEX evidence_message ON evidence(message_id)",
        "CREATE INDEX evidence_document ON evidence(document_id)",
    ])


def m002_evidence_citation(db: sqlite_utils.Database) -> None:
    # A citation names its book and page itself, so it still reads "Moby-Dick, p. 12"
    # after the book is removed and document_id has become NULL.
    _run(db, [
        "ALTER TABLE evidence ADD COLUMN title TEXT",
        "ALTER TABLE evidence ADD COLUMN page_label TEXT",
    ])
    # Evidence written before this migration takes the names its documents have now;
    # rows whose document is already gone have nothing left to name them by.
    rows = list(db.query(
        "SELECT e.id, d.title, d.path, p.label FROM evidence e "
        "JOIN documents d ON d.id = e.document_id "
        "LEFT JOIN pages p ON p.document_id = e.document_id AND p.page_index = e.page_index"
    ))
    for row in rows:
        db.execute(
            "UPDATE evidence SET title = ?, page_label = ? WHERE id = ?",
            [row["title"] or PurePath(row["path"]).name, row["label"], row["id"]],
        )


def m003_watched_folders(db: sqlite_utils.Database) -> None:
    # Folders whose new and changed files come in by themselves (ingest/watch.py). A
    # document whose file has gone is marked missing, not removed: its text, cache
    # and citations stay until the user removes it.
    _run(db, [
        "CREATE TABLE watched_folders (path TEXT PRIMARY KEY, added_at TEXT NOT NULL)",
        "ALTER TABLE documents ADD COLUMN missing_since TEXT",
    ])


def m004_ocr_words(db: sqlite_utils.Database) -> None:
    # Where OCR found each word of a scanned page (JSON [[word, left, top, right,
    # bottom], …] in points), so the viewer can highlight a passage on the scan. Kept
    # apart from `pages`: only OCR'd pages have them, and they are read one page at a time.
    _run(db, [
        """CREATE TABLE ocr_words (
            document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
            page_index INTEGER NOT NULL,
            words_json TEXT NOT NULL,
            PRIMARY KEY (document_id, page_index)
        )""",
    ])


# Append only. See the module docstring.
MIGRATIONS: list[Migration] = [m001_initial, m002_evidence_citation, m003_watched_folders, m004_ocr_words]


def applied_migrations(db: sqlite_utils.Database) -> list[str]:
    """Names of the migrations this database has, in the order they ran."""
    if not db["migrations"].exists():
        return []
    return [row["name"] for row in db.query("SELECT name FROM migrations ORDER BY id")]


def apply_migrations(db: sqlite_utils.Database, migrations: Sequence[Migration] = MIGRATIONS) -> list[str]:
    """Run the migrations `db` does not have yet, in order; return their names.

    Raises LibraryError when the database records migrations this code does not
    know, or in another order: it was written by a newer (or different) Quire, and
    writing to it could corrupt it.
    """
    db.execute(
        "CREATE TABLE IF NOT EXISTS migrations ("
        "id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, applied_at TEXT NOT NULL)"
    )
    names = [migration.__name__ for migration in migrations]
    if len(set(names)) != len(names):
        raise LibraryError(f"duplicate migration names in {names}")
    done = applied_migrations(db)
    if done != names[: len(done)]:
        unknown = [name for name in done if name not in names]
        detail = f"unknown migrations {unknown}" if unknown else f"migrations applied in another order: {done}"
        raise LibraryError(f"{db.conn.execute('PRAGMA database_list').fetchone()[2]} was written by another Quire version ({detail})")
    applied: list[str] = []
    for migration in migrations[len(done):]:
        with db.atomic():
            migration(db)
            db["migrations"].insert({"name": migration.__name__, "applied_at": utc_now()})
        logger.info("applied migration %s", migration.__name__)
        applied.append(migration.__name__)
    return applied
