"""`Answerer`: answers questions about documents, and runs the whole-document tasks,
streaming Token, Evidence and AskStats events. It composes the three layers below it:

    answerer = Answerer(load_model("qwen2.5-coder-0.5b-instruct"))
    for event in answerer.ask("Who wrote it?", documents):
        ...

- the retriever (`answerer.retriever`, engine/corpus/retriever.py `Retriever`): the
  passages BM25 ranks best for the question, numbered, each cited by one page;
- the reader (`answerer.reader`, engine/reader.py): the model that writes the answer
  from them as one numbered context (the prompt and citations: engine/corpus/answer.py);
- the corpus cache (`answerer.cache`, engine/corpus/cache.py `CorpusCache`): each
  document's keys and values, every segment prefilled after the shared prefix (the
  model's chat template up to the user's text, `_split_prompt`). `ask` needs no
  cache; it can read the passages' keys and values from it instead of prefilling
  their text (`read_cached`).

The earlier answer path, block-sparse attention over the whole cache with the model's
retrieval heads, was removed: it lost to BM25 passages on `quire bench qa`
(docs/lab/answers-bench-qa.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from engine.corpus.answer import (
    HISTORY_TOKENS,
    RESTATED,
    Source,
    Turn,
    attribute,
    citations,
    grounded_messages,
    missing_names,
    not_mentioned,
    reading_order,
    recent_turns,
    restates_question,
    says_not_found,
    without_citations,
)
from engine.corpus.build import CorpusDocument, Manifest
from engine.corpus import tasks
from engine.corpus.cache import CorpusCache
from engine.corpus.retriever import Retriever
from engine.corpus.settings import CacheSettings
from engine.errors import Cancelled, CorruptCacheError
from engine.generate import GenerationStats, SamplingParams, Token, prefill
from engine.reader import LocalReader, Reader
from engine.runtime import LoadedModel

log = logging.getLogger(__name__)

# Marks where the user's text goes in the chat template (`_split_prompt`).
MEMORY_MARKER = "\u2063QUIRE-MEMORY\u2063"

# The answer's repetition guard (SamplingParams.no_repeat_ngram): no 12-token run
# twice. Long enough for an answer to repeat a name or a phrase, short enough to cut
# a looping sentence after its first round.
ANSWER_NO_REPEAT_NGRAM = 12
# The answer's soft guard (SamplingParams.run_penalty) against loops that change a
# word each round. On bench qa's 138 questions: answers flagged as loops (a 6-word run
# three times) 6 → 2, accuracy 57.8% both, 2 scores moved (docs/lab/answers-bench-qa.md).
ANSWER_RUN_PENALTY = 0.8
# The answer's loop stop (SamplingParams.loop_words): an answer ends where it would
# say the same 6-word run a third time, before that run, and is marked " …". On bench
# qa's 138 questions the guards above still left 2 answers with such a run (an
# explanation that says "rounds the result to the nearest integer" three times);
# none now, with the same scores (docs/lab/answers-bench-qa.md, session 32).
ANSWER_LOOP_WORDS = 6
# What ends an answer that the loop stop ended.
CUT_SHORT = " …"


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
    # The answer path (Answerer.ask): seconds to choose the passages (BM25), how many it
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


class Answerer:
    """Answers over documents: `retriever` chooses the passages, `reader` writes from
    them, `cache` holds the documents' keys and values (see the module's docstring)."""

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
        self.prefix_ids, self._after_memory = self._split_prompt()
        self.cache = CorpusCache(model, self.prefix_ids, root=cache_root, settings=cache_settings)
        self.retriever = Retriever()

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
        question together with the turn before it (`Retriever.choose_sources`).

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
        params = replace(params or SamplingParams(max_new_tokens=400), no_repeat_ngram=ANSWER_NO_REPEAT_NGRAM,
                         run_penalty=ANSWER_RUN_PENALTY, loop_words=ANSWER_LOOP_WORDS)
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

    def prepare(self, documents: list[CorpusDocument]) -> None:
        """Make the scope's passage index and look up its cache manifests, so the next
        question about these documents does not wait for them (seconds over a large
        library)."""
        self.retriever.passage_index(documents)
        self.cache.scope_manifests(documents)

    def _answer(self, question, documents, params, cancel, history: list[Turn], per_document: int = 0):
        params = replace(params or SamplingParams(), no_repeat_ngram=ANSWER_NO_REPEAT_NGRAM,
                         run_penalty=ANSWER_RUN_PENALTY, loop_words=ANSWER_LOOP_WORDS)
        started = time.perf_counter()
        generation = GenerationStats()
        if per_document:
            sources = self.retriever.balanced_sources(documents, question, per_document)
        else:
            sources = self.retriever.choose_sources(documents, question, history=history)
        manifests = self.cache.scope_manifests(documents)
        lowered = self.retriever.lowered(documents)
        history = recent_turns(history, HISTORY_TOKENS, self.reader.count_tokens)
        memory_tokens = sum(m.tokens for m in manifests if m is not None)
        # A question about a name the documents never mention is not answered from
        # passages that cannot hold the answer: the 0.5B reader answered every such
        # question of bench qa anyway (docs/lab/answers-bench-qa.md). The documents
        # asked are the ones the passages come from: over a whole library some other
        # book names "WebP" or "Excel" in passing, and the reader then answered from
        # the gnuplot manual or An Introduction to R, which never do.
        read_from = sorted({s.entry for s in sources})
        missing = missing_names(question, [lowered[e] for e in read_from])
        if missing:
            checked = [documents[e].title for e in read_from] if len(read_from) < len(documents) else None
            yield Token(-1, not_mentioned(missing, checked))
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
            read = self._read_cached(question, sources, manifests, params.max_new_tokens, cancel, history)
        except Cancelled:
            yield AskStats(finish_reason="cancelled")
            return
        if read is None:
            tokens = self.reader.chat(grounded_messages(question, sources, history), params, cancel=cancel,
                                      stats=generation)
        else:
            prompt, dense, logits = read
            tokens = self.model.stream(prompt, params, cancel=cancel, stats=generation, cache=dense, logits=logits)
        context_seconds = time.perf_counter() - started
        answer = ""
        for token in tokens:
            answer += token.text
            yield token
        if generation.finish_reason == "repeat":
            mark = CUT_SHORT.lstrip() if answer[-1:].isspace() else CUT_SHORT
            answer += mark
            yield Token(-1, mark)
        if generation.finish_reason != "cancelled" and restates_question(without_citations(answer), question):
            # Nothing drawn from the passages: none is marked as cited. (An answer
            # stopped by the user is left as it was stopped.)
            note = f"\n\n{RESTATED}"
            answer += note
            yield Token(-1, note)
            cited = []
        else:
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

    def _read_cached(self, question, sources, manifests: list[Manifest | None], answer_tokens, cancel,
                     history: list[Turn]):
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
        place = getattr(self.cache.memory, "append_stored", None) if self.read_cached and own else None
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
        dense = self.model.model.new_cache(sum(map(len, encoded)) + stored + answer_tokens + 1)
        try:
            kv = [self.cache.stored_kv(*span, config.num_hidden_layers) for span in spans]
        except (CorruptCacheError, OSError, KeyError) as error:
            log.warning("reading passages from the cache failed (%s); prefilling them", error)
            return None
        logits = None
        for n, tokens in enumerate(encoded):
            if tokens:
                logits = prefill(self.model.model, tokens, dense, cancel=cancel)
            if n < len(kv):
                place(self.model.model, dense, kv[n])
        if logits is None or not encoded[-1]:
            return None
        return list(range(dense.length)), dense, logits
