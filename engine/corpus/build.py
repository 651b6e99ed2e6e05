"""Building the corpus cache: documents → tokens → segments → stored keys and values.

A document's tokens are cut into segments of `segment_tokens`. Each segment is
prefilled on its own after the shared prompt prefix (the attention sinks the
question will have too), optionally after the tail of the previous segment as
read-only context, and its keys (before RoPE) and values are written to the
segment store. A segment's address is a hash of everything that determines its
content (model fingerprint, prefix, context and segment tokens, block size,
precision), so the same text is cached once however many documents hold it.

A document manifest (JSON + token→character offsets) is written last, atomically:
a build killed at any point leaves whole segments that the next build reuses, and
no manifest that points at a missing one.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine.corpus.settings import CacheSettings
from engine.corpus.store import LAYOUT_TAGS, SegmentStore
from engine.errors import Cancelled
from engine.paths import write_atomic

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


@dataclass
class CorpusDocument:
    """A document as the engine sees it: plain text with page starts (from ingest)."""

    doc_id: int | str  # the caller's id, echoed back in evidence
    text: str
    pages: list[tuple[int, str]] = field(default_factory=list)  # (start character, label)
    title: str = ""

    @property
    def content_key(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def page_at(self, char: int) -> tuple[int | None, str | None]:
        """(index, label) of the page holding character `char`; (None, None) without pages."""
        if not self.pages:
            return None, None
        index = max(0, bisect.bisect_right([start for start, _ in self.pages], char) - 1)
        return index, self.pages[index][1]


@dataclass
class SegmentRef:
    key: str
    start: int  # first token of the segment within the document
    tokens: int


@dataclass
class Manifest:
    """What the cache holds for one document's text under one model and settings."""

    content_key: str
    tokens: int
    segments: list[SegmentRef]
    offsets: np.ndarray  # (tokens + 1,) int64: character where each token starts; last = len(text)

    def char_span(self, first_token: int, end_token: int) -> tuple[int, int]:
        return int(self.offsets[first_token]), int(self.offsets[end_token])


def token_offsets(token_bytes: Callable[[int], bytes], ids: Sequence[int], text: str) -> np.ndarray:
    """(T + 1,) character offsets of each token's start in `text`, exact when the
    tokens' bytes spell the text (byte-level BPE), proportional otherwise."""
    raw = text.encode("utf-8")
    lengths = np.fromiter((len(token_bytes(i)) for i in ids), dtype=np.int64, count=len(ids))
    byte_starts = np.concatenate([[0], np.cumsum(lengths)])
    if byte_starts[-1] == len(raw):
        data = np.frombuffer(raw, dtype=np.uint8)
        # A character starts at every byte that is not a UTF-8 continuation (10xxxxxx).
        chars_before = np.concatenate([[0], np.cumsum((data & 0xC0) != 0x80)])
        return chars_before[byte_starts].astype(np.int64)
    # Tokenizers that rewrite text (SentencePiece spaces): spread offsets evenly.
    scale = len(text) / max(1, int(byte_starts[-1]))
    return np.minimum(np.round(byte_starts * scale), len(text)).astype(np.int64)


def segment_bounds(total: int, segment_tokens: int) -> list[tuple[int, int]]:
    return [(start, min(start + segment_tokens, total)) for start in range(0, total, segment_tokens)]


def segment_key(fingerprint: str, settings: CacheSettings, prefix: Sequence[int], context: Sequence[int], segment: Sequence[int]) -> str:
    h = hashlib.sha256()
    address = {"model": fingerprint, "block": settings.block_size, "precision": settings.precision}
    h.update(json.dumps(address | _layout(settings)).encode())
    for part in (prefix, context, segment):
        h.update(b"|")
        h.update(np.asarray(part, dtype=np.int64).tobytes())
    return h.hexdigest()


@dataclass
class BuildProgress:
    documents_done: int
    documents_total: int
    tokens_done: int
    tokens_total: int
    segments_built: int
    segments_reused: int
    seconds: float
    document_id: int | str | None = None  # the document being built (None before the first)
    document_fraction: float = 0.0  # share of that document's tokens cached so far

    @property
    def eta_seconds(self) -> float | None:
        if not self.tokens_done or self.tokens_done >= self.tokens_total:
            return None
        return self.seconds / self.tokens_done * (self.tokens_total - self.tokens_done)


@dataclass
class BuildSummary:
    documents: int = 0
    tokens: int = 0
    segments_built: int = 0
    segments_reused: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0


class ManifestStore:
    """documents/<content key>.<settings tag>.json + .offsets.npy beside the segment
    store. The tag names the cache settings (segment length, context, block size,
    precision): the same text cached in int8 and in int4 has two manifests, and a
    question asked with one precision never reads the other's segments."""

    def __init__(self, root: Path, tag: str = "") -> None:
        self.folder = root / "documents"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tag = tag

    def _paths(self, content_key: str) -> tuple[Path, Path]:
        stem = f"{content_key}.{self.tag}" if self.tag else content_key
        return self.folder / f"{stem}.json", self.folder / f"{stem}.offsets.npy"

    def load(self, content_key: str) -> Manifest | None:
        meta_path, offsets_path = self._paths(content_key)
        try:
            meta = json.loads(meta_path.read_text())
            offsets = np.load(offsets_path)
        except (OSError, ValueError):
            return None
        if meta.get("version") != MANIFEST_VERSION or len(offsets) != meta["tokens"] + 1:
            return None
        return Manifest(content_key, meta["tokens"], [SegmentRef(**s) for s in meta["segments"]], offsets)

    def save(self, manifest: Manifest) -> None:
        meta_path, offsets_path = self._paths(manifest.content_key)
        # Offsets first: a manifest JSON only ever points at a complete offsets file.
        buffer = io.BytesIO()
        np.save(buffer, manifest.offsets)
        write_atomic(offsets_path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
        meta = {
            "version": MANIFEST_VERSION,
            "tokens": manifest.tokens,
            "segments": [asdict(s) for s in manifest.segments],
        }
        write_atomic(meta_path, lambda tmp: tmp.write_text(json.dumps(meta)))

    def remove(self, content_key: str) -> None:
        """Every manifest of this text, whatever its settings."""
        for path in self.folder.glob(f"{content_key}.*"):
            path.unlink(missing_ok=True)

    def all(self) -> list[str]:
        """Content keys with a manifest under any settings."""
        return sorted({p.name.split(".")[0] for p in self.folder.glob("*.json")})

    def segment_keys(self, content_key: str) -> set[str]:
        """Segments that any manifest of this text uses."""
        keys: set[str] = set()
        for path in self.folder.glob(f"{content_key}.*json"):
            try:
                keys.update(s["key"] for s in json.loads(path.read_text())["segments"])
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
        return keys

    def remove_partials(self) -> None:
        """Temp files of writes a kill interrupted, and offsets without a manifest."""
        for path in self.folder.glob(".*.tmp"):
            path.unlink(missing_ok=True)
        for path in self.folder.glob("*.offsets.npy"):
            if not path.with_name(path.name.removesuffix(".offsets.npy") + ".json").exists():
                path.unlink(missing_ok=True)


def settings_tag(settings: CacheSettings) -> str:
    tagged = asdict(settings) | _layout(settings)
    return hashlib.sha256(json.dumps(tagged, sort_keys=True).encode()).hexdigest()[:12]


def _layout(settings: CacheSettings) -> dict:
    """The segment layout's tag where a precision's layout changed (store.LAYOUT_TAGS),
    else nothing: addresses of the unchanged precisions stay as they were."""
    tag = LAYOUT_TAGS.get(settings.precision)
    return {"layout": tag} if tag else {}


def writer_threads() -> int:
    """Threads that quantise and write segments while the model prefills the next
    ones: half the cores, at most 8 (numpy and file writes release the GIL)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class CorpusBuilder:
    """Builds and reuses segments for documents under one model and cache settings.

    `prefill` is the backend's segment prefiller: run(context, segment, on_layer)
    → (keys, values) float32 (L, Hkv, T, D), with `layers` the model layers stored.
    Quantising and writing a segment runs on writer threads while the model
    prefills the next (on a GPU the writes took longer than the prefill); a
    document's manifest is saved only once all its segments are written.
    """

    def __init__(
        self,
        store: SegmentStore,
        manifests: ManifestStore,
        *,
        fingerprint: str,
        settings: CacheSettings,
        prefix: Sequence[int],
        encode: Callable[[str], list[int]],
        token_bytes: Callable[[int], bytes],
        make_prefiller: Callable[[], object],
    ) -> None:
        self.store = store
        self.manifests = manifests
        self.fingerprint = fingerprint
        self.settings = settings
        self.prefix = list(prefix)
        self.encode = encode
        self.token_bytes = token_bytes
        self._make_prefiller = make_prefiller
        self._prefiller: object | None = None

    def manifest_for(self, document: CorpusDocument) -> Manifest | None:
        """The document's manifest if every segment it names is present and sound."""
        manifest = self.manifests.load(document.content_key)
        if manifest is None or not all(self.store.has(s.key) for s in manifest.segments):
            return None
        return manifest

    def build(
        self,
        documents: Iterable[CorpusDocument],
        *,
        on_progress: Callable[[BuildProgress], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> BuildSummary:
        documents = list(documents)
        summary = BuildSummary(documents=len(documents))
        started = time.perf_counter()
        pending: list[tuple[CorpusDocument, list[int]]] = []
        for document in documents:
            cached = self.manifest_for(document)
            if cached is not None:
                summary.segments_reused += len(cached.segments)
                continue
            pending.append((document, self.encode(document.text)))
        total = sum(len(ids) for _, ids in pending)
        done = 0

        def report(index: int, document: CorpusDocument | None = None, document_done: int = 0, document_total: int = 0) -> None:
            if on_progress is not None:
                on_progress(BuildProgress(
                    len(documents) - len(pending) + index, len(documents), done, total,
                    summary.segments_built, summary.segments_reused, time.perf_counter() - started,
                    document.doc_id if document is not None else None,
                    document_done / document_total if document_total else 1.0,
                ))

        report(0)
        threads = writer_threads()
        writing: dict[str, Future] = {}  # segment key → its write, until collected

        def collect(wait_for: int) -> None:
            """Wait for the oldest writes until at most `wait_for` are in flight."""
            while len(writing) > wait_for:
                key = next(iter(writing))
                summary.bytes_written += writing.pop(key).result()
                summary.segments_built += 1

        # Leaving the pool (finished, cancelled or failed) waits for the writes in
        # flight: none is left half done.
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cache-writer") as pool:
            for index, (document, ids) in enumerate(pending):
                refs = []
                for start, end in segment_bounds(len(ids), self.settings.segment_tokens):
                    if cancel is not None and cancel():
                        raise Cancelled("cache build cancelled")
                    context = ids[max(0, start - self.settings.context_tokens) : start]
                    segment = ids[start:end]
                    key = segment_key(self.fingerprint, self.settings, self.prefix, context, segment)
                    if key in writing or self.store.has(key):
                        summary.segments_reused += 1
                    else:
                        keys, values = self._prefill_segment(context, segment, cancel, summary)
                        # At most two segments per writer wait in memory (each ~25 MB
                        # of float32 for a 0.5B model's 1K-token segment).
                        collect(2 * threads - 1)
                        writing[key] = pool.submit(self._write_segment, key, keys, values, len(context))
                    refs.append(SegmentRef(key, start, end - start))
                    done += end - start
                    report(index, document, end, len(ids))
                collect(0)  # the manifest names only segments already on disk
                offsets = token_offsets(self.token_bytes, ids, document.text)
                self.manifests.save(Manifest(document.content_key, len(ids), refs, offsets))
                summary.tokens += len(ids)
                report(index + 1, document, len(ids), len(ids))
        summary.seconds = time.perf_counter() - started
        return summary

    def _prefill_segment(
        self, context: list[int], segment: list[int], cancel: Callable[[], bool] | None, summary: BuildSummary
    ) -> tuple[np.ndarray, np.ndarray]:
        if self._prefiller is None:
            self._prefiller = self._make_prefiller()
        prefiller = self._prefiller

        def on_layer(done: int, total: int) -> None:
            if cancel is not None and cancel():
                raise Cancelled("cache build cancelled")

        started = time.perf_counter()
        keys, values = prefiller.run(context, segment, on_layer)  # type: ignore[attr-defined]
        summary.prefill_seconds += time.perf_counter() - started
        return keys, values

    def _write_segment(self, key: str, keys: np.ndarray, values: np.ndarray, context: int) -> int:
        return self.store.write(
            key,
            keys,
            values,
            layers=self._prefiller.layers,  # type: ignore[attr-defined]
            precision=self.settings.precision,
            block_size=self.settings.block_size,
            meta={"tokens": keys.shape[2], "context": context},
        )
