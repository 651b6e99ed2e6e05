"""`Engine`: build the corpus cache for documents, and answer questions about them,
streaming Token, Evidence and Stats events.

    engine = Engine(load_model("qwen2.5-coder-0.5b-instruct"))
    for event in engine.ask("Who wrote it?", documents):
        ...

`ask` reads the passages BM25 ranks best as one numbered context; it needs no cache.
`build` writes the corpus cache (each document's keys and values, engine/corpus/build.py),
every segment prefilled after the shared prefix (the model's chat template up to the
user's text); `ask` can read the passages' keys and values from it instead of
prefilling their text (`read_cached`).

The earlier answer path, block-sparse attention over the whole cache with the model's
retrieval heads, was removed: it lost to BM25 passages on `quire bench qa`
(docs/lab/answers-bench-qa.md).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from engine.corpus.answer import (
    HISTORY_TOKENS,
    Source,
    Turn,
    attribute,
    citations,
    grounded_messages,
    missing_names,
    not_mentioned,
    reading_order,
    recent_turns,
    says_not_found,
    without_citations,
)
from engine.corpus.build import (
    BuildProgress,
    BuildSummary,
    CorpusBuilder,
    CorpusDocument,
    Manifest,
    ManifestStore,
    settings_tag,
)
from engine.corpus import tasks
from engine.corpus.passages import PassageIndex
from engine.corpus.settings import CacheSettings
from engine.corpus.store import SegmentStore
from engine.errors import Cancelled, CorruptCacheError
from engine.generate import GenerationStats, SamplingParams, Token, prefill
from engine.paths import data_dir
from engine.reader import LocalReader, Reader
from engine.runtime import LoadedModel

log = logging.getLogger(__name__)

# Bump when what a segment holds changes for the same model (capture point, key
# layout): older caches then live in another folder and are never read.
MEMORY_LAYOUT = 1
MEMORY_MARKER = "\u2063QUIRE-MEMORY\u2063"

# Passages the reader gets (engine/corpus/passages.py): 5 of 200 words, as BM25-RAG
# reads. More passages raised the evidence hit (8: 84.9%, 12: 88.9% against 79.4%)
# but not the 0.5B reader's accuracy (36.4%, 36.1% against 40.1%; docs/lab/answers-bench-qa.md).
READ_PASSAGES = 5
# A follow-up is retrieved for together with the turn before it, whose words carry
# what "she", "it" or "the second one" refer to: BM25 of the follow-up, plus these
# shares of BM25 for the previous question and the previous answer.
FOLLOW_UP_QUESTION_WEIGHT = 0.5
FOLLOW_UP_ANSWER_WEIGHT = 0.25
# Of a follow-up's passages, this many are ranked with the turn before; the rest for
# the follow-up alone, so a question on a new topic still finds its own. Measured by
# the passages read (evidence hit) on bench qa: the 26 follow-ups 96.2% (61.5% alone),
# the 127 answerable questions after a turn about another document 84.2% (85.3%
# with no turn before; 80.4% with all five passages ranked with the turn).
FOLLOW_UP_JOINT = 3
# The answer's repetition guard (SamplingParams.no_repeat_ngram): no 12-token run
# twice. Long enough for an answer to repeat a name or a phrase, short enough to cut
# a looping sentence after its first round.
ANSWER_NO_REPEAT_NGRAM = 12


@dataclass
class Evidence:
    """A passage the answer read, with its share of the retrieval (BM25) score."""

    doc_id: int | str
    title: str
    page_label: str | None
    page_index: int | None
    char_start: int
    char_end: int
    text: str
    weight: float
    # Where the answer read this passage as part of its numbered context: its [n],
    # whether the answer cited it, and whether every citation of it held the cited
    # sentence's key words (None where it was not cited).
    number: int | None = None
    cited: bool = False
    supported: bool | None = None


@dataclass
class AskStats:
    prompt_tokens: int = 0
    memory_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token: float = 0.0
    decode_tokens_per_second: float = 0.0
    # The answer path (Engine.ask): seconds to choose the passages (BM25), how many it
    # read (and how many of those from the corpus cache) and the reader's prompt
    # tokens, and what the answer did with them.
    retrieval_seconds: float = 0.0
    passages_read: int = 0
    passages_from_cache: int = 0  # read from the corpus cache, not prefilled again
    context_tokens: int = 0
    citations: int = 0
    unsupported_citations: int = 0
    not_found: bool = False
    finish_reason: str = ""


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


class Engine:
    def __init__(
        self,
        model: LoadedModel,
        *,
        cache_root: Path | None = None,
        cache_settings: CacheSettings | None = None,
        read_cached: bool = False,
        reader: Reader | None = None,
    ) -> None:
        self.model = model
        # Who writes answers and summaries from the chosen passages (engine/reader.py):
        # the cache's own model unless another is given.
        self.reader: Reader = reader if reader is not None else LocalReader(model)
        # Whether `ask` reads cached passages' keys and values instead of prefilling
        # their text: faster to the first token, not yet shown as good (see
        # _read_cached); off by default, measured as bench qa's "quire-cache".
        self.read_cached = read_cached
        self.cache_settings = cache_settings or CacheSettings()
        self.fingerprint = model_fingerprint(model)
        self.root = (cache_root or data_dir() / "cache") / self.fingerprint
        self.store = SegmentStore(self.root)
        self.manifests = ManifestStore(self.root, settings_tag(self.cache_settings))
        self.memory = importlib.import_module(f"engine.backends.{model.backend}.memory")
        self.prefix_ids, self._after_memory = self._split_prompt()
        # The documents last asked: their passage index, their cache manifests (None
        # where a document is not cached) and their text in lowercase (for names).
        self._passages: tuple[tuple[str, ...], PassageIndex, list[Manifest | None], list[str]] | None = None
        self.builder = CorpusBuilder(
            self.store,
            self.manifests,
            fingerprint=self.fingerprint,
            settings=self.cache_settings,
            prefix=self.prefix_ids,
            encode=lambda text: model.tokenizer.encode(text),
            token_bytes=model.tokenizer.token_bytes,
            make_prefiller=lambda: self.memory.SegmentPrefiller(
                model.model, self.prefix_ids, self.cache_settings.context_tokens + self.cache_settings.segment_tokens
            ),
        )

    # -- prompt ------------------------------------------------------------------

    def _split_prompt(self) -> tuple[list[int], str]:
        """The chat template around a user turn: the ids before the user's text (the
        shared prefix every segment is prefilled after) and the text after it, with
        "{question}" where the question goes."""
        messages = [{"role": "user", "content": MEMORY_MARKER + "\n\n{question}"}]
        text = self.model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        before, marker, after = text.partition(MEMORY_MARKER)
        if not marker:
            raise ValueError("the chat template dropped the user's text")
        tokenizer = self.model.tokenizer
        prefix = tokenizer.encode(before)
        if tokenizer.add_bos_default and tokenizer.bos_id is not None and (not prefix or prefix[0] != tokenizer.bos_id):
            prefix = [tokenizer.bos_id, *prefix]
        return prefix, after

    def question_ids(self, question: str) -> list[int]:
        return self.model.tokenizer.encode(self._after_memory.replace("{question}", question.strip()))

    # -- cache -------------------------------------------------------------------

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

    def cache_bytes(self) -> int:
        return self.store.total_bytes()

    # -- ask ---------------------------------------------------------------------

    def ask(
        self,
        question: str,
        documents: list[CorpusDocument],
        params: SamplingParams | None = None,
        *,
        history: Iterable[Turn] = (),
        cancel: Callable[[], bool] | None = None,
    ) -> Iterator[Token | Evidence | AskStats]:
        """Answer from the documents: the passages BM25 ranks best, read as one
        numbered context (engine/corpus/answer.py); stream the answer's tokens, then
        every passage read as Evidence (number, cited, supported), then statistics.

        `history`: the conversation's earlier turns, oldest first. The reader sees the
        newest of them that fit in HISTORY_TOKENS, and the passages are chosen for the
        question together with the turn before it (`choose_sources`).

        The documents need not be cached. The retrieval heads' tally over the cache
        (the removed block-sparse path), fused with BM25, lowered the evidence hit on
        `quire bench qa` (77.1% against 77.8% for BM25 alone, 127 questions) and cost
        up to 39 s a question, so the answer path does not rank by the cache
        (docs/lab/answers-bench-qa.md)."""
        return self._answer(question, documents, params, cancel, list(history))

    # -- whole-document tasks (engine/corpus/tasks.py) -------------------------------

    def find_all(self, term: str, documents: list[CorpusDocument], *, cancel: Callable[[], bool] | None = None):
        """Every sentence of the documents that mentions `term` (exhaustive), streamed
        as a numbered list with Evidence per sentence, then TaskStats."""
        return tasks.find_all(term, documents, cancel)

    def summarise(self, document: CorpusDocument, params: SamplingParams | None = None, *,
                  first_page: int | None = None, last_page: int | None = None,
                  cancel: Callable[[], bool] | None = None):
        """A summary of the document (or of pages first_page..last_page, 1-based), its
        points citing the parts they came from; TaskProgress with an ETA as it reads."""
        params = replace(params or SamplingParams(max_new_tokens=400), no_repeat_ngram=ANSWER_NO_REPEAT_NGRAM)
        return tasks.summarise(self.reader, document, params, first_page=first_page, last_page=last_page, cancel=cancel)

    def compare(self, documents: list[CorpusDocument], topic: str, params: SamplingParams | None = None, *,
                cancel: Callable[[], bool] | None = None) -> Iterator[Token | Evidence | AskStats]:
        """How two or more documents differ on `topic`: each document's COMPARE_PASSAGES
        best passages for it (BM25 within that document), numbered together, read as
        one context with a comparing question; streamed and cited as `ask` is."""
        if len(documents) < 2:
            raise ValueError("compare needs two or more documents")
        question = (f"Compare what the documents say about {topic.strip()}: for each document, what it says "
                    f"about it, then how they differ. Cite the passages.")
        return self._answer(question, documents, params, cancel, [], per_document=tasks.COMPARE_PASSAGES)

    # -- the answer path -----------------------------------------------------------

    def passage_index(self, documents: list[CorpusDocument]) -> PassageIndex:
        """The documents' passages and their lexical index (kept for the documents
        last asked). Built from their text: the answer path does not read the cache."""
        names = tuple(d.content_key for d in documents)
        if self._passages is None or self._passages[0] != names:
            # Passages run across page edges: cut at them, the passages that end a
            # page are fragments, and the reader scored 26.6% against BM25-RAG's 40.1%
            # on the same prompt (bench qa's 36-question subset; docs/lab/answers-bench-qa.md).
            index = PassageIndex([d.text for d in documents])
            lowered = [d.text.lower() for d in documents]
            self._passages = (names, index, [self.manifests.load(name) for name in names], lowered)
        else:  # a document cached since
            manifests = self._passages[2]
            for n, manifest in enumerate(manifests):
                if manifest is None:
                    manifests[n] = self.manifests.load(names[n])
        return self._passages[1]

    def choose_sources(
        self, documents: list[CorpusDocument], question: str, count: int = READ_PASSAGES, history: list[Turn] | None = None
    ) -> list[Source]:
        """The `count` passages that BM25 ranks best for `question`, numbered best
        first. Neighbours that overlap stay separate sources (their shared words are
        read twice): a merged run would cite the page where it starts, not the page of
        the passage that held the answer. After earlier turns, the first
        FOLLOW_UP_JOINT passages are ranked with the previous question and answer
        (`retrieval_scores`), the rest for the question alone."""
        index = self.passage_index(documents)
        scores = index.bm25(question)
        ranked = [int(i) for i in np.argsort(-scores, kind="stable")[: count + FOLLOW_UP_JOINT]]
        if not history:
            return self._numbered(documents, index, ranked[:count], scores, index.weights(question))
        scores = scores + turn_scores(index, history)
        chosen = [int(i) for i in np.argsort(-scores, kind="stable")[:FOLLOW_UP_JOINT]]
        order = chosen + [i for i in ranked if i not in chosen]
        return self._numbered(documents, index, order[:count], scores, index.weights(f"{question} {history[-1].question}"))

    @staticmethod
    def _numbered(documents: list[CorpusDocument], index: PassageIndex, order: list[int], scores: np.ndarray,
                  asked: dict[str, float]) -> list[Source]:
        """Passages `order` of `index` as Sources numbered 1.. in that order, each cited
        by the page that holds the question's rarest terms (`_page_of`)."""
        sources = []
        for number, i in enumerate(order, 1):
            document = documents[int(index.entry[i])]
            start, end = int(index.start[i]), int(index.end[i])
            page_index, label = _page_of(document, start, end, asked, index.analyse)
            sources.append(Source(number, int(index.entry[i]), start, end, document.title, label,
                                  document.text[start:end], float(scores[i]), page_index))
        return sources

    def balanced_sources(self, documents: list[CorpusDocument], question: str, per_document: int) -> list[Source]:
        """The `per_document` best passages of each document for `question`, numbered
        together (each document's best first, the documents in turn)."""
        index = self.passage_index(documents)
        scores = index.bm25(question)
        chosen: list[list[int]] = []
        for entry in range(len(documents)):
            mine = np.flatnonzero(index.entry == entry)
            chosen.append([int(i) for i in mine[np.argsort(-scores[mine], kind="stable")[:per_document]]])
        order = [picks[rank] for rank in range(per_document) for picks in chosen if rank < len(picks)]
        return self._numbered(documents, index, order, scores, index.weights(question))

    def _answer(self, question, documents, params, cancel, history: list[Turn], per_document: int = 0):
        params = replace(params or SamplingParams(), no_repeat_ngram=ANSWER_NO_REPEAT_NGRAM)
        started = time.perf_counter()
        generation = GenerationStats()
        if per_document:
            sources = self.balanced_sources(documents, question, per_document)
        else:
            sources = self.choose_sources(documents, question, history=history)
        history = recent_turns(history, HISTORY_TOKENS, self.reader.count_tokens)
        _, _, manifests, lowered = self._passages  # set by choose_sources
        memory_tokens = sum(m.tokens for m in manifests if m is not None)
        # A question about a name the documents never mention is not answered from
        # passages that cannot hold the answer: the 0.5B reader answered every such
        # question of bench qa anyway (docs/lab/answers-bench-qa.md).
        missing = missing_names(question, lowered)
        if missing:
            yield Token(-1, not_mentioned(missing))
            yield from self._passage_evidence(sources, documents, [])
            seconds = time.perf_counter() - started
            yield AskStats(
                memory_tokens=memory_tokens,
                time_to_first_token=seconds,
                retrieval_seconds=seconds,
                passages_read=0,
                not_found=True,
                finish_reason="not_mentioned",
            )
            return
        retrieval_seconds = time.perf_counter() - started
        try:
            read = self._read_cached(question, sources, documents, params.max_new_tokens, cancel, history)
        except Cancelled:
            yield AskStats(finish_reason="cancelled")
            return
        if read is None:
            tokens = self.reader.chat(grounded_messages(question, sources, history), params, cancel=cancel,
                                      stats=generation)
        else:
            prompt, cache, logits = read
            tokens = self.model.stream(prompt, params, cancel=cancel, stats=generation, cache=cache, logits=logits)
        context_seconds = time.perf_counter() - started
        answer = ""
        for token in tokens:
            answer += token.text
            yield token
        # Inline [n] where the model wrote them, else the passages the answer's
        # sentences share their key words with.
        cited = citations(answer, sources) or attribute(answer, sources)
        yield from self._passage_evidence(sources, documents, cited)
        yield AskStats(
            prompt_tokens=generation.prompt_tokens,
            memory_tokens=memory_tokens,
            generated_tokens=generation.generated_tokens,
            time_to_first_token=context_seconds + generation.time_to_first_token,
            decode_tokens_per_second=generation.decode_tokens_per_second,
            retrieval_seconds=retrieval_seconds,
            passages_read=len(sources),
            passages_from_cache=len(sources) if read is not None else 0,
            context_tokens=generation.prompt_tokens,
            citations=len(cited),
            unsupported_citations=sum(not c.supported for c in cited),
            not_found=says_not_found(answer),
            finish_reason=generation.finish_reason,
        )

    @staticmethod
    def _passage_evidence(sources: list[Source], documents: list[CorpusDocument], cited: list) -> Iterator[Evidence]:
        """Every passage chosen, as Evidence, marked where the answer cited it. A
        passage's weight is its share of the chosen passages' BM25 scores (BM25 goes
        below zero where a term is in most passages of a small scope: such a passage
        shares nothing)."""
        shares = [max(s.score, 0.0) for s in sources]
        total = sum(shares)
        for source, share in zip(sources, shares):
            mine = [c for c in cited if c.number == source.number]
            document = documents[source.entry]
            yield Evidence(
                doc_id=document.doc_id,
                title=document.title,
                page_label=source.page_label,
                page_index=source.page_index,
                char_start=source.start,
                char_end=source.end,
                text=source.text,
                weight=share / total if total else 1.0 / len(sources),
                number=source.number,
                cited=bool(mine),
                supported=all(c.supported for c in mine) if mine else None,
            )

    def _read_cached(self, question, sources, documents, answer_tokens, cancel, history: list[Turn]):
        """The reader's context with each passage's keys and values read from the
        corpus cache (keys re-rotated to their new places) and only the rest (chat
        template, passage headers, question) prefilled: (prompt ids, the filled dense
        cache, the last prompt token's logits), or None where a passage's document is
        not cached, a segment cannot be read, or the backend cannot place stored keys.

        Off by default: on bench qa's 36-question subset, with the stemmed passages,
        it scored 35.3% against 45.9% prefilled (first token 1.45 s against 4.50 s,
        median, 2-core box), and 37.4% with each passage's first 32 tokens prefilled
        again (EPIC-style); SmolLM2-135M misreads a test document from the cache that
        it answers when prefilled. Each passage's keys and values were computed in its
        own segment, not after the passages before it (docs/lab/answers-bench-qa.md).
        A passage's tokens are those starting inside its characters, plus the one
        its first word begins in."""
        # Stored keys and values are the cache model's own: only it can read them.
        own = isinstance(self.reader, LocalReader) and self.reader.model is self.model
        place = getattr(self.memory, "append_stored", None) if self.read_cached and own else None
        manifests = self._passages[2] if self._passages is not None else []
        if place is None or not sources or any(manifests[s.entry] is None for s in sources):
            return None
        config = self.model.model.config
        sources = reading_order(sources)  # the prompt's order: its pieces alternate with them
        spans = []
        for source in sources:
            offsets = manifests[source.entry].offsets
            first = max(0, int(np.searchsorted(offsets, source.start, side="right")) - 1)
            spans.append((manifests[source.entry], first, max(first + 1, int(np.searchsorted(offsets, source.end, side="left")))))
        marks = [f"\u2063QUIRE-PASSAGE-{s.number}\u2063" for s in sources]
        text = self.model.tokenizer.apply_chat_template(
            grounded_messages(question, [replace(s, text=mark) for s, mark in zip(sources, marks)], history),
            add_generation_prompt=True,
        )
        pieces = []
        for mark in marks:
            before, found, text = text.partition(mark)
            if not found:
                return None  # the template changed the passage's text
            pieces.append(before)
        pieces.append(text)
        tokenizer = self.model.tokenizer
        encoded = [tokenizer.encode(piece) for piece in pieces]
        if tokenizer.add_bos_default and tokenizer.bos_id is not None and encoded[0][:1] != [tokenizer.bos_id]:
            encoded[0] = [tokenizer.bos_id, *encoded[0]]
        stored = sum(end - first for _, first, end in spans)
        cache = self.model.model.new_cache(sum(map(len, encoded)) + stored + answer_tokens + 1)
        try:
            kv = [self._stored_kv(*span, config.num_hidden_layers) for span in spans]
        except (CorruptCacheError, OSError, KeyError) as error:
            log.warning("reading passages from the cache failed (%s); prefilling them", error)
            return None
        logits = None
        for n, tokens in enumerate(encoded):
            if tokens:
                logits = prefill(self.model.model, tokens, cache, cancel=cancel)
            if n < len(kv):
                place(self.model.model, cache, kv[n])
        if logits is None or not encoded[-1]:
            return None
        return list(range(cache.length)), cache, logits

    def _stored_kv(self, manifest: Manifest, first: int, end: int, layers: int) -> list[tuple[np.ndarray, np.ndarray]]:
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

def turn_scores(index: PassageIndex, history: list[Turn]) -> np.ndarray:
    """What the turn before adds to a follow-up's BM25: the previous question's and
    answer's BM25 at FOLLOW_UP_QUESTION_WEIGHT and FOLLOW_UP_ANSWER_WEIGHT."""
    last = history[-1]
    return (FOLLOW_UP_QUESTION_WEIGHT * index.bm25(last.question)
            + FOLLOW_UP_ANSWER_WEIGHT * index.bm25(without_citations(last.answer)))


def retrieval_scores(index: PassageIndex, question: str, history: list[Turn] | None = None) -> np.ndarray:
    """BM25 of every passage for `question`, plus `turn_scores` after earlier turns."""
    scores = index.bm25(question)
    return scores + turn_scores(index, history) if history else scores


def _page_of(document: CorpusDocument, start: int, end: int, asked: dict[str, float],
             analyse: Callable[[str], list[str]]) -> tuple[int | None, str | None]:
    """The page a passage [start, end) is cited by, where it spans several: the one
    whose part holds the question's rarest terms (by their weights `asked`, over the
    terms that `analyse` gives), then most of its characters."""
    pages = document.pages
    if not pages:
        return None, None
    first = document.page_at(start)[0]
    last = document.page_at(max(start, end - 1))[0]
    bounds = [p for p, _ in pages] + [max(end, pages[-1][0])]

    def weight(i: int) -> tuple[float, int]:
        lo, hi = max(start, bounds[i]), min(end, bounds[i + 1])
        return sum(asked.get(t, 0.0) for t in set(analyse(document.text[lo:hi]))), hi - lo

    index = max(range(first, last + 1), key=weight)
    return index, pages[index][1]


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
