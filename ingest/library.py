"""The library: documents, their pages and a full-text index, in one SQLite file.

`Library(path)` opens (or creates) library.db through sqlite-utils, in WAL mode with
foreign keys enforced, and brings its schema up to date with the append-only
migrations of `ingest.schema`. It stores what the readers produce (`Document`) and
answers what the app asks: which documents there are, their pages, full-text
search with marked snippets, collections.

The invariant every write keeps: a document has page rows (and so FTS rows) only
while its status is 'ready'. Marking a document 'ingesting' deletes its old pages in
the same transaction, and its new pages arrive in the one transaction that sets
'ready'; a process killed at any moment therefore leaves each document either
complete or visibly unfinished, never half-indexed. `Library.check()` verifies it.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import sqlite_utils

from ingest.document import Document, ExtractionReport, OutlineEntry, Page
from ingest.errors import DocumentNotFoundError, LibraryError
from ingest.paths import library_path
from ingest.schema import MIGRATIONS, Migration, apply_migrations, utc_now

logger = logging.getLogger(__name__)

# Called with (document_id, content_hash) when a document's content leaves the
# library: the document was removed, or a changed file replaced its content.
RemoveListener = Callable[[int, "str | None"], None]

UNFINISHED_STATUSES = ("pending", "ingesting")


@dataclass
class DocumentRecord:
    """One row of `documents`, as the app and the CLI see it."""

    id: int
    content_hash: str | None
    path: str
    format: str | None
    title: str | None
    author: str | None
    date: str | None
    pages: int
    characters: int
    tokens: int | None
    status: str
    error: str | None
    added_at: str
    updated_at: str
    file_size: int | None
    file_mtime: float | None
    report_json: str | None
    outline_json: str | None
    missing_since: str | None = None  # when a watched folder found its file gone

    @classmethod
    def from_row(cls, row: dict[str, object]) -> DocumentRecord:
        # A column a later migration added is absent while an older schema is open.
        return cls(**{field.name: row[field.name] for field in fields(cls) if field.name in row})  # type: ignore[arg-type]

    @property
    def display_title(self) -> str:
        return self.title or Path(self.path).name

    @property
    def locked(self) -> bool:
        """Whether it failed for want of its password (ingest.readers.pdf's
        EncryptedDocumentError messages), so a password would open it."""
        error = self.error or ""
        return self.status == "failed" and ("password-protected" in error or "wrong password" in error)

    @property
    def report(self) -> ExtractionReport:
        if not self.report_json:
            return ExtractionReport()
        known = {field.name for field in fields(ExtractionReport)}
        values = {key: value for key, value in json.loads(self.report_json).items() if key in known}
        return ExtractionReport(**values)

    @property
    def outline(self) -> list[OutlineEntry]:
        if not self.outline_json:
            return []
        return [OutlineEntry(**entry) for entry in json.loads(self.outline_json)]


@dataclass
class SearchHit:
    document_id: int
    title: str
    path: str
    page_index: int
    page_label: str | None
    snippet: str  # the page text around the match, the match between the marks
    rank: float  # FTS5 bm25: lower is better


@dataclass
class Collection:
    id: int
    name: str
    created_at: str
    document_ids: list[int]


_TERMS = re.compile(r'"([^"]*)"|(\S+)')


def fts_query(text: str) -> str:
    """What a person typed as an FTS5 query: every word required, anywhere on the
    page, and "words in quotes" as a phrase. Each term is quoted, so a user's
    hyphens, colons or `OR` are searched for, never parsed as query syntax."""
    terms = []
    for match in _TERMS.finditer(text):
        phrase, word = match.groups()
        terms.append(phrase if phrase is not None else word)
    return " ".join(fts_phrase(term.strip()) for term in terms if term.strip()) or fts_phrase(text)


def fts_phrase(phrase: str) -> str:
    """`phrase` as one FTS5 phrase query: a user's quotes, hyphens or `AND` are
    searched for, never parsed as query syntax (which would fail or surprise)."""
    return '"' + phrase.replace('"', '""') + '"'


class Library:
    """The documents a person has added, in library.db (default: data_dir()/library.db).

    One SQLite connection, usable only on the thread that opened the library (the
    app's single worker owns it); other processes may open the same file at once
    (WAL: readers never block the writer).
    """

    def __init__(self, path: Path | str | None = None, *, migrations: Sequence[Migration] = MIGRATIONS) -> None:
        self.path = Path(path) if path is not None else library_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_listeners: list[RemoveListener] = []
        try:
            self.db = sqlite_utils.Database(self.path)
            self.db.enable_wal()
            # Per connection, and a no-op inside a transaction: set before anything runs.
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("PRAGMA busy_timeout = 10000")
            self.applied_migrations = apply_migrations(self.db, migrations)
            self._has_ocr_words = self.db["ocr_words"].exists()  # absent only under a test's older schema
        except sqlite3.DatabaseError as error:
            raise LibraryError(f"{self.path} is not a usable library database: {error}") from error

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- watched folders (ingest/watch.py) ----------------------------------------

    def watch(self, folder: Path | str) -> Path:
        folder = Path(folder).expanduser().resolve()
        if not folder.is_dir():
            raise LibraryError(f"{folder} is not a folder")
        with self.db.atomic():
            self.db.execute("INSERT OR IGNORE INTO watched_folders (path, added_at) VALUES (?, ?)", [str(folder), utc_now()])
        return folder

    def unwatch(self, folder: Path | str) -> bool:
        """Stop watching `folder` (its documents stay). Whether it was watched."""
        folder = Path(folder).expanduser().resolve()
        with self.db.atomic():
            cursor = self.db.execute("DELETE FROM watched_folders WHERE path = ?", [str(folder)])
        return cursor.rowcount > 0

    def watched(self) -> list[Path]:
        return [Path(row["path"]) for row in self.db.query("SELECT path FROM watched_folders ORDER BY path")]

    def set_missing(self, document_id: int, missing: bool) -> None:
        with self.db.atomic():
            self.db.execute(
                "UPDATE documents SET missing_since = ? WHERE id = ?", [utc_now() if missing else None, document_id]
            )

    # -- documents -------------------------------------------------------------

    def documents(self, status: str | None = None) -> list[DocumentRecord]:
        where, params = ("WHERE status = ?", [status]) if status else ("", [])
        rows = self.db.query(f"SELECT * FROM documents {where} ORDER BY id", params)
        return [DocumentRecord.from_row(row) for row in rows]

    def get(self, document_id: int) -> DocumentRecord:
        rows = list(self.db.query("SELECT * FROM documents WHERE id = ?", [document_id]))
        if not rows:
            raise DocumentNotFoundError(f"no document with id {document_id} in the library")
        return DocumentRecord.from_row(rows[0])

    def find_by_hash(self, content_hash: str) -> DocumentRecord | None:
        rows = list(self.db.query("SELECT * FROM documents WHERE content_hash = ?", [content_hash]))
        return DocumentRecord.from_row(rows[0]) if rows else None

    def find_by_path(self, path: Path | str) -> DocumentRecord | None:
        """The document last ingested from `path` (stored resolved and absolute)."""
        rows = list(self.db.query(
            "SELECT * FROM documents WHERE path = ? ORDER BY updated_at DESC, id DESC LIMIT 1",
            [str(Path(path).resolve())],
        ))
        return DocumentRecord.from_row(rows[0]) if rows else None

    def unfinished(self) -> list[DocumentRecord]:
        """Documents an interrupted run left 'pending' or 'ingesting'."""
        rows = self.db.query(
            "SELECT * FROM documents WHERE status IN (?, ?) ORDER BY id", list(UNFINISHED_STATUSES)
        )
        return [DocumentRecord.from_row(row) for row in rows]

    def pages(self, document_id: int) -> list[Page]:
        rows = self.db.query(
            'SELECT page_index, label, title, start, text FROM pages WHERE document_id = ? ORDER BY page_index',
            [document_id],
        )
        return [
            Page(index=row["page_index"], text=row["text"], start=row["start"], label=row["label"], title=row["title"])
            for row in rows
        ]

    def _drop_ocr_words(self, document_id: int) -> None:
        if self._has_ocr_words:
            self.db.execute("DELETE FROM ocr_words WHERE document_id = ?", [document_id])

    def ocr_words(self, document_id: int, page_index: int) -> list[tuple[str, float, float, float, float]]:
        """Where OCR found each word of a scanned page (empty for a page with a text layer)."""
        rows = list(self.db.query(
            "SELECT words_json FROM ocr_words WHERE document_id = ? AND page_index = ?", [document_id, page_index]
        ))
        return [tuple(word) for word in json.loads(rows[0]["words_json"])] if rows else []  # type: ignore[misc]

    def begin_document(
        self,
        *,
        path: Path | str,
        content_hash: str,
        file_size: int | None = None,
        file_mtime: float | None = None,
        format: str | None = None,
        document_id: int | None = None,
    ) -> int:
        """Record that `path` is being ingested (status 'ingesting') and commit.

        With `document_id`, that document is reused (a changed file at a known path,
        or a run that was interrupted): its old pages go in this same transaction.
        Returns the document id.
        """
        now = utc_now()
        values = {
            "content_hash": content_hash,
            "path": str(Path(path).resolve()),
            "format": format,
            "status": "ingesting",
            "error": None,
            "updated_at": now,
            "file_size": file_size,
            "file_mtime": file_mtime,
        }
        replaced: tuple[int, str | None] | None = None
        with self.db.atomic():
            if document_id is None:
                document_id = int(self.db["documents"].insert({**values, "added_at": now}).last_pk)
            else:
                previous = self.get(document_id)
                if previous.content_hash != content_hash and previous.status == "ready":
                    replaced = (document_id, previous.content_hash)
                self.db.execute("DELETE FROM pages WHERE document_id = ?", [document_id])
                self._drop_ocr_words(document_id)
                self.db["documents"].update(document_id, {**values, "pages": 0, "characters": 0, "tokens": None})
        if replaced:
            self._notify_removed(*replaced)
        return document_id

    def store_document(self, document_id: int, document: Document, *, tokens: int | None = None) -> DocumentRecord:
        """Write the pages of `document`, its metadata and status 'ready' in one transaction."""
        characters = sum(len(page.text) for page in document.pages)
        rows = (
            {
                "document_id": document_id,
                "page_index": page.index,
                "label": page.label,
                "title": page.title,
                "start": page.start,
                "end": page.end,
                "text": page.text,
            }
            for page in document.pages
        )
        with self.db.atomic():
            current = self.get(document_id)  # raises if it was removed meanwhile
            if current.status != "ingesting":
                raise LibraryError(f"document {document_id} is '{current.status}', not 'ingesting'")
            self.db.execute("DELETE FROM pages WHERE document_id = ?", [document_id])
            self.db["pages"].insert_all(rows, batch_size=200)
            self._drop_ocr_words(document_id)
            self.db["ocr_words"].insert_all(
                ({"document_id": document_id, "page_index": page.index, "words_json": json.dumps(page.ocr_words)}
                 for page in document.pages if page.ocr_words),
                batch_size=200,
            )
            self.db["documents"].update(document_id, {
                "format": document.format,
                "title": document.title,
                "author": document.author,
                "date": document.date,
                "pages": len(document.pages),
                "characters": characters,
                "tokens": tokens,
                "status": "ready",
                "error": None,
                "updated_at": utc_now(),
                "report_json": json.dumps(asdict(document.report)),
                "outline_json": json.dumps([asdict(entry) for entry in document.outline]),
            })
        return self.get(document_id)

    def mark_failed(self, document_id: int, error: str) -> None:
        """Status 'failed' with a one-line error; its pages (if any) go too."""
        self._set_status(document_id, "failed", " ".join(error.split()) or "unknown error")

    def mark_pending(self, document_id: int) -> None:
        """Back to 'pending' (a cancelled run): the next run redoes it."""
        self._set_status(document_id, "pending", None)

    def _set_status(self, document_id: int, status: str, error: str | None) -> None:
        with self.db.atomic():
            self.get(document_id)
            self.db.execute("DELETE FROM pages WHERE document_id = ?", [document_id])
            self._drop_ocr_words(document_id)
            self.db["documents"].update(document_id, {
                "status": status, "error": error, "pages": 0, "characters": 0, "updated_at": utc_now(),
            })

    def update_file_stat(self, document_id: int, *, file_size: int, file_mtime: float) -> None:
        """Remember a file's size and mtime (touched, same content) so the next run
        can skip hashing it."""
        self.db["documents"].update(document_id, {"file_size": file_size, "file_mtime": file_mtime})

    def record_failure(self, path: Path | str, error: str) -> int:
        """A file that failed before its content could be read (so it has no hash)."""
        now = utc_now()
        row = {
            "path": str(Path(path).resolve()),
            "status": "failed",
            "error": " ".join(error.split()) or "unknown error",
            "added_at": now,
            "updated_at": now,
        }
        return int(self.db["documents"].insert(row).last_pk)

    def remove(self, document_id: int) -> DocumentRecord:
        """Delete a document with its pages, FTS rows and collection links.

        Evidence rows of past answers keep their quotes and lose only the link.
        """
        with self.db.atomic():
            record = self.get(document_id)
            # Pages, FTS rows (via triggers) and collection links go by ON DELETE CASCADE.
            self.db.execute("DELETE FROM documents WHERE id = ?", [document_id])
        self._notify_removed(document_id, record.content_hash)
        return record

    def on_remove(self, listener: RemoveListener) -> None:
        """Call `listener(document_id, content_hash)` whenever a document's content
        leaves the library (removed, or replaced by a changed file): caches keyed by
        content drop what they hold for it."""
        self._remove_listeners.append(listener)

    def _notify_removed(self, document_id: int, content_hash: str | None) -> None:
        for listener in self._remove_listeners:
            try:
                listener(document_id, content_hash)
            except Exception:
                # The removal is committed; a cache that fails to clean up must not undo
                # it or hide the others' notifications.
                logger.exception("on_remove listener %r failed for document %d", listener, document_id)

    # -- search ----------------------------------------------------------------

    def search(
        self,
        phrase: str,
        limit: int = 20,
        *,
        mark: tuple[str, str] = ("[", "]"),
        context_tokens: int = 16,
        document_ids: Iterable[int] | None = None,
    ) -> list[SearchHit]:
        """Pages containing every word of `phrase` ("quoted words" as a phrase; case
        and accents ignored), best first, each with a snippet where the matches are
        wrapped in `mark`."""
        if not phrase.strip():
            raise LibraryError("nothing to search for: the phrase is empty")
        scope = ""
        params: list[object] = [mark[0], mark[1], max(1, min(context_tokens, 64)), fts_query(phrase)]
        if document_ids is not None:
            ids = [int(document_id) for document_id in document_ids]
            if not ids:
                return []
            scope = f"AND p.document_id IN ({', '.join('?' * len(ids))})"
            params.extend(ids)
        params.append(limit)
        sql = f"""
            SELECT p.document_id, d.title, d.path, p.page_index, p.label,
                   snippet(pages_fts, 0, ?, ?, '…', ?) AS snippet, bm25(pages_fts) AS rank
            FROM pages_fts
            JOIN pages p ON p.id = pages_fts.rowid
            JOIN documents d ON d.id = p.document_id
            WHERE pages_fts MATCH ? AND d.status = 'ready' {scope}
            ORDER BY rank, p.document_id, p.page_index
            LIMIT ?
        """
        try:
            rows = list(self.db.query(sql, params))
        except sqlite3.OperationalError as error:
            raise LibraryError(f"search failed for {phrase!r}: {error}") from error
        return [
            SearchHit(
                document_id=row["document_id"],
                title=row["title"] or Path(row["path"]).name,
                path=row["path"],
                page_index=row["page_index"],
                page_label=row["label"],
                # Words matched side by side read as one mark: "[white whale]".
                snippet=row["snippet"].replace(f"{mark[1]} {mark[0]}", " "),
                rank=row["rank"],
            )
            for row in rows
        ]

    # -- collections -----------------------------------------------------------

    def create_collection(self, name: str) -> int:
        if not name.strip():
            raise LibraryError("a collection needs a name")
        try:
            return int(self.db["collections"].insert({"name": name.strip(), "created_at": utc_now()}).last_pk)
        except sqlite3.IntegrityError as error:
            raise LibraryError(f"a collection named {name.strip()!r} already exists") from error

    def delete_collection(self, collection_id: int) -> None:
        self.db.execute("DELETE FROM collections WHERE id = ?", [collection_id])

    def collections(self) -> list[Collection]:
        links: dict[int, list[int]] = {}
        for row in self.db.query("SELECT collection_id, document_id FROM collection_documents ORDER BY document_id"):
            links.setdefault(row["collection_id"], []).append(row["document_id"])
        return [
            Collection(id=row["id"], name=row["name"], created_at=row["created_at"], document_ids=links.get(row["id"], []))
            for row in self.db.query("SELECT * FROM collections ORDER BY name")
        ]

    def add_to_collection(self, collection_id: int, document_ids: Iterable[int]) -> None:
        now = utc_now()
        try:
            with self.db.atomic():
                for document_id in document_ids:
                    self.db.execute(
                        "INSERT OR IGNORE INTO collection_documents (collection_id, document_id, added_at) VALUES (?, ?, ?)",
                        [collection_id, document_id, now],
                    )
        except sqlite3.IntegrityError as error:
            raise LibraryError(f"cannot add to collection {collection_id}: unknown collection or document") from error

    def remove_from_collection(self, collection_id: int, document_ids: Iterable[int]) -> None:
        with self.db.atomic():
            for document_id in document_ids:
                self.db.execute(
                    "DELETE FROM collection_documents WHERE collection_id = ? AND document_id = ?",
                    [collection_id, document_id],
                )

    # -- integrity -------------------------------------------------------------

    def check(self) -> list[str]:
        """Problems found in the database (empty when consistent): SQLite's own
        integrity and foreign-key checks, the FTS index against the pages, and the
        invariant that only 'ready' documents have pages, all of them."""
        problems: list[str] = []
        integrity = [row[0] for row in self.db.execute("PRAGMA integrity_check").fetchall()]
        if integrity != ["ok"]:
            problems.extend(f"integrity: {line}" for line in integrity)
        for row in self.db.execute("PRAGMA foreign_key_check").fetchall():
            problems.append(f"foreign key: {tuple(row)}")
        try:
            # rank=1 makes FTS5 compare the index with the content table too.
            self.db.execute("INSERT INTO pages_fts(pages_fts, rank) VALUES ('integrity-check', 1)")
        except sqlite3.DatabaseError as error:
            problems.append(f"full-text index: {error}")
        for row in self.db.query(
            "SELECT d.id, d.status, d.pages, COUNT(p.id) AS stored FROM documents d "
            "LEFT JOIN pages p ON p.document_id = d.id GROUP BY d.id"
        ):
            if row["status"] != "ready" and row["stored"]:
                problems.append(f"document {row['id']} is '{row['status']}' but has {row['stored']} pages")
            elif row["status"] == "ready" and row["stored"] != row["pages"]:
                problems.append(f"document {row['id']} records {row['pages']} pages but has {row['stored']}")
        return problems
