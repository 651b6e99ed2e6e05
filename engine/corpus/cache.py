"""`CorpusCache`: the persistent KV cache of one model's documents — build it, check
it, forget it, measure it, and read passages' keys and values back.

    cache = CorpusCache(model, prefix)        # prefix: the chat template's ids before the user's text
    cache.build(documents, on_progress=...)   # BuildSummary
    cache.is_cached(document), cache.total_bytes(), cache.forget(keep=documents)

`build` writes each document's keys and values (engine/corpus/build.py `CorpusBuilder`),
every segment prefilled after the shared prefix, into engine/corpus/store.py's
`SegmentStore`, with a `Manifest` per document and cache settings (`ManifestStore`):
`<cache root>/<model fingerprint>/segments/…` and `…/documents/`. The answer path does
not need it: `Answerer` (engine/corpus/answerer.py) reads passages from it only with
`read_cached`, through `scope_manifests` and `stored_kv`.

`prune_caches` frees the disk of removed documents in every model's folder with no
model loaded.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from engine.corpus.build import (
    BuildProgress,
    BuildSummary,
    CorpusBuilder,
    CorpusDocument,
    Manifest,
    ManifestStore,
    settings_tag,
)
from engine.corpus.settings import CacheSettings
from engine.corpus.store import SegmentStore
from engine.paths import data_dir
from engine.runtime import LoadedModel

# Bump when what a segment holds changes for the same model (capture point, key
# layout): older caches then live in another folder and are never read.
MEMORY_LAYOUT = 1


def model_fingerprint(model: LoadedModel) -> str:
    """Everything that changes the keys and values a model computes for a text."""
    h = hashlib.sha256()
    h.update(json.dumps(asdict(model.config), sort_keys=True, default=str).encode())
    for path in model.folder.weight_files:
        h.update(f"{path.name}:{path.stat().st_size}".encode())
    # Segments hold the same layout whichever backend computed them (pre-RoPE keys in
    # the interleaved pair order, float32 into the store), so the backend is not part
    # of the fingerprint: a cache built by torch is read by MLX and the other way
    # round. The dtype is: bf16 and fp32 weights give (slightly) different keys, so
    # the two backends share a cache when they run the same dtype. The text hashed
    # keeps the form torch caches were addressed by before MLX ("torch:torch.float32:1"),
    # so caches built then stay valid.
    dtype = str(getattr(model.model, "dtype", "")).rsplit(".", 1)[-1]
    h.update(f"torch:torch.{dtype}:{MEMORY_LAYOUT}".encode())
    if getattr(model.model, "quantised", False):
        # Quantised matrices give other keys than the float ones of the same file.
        h.update(b":quantised")
    return h.hexdigest()[:20]


class CorpusCache:
    def __init__(
        self,
        model: LoadedModel,
        prefix: list[int],
        *,
        root: Path | None = None,
        settings: CacheSettings | None = None,
    ) -> None:
        """`prefix`: the token ids every segment is prefilled after (the chat template
        before the user's text, `Answerer._split_prompt`); `root`: the cache root
        (default: the data directory's cache/), the model's folder goes under it."""
        self.model = model
        self.settings = settings or CacheSettings()
        self.prefix = prefix
        self.fingerprint = model_fingerprint(model)
        self.root = (root or data_dir() / "cache") / self.fingerprint
        self.store = SegmentStore(self.root)
        self.manifests = ManifestStore(self.root, settings_tag(self.settings))
        # The backend's capture of keys and values (SegmentPrefiller) and, where it has
        # one, its placing of stored ones into a dense cache (append_stored).
        self.memory = importlib.import_module(f"engine.backends.{model.backend}.memory")
        # The documents last asked about and their manifests (None where not cached).
        self._scope: tuple[tuple[str, ...], list[Manifest | None]] | None = None
        self.builder = CorpusBuilder(
            self.store,
            self.manifests,
            fingerprint=self.fingerprint,
            settings=self.settings,
            prefix=prefix,
            encode=lambda text: model.tokenizer.encode(text),
            token_bytes=model.tokenizer.token_bytes,
            make_prefiller=lambda: self.memory.SegmentPrefiller(
                model.model, prefix, self.settings.context_tokens + self.settings.segment_tokens
            ),
        )

    def build(
        self,
        documents: Iterable[CorpusDocument],
        *,
        on_progress: Callable[[BuildProgress], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> BuildSummary:
        return self.builder.build(documents, on_progress=on_progress, cancel=cancel)

    def is_cached(self, document: CorpusDocument) -> bool:
        return self.builder.manifest_for(document) is not None

    def forget(self, keep: Iterable[CorpusDocument]) -> int:
        """Drop manifests and segments of every document not in `keep`; bytes freed."""
        return _prune_folder(self.root, {d.content_key for d in keep})

    def total_bytes(self) -> int:
        return self.store.total_bytes()

    def scope_manifests(self, documents: list[CorpusDocument]) -> list[Manifest | None]:
        """The documents' manifests (None where a document is not cached), kept for the
        documents last asked; a document cached since is looked up again."""
        names = tuple(d.content_key for d in documents)
        if self._scope is None or self._scope[0] != names:
            self._scope = (names, [self.manifests.load(name) for name in names])
        else:
            manifests = self._scope[1]
            for n, manifest in enumerate(manifests):
                if manifest is None:
                    manifests[n] = self.manifests.load(names[n])
        return self._scope[1]

    def stored_kv(self, manifest: Manifest, first: int, end: int, layers: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every layer's keys (before RoPE) and values, (Hkv, T, D) float32, of the
        document's tokens [first, end), from the segments that hold them."""
        keys: list[list[np.ndarray]] = [[] for _ in range(layers)]
        values: list[list[np.ndarray]] = [[] for _ in range(layers)]
        for ref in manifest.segments:
            lo, hi = max(first, ref.start), min(end, ref.start + ref.tokens)
            if lo >= hi:
                continue
            with self.store.open(ref.key) as segment:
                for layer in range(layers):
                    k, v = segment.dequantize(segment.layer_slot(layer))  # KeyError: a layer not stored
                    keys[layer].append(k[:, lo - ref.start : hi - ref.start])
                    values[layer].append(v[:, lo - ref.start : hi - ref.start])
        return [(np.concatenate(k, axis=1), np.concatenate(v, axis=1)) for k, v in zip(keys, values)]


def prune_caches(keep_content_keys: set[str], cache_root: Path | None = None) -> int:
    """Drop, in every model's cache folder, the manifests of texts not in
    `keep_content_keys` and the segments no remaining manifest uses; bytes freed.
    Needs no model: removing a document frees its disk without loading one."""
    root = cache_root or data_dir() / "cache"
    return sum(_prune_folder(folder, keep_content_keys) for folder in sorted(root.glob("*")) if folder.is_dir())


def _prune_folder(folder: Path, keep_content_keys: set[str]) -> int:
    """One model's cache folder: manifests of other texts (under any settings) and
    the segments nothing kept uses go; bytes freed."""
    manifests = ManifestStore(folder)
    manifests.remove_partials()
    live: set[str] = set()
    for key in manifests.all():
        if key in keep_content_keys:
            live |= manifests.segment_keys(key)
        else:
            manifests.remove(key)
    return SegmentStore(folder).collect_garbage(live)
