"""The two owners of slow work, each on its own QThread, so the window never waits.

`ServiceWorker` owns the service (app/service.py: the model, its reader and its
`Answerer`): it loads it, builds the corpus cache and answers questions, one task at
a time in the order asked (Qt queues the calls; Anki's `taskman` is the model).
`IngestWorker` owns reading files into the library, which needs no model and so runs
beside the service. Results come back as queued signals;
`cancel()` may be called from the GUI thread and is checked between chunks of work.
Each worker opens its own SQLite connection in its own thread (a connection must
stay in the thread that made it).

Every failure, including an out-of-memory or a bug in the engine, is caught at the
task boundary and reported as one line; the worker stays alive for the next task.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PySide6.QtCore import QObject, Signal, Slot

from app.service import Service, library_content_keys, scope_documents
from app.settings import AppSettings
from engine.corpus.build import BuildProgress, CorpusDocument
from engine.corpus.answer import Turn
from engine.corpus.answerer import AskStats, Evidence
from engine.corpus.tasks import TaskProgress, TaskStats
from engine.errors import Cancelled as EngineCancelled
from engine.generate import Token
from ingest.conversations import Citation, Conversations
from ingest.jobs import IngestJob, IngestProgress, IngestSummary
from ingest.library import Library

log = logging.getLogger(__name__)

ServiceFactory = Callable[[AppSettings], Service]
# Runs before the factory, e.g. installing a default model on first run: (settings, progress, cancel).
Prepare = Callable[[AppSettings, Callable[[str, int, int], None], Callable[[], bool]], object]


def describe_failure(error: BaseException) -> str:
    """One line a person can act on, never a traceback."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return "out of memory: choose a smaller model, a lower cache precision or fewer documents"
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:400]


@dataclass
class AskRequest:
    conversation_id: int
    question: str
    document_ids: list[int] | None  # None: every ready document
    max_tokens: int
    history: list[Turn] = field(default_factory=list)  # the conversation's earlier turns
    # A whole-document task instead of a question: "find-all", "summarise", "compare",
    # with its options (term, topic, first_page, last_page).
    task: str = "ask"
    options: dict = field(default_factory=dict)


def _progress_text(progress: TaskProgress) -> str:
    """"Reading parts 9–16 of 40, about 2 min left" for the status bar."""
    one, several = {"finding": ("Finding", "Finding"), "reading": ("Reading part", "Reading parts"),
                    "combining": ("Combining notes", "Combining notes")}.get(progress.stage, (progress.stage, progress.stage))
    first, last = progress.done + 1, min(progress.done + max(progress.working, 1), progress.total)
    if progress.total <= 1:
        text = one
    elif last > first:
        text = f"{several} {first}–{last} of {progress.total}"
    else:
        text = f"{one} {first} of {progress.total}"
    if progress.eta_seconds is not None:
        minutes = progress.eta_seconds / 60
        text += f", about {minutes:.0f} min left" if minutes >= 1.5 else f", about {progress.eta_seconds:.0f} s left"
    return text


class ServiceWorker(QObject):
    loading = Signal(str)  # model being loaded
    installing = Signal(str, int, int)  # first run: stage, done, total of the model install
    ready = Signal(object)  # settings summary of the loaded service
    cache_progress = Signal(object)  # BuildProgress
    cache_finished = Signal(str)  # a one-line summary ("" when cancelled)
    cache_states = Signal(object)  # {document id: cached?}
    cache_bytes = Signal(object)  # bytes; a Python int, since a cache passes 2 GiB
    token = Signal(str)
    evidence = Signal(list)  # list[Citation]
    answer_finished = Signal(object)  # conversation_id, message_id, stats, cancelled
    failed = Signal(str, str)  # task ("load", "cache", "ask"), message
    busy = Signal(str)  # what is running, "" when idle

    def __init__(self, library_path: Path, factory: ServiceFactory, prepare: Prepare | None = None) -> None:
        super().__init__()
        self.library_path = library_path
        self.factory = factory
        self.prepare = prepare
        self.service: Service | None = None
        self.settings: AppSettings | None = None
        self._cancel = threading.Event()
        self._library: Library | None = None

    # Called from the GUI thread: only sets a flag the running task checks.
    def cancel(self) -> None:
        self._cancel.set()

    def _cancelled(self) -> bool:
        return self._cancel.is_set()

    def _db(self) -> Library:
        if self._library is None:
            self._library = Library(self.library_path)
        return self._library

    @Slot()
    def shutdown(self) -> None:
        if self._library is not None:
            self._library.close()
            self._library = None
        self.service = None

    # -- tasks -------------------------------------------------------------------

    @Slot(object)
    def configure(self, settings: AppSettings) -> None:
        """Load (or reload) the service for these settings."""
        self._cancel.clear()
        self.service = None
        self.settings = settings
        self.busy.emit(f"Loading {settings.model_spec()}…")
        self.loading.emit(settings.model_spec())
        try:
            if self.prepare is not None:
                self.prepare(settings, self.installing.emit, self._cancelled)
            self.service = self.factory(settings)
        except BaseException as error:  # noqa: BLE001 — any failure leaves the window alive
            log.error("loading the service failed: %s", traceback.format_exc())
            self.failed.emit("load", f"the model could not be loaded: {describe_failure(error)}")
            self.busy.emit("")
            return
        self.ready.emit(self.service.settings_summary())
        self.busy.emit("")
        self.refresh_cache_states()

    @Slot()
    def refresh_cache_states(self) -> None:
        if self.service is None:
            return
        try:
            documents = self._documents(None)
            self.cache_states.emit({d.doc_id: self.service.is_cached(d) for d in documents})
            self.cache_bytes.emit(self.service.cache_bytes())
        except BaseException as error:  # noqa: BLE001
            self.failed.emit("cache", describe_failure(error))

    @Slot(object)
    def build(self, document_ids: list[int] | None) -> None:
        """Cache the given (or all ready) documents that are not cached yet."""
        if self.service is None:
            return
        self._cancel.clear()
        try:
            documents = self._documents(document_ids)
            self._build(documents)
            prepare = getattr(self.service, "prepare", None)
            if prepare is not None and document_ids is None:
                prepare(documents)  # the whole library: the usual scope of the next question
        except EngineCancelled:
            self.cache_finished.emit("")
        except BaseException as error:  # noqa: BLE001
            log.error("cache build failed: %s", traceback.format_exc())
            self.failed.emit("cache", f"the cache could not be built: {describe_failure(error)}")
        finally:
            self.busy.emit("")
            self.refresh_cache_states()

    def _build(self, documents: list[CorpusDocument]) -> None:
        assert self.service is not None
        pending = [d for d in documents if not self.service.is_cached(d)]
        if not pending:
            return
        self.busy.emit(f"Caching {len(pending)} document(s)…")
        summary = self.service.build(pending, self.cache_progress.emit, self._cancelled)
        self.cache_finished.emit(
            f"Cached {summary.documents} document(s): {summary.tokens:,} tokens in {summary.seconds:.0f} s"
        )

    @Slot(object)
    def ask(self, request: AskRequest) -> None:
        if self.service is None:
            self.failed.emit("ask", "no model is loaded (see Settings)")
            return
        self._cancel.clear()
        self.busy.emit("Answering…")
        pieces: list[str] = []
        citations: list[Citation] = []
        stats: AskStats | None = None
        started = time.perf_counter()
        error_message = ""
        cancelled = False
        documents: list[CorpusDocument] = []
        try:
            # No caching first: the answer reads the documents' text (Answerer.ask).
            documents = self._documents(request.document_ids)
            if request.task == "ask":
                events = self.service.ask(request.question, documents, request.max_tokens, self._cancelled, request.history)
            else:
                events = self.service.run_task(request.task, documents, request.options, request.max_tokens, self._cancelled)
            for event in events:
                if isinstance(event, Token):
                    pieces.append(event.text)
                    self.token.emit(event.text)
                elif isinstance(event, Evidence):
                    citations.append(_citation(event))
                elif isinstance(event, (AskStats, TaskStats)):
                    stats = event
                elif isinstance(event, TaskProgress):
                    self.busy.emit(_progress_text(event))
            cancelled = self._cancelled() or (stats is not None and (
                getattr(stats, "finish_reason", "") == "cancelled" or getattr(stats, "cancelled", False)))
        except EngineCancelled:
            cancelled = True
        except BaseException as error:  # noqa: BLE001
            log.error("answer failed: %s", traceback.format_exc())
            error_message = describe_failure(error)
        if citations:
            self.evidence.emit(citations)
        summary = asdict(stats) if stats is not None else {}
        summary.update(
            total_seconds=time.perf_counter() - started,
            cancelled=cancelled,
            error=error_message or None,
            documents=[d.doc_id for d in documents],
            not_in_yet=self._not_in_yet(request.document_ids),
            corpus_hash=corpus_hash(documents),
            engine=self.service.settings_summary(),  # saved as "engine", as in the answers stored before
        )
        message_id = None
        text = "".join(pieces)
        if text or citations:
            try:
                message = Conversations(self._db()).add_message(
                    request.conversation_id, "assistant", text, model=self.service.model_name, stats=summary, citations=citations
                )
                message_id = message.id
            except BaseException as error:  # noqa: BLE001
                error_message = error_message or f"the answer could not be saved: {describe_failure(error)}"
        if error_message:
            self.failed.emit("ask", f"the answer failed: {error_message}")
        self.answer_finished.emit(
            {"conversation_id": request.conversation_id, "message_id": message_id, "stats": summary, "cancelled": cancelled}
        )
        self.busy.emit("")

    def _documents(self, document_ids: list[int] | None) -> list[CorpusDocument]:
        return scope_documents(self._db(), document_ids)

    def _not_in_yet(self, document_ids: list[int] | None) -> list[str]:
        """The scope's documents still being read (the answer could not use them)."""
        try:
            library = self._db()
            records = library.documents() if document_ids is None else [library.get(i) for i in document_ids]
        except BaseException:  # noqa: BLE001 — a note on the answer is not worth failing it
            return []
        return [r.display_title for r in records if r.status in ("pending", "ingesting")]


def corpus_hash(documents: list[CorpusDocument]) -> str | None:
    """Identifies the exact texts an answer was drawn from (order-independent)."""
    import hashlib

    if not documents:
        return None
    keys = sorted(d.content_key for d in documents)
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def _citation(evidence: Evidence) -> Citation:
    return Citation(
        document_id=evidence.doc_id if isinstance(evidence.doc_id, int) else None,
        title=evidence.title,
        page_index=evidence.page_index,
        page_label=evidence.page_label,
        start=evidence.char_start,
        end=evidence.char_end,
        weight=evidence.weight,
        quote=evidence.text,
    )


class IngestWorker(QObject):
    progress = Signal(object)  # IngestProgress
    finished = Signal(object)  # IngestSummary
    removed = Signal(list, int)  # document ids, cache bytes freed
    failed = Signal(str)
    busy = Signal(str)
    watched = Signal(object)  # WatchSummary of a pass over the watched folders

    def __init__(self, library_path: Path, token_counter: Callable[[], Callable[[str], int] | None]) -> None:
        super().__init__()
        self.library_path = library_path
        self.token_counter = token_counter
        self._job: IngestJob | None = None
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()
        job = self._job
        if job is not None:
            job.cancel()

    @Slot()
    def warm(self) -> None:
        """Import the readers and load the token counter now, at start-up. Done on the
        first ingest instead, the C parts of those imports (pypdf's, cryptography's,
        lxml's) and the tokenizer's JSON hold the GIL long enough to stall the window
        by 110-130 ms (quire bench gui); at start-up nothing is waiting."""
        import importlib

        for module in ("ingest.readers.pdf", "ingest.readers.epub", "ingest.readers.docx", "ingest.readers.html"):
            try:
                importlib.import_module(module)
            except ImportError as error:  # the reader reports it properly when used
                log.warning("reader not available: %s", error)
        self.token_counter()

    @Slot(list)
    def ingest(self, paths: list[str]) -> None:
        self._ingest(paths, None)

    @Slot(list, str)
    def ingest_locked(self, paths: list[str], password: str) -> None:
        """Read encrypted documents with the password the user typed. It is tried
        once and kept nowhere (not in the library, not in the settings)."""
        self._ingest(paths, password)

    def _ingest(self, paths: list[str], password: str | None) -> None:
        self._cancel.clear()
        self.busy.emit(f"Adding {len(paths)} item(s)…")
        try:
            with Library(self.library_path) as library:
                self._job = IngestJob(
                    library, [Path(p) for p in paths], tokenize=self.token_counter(),
                    progress=self.progress.emit, cancel=self._cancel.is_set,
                    password_for=(lambda _path: password) if password is not None else None,
                )
                summary: IngestSummary = self._job.run()
            self.finished.emit(summary)
        except BaseException as error:  # noqa: BLE001
            log.error("ingest failed: %s", traceback.format_exc())
            self.failed.emit(f"adding documents failed: {describe_failure(error)}")
        finally:
            self._job = None
            self.busy.emit("")


    @Slot()
    def scan_watched(self) -> None:
        """One pass over the watched folders (ingest/watch.py): missing files marked,
        new and changed ones read, with the same progress and cancel as adding."""
        from ingest.watch import scan

        self._cancel.clear()
        try:
            with Library(self.library_path) as library:
                if not library.watched():
                    return
                self.busy.emit("Checking watched folders…")
                summary = scan(library, progress=self.progress.emit, cancel=self._cancel.is_set,
                               tokenize=self.token_counter())
            self.watched.emit(summary)
        except BaseException as error:  # noqa: BLE001
            log.error("watched folders failed: %s", traceback.format_exc())
            self.failed.emit(f"checking watched folders failed: {describe_failure(error)}")
        finally:
            self.busy.emit("")

    @Slot(list, str)
    def remove(self, document_ids: list[int], cache_root: str) -> None:
        """Remove documents and free their cache in every model's folder (no model needed)."""
        from engine.corpus.cache import prune_caches

        self.busy.emit(f"Removing {len(document_ids)} document(s)…")
        try:
            with Library(self.library_path) as library:
                for document_id in document_ids:
                    library.remove(document_id)
                keep = library_content_keys(library)
            freed = prune_caches(keep, Path(cache_root))
            self.removed.emit(document_ids, freed)
        except BaseException as error:  # noqa: BLE001
            self.failed.emit(f"removing documents failed: {describe_failure(error)}")
        finally:
            self.busy.emit("")


def default_token_counter(settings: AppSettings) -> Callable[[], Callable[[str], int] | None]:
    """Token counts with the chosen model's tokenizer (loaded once, in the ingest thread)."""
    counter: list[Callable[[str], int] | None] = []

    def get() -> Callable[[str], int] | None:
        if not counter:
            try:
                from engine.model_store import open_model
                from engine.tokenizer import load_tokenizer

                tokenizer = load_tokenizer(open_model(settings.model_spec()).path)
                counter.append(lambda text: len(tokenizer.encode(text)))
            except Exception as error:  # noqa: BLE001 — counts are optional
                log.warning("no token counts: %s", error)
                counter.append(None)
        return counter[0]

    return get


__all__ = ["AskRequest", "ServiceWorker", "IngestWorker", "BuildProgress", "IngestProgress", "corpus_hash"]
