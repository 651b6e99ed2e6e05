"""Ingestion jobs: files and folders into the library, resumable and cancellable.

`ingest_paths(library, paths)` (or `IngestJob(...).run()`) expands folders to the
files a reader supports, hashes each file's content (SHA-256, streamed), and then
per file:

- content already in the library and complete -> reported as a duplicate (or as
  unchanged when it is the same path), never added twice;
- a known path whose content changed -> re-ingested into the same document id,
  so collections and links keep pointing at it;
- otherwise: status 'ingesting' is committed first, the file is read outside any
  transaction, and pages + FTS + metadata + status 'ready' are written in one
  transaction (`Library.store_document`).

So a process killed at any moment leaves every document complete or marked
unfinished; the next run over the same paths skips what is complete and redoes what
is not ('pending', 'ingesting', 'failed'), and `resume_unfinished` does the same
from the paths the library remembers. A file that fails is recorded 'failed' with
its one-line error and the others continue.

Cancellation is checked between files and, when the reader takes a
`progress(done, total)` page callback (as `ingest.readers.read_document` does),
between pages: the callback raises `Cancelled` and the reader stops. A reader
without that parameter is read to its end before a cancel takes effect. Either way
the interrupted file goes back to 'pending' and is redone by the next run.

Token counts come from an injected `tokenize(text) -> int` (the app passes the
model's tokenizer): ingest never imports the engine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ingest.document import Document
from ingest.errors import Cancelled, EncryptedDocumentError, IngestError
from ingest.library import Library
from ingest.readers.common import accepts_keyword

logger = logging.getLogger(__name__)

HASH_CHUNK_BYTES = 1 << 20
# A GUI asking again after a wrong password: stop after this many tries.
MAX_PASSWORD_ATTEMPTS = 3


class Reader(Protocol):
    """`read_document`'s shape. A reader may also take `progress: Callable[[int, int],
    None]`, called after each page; the job passes one when it does."""

    def __call__(self, path: Path, *, password: str | None = None) -> Document: ...


PageProgress = Callable[[int, int], None]


@dataclass
class IngestProgress:
    """One progress report; sent when a file starts and when it is done."""

    file: Path
    index: int  # 0-based position of `file` among the files of this job
    total: int  # number of files in this job
    pages_done: int  # pages stored by this job so far
    fraction: float  # 0..1 over the whole job, by bytes of the files handled
    eta_seconds: float | None  # None until there is a rate to extrapolate
    message: str  # "reading NAME", "NAME: page 3 of 40" or "NAME: <outcome>"
    file_done: bool = False  # False: `file` is starting; True: its outcome is in `message`
    file_fraction: float = 0.0  # pages of `file` read so far, 0..1


@dataclass
class FileOutcome:
    path: Path
    outcome: str  # "added", "updated", "duplicate", "unchanged", "failed", "cancelled"
    document_id: int | None = None
    message: str = ""
    pages: int = 0


@dataclass
class IngestSummary:
    outcomes: list[FileOutcome] = field(default_factory=list)
    cancelled: bool = False
    remaining: list[Path] = field(default_factory=list)  # files not handled because of a cancel
    seconds: float = 0.0

    def _with(self, outcome: str) -> list[FileOutcome]:
        return [item for item in self.outcomes if item.outcome == outcome]

    @property
    def added(self) -> list[FileOutcome]:
        return self._with("added")

    @property
    def updated(self) -> list[FileOutcome]:
        return self._with("updated")

    @property
    def duplicates(self) -> list[FileOutcome]:
        return self._with("duplicate")

    @property
    def unchanged(self) -> list[FileOutcome]:
        return self._with("unchanged")

    @property
    def failed(self) -> list[FileOutcome]:
        return self._with("failed")

    @property
    def pages(self) -> int:
        return sum(item.pages for item in self.outcomes)

    def describe(self) -> str:
        text = (
            f"{len(self.added)} added, {len(self.updated)} updated, {len(self.duplicates)} duplicate, "
            f"{len(self.unchanged)} unchanged, {len(self.failed)} failed; {self.pages} pages in {self.seconds:.1f} s"
        )
        if self.cancelled:
            left = len(self.remaining)
            text += f"; cancelled with {left} file{'s' if left != 1 else ''} left"
        return text


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def normalise_extensions(extensions: Iterable[str]) -> frozenset[str]:
    return frozenset("." + extension.lower().lstrip(".") for extension in extensions)


def expand_paths(paths: Iterable[Path | str], extensions: Collection[str]) -> tuple[list[Path], list[Path]]:
    """(files, missing): folders expanded recursively to files with a supported
    extension (hidden files and folders skipped), in a stable order, each once.
    A file named explicitly is kept whatever its extension, so its reader can say
    why it is unsupported."""
    wanted = normalise_extensions(extensions)
    files: list[Path] = []
    missing: list[Path] = []
    seen: set[Path] = set()

    def keep(candidate: Path) -> None:
        resolved = candidate.resolve()
        if resolved not in seen:
            seen.add(resolved)
            files.append(resolved)

    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            for folder, subfolders, names in os.walk(path):
                subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
                for name in sorted(names):
                    if not name.startswith(".") and Path(name).suffix.lower() in wanted:
                        keep(Path(folder) / name)
        elif path.is_file():
            keep(path)
        else:
            missing.append(path)
    return files, missing


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, IngestError):
        return text or type(error).__name__
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    # Not raised on purpose (a reader bug, a library quirk): the type helps a report.
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _default_reader() -> Reader:
    from ingest.readers import read_document

    return read_document


def _default_extensions() -> Collection[str]:
    from ingest.readers import SUPPORTED_EXTENSIONS

    return SUPPORTED_EXTENSIONS


class IngestJob:
    """Ingest files and folders into `library`; `run()` once, `cancel()` from any thread."""

    def __init__(
        self,
        library: Library,
        paths: Iterable[Path | str],
        *,
        reader: Reader | None = None,
        extensions: Collection[str] | None = None,
        tokenize: Callable[[str], int] | None = None,
        progress: Callable[[IngestProgress], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        password_for: Callable[[Path], str | None] | None = None,
        trust_mtime: bool = True,
    ) -> None:
        self.library = library
        self.paths = list(paths)
        self.reader = reader if reader is not None else _default_reader()
        self.extensions = extensions if extensions is not None else _default_extensions()
        self.tokenize = tokenize
        self.progress = progress
        self.password_for = password_for
        # Size and mtime unchanged at a known path: skip hashing (re-adding a large
        # folder would otherwise read every byte again). False forces a re-hash.
        self.trust_mtime = trust_mtime
        self._cancel_flag = cancel
        self._cancel_event = threading.Event()
        self._pages_done = 0
        self._started = 0.0
        self._total_files = 0
        self._total_bytes = 1
        self._reader_takes_progress = accepts_keyword(self.reader, "progress")

    def cancel(self) -> None:
        self._cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel_event.is_set() or bool(self._cancel_flag and self._cancel_flag())

    def run(self) -> IngestSummary:
        self._started = time.monotonic()
        summary = IngestSummary()
        files, missing = expand_paths(self.paths, self.extensions)
        for path in missing:
            summary.outcomes.append(self._fail_missing(path))
        sizes = [self._size(path) for path in files]
        self._total_files = len(files)
        self._total_bytes = max(1, sum(sizes))
        bytes_done = 0
        for index, path in enumerate(files):
            if self.cancelled:
                summary.cancelled = True
                summary.remaining = files[index:]
                break
            self._report(path, index, bytes_done, f"reading {path.name}", False)
            outcome = self._ingest_file(path, self._page_reporter(path, index, bytes_done, sizes[index]))
            if outcome.outcome == "cancelled":
                summary.cancelled = True
                summary.remaining = files[index:]
                break
            summary.outcomes.append(outcome)
            bytes_done += sizes[index]
            self._report(path, index, bytes_done, f"{path.name}: {outcome.message}", True)
        summary.seconds = time.monotonic() - self._started
        logger.info("ingest: %s", summary.describe())
        return summary

    @staticmethod
    def _size(path: Path) -> int:
        try:
            return path.stat().st_size
        except OSError:
            return 0

    def _report(
        self, path: Path, index: int, bytes_done: float, message: str, file_done: bool, file_fraction: float = 0.0
    ) -> None:
        if self.progress is None:
            return
        # By bytes, not files: one 900-page PDF outweighs ten short stories.
        fraction = bytes_done / self._total_bytes
        elapsed = time.monotonic() - self._started
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else None
        self.progress(IngestProgress(
            file=path, index=index, total=self._total_files, pages_done=self._pages_done,
            fraction=min(1.0, fraction), eta_seconds=eta, message=message, file_done=file_done,
            file_fraction=1.0 if file_done else file_fraction,
        ))

    def _page_reporter(self, path: Path, index: int, bytes_done: int, size: int) -> PageProgress:
        """The reader's page callback: progress within the file, and the cancel check."""

        def on_page(done: int, pages: int, what: str | None = None) -> None:
            if self.cancelled:
                raise Cancelled(f"cancelled while reading {path.name}")
            within = done / pages if pages else 0.0
            step = what or f"page {done} of {pages}"
            self._report(path, index, bytes_done + size * within, f"{path.name}: {step}", False, within)

        return on_page

    def _fail_missing(self, path: Path) -> FileOutcome:
        """A path that does not exist: a typo is not recorded in the library, but a
        document it already tracks (an unfinished one) is marked failed."""
        error = "no such file or directory"
        known = self.library.find_by_path(path)
        if known is not None and known.status != "ready":
            self.library.mark_failed(known.id, error)
        return FileOutcome(path, "failed", known.id if known else None, f"failed: {error}")

    def _fail_unread(self, path: Path, error: str) -> FileOutcome:
        """A file whose content could not be read at all: there is no hash to key it by."""
        known = self.library.find_by_path(path)
        if known is None:
            document_id: int | None = self.library.record_failure(path, error)
        elif known.status != "ready":
            self.library.mark_failed(known.id, error)
            document_id = known.id
        else:
            # Keep the complete copy already in the library; only this run failed.
            document_id = known.id
        return FileOutcome(path, "failed", document_id, f"failed: {error}")

    def _ingest_file(self, path: Path, page_progress: PageProgress) -> FileOutcome:
        try:
            stat = path.stat()
            known = self.library.find_by_path(path)
            if (
                self.trust_mtime and known is not None and known.status == "ready"
                and known.file_size == stat.st_size and known.file_mtime == stat.st_mtime
            ):
                return FileOutcome(path, "unchanged", known.id, "unchanged")
            content_hash = sha256_file(path)
        except OSError as error:
            return self._fail_unread(path, error.strerror or str(error))

        same = self.library.find_by_hash(content_hash)
        if same is not None and same.status == "ready":
            if same.path == str(path):
                self.library.update_file_stat(same.id, file_size=stat.st_size, file_mtime=stat.st_mtime)
                return FileOutcome(path, "unchanged", same.id, "unchanged")
            return FileOutcome(path, "duplicate", same.id, f"duplicate of #{same.id} {same.display_title!r}")
        if same is not None:
            reuse, outcome = same.id, "added"  # unfinished or failed before: redo it
        elif known is not None:
            reuse, outcome = known.id, ("updated" if known.status == "ready" else "added")
        else:
            reuse, outcome = None, "added"
        document_id = self.library.begin_document(
            path=path, content_hash=content_hash, file_size=stat.st_size, file_mtime=stat.st_mtime,
            document_id=reuse,
        )

        try:
            document = self._read(path, page_progress)
            if self.cancelled:
                self.library.mark_pending(document_id)
                return FileOutcome(path, "cancelled", document_id, "cancelled")
            tokens = self.tokenize(document.text) if self.tokenize is not None else None
            if self.cancelled:
                self.library.mark_pending(document_id)
                return FileOutcome(path, "cancelled", document_id, "cancelled")
        except Cancelled:
            self.library.mark_pending(document_id)
            return FileOutcome(path, "cancelled", document_id, "cancelled")
        except Exception as error:  # one bad file never stops the others
            message = _one_line(error)
            if not isinstance(error, IngestError):
                logger.exception("unexpected error while reading %s", path)
            self.library.mark_failed(document_id, message)
            return FileOutcome(path, "failed", document_id, f"failed: {message}")

        record = self.library.store_document(document_id, document, tokens=tokens)
        self._pages_done += record.pages
        detail = f"{record.pages} page{'s' if record.pages != 1 else ''}" + (
            f", {tokens} tokens" if tokens is not None else ""
        )
        return FileOutcome(path, outcome, document_id, f"{outcome} as #{document_id} ({detail})", record.pages)

    def _read(self, path: Path, page_progress: PageProgress) -> Document:
        options: dict[str, PageProgress] = {"progress": page_progress} if self._reader_takes_progress else {}
        try:
            return self.reader(path, **options)
        except EncryptedDocumentError as first:
            if self.password_for is None:
                raise
            error, tried = first, set()
            for _ in range(MAX_PASSWORD_ATTEMPTS):
                password = self.password_for(path)
                if password is None or password in tried:
                    break
                tried.add(password)
                try:
                    return self.reader(path, password=password, **options)
                except EncryptedDocumentError as wrong:
                    error = wrong
            raise error


def ingest_paths(
    library: Library,
    paths: Iterable[Path | str],
    *,
    reader: Reader | None = None,
    extensions: Collection[str] | None = None,
    tokenize: Callable[[str], int] | None = None,
    progress: Callable[[IngestProgress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    password_for: Callable[[Path], str | None] | None = None,
    trust_mtime: bool = True,
) -> IngestSummary:
    """Ingest files and folders into `library`; see the module docstring.

    `reader` and `extensions` default to `ingest.readers.read_document` and its
    `SUPPORTED_EXTENSIONS`."""
    return IngestJob(
        library, paths, reader=reader, extensions=extensions, tokenize=tokenize, progress=progress,
        cancel=cancel, password_for=password_for, trust_mtime=trust_mtime,
    ).run()


def resume_unfinished(library: Library, **options: object) -> IngestSummary:
    """Finish what an interrupted run left 'pending' or 'ingesting', from the paths
    the library recorded (e.g. at app start). Takes `ingest_paths`' options."""
    paths = [Path(record.path) for record in library.unfinished()]
    return ingest_paths(library, paths, **options)  # type: ignore[arg-type]
